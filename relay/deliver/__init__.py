"""Delivery: the signed message goes to an upstream (smarthost, MX hosts, or the dev outbox)."""
