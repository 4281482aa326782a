"""The public IP address the relay's mail leaves from: the address receivers check SPF against.

`spf.egress_ip` decides:
- an address or a list (the NAT gateway's or the egress proxy's public addresses): used as
  is, source "config";
- `auto`: (1) the address the upstream says it sees, as an address literal in its greeting
  or EHLO reply (RFC 5321 §4.1.3, e.g. "mx.google.com at your service, [203.0.113.9]"),
  from `UpstreamTarget.probe()`, source "upstream"; else (2) `spf.ip_echo_url`, an http:// or
  https:// URL whose body is the caller's address, fetched through the same dialer (egress
  proxy) as the mail, source "ip_echo_url". There is no default URL: nothing phones home
  unless configured.

Only public unicast addresses count: a lab upstream on a private network reports a private
address, which says nothing about where mail to the internet leaves from. The filter is the
`accept` parameter, so tests on loopback can widen it (`accept_also("127.0.0.0/8")`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from relay import __version__
from relay.config.schema import SpfSettings
from relay.deliver.dial import Dialer
from relay.errors import SmtpError

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Accept = Callable[[IpAddress], bool]

ECHO_TIMEOUT = 15.0
_MAX_HEAD = 16 * 1024  # status line + headers
_MAX_BODY = 4096  # an address, some whitespace; anything longer is not an echo service
# RFC 5321 §4.1.3 address literals: [192.0.2.1], [IPv6:2001:db8::1]
_LITERAL = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")


def is_public_unicast(ip: IpAddress) -> bool:
    """Globally routable and not multicast: excludes private, loopback, link-local, CGNAT,
    documentation and reserved ranges (Python's `is_global`, from the IANA registries)."""
    return ip.is_global and not ip.is_multicast


def accept_also(*networks: str) -> Accept:
    """Public unicast addresses, plus the given networks (for tests on loopback)."""
    nets = [ipaddress.ip_network(n) for n in networks]

    def accept(ip: IpAddress) -> bool:
        return is_public_unicast(ip) or any(ip.version == n.version and ip in n for n in nets)

    return accept


@dataclass(frozen=True)
class Egress:
    ips: tuple[str, ...]
    source: str | None  # "config" | "upstream" | "ip_echo_url" | None (none found)
    problem: str | None = None  # why no source gave an address


class EchoError(Exception):
    """The IP echo URL gave no address; the message is safe to log (no credentials)."""


def addresses_in_banner(text: str, accept: Accept = is_public_unicast) -> list[str]:
    """The accepted address literals in an upstream's greeting/EHLO text, in order, unique."""
    found: list[str] = []
    for match in _LITERAL.finditer(text or ""):
        try:
            ip = ipaddress.ip_address(match.group(1))
        except ValueError:
            continue
        if accept(ip) and str(ip) not in found:
            found.append(str(ip))
    return found


async def discover_egress(
    spf: SpfSettings,
    *,
    probe: Callable[[], Awaitable[str]] | None,
    dialer: Dialer | None,
    accept: Accept = is_public_unicast,
    timeout: float = ECHO_TIMEOUT,
    tls_context: ssl.SSLContext | None = None,
) -> Egress:
    """Find the egress address(es) as `spf.egress_ip` says (see the module docstring).

    `probe` is the default upstream's `UpstreamTarget.probe` (it may be a cached one); `dialer` is
    the same dialer the mail uses, for `spf.ip_echo_url`. Never raises for a failed source:
    the reasons end up in `Egress.problem`.
    """
    if spf.egress_ip != "auto":
        ips: Sequence[str] = [spf.egress_ip] if isinstance(spf.egress_ip, str) else spf.egress_ip
        return Egress(tuple(ips), "config")
    tried: list[str] = []
    if probe is not None:
        try:
            banner = await probe()
        except SmtpError as exc:
            tried.append(f"upstream probe failed ({exc.reason})")
        except Exception as exc:  # a failing source must not stop the others
            tried.append(f"upstream probe failed ({type(exc).__name__})")
        else:
            ips = addresses_in_banner(banner, accept)
            if ips:
                return Egress(tuple(ips), "upstream")
            tried.append("the upstream's greeting and EHLO reply name no public address")
    if spf.ip_echo_url and dialer is not None:
        try:
            ip = await fetch_echo_ip(spf.ip_echo_url, dialer, timeout=timeout, tls_context=tls_context)
        except EchoError as exc:
            tried.append(f"spf.ip_echo_url: {exc}")
        else:
            if accept(ipaddress.ip_address(ip)):
                return Egress((ip,), "ip_echo_url")
            tried.append(f"spf.ip_echo_url answered {ip}, not a public address")
    else:
        tried.append("no spf.ip_echo_url configured")
    problem = "; ".join(tried) + "; set spf.egress_ip to the public address(es) mail leaves from"
    return Egress((), None, problem)


# -- the IP echo URL: HTTP/1.1 GET over the dialer's socket ---------------------------------


async def fetch_echo_ip(
    url: str,
    dialer: Dialer,
    *,
    timeout: float = ECHO_TIMEOUT,
    tls_context: ssl.SSLContext | None = None,
) -> str:
    """GET `url` through `dialer` and return the address its body holds. Raises EchoError.

    The request goes through the egress proxy like the mail does, so the echo service sees
    the same public address the upstream sees. https:// runs TLS end to end with the echo
    host (SNI and certificate checks for its name, not the proxy's).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EchoError("must be an http:// or https:// URL")
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise EchoError("invalid port") from None
    where = f"{parts.scheme}://{host}:{port}"  # never the user-info part of the URL
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default_port = port == (443 if parts.scheme == "https" else 80)
    host_header = f"[{host}]" if ":" in host else host
    if not default_port:
        host_header += f":{port}"
    try:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: relay/{__version__}\r\n"
            "Accept: text/plain\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
    except UnicodeEncodeError:
        raise EchoError("the URL must be ASCII (percent-encode the path)") from None
    try:
        async with asyncio.timeout(timeout):
            sock = await dialer.connect(host, port)
            ssl_args: dict[str, Any] = {}
            if parts.scheme == "https":
                ssl_args = {"ssl": tls_context or ssl.create_default_context(), "server_hostname": host}
            try:
                reader, writer = await asyncio.open_connection(sock=sock, limit=_MAX_HEAD, **ssl_args)
            except BaseException:
                sock.close()
                raise
            try:
                writer.write(request)
                await writer.drain()
                body = await _read_response(reader)
            finally:
                writer.close()
    except EchoError as exc:
        raise EchoError(f"{where}: {exc}") from None
    except SmtpError as exc:
        raise EchoError(f"{where}: {exc.reason}") from None
    except TimeoutError:
        raise EchoError(f"{where}: no answer within {timeout:g}s") from None
    except (ssl.SSLError, ssl.CertificateError) as exc:
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise EchoError(f"{where}: TLS failed ({reason})") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise EchoError(f"{where}: {type(exc).__name__}: {str(exc)[:120]}") from None
    text = body.decode("ascii", errors="replace").strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise EchoError(f"{where}: the body is not an IP address ({text[:60]!r})") from None


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    status = (await reader.readline()).decode("latin-1").strip()
    fields = status.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        raise EchoError(f"not an HTTP/1.x response ({status[:60]!r})")
    if fields[1] != "200":
        raise EchoError(f"HTTP {' '.join(fields[1:])}"[:120])
    headers: dict[str, str] = {}
    size = 0
    while True:
        line = await reader.readline()
        size += len(line)
        if size > _MAX_HEAD:
            raise EchoError("response headers too long")
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length > _MAX_BODY:
            raise EchoError(f"body of {length} bytes is too long for an address")
        return await reader.readexactly(length)
    body = await reader.read(_MAX_BODY + 1)
    if len(body) > _MAX_BODY:
        raise EchoError("body too long for an address")
    return body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    # RFC 9112 §7.1
    body = b""
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
        if size == 0:
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)
        if len(body) > _MAX_BODY:
            raise EchoError("body too long for an address")
