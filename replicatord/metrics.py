"""Prometheus metrics (docs/design.md §6) behind one object with an injectable registry.

Labels have bounded cardinality: pair, pipeline, peer, reason, kind, type, service,
operation. Never shard ids or item keys.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_* (start time, memory, fds) and python_info, for restart and resource alerts.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.up = Gauge("replicatord_up", "1 while the daemon runs", registry=r)
        self.records_read = Counter(
            "replicatord_records_read_total", "Stream records read", ["pair", "pipeline"], registry=r
        )
        self.records_forwarded = Counter(
            "replicatord_records_forwarded_total",
            "Local changes put on a peer's Kinesis stream",
            ["pair", "peer"],
            registry=r,
        )
        self.records_skipped = Counter(
            "replicatord_records_skipped_total",
            "Stream records the forwarder did not forward, by reason",
            ["pair", "reason"],
            registry=r,
        )
        self.records_applied = Counter(
            "replicatord_records_applied_total",
            "Replicated changes written to the local table",
            ["pair", "op"],
            registry=r,
        )
        self.records_stale = Counter(
            "replicatord_records_stale_total",
            "Replicated changes not applied: the local item holds an equal or newer version",
            ["pair"],
            registry=r,
        )
        self.conflicts = Counter(
            "replicatord_conflicts_total", "Conflicts repaired, by kind", ["kind"], registry=r
        )
        self.unversioned = Counter(
            "replicatord_unversioned_total",
            "Local changes without the version attributes, by what conflict.missing_version did",
            ["pair", "action"],
            registry=r,
        )
        self.ttl_deletes = Counter(
            "replicatord_ttl_deletes_total",
            "Deletes made by DynamoDB's TTL here, by what conflict.ttl_deletes did (replicated, skipped)",
            ["pair", "action"],
            registry=r,
        )
        self.errors = Counter(
            "replicatord_errors_total", "Errors, by pipeline and type", ["pipeline", "type"], registry=r
        )
        self.iterator_age = Gauge(
            "replicatord_iterator_age_seconds",
            "Age of the newest record read, max over this instance's shards",
            ["pair", "pipeline"],
            registry=r,
        )
        self.latency = Histogram(
            "replicatord_replication_latency_seconds",
            "Source change (stream ApproximateCreationDateTime) to applied in this region",
            ["pair"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.leases_held = Gauge(
            "replicatord_leases_held", "Shard leases held", ["pair", "pipeline"], registry=r
        )
        self.lease_takeovers = Counter(
            "replicatord_lease_takeovers_total",
            "Expired leases taken over from another instance (failover)",
            ["pipeline"],
            registry=r,
        )
        self.lease_steals = Counter(
            "replicatord_lease_steals_total", "Leases stolen to balance the load", ["pipeline"], registry=r
        )
        self.leases_lost = Counter(
            "replicatord_leases_lost_total",
            "Leases this instance lost to another (fenced: it stopped that shard)",
            ["pipeline"],
            registry=r,
        )
        self.trimmed = Counter(
            "replicatord_checkpoint_trimmed_total",
            "Checkpoints found older than the stream's retention: records lost to trimming, run verify/backfill",
            ["pair", "pipeline"],
            registry=r,
        )
        self.dlq_sent = Counter(
            "replicatord_dlq_sent_total", "Records sent to the dead-letter queue", ["pair", "reason"], registry=r
        )
        self.aws_request = Histogram(
            "replicatord_aws_request_duration_seconds",
            "AWS API call durations",
            ["service", "operation"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.peer_credentials_refreshed = Counter(
            "replicatord_peer_credentials_refreshed_total",
            "New peer key pairs taken from SSM after the peer refused the old one",
            ["peer"],
            registry=r,
        )
        self.peer_reachable = Gauge(
            "replicatord_peer_reachable", "1 if the last call to the peer succeeded", ["peer"], registry=r
        )
        self.oldest_unprocessed = Gauge(
            "replicatord_oldest_unprocessed_age_seconds",
            "Age of the oldest record not yet handled, max over this instance's shards (0: caught up); "
            "an upper bound while a shard is paused, stalled or between pages",
            ["pair", "pipeline"],
            registry=r,
        )
        self.time_to_data_loss = Gauge(
            "replicatord_time_to_data_loss_seconds",
            "How long until the oldest record not yet handled leaves the stream's retention (a lower bound)",
            ["pair", "pipeline"],
            registry=r,
        )
        self.peer_mode = Gauge(
            "replicatord_peer_mode",
            "Where a pair's records for a peer go (outbox.py): 0 direct, 1 diverted to the outbox, "
            "2 draining (direct, while the outbox is emptied)",
            ["pair", "peer"], registry=r,
        )
        self.outbox_records = Counter(
            "replicatord_outbox_records_total",
            "Records put in a peer's outbox (event=diverted) and shipped from it to the peer (event=shipped)",
            ["pair", "peer", "event"], registry=r,
        )
        self.outbox_depth = Gauge(
            "replicatord_outbox_depth",
            "Records put in a peer's outbox and not yet shipped, as counted in the stats table (best effort)",
            ["pair", "peer"], registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "replicatord_outbox_oldest_age_seconds",
            "Age of the oldest record in a peer's outbox not yet shipped (0: drained)",
            ["pair", "peer"], registry=r,
        )
        self.outbox_time_to_data_loss = Gauge(
            "replicatord_outbox_time_to_data_loss_seconds",
            "How long until the oldest unshipped record leaves the outbox's retention",
            ["pair", "peer"], registry=r,
        )
        self.paused = Gauge(
            "replicatord_paused", "1 while forwarding in this direction is paused (replicatord pause)",
            ["pair", "direction"], registry=r,
        )
        self.stream_problem = Gauge(
            "replicatord_stream_problem",
            "1 while the pair's table in this region has no stream the forwarder can use (disabled, or a view "
            "type other than NEW_AND_OLD_IMAGES): its changes are not replicated",
            ["pair"], registry=r,
        )
        self.records_refused = Counter(
            "replicatord_records_refused_total",
            "Kinesis records the applier refused and dead-lettered: not a record (bad_record), or not one a "
            "peer could have sent (forged_origin, version_mismatch, key_schema, forged_marker, future_version, "
            "bad_created)",
            ["pair", "reason"], registry=r,
        )
        self.probes = Counter(
            "replicatord_preflight_probes_total",
            "Probe records of 'replicatord preflight' read by the applier (they change nothing)",
            ["pair"], registry=r,
        )
        self.page_bytes_held = Gauge(
            "replicatord_page_bytes_held",
            "Bytes of stream pages read and not yet handled, every shard together (pages read ahead are "
            "held within tuning.read_ahead_budget_mib)", registry=r,
        )
        self.clock_skew = Gauge(
            "replicatord_clock_skew_seconds",
            "The region's clock minus this host's, from the Date header of its answers (sampled; whole "
            "seconds); AWS refuses requests signed 15 minutes off",
            ["region"], registry=r,
        )
        self.dead_letters = Gauge(
            "replicatord_dead_letters", "Messages in this region's dead-letter queue (SQS's approximate count)",
            registry=r,
        )
        # Iterator age is a max over shards; the shard-level values stay here, not in labels.
        self._ages: dict[tuple[str, str], dict[str, float]] = {}
        # When the oldest record a shard may still have to handle entered its stream (None: caught up).
        self._pending: dict[tuple[str, str], dict[str, float | None]] = {}

    def lost_to_retention(self, pair: str, pipeline: str) -> None:
        """Count records lost to a stream's retention (the caller logs the shard and the range)."""
        self.trimmed.labels(pair, pipeline).inc()
        self.errors.labels(pipeline, "trimmed_data").inc()

    def set_pending(self, pair: str, pipeline: str, shard: str, since: float | None) -> None:
        self._pending.setdefault((pair, pipeline), {})[shard] = since

    def refresh_pending(self, pair: str, pipeline: str, retention_s: float, now: float) -> None:
        """Set the oldest-unprocessed age and the time to data loss from the shards' state now."""
        since = [s for s in self._pending.get((pair, pipeline), {}).values() if s is not None]
        age = max((now - s for s in since), default=0.0)
        self.oldest_unprocessed.labels(pair, pipeline).set(max(age, 0.0))
        self.time_to_data_loss.labels(pair, pipeline).set(max(retention_s - age, 0.0))

    def set_iterator_age(self, pair: str, pipeline: str, shard: str, age_s: float) -> None:
        ages = self._ages.setdefault((pair, pipeline), {})
        ages[shard] = max(age_s, 0.0)
        self.iterator_age.labels(pair, pipeline).set(max(ages.values()))

    def forget_shard(self, pair: str, pipeline: str, shard: str) -> None:
        self._pending.get((pair, pipeline), {}).pop(shard, None)
        ages = self._ages.get((pair, pipeline), {})
        ages.pop(shard, None)
        self.iterator_age.labels(pair, pipeline).set(max(ages.values(), default=0.0))
