"""AWS Secrets Manager backend against moto in server mode (a real process on loopback).

No AWS endpoint is ever contacted: the backend and the boto3 setup client both point at
`http://127.0.0.1:PORT`, credentials are dummy values from the environment (so the credential
chain stops there and never probes instance metadata), and shared config files are disabled.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import boto3
import pytest

from relay.secrets.aws import AwsSecretsBackend
from relay.secrets.base import SecretFetchError, SecretRef
from tests.support.aws import AWS_ENV as _AWS_ENV
from tests.support.aws import moto_server, stop
from tests.support.procs import dead_port

pytestmark = pytest.mark.binaries

REGION = "us-east-1"
PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIHs3cr3tK3yMat3r1alDoNotLogMe0123456789abcd\n"
    "-----END PRIVATE KEY-----\n"
)
SECRET_MARKERS = ("s3cr3t", "Mat3r1al", "BEGIN PRIVATE KEY", "hunter2")


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with moto_server(log) as (url, _proc):
        yield url


@pytest.fixture(autouse=True)
def aws_env(monkeypatch) -> None:
    for name in (
        "AWS_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in _AWS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def sm(endpoint):
    return boto3.client(
        "secretsmanager",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
async def backend(endpoint):
    b = AwsSecretsBackend(region=REGION, endpoint_url=endpoint)
    yield b
    await b.close()


def unique(prefix: str) -> str:
    return f"relay-test/{prefix}-{uuid.uuid4().hex[:8]}"


def assert_no_secret(message: str) -> None:
    for marker in SECRET_MARKERS:
        assert marker not in message, f"secret material leaked into error: {message!r}"
    assert "testing" not in message  # the dummy credentials


# -- fetch -------------------------------------------------------------------------------------


async def test_plain_secret_string(sm, backend):
    name = unique("plain")
    created = sm.create_secret(Name=name, SecretString=PEM)
    value = await backend.fetch(SecretRef.parse(f"aws-sm://{name}"))
    assert value.data == PEM.encode()
    assert value.version == created["VersionId"]
    assert "redacted" in repr(value) and "PRIVATE" not in repr(value)


async def test_json_field(sm, backend):
    import json

    name = unique("json")
    created = sm.create_secret(Name=name, SecretString=json.dumps({"private_key": PEM, "other": "hunter2", "n": 5}))
    value = await backend.fetch(SecretRef.parse(f"aws-sm://{name}#private_key"))
    assert value.data == PEM.encode()
    assert value.version == created["VersionId"]
    number = await backend.fetch(SecretRef.parse(f"aws-sm://{name}#n"))
    assert number.data == b"5"


async def test_secret_binary(sm, backend):
    name = unique("bin")
    blob = b"\x00\x01s3cr3t\xff\xfe binary"
    created = sm.create_secret(Name=name, SecretBinary=blob)
    value = await backend.fetch(SecretRef.parse(f"aws-sm://{name}"))
    assert value.data == blob
    assert value.version == created["VersionId"]


async def test_fetch_by_arn(sm, backend):
    name = unique("arn")
    created = sm.create_secret(Name=name, SecretString="s3cr3t-by-arn")
    value = await backend.fetch(SecretRef.parse(f"aws-sm://{created['ARN']}"))
    assert value.data == b"s3cr3t-by-arn"


async def test_missing_secret(backend):
    ref = SecretRef.parse("aws-sm://relay-test/does-not-exist")
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(ref)
    message = str(info.value)
    assert "aws-sm://relay-test/does-not-exist" in message
    assert "ResourceNotFoundException" in message
    assert_no_secret(message)


async def test_missing_field_and_not_json(sm, backend):
    import json

    name = unique("fields")
    sm.create_secret(Name=name, SecretString=json.dumps({"private_key": PEM}))
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(SecretRef.parse(f"aws-sm://{name}#nope"))
    message = str(info.value)
    assert name in message and "'nope'" in message
    assert_no_secret(message)

    raw = unique("raw")
    sm.create_secret(Name=raw, SecretString=PEM)
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(SecretRef.parse(f"aws-sm://{raw}#private_key"))
    message = str(info.value)
    assert raw in message and "not JSON" in message and "private_key" in message
    assert_no_secret(message)

    arr = unique("array")
    sm.create_secret(Name=arr, SecretString='["s3cr3t"]')
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(SecretRef.parse(f"aws-sm://{arr}#k"))
    assert "not a JSON object" in str(info.value)
    assert_no_secret(str(info.value))


async def test_client_is_reused(sm, backend):
    name = unique("reuse")
    sm.create_secret(Name=name, SecretString="s3cr3t")
    ref = SecretRef.parse(f"aws-sm://{name}")
    await backend.fetch(ref)
    client = backend._client
    await backend.fetch(ref)
    assert backend._client is client


# -- store -------------------------------------------------------------------------------------


async def test_store_creates_then_puts_new_version(sm, backend):
    name = unique("store")
    ref = SecretRef.parse(f"aws-sm://{name}")
    v1 = await backend.store(ref, PEM.encode())
    assert sm.get_secret_value(SecretId=name)["SecretString"] == PEM  # stored as SecretString
    first = await backend.fetch(ref)
    assert first.data == PEM.encode() and first.version == v1

    new = PEM.replace("Mat3r1al", "R0tat3d0")
    v2 = await backend.store(ref, new.encode())
    assert v2 != v1
    second = await backend.fetch(ref)
    assert second.data == new.encode() and second.version == v2


async def test_store_binary(sm, backend):
    name = unique("store-bin")
    ref = SecretRef.parse(f"aws-sm://{name}")
    await backend.store(ref, b"\xff\x00s3cr3t")
    assert sm.get_secret_value(SecretId=name)["SecretBinary"] == b"\xff\x00s3cr3t"
    assert (await backend.fetch(ref)).data == b"\xff\x00s3cr3t"


async def test_store_field_read_modify_write(sm, backend):
    import json

    name = unique("store-field")
    key_ref = SecretRef.parse(f"aws-sm://{name}#private_key")
    v1 = await backend.store(key_ref, PEM.encode())
    assert json.loads(sm.get_secret_value(SecretId=name)["SecretString"]) == {"private_key": PEM}
    assert (await backend.fetch(key_ref)).data == PEM.encode()

    other_ref = SecretRef.parse(f"aws-sm://{name}#selector")
    v2 = await backend.store(other_ref, b"s2026")
    assert v2 != v1
    assert json.loads(sm.get_secret_value(SecretId=name)["SecretString"]) == {
        "private_key": PEM,
        "selector": "s2026",
    }
    got = await backend.fetch(key_ref)
    assert got.data == PEM.encode() and got.version == v2

    raw = unique("store-raw")
    sm.create_secret(Name=raw, SecretString="s3cr3t not json")
    with pytest.raises(SecretFetchError) as info:
        await backend.store(SecretRef.parse(f"aws-sm://{raw}#f"), b"x")
    assert_no_secret(str(info.value))
    assert sm.get_secret_value(SecretId=raw)["SecretString"] == "s3cr3t not json"


# -- unreachable endpoint ----------------------------------------------------------------------


async def test_dead_endpoint_fails_fast(tmp_path):
    with moto_server(tmp_path / "moto-dead.log") as (url, proc):
        setup = boto3.client(
            "secretsmanager",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        name = unique("dead")
        setup.create_secret(Name=name, SecretString="s3cr3t-dead")
        ref = SecretRef.parse(f"aws-sm://{name}")
        backend = AwsSecretsBackend(region=REGION, endpoint_url=url)
        try:
            assert (await backend.fetch(ref)).data == b"s3cr3t-dead"
            stop(proc)
            with pytest.raises(SecretFetchError) as info:
                await backend.fetch(ref)
        finally:
            await backend.close()
    message = str(info.value)
    assert name in message and "endpoint unreachable" in message
    assert_no_secret(message)


async def test_never_listening_endpoint_is_a_fetch_error():
    backend = AwsSecretsBackend(region=REGION, endpoint_url=f"http://127.0.0.1:{dead_port()}")
    try:
        with pytest.raises(SecretFetchError) as info:
            await backend.fetch(SecretRef.parse("aws-sm://relay-test/x#f"))
    finally:
        await backend.close()
    assert "aws-sm://relay-test/x#f" in str(info.value)
    assert "endpoint unreachable" in str(info.value)


async def test_close_is_idempotent(backend):
    await backend.close()
    await backend.close()
