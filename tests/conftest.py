"""Shared fixtures: test PKI, DKIM keys, a real upstream, and the relay: in the test's event
loop (`make_loop_relay`, the fast tier) or as a process (`make_relay`, marked e2e).

Markers (pyproject.toml): `e2e` for tests that start relay as a process, `binaries` for tests
that need programs outside the test process. Tests that use `make_relay` are marked e2e here;
`make test-fast` runs what is neither.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings

from tests.support.certs import TestPki, make_pki
from tests.support.config import APP_PASSWORD, relay_config
from tests.support.dkim import DkimKeys, make_dkim_keys
from tests.support.inloop import LoopRelay
from tests.support.procs import holding_dead_ports
from tests.support.relayproc import RelayProcess
from tests.support.upstream import Upstream

# Property tests (tests/test_properties.py): a modest run in the suite, a long one in
# `make fuzz` (HYPOTHESIS_PROFILE=fuzz).
settings.register_profile("suite", max_examples=60)
settings.register_profile("fuzz", max_examples=4000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

# Fixtures that start a program outside the test process (tests/test_posture.py: nsd, microsocks).
_BINARY_FIXTURES = {"nameserver", "resolver", "socks_proxy"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "make_relay" in fixtures:
            item.add_marker(pytest.mark.e2e)
        if fixtures & _BINARY_FIXTURES:
            item.add_marker(pytest.mark.binaries)


_exit_status: int | None = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the run here, with pytest's status, once every fixture is torn down and the
    summary printed. The interpreter's final garbage collection after that once hung in a
    C extension's finalizer (2 of 23 runs of one test at load ~25, after "1 passed"; only
    the main thread left, cause not found): in CI that is a run that never ends. Nothing
    of the tests is left to clean up at this point."""
    if _exit_status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


@pytest.fixture(autouse=True)
def _dead_ports() -> Iterator[None]:
    """The ports a test holds with `dead_port()` stay held until its last fixture is done."""
    with holding_dead_ports():
        yield


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def dkim_keys(tmp_path_factory) -> DkimKeys:
    return make_dkim_keys(tmp_path_factory.mktemp("dkim"))


@pytest.fixture(scope="session")
def app_password_hash() -> str:
    from relay.auth.passwords import hash_password

    return hash_password(APP_PASSWORD)


@pytest.fixture
def upstream(pki) -> Iterator[Upstream]:
    with Upstream(tls="starttls", server_context=pki.server_context()) as up:
        yield up


@pytest.fixture
async def make_loop_relay(tmp_path, pki, dkim_keys, app_password_hash) -> AsyncIterator[Callable[..., LoopRelay]]:
    """The relay in this test's event loop (see tests/support/inloop.py). Call the factory
    from an `@in_thread` test body (it starts the relay and waits until it is ready), or with
    `start=False` from an async test and `await relay.astart()`."""
    loop = asyncio.get_running_loop()
    started: list[LoopRelay] = []

    def factory(
        upstream_port: int,
        *,
        config: dict | None = None,
        env: dict | None = None,
        start: bool = True,
        wait_ready: bool = True,
        **overrides: Any,
    ) -> LoopRelay:
        workdir = tmp_path / f"relay{len(started)}"
        workdir.mkdir()
        cfg = config or relay_config(workdir, pki, dkim_keys, upstream_port, app_password_hash, **overrides)
        relay = LoopRelay(workdir, cfg, loop, env=env)
        started.append(relay)
        if start:
            relay.start(wait_ready=wait_ready)
        return relay

    yield factory
    for relay in started:
        await relay.astop()


@pytest.fixture
def make_relay(tmp_path, pki, dkim_keys, app_password_hash) -> Iterator[Callable[..., RelayProcess]]:
    """The relay as a process (`python -m relay serve`): for what only a process shows."""
    started: list[RelayProcess] = []

    def factory(
        upstream_port: int,
        *,
        config: dict | None = None,
        env: dict | None = None,
        start: bool = True,
        wait_ready: bool = True,
        **overrides: Any,
    ) -> RelayProcess:
        workdir = tmp_path / f"relay{len(started)}"
        workdir.mkdir()
        cfg = config or relay_config(workdir, pki, dkim_keys, upstream_port, app_password_hash, **overrides)
        relay = RelayProcess(workdir, cfg, env=env)
        started.append(relay)
        if start:
            relay.start(wait_ready=wait_ready)
        return relay

    yield factory
    for relay in started:
        relay.__exit__(None, None, None)
