"""AWS Secrets Manager backend: `aws-sm://SECRET_ID[#json_field]`.

SECRET_ID is a secret name or full ARN. Without `#field` the whole secret (SecretString as
UTF-8, or SecretBinary) is the value; with `#field` the secret must be a JSON object and the
named member is the value (a JSON string becomes its UTF-8 bytes, any other JSON value its
compact JSON text). The version is the Secrets Manager VersionId.

Credentials are never handled here: aiobotocore's session resolves them through the standard
chain (environment, shared config/credentials files and SSO, IRSA web identity, ECS task role,
EC2 instance profile). The region is `region`, else `AWS_REGION`, else the SDK's own
resolution (`AWS_DEFAULT_REGION`, shared config), else the region of an ARN reference.

The client is created lazily on first use and reused; timeouts and retries are kept short so
that an unreachable endpoint fails within seconds (the relay's refresh loop retries anyway),
instead of the SDK default of minutes.

Error messages name the reference and the AWS error code or connection failure, never the
secret value and never credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from relay.secrets.base import SecretFetchError, SecretNotFoundError, SecretRef, SecretValue
from relay.secrets.http_dns import ConfiguredDnsResolver, HostAddresses

__all__ = ["AwsSecretsBackend"]


class AwsSecretsBackend:
    """Fetch (and, for `relay keygen --store`, store) secrets in AWS Secrets Manager."""

    scheme = "aws-sm"

    def __init__(
        self,
        region: str | None = None,
        endpoint_url: str | None = None,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 2,
        resolver: HostAddresses | None = None,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self._config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # total attempts including the first; "standard" mode backs off with jitter
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # dns.nameservers, when configured, for the endpoint's host name.
            connector_args={"resolver": ConfiguredDnsResolver(resolver)} if resolver is not None else None,
        )
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()

    # -- client ---------------------------------------------------------------------------

    def _region(self) -> str | None:
        return self.region or os.environ.get("AWS_REGION") or None

    async def _get_client(self, ref: SecretRef) -> Any:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is not None:
                return self._client
            session = get_session()
            region = self._region() or session.get_config_variable("region")
            if not region and ref.location.startswith("arn:"):
                parts = ref.location.split(":")
                region = parts[3] if len(parts) > 3 and parts[3] else None
            stack = contextlib.AsyncExitStack()
            try:
                client = await stack.enter_async_context(
                    session.create_client(
                        "secretsmanager",
                        region_name=region,
                        endpoint_url=self.endpoint_url,
                        config=self._config,
                    )
                )
            except NoRegionError as exc:
                await stack.aclose()
                raise SecretFetchError(f"{ref}: no AWS region configured (set region or AWS_REGION)") from exc
            except BotoCoreError as exc:
                await stack.aclose()
                raise SecretFetchError(f"{ref}: cannot create AWS client ({type(exc).__name__})") from exc
            self._stack, self._client = stack, client
            return client

    async def close(self) -> None:
        async with self._lock:
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- fetch ----------------------------------------------------------------------------

    async def fetch(self, ref: SecretRef) -> SecretValue:
        if ref.scheme != self.scheme:
            raise SecretFetchError(f"{ref}: not an {self.scheme}:// reference")
        response = await self._call(ref, "GetSecretValue", SecretId=ref.location)
        raw = _payload(response)
        if raw is None:
            raise SecretFetchError(f"{ref}: secret has neither SecretString nor SecretBinary")
        data = _select_field(ref, raw) if ref.field else raw
        return SecretValue(data, str(response.get("VersionId", "")))

    # -- store ----------------------------------------------------------------------------

    async def store(self, ref: SecretRef, data: bytes) -> str:
        """Write `data` as the new current version of `ref`; returns the VersionId.

        Creates the secret when it does not exist. With `#field`, the secret is a JSON
        object: read, set the field, write back (created as `{field: value}` if new).
        """
        if ref.scheme != self.scheme:
            raise SecretFetchError(f"{ref}: not an {self.scheme}:// reference")
        if ref.field:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise SecretFetchError(f"{ref}: a #field value must be UTF-8 text") from None
            try:
                current = await self._call(ref, "GetSecretValue", SecretId=ref.location)
            except _AwsError as exc:
                if exc.code != "ResourceNotFoundException":
                    raise
                return await self._create(ref, json.dumps({ref.field: text}).encode())
            raw = _payload(current)
            obj = _json_object(ref, raw) if raw is not None else {}
            obj[ref.field] = text
            payload = json.dumps(obj).encode()
            return await self._put(ref, payload)
        try:
            return await self._put(ref, data)
        except _AwsError as exc:
            if exc.code != "ResourceNotFoundException":
                raise
            return await self._create(ref, data)

    async def _put(self, ref: SecretRef, data: bytes) -> str:
        response = await self._call(ref, "PutSecretValue", SecretId=ref.location, **_value_kwargs(data))
        return str(response["VersionId"])

    async def _create(self, ref: SecretRef, data: bytes) -> str:
        try:
            response = await self._call(ref, "CreateSecret", Name=ref.location, **_value_kwargs(data))
        except _AwsError as exc:
            if exc.code != "ResourceExistsException":
                raise
            # created concurrently: write a new version instead
            return await self._put(ref, data)
        return str(response["VersionId"])

    async def delete(self, ref: SecretRef, *, recovery_window_days: int = 7) -> bool:
        """Schedule the secret for deletion, recoverable for `recovery_window_days` (AWS
        keeps it that long; `RestoreSecret` brings it back). False if it does not exist or
        is already scheduled."""
        if ref.scheme != self.scheme:
            raise SecretFetchError(f"{ref}: not an {self.scheme}:// reference")
        try:
            described = await self._call(ref, "DescribeSecret", SecretId=ref.location)
        except _AwsNotFound:
            return False
        if described.get("DeletedDate"):
            return False
        await self._call(ref, "DeleteSecret", SecretId=ref.location, RecoveryWindowInDays=recovery_window_days)
        return True

    # -- plumbing -------------------------------------------------------------------------

    async def _call(self, ref: SecretRef, operation: str, **params: Any) -> dict[str, Any]:
        client = await self._get_client(ref)
        method = getattr(client, _snake(operation))
        try:
            result: dict[str, Any] = await method(**params)
            return result
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code") or "UnknownError"
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            suffix = f", HTTP {status}" if status else ""
            error_type = _AwsNotFound if code == "ResourceNotFoundException" else _AwsError
            raise error_type(f"{ref}: {operation} failed: {code}{suffix}", code) from None
        except (EndpointConnectionError, ConnectTimeoutError) as exc:
            where = getattr(exc, "kwargs", {}).get("endpoint_url", "")
            raise SecretFetchError(
                f"{ref}: {operation} failed: endpoint unreachable"
                + (f" ({where})" if where else "")
                + f" [{type(exc).__name__}]"
            ) from None
        except ReadTimeoutError:
            raise SecretFetchError(f"{ref}: {operation} failed: read timeout") from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise SecretFetchError(
                f"{ref}: {operation} failed: no usable AWS credentials ({type(exc).__name__})"
            ) from None
        except BotoCoreError as exc:
            raise SecretFetchError(f"{ref}: {operation} failed: {type(exc).__name__}") from None
        except (OSError, aiohttp.ClientError) as exc:  # TimeoutError is an OSError
            raise SecretFetchError(f"{ref}: {operation} failed: {type(exc).__name__}") from None


class _AwsError(SecretFetchError):
    """An AWS service error; `code` is the AWS error code (ResourceNotFoundException...)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class _AwsNotFound(_AwsError, SecretNotFoundError):
    """ResourceNotFoundException: the secret does not exist."""


def _snake(operation: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in operation).lstrip("_")


def _payload(response: dict[str, Any]) -> bytes | None:
    if response.get("SecretString") is not None:
        return str(response["SecretString"]).encode("utf-8")
    if response.get("SecretBinary") is not None:
        return bytes(response["SecretBinary"])
    return None


def _value_kwargs(data: bytes) -> dict[str, Any]:
    try:
        return {"SecretString": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"SecretBinary": data}


def _json_object(ref: SecretRef, raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        # never include the content: it may be the secret itself
        raise SecretFetchError(f"{ref}: secret is not JSON, cannot select field {ref.field!r}") from None
    if not isinstance(obj, dict):
        raise SecretFetchError(f"{ref}: secret is not a JSON object, cannot select field {ref.field!r}")
    return obj


def _select_field(ref: SecretRef, raw: bytes) -> bytes:
    obj = _json_object(ref, raw)
    if ref.field not in obj:
        raise SecretFetchError(f"{ref}: secret has no field {ref.field!r}")
    value = obj[ref.field]
    if isinstance(value, str):
        return value.encode("utf-8")
    if value is None:
        raise SecretFetchError(f"{ref}: field {ref.field!r} is null")
    return json.dumps(value, separators=(",", ":")).encode("utf-8")
