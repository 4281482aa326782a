"""Egress proxy URLs, parsed once: at config load, by the same parser the dialer uses.

    socks5://[user@]host[:port]    SOCKS5; the upstream name is resolved here (locally)
    socks5h://[user@]host[:port]   SOCKS5; the upstream name is sent to the proxy to resolve
    socks4://[userid@]host[:port]  SOCKS4; resolved locally (SOCKS4 carries IPv4 only)
    http://[user@]host:port        HTTP CONNECT (RFC 9110 §9.3.6), Basic proxy auth

A password may be in the URL (``user:pass@``, percent-encoded) or, as the real configuration
does, given separately (``upstream.proxy_password``, a resolved secret), which then wins over
the URL's. Ports: the SOCKS schemes default to 1080 (the IANA-registered SOCKS port); an
``http://`` URL must name its port, since HTTP proxies have no common one (3128 squid, 8888
tinyproxy, 8080...) and guessing would just fail later with a less clear error. SOCKS4 has no
passwords: a password with ``socks4://`` is a configuration error (``ValueError``), as is
anything else in the URL that could not work (unknown scheme, a path, a user name the
protocol cannot carry...). Error messages never repeat the URL: it may hold a secret.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote, urlsplit

SCHEMES = ("socks5", "socks5h", "socks4", "http")
_DEFAULT_PORTS = {"socks5": 1080, "socks5h": 1080, "socks4": 1080}


@dataclass(frozen=True, slots=True, repr=False)
class ProxyUrl:
    """One parsed proxy URL. Its repr and `describe()` never show the password."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    text: str = ""  # as written in the config, for the redacted config log

    @property
    def resolves_remotely(self) -> bool:
        """The proxy resolves the upstream's name (socks5h://, http:// CONNECT)."""
        return self.scheme in ("socks5h", "http")

    def describe(self) -> str:
        """The URL without its password, e.g. ``socks5://user@proxy.internal:1080``."""
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        return f"{self.scheme}://{user}{host_port(self.host, self.port)}"

    def __repr__(self) -> str:
        return f"ProxyUrl({self.describe()!r})"

    def with_password(self, password: str | None) -> ProxyUrl:
        """This proxy with `password` (a resolved secret) in place of the URL's, if given."""
        if password is None:
            return self
        check_credentials(self.scheme, self.username, password)
        return replace(self, password=password)


def parse_proxy_url(url: str, password: str | None = None, *, check: bool = True) -> ProxyUrl:
    """Split and check a proxy URL; `password` (if given) wins over the URL's.

    `check=False` leaves out the credential checks, for a password that comes separately
    later (`ProxyUrl.with_password`, or `check_credentials` at config load). Raises
    ValueError with a message that never repeats the URL.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("proxy URL is empty")
    text = url.strip()
    if "://" not in text:
        raise ValueError("proxy URL needs a scheme: socks5://, socks5h://, socks4:// or http://")
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ValueError("proxy URL is malformed") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        shown = repr(scheme) if re.fullmatch(r"[a-z0-9+.-]{1,16}", scheme) else "in the URL"
        extra = " (TLS to the proxy is not supported)" if scheme == "https" else ""
        raise ValueError(
            f"proxy URL scheme {shown} is not supported{extra}: use socks5://, socks5h://, socks4:// or http://"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{scheme} proxy URL must be only [user[:password]@]host:port")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise ValueError(f"{scheme} proxy URL has a malformed host or port") from None
    if not host:
        raise ValueError(f"{scheme} proxy URL has no host")
    if port is None:
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"{scheme} proxy URL needs an explicit port (HTTP proxies have no common one)")
        port = _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise ValueError(f"{scheme} proxy URL port must be 1-65535")

    username = unquote(parts.username) if parts.username else None
    url_password = unquote(parts.password) if parts.password is not None else None
    chosen = password if password is not None else url_password
    if check:
        check_credentials(scheme, username, chosen)
    return ProxyUrl(scheme, host, port, username, chosen, text)


def check_credentials(scheme: str, username: str | None, password: str | None) -> None:
    """Raise ValueError when the proxy's protocol cannot carry these credentials."""
    if scheme == "socks4":
        if password is not None:
            raise ValueError("socks4 proxies have no passwords (only a user id): drop the password or use socks5://")
    elif password is not None and username is None:
        raise ValueError(f"{scheme} proxy password given but the URL has no user name")
    if scheme in ("socks5", "socks5h") and username is not None:
        if not password:
            raise ValueError(f"{scheme} proxy user name given without a password")
        if len(username.encode()) > 255 or len(password.encode()) > 255:
            raise ValueError(f"{scheme} proxy user name and password must be 255 bytes at most")
    if scheme == "http" and username is not None and ":" in username:
        raise ValueError("http proxy user name cannot contain ':' (Basic authentication)")
    if username is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in username):
        raise ValueError(f"{scheme} proxy user name has control characters")


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
