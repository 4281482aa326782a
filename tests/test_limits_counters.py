"""The counters behind sending limits, local (LMDB) and shared (a real redis-server).

The scenarios in tests/data/limits/*.yaml run against both backends with the same clock,
so the Lua script and the Python counting are held to the same results. The rest checks
what each backend promises on its own: one limit across processes (local), one round trip
per message, atomicity between replicas, and serving on through a Redis outage (redis).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relay.limits.counters import FAIL_OPEN, Demand, Excess, Taken, Usage
from relay.limits.local import FILE_CHECK_INTERVAL, LocalCounters
from relay.limits.redis_counters import RedisCounters
from relay.limits.rules import Entity, Limits, parse_rate
from tests.support.redis import RedisServer

SCENARIOS = sorted((Path(__file__).parent / "data" / "limits").glob("*.yaml"))
BASE = 1_800_000_000.0  # a slot boundary (a multiple of 900 s)


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return BASE + self.offset


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def entity(text: str) -> Entity:
    scope, _, name = text.partition(":")
    return Entity(scope, name)


def limits_of(spec: dict) -> Limits:
    rate = parse_rate(spec["rate"]) if "rate" in spec else None
    return Limits(
        rate=rate,
        burst=spec.get("burst", rate.count if rate else 1),
        daily=spec.get("daily"),
        daily_recipients=spec.get("daily_recipients"),
        rate_recipients=spec.get("rate_counts") == "recipients",
    )


def make_counters(kind: str, tmp_path: Path, clock: Clock, redis_server: RedisServer | None, prefix: str):
    local = LocalCounters(tmp_path / "limits", clock=clock)
    if kind == "local":
        return local
    return RedisCounters(redis_server.url, fallback=local, clock=clock, timeout=10, key_prefix=prefix)


@pytest.mark.parametrize("kind", ["local", pytest.param("redis", marks=pytest.mark.binaries)])
@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
async def test_scenario(path, kind, tmp_path, request):
    redis_server = request.getfixturevalue("redis_server") if kind == "redis" else None
    scenario = yaml.safe_load(path.read_text())
    limits = {name: limits_of(spec) for name, spec in scenario["limits"].items()}
    clock = Clock()
    counters = make_counters(kind, tmp_path, clock, redis_server, prefix=f"test:{path.stem}:")
    last_ok: Taken | None = None
    try:
        for number, step in enumerate(scenario["steps"], 1):
            where = f"{path.name} step {number}: {step}"
            clock.offset = float(step["at"])
            if "take" in step:
                demands = [Demand(entity(name), limits[name], 1, step.get("recipients", 1)) for name in step["take"]]
                result = await counters.take(demands)
                if step["expect"] == "ok":
                    assert isinstance(result, Taken), where + f" → {result}"
                    last_ok = result
                else:
                    assert isinstance(result, Excess), where
                    assert f"{result.entity.key}:{result.kind}" == step["expect"], where
            elif "give_back" in step:
                await counters.give_back(last_ok)
            elif "usage" in step:
                expected = {entity(name): tuple(pair) for name, pair in step["usage"].items()}
                usage = await counters.usage(list(expected))
                assert {e: (u.messages, u.recipients) for e, u in usage.items()} == expected, where
    finally:
        await counters.close()


# -- local: one limit for every process ---------------------------------------------------
def _hammer(directory: str, attempts: int, results) -> None:
    async def run() -> int:
        counters = LocalCounters(Path(directory))
        limits = Limits(rate=parse_rate("1/d"), burst=1000, daily=250)
        ok = 0
        for _ in range(attempts):
            if isinstance(await counters.take([Demand(Entity("user", "app"), limits, 1, 1)]), Taken):
                ok += 1
        await counters.close()
        return ok

    results.put(asyncio.run(run()))


def test_local_limit_holds_across_processes(tmp_path):
    """Four processes (as `--workers 4` forks them) share one daily quota of 250: together
    they get exactly 250, not 4 × 250."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path / "limits"), 200, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    granted = [results.get(timeout=5) for _ in procs]
    assert sum(granted) == 250, granted


async def test_local_counts_survive_a_restart(tmp_path):
    limits = Limits(daily=2)
    demand = Demand(Entity("user", "app"), limits, 1, 1)
    first = LocalCounters(tmp_path / "limits")
    assert isinstance(await first.take([demand]), Taken)
    assert isinstance(await first.take([demand]), Taken)
    await first.close()
    again = LocalCounters(tmp_path / "limits")
    assert isinstance(await again.take([demand]), Excess)
    await again.close()


