"""Egress proxies: URL parsing (`url`), SOCKS (`socks`), HTTP CONNECT (`http_connect`), the
failure labels (`failures`) and the dialer that ties them together (`dialer`)."""

from relay.proxy.dialer import PROXY_CONNECT_SECONDS, PROXY_FAILURES, ProxyDialer, dialer_for
from relay.proxy.failures import FAILURE_LABELS
from relay.proxy.url import SCHEMES, ProxyUrl, parse_proxy_url

__all__ = [
    "FAILURE_LABELS",
    "PROXY_CONNECT_SECONDS",
    "PROXY_FAILURES",
    "SCHEMES",
    "ProxyDialer",
    "ProxyUrl",
    "dialer_for",
    "parse_proxy_url",
]
