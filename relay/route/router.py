"""Pick the upstream target for a transaction: by sender domain (`routes`), else the default.

The default is the configured `upstream` (or, when `upstream` is a list, the failover
chain over all of them in order).
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.deliver.base import UpstreamTarget
from relay.policy.senders import SenderPolicy


class Router:
    def __init__(self, default: UpstreamTarget, routes: Sequence[tuple[str, UpstreamTarget]] = ()) -> None:
        self.default = default
        self._routes = [(SenderPolicy([pattern]), delivery) for pattern, delivery in routes]

    def target_for(self, mail_from: str) -> UpstreamTarget:
        """The target for a transaction with envelope sender `mail_from` (routes match the
        sender's domain only, so every recipient of a transaction goes the same way)."""
        domain = mail_from.rpartition("@")[2]
        if domain:
            for policy, delivery in self._routes:
                if policy.allows(mail_from) or policy.allows_domain(domain):
                    return delivery
        return self.default
