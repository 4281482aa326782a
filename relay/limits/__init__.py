"""Sending limits: per-user and per-From-domain rates and daily quotas.

- `rules`: what is limited (rates, the rolling 24 hours) and each entity's effective limits.
- `counters`: the contract of a counter backend, and the counting shared by all of them.
- `local`: counters in an LMDB file in the data dir, shared by every worker on the host.
- `redis_counters`: counters in Redis, shared by every replica; fail-open to `local`.
- `limiter`: the stage the message path calls (check at RCPT, reserve at DATA).
- `usage`: `relay_limit_usage_ratio`, read from the counters at scrape time.
"""