def _take_once(directory: str) -> None:
    async def run() -> None:
        counters = LocalCounters(Path(directory))
        await counters.take([Demand(Entity("user", "app"), Limits(daily=1), 1, 1)])
        await counters.close()

    asyncio.run(run())


async def test_local_peek_sees_other_processes_and_counts_nothing(tmp_path):
    demand = Demand(Entity("user", "app"), Limits(daily=1), 1, 1)
    counters = LocalCounters(tmp_path / "limits")
    assert counters.peek([demand]) is None
    assert counters.peek([demand]) is None  # peeking twice counted nothing
    # A fresh interpreter: LMDB refuses an environment opened before a fork.
    other = multiprocessing.get_context("spawn").Process(target=_take_once, args=(str(tmp_path / "limits"),))
    other.start()
    other.join(30)
    assert other.exitcode == 0
    excess = counters.peek([demand])
    assert excess is not None and excess.kind == "daily"
    await counters.close()


async def test_counters_rebuilt_in_one_process_share_the_file(tmp_path):
    """A reload builds new counters while the old ones still serve transactions."""
    demand = Demand(Entity("user", "app"), Limits(daily=1), 1, 1)
    old = LocalCounters(tmp_path / "limits")
    new = LocalCounters(tmp_path / "limits")
    assert isinstance(await old.take([demand]), Taken)
    await old.close()
    assert isinstance(await new.take([demand]), Excess)
    assert new.problem() is None
    await new.close()


async def test_entities_idle_for_days_are_forgotten(tmp_path):
    clock = Clock()
    counters = LocalCounters(tmp_path / "limits", clock=clock)
    for name in ("gone", "kept"):
        await counters.take([Demand(Entity("user", name), Limits(daily=5), 1, 1)])
    await counters.close()
    clock.offset = 3 * 86400
    counters = LocalCounters(tmp_path / "limits", clock=clock)
    await counters.take([Demand(Entity("user", "kept"), Limits(daily=5), 1, 1)])
    await counters.close()
    clock.offset = 4 * 86400 + 3600
    counters = LocalCounters(tmp_path / "limits", clock=clock)  # idle: "gone" 4 days, "kept" 1 day
    with counters._env.begin() as txn:
        assert [bytes(key) for key, _ in txn.cursor()] == [b"user:kept"]
    await counters.close()


async def test_unreadable_counter_file_is_set_aside(tmp_path, caplog):
    directory = tmp_path / "limits"
    directory.mkdir()
    (directory / "data.mdb").write_bytes(b"not an lmdb file" * 512)
    with caplog.at_level(logging.ERROR, logger="relay.limits"):
        counters = LocalCounters(directory)
    assert "limit counters unreadable; starting afresh" in caplog.text
    assert isinstance(await counters.take([Demand(Entity("user", "app"), Limits(daily=1), 1, 1)]), Taken)
    assert list(tmp_path.glob("limits.broken-*"))
    await counters.close()


# -- redis: shared, atomic, one round trip, fail-open -----------------------------------
@pytest.mark.binaries
async def test_redis_one_round_trip_per_message(redis_server, tmp_path):
    counters = RedisCounters(
        redis_server.url, fallback=LocalCounters(tmp_path / "l"), timeout=10, key_prefix="test:rt:"
    )
    demands = [
        Demand(Entity("user", "app"), Limits(rate=parse_rate("100/s"), burst=100, daily=1000), 1, 3),
        Demand(Entity("domain", "example.com"), Limits(daily=1000, daily_recipients=5000), 1, 3),
    ]
    assert isinstance(await counters.take(demands), Taken)  # loads the script
    before = redis_server.command_calls("evalsha") + redis_server.command_calls("eval")
    for _ in range(10):
        assert isinstance(await counters.take(demands), Taken)
        assert counters.peek(demands) is None  # RCPT-time checks cost no round trip
    after = redis_server.command_calls("evalsha") + redis_server.command_calls("eval")
    assert after - before == 10
    await counters.close()


