"""What a failed dial through the proxy means for the client, and for the operator.

Failures are `SmtpError` 451 (every dial failure is temporary for the client) with a generic
client text, a log reason naming the hop that failed (never a password) and a fixed label:

    label                 enhanced  when
    proxy_unreachable     4.4.1     proxy host unresolvable, TCP connect to it refused/failed
    proxy_timeout         4.4.1     TCP connect to the proxy, or the handshake, timed out
    proxy_auth            4.4.0     proxy refused our credentials / wants some we lack
                                    (SOCKS5 auth failure or no acceptable method, HTTP 407
                                    or 401, SOCKS4 identd rejection 0x5C/0x5D)
    proxy_refused         4.4.1     proxy would not open the tunnel: HTTP non-2xx (403...),
                                    SOCKS5 reply 0x01-0x02, 0x07-0x08, SOCKS4 reply 0x5B
    upstream_unreachable  4.4.1     the proxy could not reach the upstream: SOCKS5 0x03-0x05,
                                    HTTP 502/503 (also: the upstream name does not resolve)
    upstream_timeout      4.4.1     the proxy timed out reaching it: SOCKS5 0x06, HTTP 504
    proxy_protocol        4.4.0     malformed/unexpected reply, proxy closed or reset mid-handshake
    upstream_unreachable  4.4.1     before the proxy is asked: no local address for the upstream
                                    (socks5://, socks4://), or a name that cannot be sent
    upstream_timeout      4.4.1     local resolution of the upstream name timed out

Why 4.4.0 and not 4.7.x for ``proxy_auth``: the credentials are the relay's own, for its own
egress route; the client's message and authorization are not at fault, and X.7.x (security or
policy status) would tell it otherwise. It is a routing failure the operator must fix, retried
meanwhile, like every dial failure (the `Dialer` contract is 451 4.4.x).
"""

from __future__ import annotations

from relay.errors import SmtpError

# label -> enhanced status code; every failure is a 451.
_ENHANCED = {
    "proxy_unreachable": "4.4.1",
    "proxy_timeout": "4.4.1",
    "proxy_auth": "4.4.0",
    "proxy_refused": "4.4.1",
    "proxy_protocol": "4.4.0",
    "upstream_unreachable": "4.4.1",
    "upstream_timeout": "4.4.1",
}
FAILURE_LABELS = tuple(_ENHANCED)
_CLIENT_TEXT = "Upstream not reachable, try again later"


def dial_error(label: str, reason: str) -> SmtpError:
    return SmtpError(451, _ENHANCED[label], _CLIENT_TEXT, reason=reason, label=label)


def printable(text: str, limit: int = 120) -> str:
    """Peer-supplied text made safe for one log line."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def os_text(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
