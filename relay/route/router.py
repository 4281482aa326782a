"""Pick the delivery for a transaction: by sender domain (`routes`), else the default.

The default is the configured `upstream` (or, when `upstream` is a list, the failover
chain over all of them in order).
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.deliver.base import Delivery
from relay.policy.senders import SenderPolicy


class Router:
    def __init__(self, default: Delivery, routes: Sequence[tuple[str, Delivery]] = ()) -> None:
        self.default = default
        self._routes = [(SenderPolicy([pattern]), delivery) for pattern, delivery in routes]

    def route(self, mail_from: str, recipient: str) -> Delivery:
        domain = mail_from.rpartition("@")[2]
        if domain:
            for policy, delivery in self._routes:
                if policy.allows(mail_from) or policy.allows_domain(domain):
                    return delivery
        return self.default
