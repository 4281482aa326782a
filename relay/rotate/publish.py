"""Publishing and removing DKIM TXT records: in Route 53, or by a human told what to do.

    publisher = publisher_for("route53:Z0123456789ABC", rotation_settings, say=print)
    await publisher.upsert("s20261115._domainkey.example.com", "v=DKIM1; k=rsa; p=...", ttl)
    await publisher.remove("s20260301._domainkey.example.com", "v=DKIM1; k=rsa; p=...")

A DKIM record longer than 255 bytes is one TXT record of several character-strings
(RFC 1035 §3.3.14); verifiers join them (RFC 6376 §3.6.2.2). `remove` deletes only the
value rotation published: another value at the same name (someone else's record) stays,
and says so.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any, Protocol

from relay.config.schema import DkimRotationSettings
from relay.keygen import txt_strings, zone_line

Say = Callable[[str], None]


class PublishError(Exception):
    """The record could not be published or removed; the message is safe to show."""


class RecordPublisher(Protocol):
    """Where a domain's DKIM records live. `target` is `print` or `route53:ZONE_ID`.

    `upsert` makes `value` the one TXT record at `name` (idempotent). `remove` takes
    `value` away from `name` and returns a sentence saying what happened; a record that
    is already gone is not an error. Both raise `PublishError`."""

    target: str

    async def upsert(self, name: str, value: str, ttl: int) -> None: ...

    async def remove(self, name: str, value: str) -> str: ...

    async def close(self) -> None: ...


def quoted_strings(value: str) -> str:
    """The TXT value as Route 53 (and zone files) take it: `"..." "..."`, each string at
    most 255 bytes, with `"` and `\\` escaped."""
    strings = txt_strings(value)
    return " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in strings)


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def joined_strings(record: str) -> str:
    """Inverse of `quoted_strings`: the character-strings of one record, joined."""
    return "".join(re.sub(r"\\(.)", r"\1", s) for s in _QUOTED.findall(record))


class PrintPublisher:
    """No DNS API: print the record and what to do; rotation then waits for DNS to serve it."""

    target = "print"

    def __init__(self, say: Say) -> None:
        self._say = say

    async def upsert(self, name: str, value: str, ttl: int) -> None:
        domain, selector = _split(name)
        self._say(f"publish this TXT record at {name} (the quoted strings form one record):")
        self._say("  " + zone_line(domain, selector, value, ttl))
        self._say(f"  value: {value}")

    async def remove(self, name: str, value: str) -> str:
        return f"remove the TXT record at {name} from your DNS zone (relay no longer signs with it)"

    async def close(self) -> None:
        return None


class Route53Publisher:
    """One hosted zone, through aiobotocore (credentials from the standard AWS chain)."""

    def __init__(self, zone_id: str, *, region: str | None = None, endpoint_url: str | None = None) -> None:
        self.zone_id = zone_id
        self.target = f"route53:{zone_id}"
        self._region = region
        self._endpoint_url = endpoint_url
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def _get_client(self) -> Any:
        if self._client is None:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session

            stack = contextlib.AsyncExitStack()
            config = AioConfig(connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"})
            # Route 53 is a global service; its API lives in us-east-1.
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "route53", region_name=self._region or "us-east-1", endpoint_url=self._endpoint_url, config=config
                )
            )
            self._stack = stack
        return self._client

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client = await self._get_client()
            reply: dict[str, Any] = await getattr(client, operation)(**params)
            return reply
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code") or "UnknownError"
            # Route 53's messages name records and zones, never credentials.
            message = str(error.get("Message") or "")[:300]
            raise PublishError(f"Route 53 {operation} in zone {self.zone_id}: {code}: {message}") from None
        except (BotoCoreError, OSError) as exc:
            raise PublishError(f"Route 53 {operation} in zone {self.zone_id}: {type(exc).__name__}") from None

    async def _change(self, action: str, name: str, ttl: int, values: list[str]) -> None:
        await self._call(
            "change_resource_record_sets",
            HostedZoneId=self.zone_id,
            ChangeBatch={
                "Comment": f"relay dkim rotate: {action} {name}",
                "Changes": [
                    {
                        "Action": action,
                        "ResourceRecordSet": {
                            "Name": _fqdn(name),
                            "Type": "TXT",
                            "TTL": ttl,
                            "ResourceRecords": [{"Value": v} for v in values],
                        },
                    }
                ],
            },
        )

    async def _current(self, name: str) -> tuple[int, list[str]] | None:
        """(TTL, quoted values) of the TXT record set at `name`, or None."""
        reply = await self._call(
            "list_resource_record_sets",
            HostedZoneId=self.zone_id,
            StartRecordName=_fqdn(name),
            StartRecordType="TXT",
            MaxItems="1",
        )
        for rrset in reply.get("ResourceRecordSets", []):
            if rrset.get("Type") == "TXT" and _fqdn(rrset.get("Name", "")).lower() == _fqdn(name).lower():
                return int(rrset.get("TTL", 300)), [r["Value"] for r in rrset.get("ResourceRecords", [])]
        return None

    async def upsert(self, name: str, value: str, ttl: int) -> None:
        # UPSERT replaces the whole record set: one record, as a selector must have
        # (several TXT records at a selector make verification a lottery, §3.6.2.2).
        await self._change("UPSERT", name, ttl, [quoted_strings(value)])

    async def remove(self, name: str, value: str) -> str:
        current = await self._current(name)
        if current is None:
            return f"no TXT record at {name} in Route 53 zone {self.zone_id} (already removed)"
        ttl, values = current
        keep = [v for v in values if joined_strings(v) != value]
        if len(keep) == len(values):
            return (
                f"kept the TXT record at {name} in Route 53 zone {self.zone_id}: it no longer "
                f"holds the value rotation published (changed by someone else)"
            )
        if keep:
            await self._change("UPSERT", name, ttl, keep)
        else:
            await self._change("DELETE", name, ttl, values)
        return f"removed the TXT record at {name} from Route 53 zone {self.zone_id}"


def publisher_for(target: str, settings: DkimRotationSettings, say: Say) -> RecordPublisher:
    if target == "print":
        return PrintPublisher(say)
    if target.startswith("route53:") and target != "route53:":
        return Route53Publisher(
            target.removeprefix("route53:"), region=settings.route53.region, endpoint_url=settings.route53.endpoint_url
        )
    raise PublishError(f"unknown publish target {target!r}: expected print or route53:ZONE_ID")


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _split(name: str) -> tuple[str, str]:
    selector, _, domain = name.partition("._domainkey.")
    return domain, selector