@pytest.mark.binaries
async def test_redis_replicas_share_one_limit_atomically(redis_server, tmp_path):
    """Two replicas (two clients, their own local fallbacks) race for a quota of 100."""
    # A generous timeout: this is about atomicity, and a loaded machine must not look like
    # an outage here.
    replicas = [
        RedisCounters(redis_server.url, fallback=LocalCounters(tmp_path / f"l{i}"), timeout=10, key_prefix="test:race:")
        for i in range(2)
    ]
    demand = Demand(Entity("domain", "example.com"), Limits(daily=100), 1, 1)

    async def send(counters, n):
        results = await asyncio.gather(*(counters.take([demand]) for _ in range(n)))
        return sum(isinstance(r, Taken) for r in results)

    granted = await asyncio.gather(send(replicas[0], 80), send(replicas[1], 80))
    assert sum(granted) == 100, granted
    # The refusals taught each replica that the quota is reached: RCPT can say so at once.
    assert all(r.peek([demand]) is not None for r in replicas)
    for counters in replicas:
        await counters.close()


@pytest.mark.binaries
async def test_redis_outage_fails_open_then_reconnects(tmp_path, caplog):
    """Redis killed mid-run: checks go on against local counters (counted, logged once,
    said in the problem for /readyz); Redis restarted: the counters are shared again
    without any action."""
    with RedisServer(tmp_path) as server:
        counters = RedisCounters(
            server.url, fallback=LocalCounters(tmp_path / "l"), timeout=5, key_prefix="test:outage:"
        )
        demand = Demand(Entity("user", "app"), Limits(daily=3), 1, 1)
        assert isinstance(await counters.take([demand]), Taken)
        assert counters.problem() is None

        server.kill()
        fail_open_before = FAIL_OPEN.labels("redis")._value.get()
        with caplog.at_level(logging.WARNING, logger="relay.limits"):
            results = [await counters.take([demand]) for _ in range(5)]
        # Local counters enforce the limit on their own while Redis is away.
        assert [type(r).__name__ for r in results] == ["Taken", "Taken", "Taken", "Excess", "Excess"]
        assert all(r.backend == "local" for r in results[:3])
        assert FAIL_OPEN.labels("redis")._value.get() - fail_open_before == 5
        warnings = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
        assert len(warnings) == 1
        assert "redis unreachable since" in counters.problem()
        assert "counted on this host only" in counters.problem()
        # Giving back a message counted locally goes to the local counters.
        await counters.give_back(results[0])
        assert isinstance(await counters.take([demand]), Taken)

        server.start()  # same port, empty
        for _ in range(300):  # reconnects by itself (pings with a growing pause, at most 10 s)
            if counters.available:
                break
            await asyncio.sleep(0.1)
        assert counters.available
        assert counters.problem() is None
        assert isinstance(await counters.take([demand]), Taken)
        assert server.cli("HGET", "test:outage:user:app", "m").strip() == "1"
        await counters.close()


