"""Observability: structured logs, and the HTTP endpoint for metrics and health."""
