"""The bytes of DATA the process holds at once, across all sessions: a budget with a limit.

Every session's DATA is kept in memory until the upstream has answered (passthrough), so
without a global bound enough concurrent large messages take all the memory there is. Each
chunk read is charged to the budget and given back once the message's reply is sent. When
the budget is spent, a new DATA gets `452 4.3.1` at once, and a DATA in progress is read to
its end (RFC 5321 §4.2.5: reply after the final dot) and then gets `452 4.3.1`: RFC 3463
§3.4 X.3.1 "mail system full", and 452 is RFC 5321's "insufficient system storage", the
temporary reply a client retries later. (`552 5.3.4` stays for one message over
`clients.max_message_size`, which no retry would change.)
"""

from __future__ import annotations

from prometheus_client import Gauge

DATA_IN_FLIGHT = Gauge(
    "relay_data_bytes_in_flight",
    "Bytes of DATA held in memory by all sessions (clients.max_bytes_in_flight bounds it).",
    multiprocess_mode="livesum",
)


class DataBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @property
    def spent(self) -> bool:
        return self.held >= self.limit

    def take(self, size: int) -> bool:
        """Charge `size` bytes; False (and nothing charged) when that would pass the limit."""
        if self.held + size > self.limit:
            return False
        self.held += size
        DATA_IN_FLIGHT.set(self.held)
        return True

    def give(self, size: int) -> None:
        self.held -= size
        DATA_IN_FLIGHT.set(self.held)
