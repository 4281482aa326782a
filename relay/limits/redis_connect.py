"""How the Redis client connects: the password read at each new connection (so a rotated
secret needs no restart), and the host name resolved through relay's resolver
(`dns.nameservers`) like every other name relay connects to, not the system's.

redis-py connects with `asyncio.open_connection(**self._connection_arguments())`; the
connection classes here resolve the host first and pass an address instead, keeping the
name for TLS (SNI and the certificate check). `_connect` and `_connection_arguments` are
redis-py's own members (tests/test_limits_redis_connect.py checks that they are there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from redis.asyncio.connection import Connection
from redis.credentials import CredentialProvider

from relay.errors import SmtpError


class HostAddresses(Protocol):
    async def addresses(self, host: str) -> list[str]: ...


class Credentials(CredentialProvider):
    """The ACL user (from the URL) and the current password, asked at each new connection."""

    def __init__(self, username: str | None, password: Callable[[], str | None]) -> None:
        self._username = username
        self._password = password

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._password() or ""
        return (self._username, password) if self._username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


class _Resolving:
    """Mixed into redis-py's Connection or SSLConnection."""

    relay_resolver: HostAddresses
    host: str
    _relay_address: str | None = None

    async def _connect(self) -> None:
        try:
            addresses = await self.relay_resolver.addresses(self.host)
        except SmtpError as exc:
            # redis-py reports an OSError from _connect as a ConnectionError.
            raise OSError(f"cannot resolve {self.host}: {exc.reason}") from None
        failure: BaseException | None = None
        for address in addresses:
            self._relay_address = address
            try:
                await super()._connect()  # type: ignore[misc]
                return
            except (OSError, TimeoutError) as exc:
                failure = exc  # the next address, as a resolver's list is meant
            finally:
                self._relay_address = None
        assert failure is not None
        raise failure

    def _connection_arguments(self) -> Mapping[str, Any]:
        arguments = dict(super()._connection_arguments())  # type: ignore[misc]
        if self._relay_address is not None:
            if arguments.get("ssl") is not None:
                arguments["server_hostname"] = self.host  # TLS checks the name, not the address
            arguments["host"] = self._relay_address
        return arguments


def resolving(base: type[Connection] | None, resolver: HostAddresses) -> type[Connection]:
    """`base` (redis-py's Connection for redis://, SSLConnection for rediss://) with its host
    name resolved by `resolver`."""
    base = base or Connection
    return type(f"Resolving{base.__name__}", (_Resolving, base), {"relay_resolver": resolver})
