"""Operator commands: provision, status, verify, backfill, dlq, pause and resume."""
