"""replicatord: active-active DynamoDB replication between AWS partitions."""

__version__ = "0.1.0"