# -- a full disk: counting fails open, the process lives on -------------------------------
@pytest.mark.e2e
def test_full_disk_fails_open_instead_of_killing_the_process(tmp_path):
    """The data dir on a 2 MiB tmpfs in a private mount namespace (as
    tests/test_queue_disk_full.py does): the disk fills, new users are counted. With the
    map written in place (LMDB's writemap on a sparse file) the first page the disk cannot
    back killed the process with SIGBUS; now the commit fails with ENOSPC and mail goes
    through, said in `problem()`."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare(1) to mount a small tmpfs in a private namespace")
    root = tmp_path / "data"
    root.mkdir()
    probe = f"{sys.executable} -m tests.support.limits_disk_full_probe {root}"
    script = f"mount -t tmpfs -o size=2m tmpfs {root} && exec {probe}"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["taken"] == 300  # fail open: every message let through
    assert "No space left on device" in result["problem"]


# -- usage: read-only and cheap, never a reason to stop sharing the counts ------------------
@pytest.mark.binaries
async def test_redis_usage_reads_without_a_script_and_a_slow_read_never_takes_redis_down(tmp_path):
    """Every scrape of every worker asks for the usage of every user with a daily quota.
    It used to be one Lua call walking up to 96 slots per idle key (Redis blocked for every
    replica meanwhile), and its timeout marked Redis down: every message of the process then
    fell back to this host's counters."""
    clock = Clock()
    with RedisServer(tmp_path) as redis:
        counters = RedisCounters(redis.url, fallback=LocalCounters(tmp_path / "limits"), clock=clock, timeout=10)
        limits = Limits(daily=1000)
        users = [Entity("user", f"app{i}") for i in range(450)]  # more than one pipeline's batch
        try:
            for user in users:
                assert isinstance(await counters.take([Demand(user, limits, 1, 2)]), Taken)
            clock.offset = 12 * 3600.0
            assert isinstance(await counters.take([Demand(users[0], limits, 1, 1)]), Taken)
            scripts = redis.command_calls("evalsha")
            clock.offset = 23 * 3600.0  # idle since: the window moved 92 slots
            usage = await counters.usage(users)
            assert usage[users[0]] == Usage(2, 3) and usage[users[1]] == Usage(1, 2) and len(usage) == len(users)
            clock.offset = 25 * 3600.0  # the first counts have left the rolling 24 h
            usage = await counters.usage(users)
            assert usage[users[0]] == Usage(1, 1) and usage[users[1]] == Usage(0, 0)
            assert redis.command_calls("evalsha") == scripts  # no script: nothing blocks Redis
            # A read that does not finish in time: no figures, and Redis stays in use.
            counters._timeout = 0.5
            redis.freeze()  # Redis busy (or the read too big for the timeout)
            try:
                assert await counters.usage(users) == {}
            finally:
                redis.thaw()
            counters._timeout = 10.0
            assert counters.available and counters.problem() is None
            taken = await counters.take([Demand(users[0], limits, 1, 1)])
            assert isinstance(taken, Taken) and taken.backend == "redis"
        finally:
            await counters.close()


# -- give-back: what peek answers from shows it -------------------------------------------
@pytest.mark.parametrize("kind", ["local", pytest.param("redis", marks=pytest.mark.binaries)])
async def test_a_count_given_back_is_not_refused_at_rcpt(kind, tmp_path, request):
    redis_server = request.getfixturevalue("redis_server") if kind == "redis" else None
    counters = make_counters(kind, tmp_path, Clock(), redis_server, prefix="test:peek-give:")
    demand = [Demand(Entity("user", "app"), Limits(daily=2), 1, 1)]
    try:
        assert isinstance(await counters.take(demand), Taken)
        last = await counters.take(demand)
        assert isinstance(last, Taken)
        assert counters.peek(demand) is not None  # at the quota: the next RCPT is refused
        await counters.give_back(last)  # the upstream refused it: room for one again
        assert counters.peek(demand) is None  # so the client's retry is not refused at RCPT
    finally:
        await counters.close()


@pytest.mark.parametrize("kind", ["local", pytest.param("redis", marks=pytest.mark.binaries)])
async def test_a_give_back_of_recipients_only_keeps_the_message(kind, tmp_path, request):
    """What a partly delivered spool entry gives back: recipients, no message. In Lua the
    message's -0 reached Redis as "-0", which HINCRBY refuses: Redis was declared down."""
    redis_server = request.getfixturevalue("redis_server") if kind == "redis" else None
    counters = make_counters(kind, tmp_path, Clock(), redis_server, prefix="test:give-recipients:")
    limits = Limits(daily=5, daily_recipients=10)
    app = Entity("domain", "example.com")
    try:
        taken = await counters.take([Demand(app, limits, 1, 3)])
        assert isinstance(taken, Taken)
        await counters.give_back(Taken((Demand(app, limits, 0, 2),), taken.slot, taken.backend))
        assert counters.problem() is None
        assert (await counters.usage([app]))[app] == Usage(1, 1)
    finally:
        await counters.close()


@pytest.mark.binaries
@pytest.mark.parametrize("breakage", ["readonly", "oom"])
async def test_redis_refusing_the_script_stays_down_until_it_runs_it(breakage, tmp_path, caplog):
    """A Redis that answers PING but refuses the script (a replica after a failover, at
    maxmemory with noeviction) used to be declared "reachable again" by a PING 0.5 s later,
    then down at the next message: a round trip per message and a warning every half second."""
    with RedisServer(tmp_path) as redis:
        if breakage == "readonly":
            redis.cli("REPLICAOF", "127.0.0.1", "1")
        else:
            redis.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
            redis.cli("CONFIG", "SET", "maxmemory", "1")
        counters = RedisCounters(redis.url, fallback=LocalCounters(tmp_path / "limits"), timeout=5)
        demand = [Demand(Entity("user", "app"), Limits(daily=1000), 1, 1)]
        caplog.set_level(logging.WARNING, logger="relay.limits")
        before = FAIL_OPEN.labels("redis")._value.get()
        try:
            for _ in range(5):
                taken = await counters.take(demand)
                assert isinstance(taken, Taken) and taken.backend == "local"
                await asyncio.sleep(0.6)  # past the first recovery attempt
            assert not counters.available
            assert counters.round_trips == 1  # only the first message asked Redis
            assert FAIL_OPEN.labels("redis")._value.get() - before == 5
            assert "redis refuses the limit script" in counters.problem()
            assert ("read only replica" if breakage == "readonly" else "maxmemory") in counters.problem()
            assert not [r for r in caplog.records if "reachable again" in r.getMessage()]
            refusals = [r for r in caplog.records if "refuses the limit script" in r.getMessage()]
            assert len(refusals) == 1  # once a minute at most
            # Fixed by the operator: the next attempt finds the script running and switches back.
            if breakage == "readonly":
                redis.cli("REPLICAOF", "NO", "ONE")
            else:
                redis.cli("CONFIG", "SET", "maxmemory", "0")
            for _ in range(300):
                if counters.available:
                    break
                await asyncio.sleep(0.1)
            assert counters.available and counters.problem() is None
            taken = await counters.take(demand)
            assert isinstance(taken, Taken) and taken.backend == "redis"
        finally:
            await counters.close()


# -- a wall clock stepped back -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", pytest.param("redis", marks=pytest.mark.binaries)])
async def test_a_clock_stepped_forward_then_back_does_not_freeze_the_bucket(kind, tmp_path, request):
    """NTP steps the clock forward an hour (a VM resumed, a bad source) and corrects it a
    moment later: the bucket used to wait for real time to reach the hour ahead, refusing
    every message meanwhile while promising a token within a second."""
    redis_server = request.getfixturevalue("redis_server") if kind == "redis" else None
    clock = Clock()
    counters = make_counters(kind, tmp_path, clock, redis_server, prefix="test:clock-step:")
    demand = [Demand(Entity("user", "app"), Limits(rate=parse_rate("1/s"), burst=2), 1, 1)]
    try:
        assert isinstance(await counters.take(demand), Taken)
        clock.offset = 3600.0
        assert isinstance(await counters.take(demand), Taken)
        clock.offset = 1.0
        taken = await counters.take(demand)
        assert isinstance(taken, Taken) or taken.retry_after <= 1.0
        for minute in range(1, 11):  # a message a minute, at 1/s: every one fits
            clock.offset = 1.0 + 60 * minute
            assert isinstance(await counters.take(demand), Taken), f"minute {minute}"
    finally:
        await counters.close()


async def test_a_boot_with_the_clock_a_year_ahead_leaves_no_frozen_bucket(tmp_path):
    """A VM that starts with a wrong RTC and counts one message before NTP corrects it: the
    counts are kept across restarts, and the bucket's time a year ahead used to refuse
    that user for the year."""
    clock = Clock()
    limits = Limits(rate=parse_rate("10/s"), burst=50, daily=1000)
    demand = [Demand(Entity("user", "billing"), limits, 1, 1)]
    counters = LocalCounters(tmp_path / "limits", clock=clock)
    clock.offset = 365 * 86400.0
    assert isinstance(await counters.take(demand), Taken)
    clock.offset = 0.0  # NTP synced
    for _ in range(49):
        assert isinstance(await counters.take(demand), Taken)
    await counters.close()
    clock.offset = 3 * 86400.0  # three days later, after restarts
    counters = LocalCounters(tmp_path / "limits", clock=clock)
    try:
        assert isinstance(await counters.take(demand), Taken)
        # The daily window follows the clock too: the 50 counts are out of it by now.
        assert (await counters.usage([demand[0].entity]))[demand[0].entity] == Usage(1, 1)
    finally:
        await counters.close()


# -- a counter file damaged after it opened -------------------------------------------------
def _damage_the_leaf_holding(directory: Path, key: bytes) -> None:
    """What a host crash can leave with unsynced commits (LMDB's documentation says so): a
    data page half written. Here the header of the leaf page that holds `key`; the meta
    pages are intact, so the file opens without complaint."""
    import random

    raw = bytearray((directory / "data.mdb").read_bytes())
    at = raw.find(key)
    while at != -1:
        page = at // 4096
        if int.from_bytes(raw[page * 4096 + 10 : page * 4096 + 12], "little") & 0x02:  # P_LEAF
            raw[page * 4096 : page * 4096 + 16] = random.Random(page).randbytes(16)
        at = raw.find(key, at + 1)
    (directory / "data.mdb").write_bytes(bytes(raw))


async def test_a_damaged_counter_file_is_set_aside_and_said_in_problem(tmp_path):
    """The entities on a damaged page used to go uncounted for good (fail open on every
    message, after every restart), while the next successful take of another entity cleared
    `problem()`: /readyz said nothing."""
    directory = tmp_path / "limits"
    users = [Entity("user", f"u{i}") for i in range(200)]
    counters = LocalCounters(directory)
    for user in users[:100]:
        await counters.take([Demand(user, Limits(daily=10**6), 1, 1)])
    await counters.close()
    _damage_the_leaf_holding(directory, b"user:u5")

    counters = LocalCounters(directory)
    other = LocalCounters(directory)  # the counters of a reload in the same process
    limits = Limits(daily=1)
    try:
        uncounted = []
        for user in users:
            await counters.take([Demand(user, limits, 1, 1)])
            if isinstance(await counters.take([Demand(user, limits, 1, 1)]), Taken):  # daily 1: over
                uncounted.append(user.name)
        assert len(uncounted) <= 1, uncounted  # the take that met the damage, at most
        assert list(tmp_path.glob("limits.broken-*"))  # set aside, kept for a look
        await counters.take([Demand(Entity("user", "fresh"), limits, 1, 1)])  # any other user
        assert "damaged" in counters.problem()  # still said, for /readyz detail
        # The other counters of this process move on to the new file too.
        other._last_file_check = -FILE_CHECK_INTERVAL
        assert isinstance(await other.take([Demand(Entity("user", "u150"), limits, 1, 1)]), Excess)
    finally:
        await counters.close()
        await other.close()
    counters = LocalCounters(directory)  # and after a restart: every user counted
    try:
        for user in users:
            await counters.take([Demand(user, limits, 1, 1)])
            assert isinstance(await counters.take([Demand(user, limits, 1, 1)]), Excess), user
    finally:
        await counters.close()


async def test_redis_over_tls_checks_the_host_name_whatever_the_client_version(tmp_path):
    """redis-py before 6 (which pyproject.toml allows) does not check it by default."""
    counters = RedisCounters("rediss://limits.internal:6379/0", fallback=LocalCounters(tmp_path / "limits"))
    try:
        assert counters._client.connection_pool.connection_kwargs["ssl_check_hostname"] is True
    finally:
        await counters.close()


# -- a take whose caller is cancelled while Redis runs it ---------------------------------
@pytest.mark.binaries
async def test_a_count_whose_caller_is_cancelled_mid_script_is_given_back(tmp_path):
    """A client that vanishes at DATA while its message is counted cancels `take` after the
    script went to Redis: Redis counted the message, and nothing gave the count back (the
    reservation never reached the pipeline). Now the count comes back once the reply does."""
    user = Entity("user", "app")
    demand = [Demand(user, Limits(daily=100), 1, 1)]
    with RedisServer(tmp_path) as redis:
        counters = RedisCounters(redis.url, fallback=LocalCounters(tmp_path / "limits"), clock=Clock(), timeout=10)
        try:
            assert isinstance(await counters.take(demand), Taken)
            scripts = redis.command_calls("evalsha")
            redis.freeze()
            try:
                calls = counters.round_trips
                take = asyncio.ensure_future(counters.take(demand))
                while counters.round_trips == calls:  # the script call has begun
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # and is, most likely, in Redis's socket already
                take.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await take
            finally:
                redis.thaw()
            for _ in range(500):  # bounded: Redis runs the cancelled call's script
                if redis.command_calls("evalsha") > scripts:
                    break
                await asyncio.sleep(0.02)
            for _ in range(500):  # and, with the fix, the give-back after it
                if (await counters.usage([user]))[user] == Usage(1, 1):
                    break
                await asyncio.sleep(0.02)
            assert (await counters.usage([user]))[user] == Usage(1, 1)
            assert counters.available and counters.problem() is None
        finally:
            await counters.close()
