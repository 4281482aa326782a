"""The per-upstream token cache against the local authorization server: one fetch for many
waiters, refresh ahead of expiry, the forced refetch, backoff after failures. Time is a
test clock wherever expiry is the point, so nothing depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from relay.oauth.cache import TokenCache
from relay.oauth.token import TokenError
from tests.support.oauth import AuthServer
from tests.support.oauth_config import MAILBOX, microsoft, source_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def auth(pki):
    with AuthServer(pki) as server:
        yield server


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
async def make_cache(auth, tmp_path, clock):
    caches: list[TokenCache] = []

    def factory(label: str = "m365", **kwargs) -> TokenCache:
        _, _, settings, lookup = microsoft(auth, tmp_path)
        kwargs.setdefault("clock", clock)
        cache = TokenCache(source_for(settings, lookup), upstream=label, **kwargs)
        caches.append(cache)
        return cache

    yield factory
    for cache in caches:
        await cache.close()


def failures(upstream: str, reason: str) -> float:
    return (
        REGISTRY.get_sample_value("relay_upstream_token_failures_total", {"upstream": upstream, "reason": reason})
        or 0.0
    )


async def settle(cache: TokenCache) -> None:
    """Let a background fetch finish."""
    while cache._inflight is not None:
        await asyncio.sleep(0.01)


async def test_many_waiters_one_fetch(auth, make_cache):
    cache = make_cache("single-flight")
    auth.behaviour.delay = 0.3  # everyone arrives while the one request is out
    tokens = await asyncio.gather(*(cache.token() for _ in range(50)))
    assert len({t.value for t in tokens}) == 1
    assert auth.requests == 1 and auth.max_inflight == 1 and cache.fetches == 1
    assert auth.check(tokens[0].value, MAILBOX) is None


async def test_a_waiter_that_leaves_does_not_cancel_the_fetch(auth, make_cache):
    cache = make_cache("leaver")
    auth.behaviour.delay = 0.3
    waiters = [asyncio.create_task(cache.token()) for _ in range(6)]
    await asyncio.sleep(0.05)
    for waiter in waiters[:3]:
        waiter.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results[:3])
    assert len({r.value for r in results[3:]}) == 1
    assert auth.requests == 1


async def test_refreshed_ahead_of_expiry_without_waiting(auth, make_cache, clock):
    cache = make_cache("refresh")
    first = await cache.token()
    assert first.lifetime == 3600
    clock.now = first.refresh_at + 1  # 5 minutes before expiry
    auth.behaviour.delay = 0.2
    same = await cache.token()  # handed out at once; the next one is being fetched
    assert same is first and cache._inflight is not None
    await settle(cache)
    second = await cache.token()
    assert second.value != first.value and cache.fetches == 2


async def test_expired_token_is_never_handed_out(auth, make_cache, clock):
    cache = make_cache("expired")
    first = await cache.token()
    clock.now = first.usable_until
    second = await cache.token()
    assert second.value != first.value


async def test_forced_refetch_once_for_many_connections(auth, make_cache):
    cache = make_cache("refetch")
    refused = await cache.token()
    auth.revoke_all()
    auth.behaviour.delay = 0.2
    fresh = await asyncio.gather(*(cache.refetch(refused) for _ in range(20)))
    assert len({t.value for t in fresh}) == 1 and fresh[0].value != refused.value
    assert auth.requests == 2 and auth.max_inflight == 1
    assert auth.check(fresh[0].value, MAILBOX) is None
    # A connection that comes late with the old token gets the new one, no new request.
    assert (await cache.refetch(refused)).value == fresh[0].value and auth.requests == 2


async def test_failure_backs_off_then_retries(auth, make_cache, clock):
    cache = make_cache("backoff", retry_min=5, retry_max=40)
    auth.behaviour.unavailable = True
    before = failures("backoff", "server_error")
    with pytest.raises(TokenError, match="server_error"):
        await cache.token()
    # Within the backoff the error comes back at once: no request piles onto the endpoint.
    for _ in range(10):
        with pytest.raises(TokenError, match="server_error"):
            await cache.token()
    assert auth.requests == 1 and failures("backoff", "server_error") == before + 1
    assert cache.problem.reason == "server_error"
    clock.now += 5
    with pytest.raises(TokenError):
        await cache.token()
    assert auth.requests == 2  # and the next wait is longer
    clock.now += 5
    with pytest.raises(TokenError):
        await cache.token()
    assert auth.requests == 2
    auth.behaviour.unavailable = False
    cache.credentials_changed()  # e.g. a rotated secret: try again now
    assert (await cache.token()).value in auth.tokens()
    assert cache.problem is None and cache.last_failure is None


async def test_failed_refresh_keeps_the_valid_token(auth, make_cache, clock):
    cache = make_cache("keep")
    first = await cache.token()
    auth.behaviour.fail = "invalid_client"
    clock.now = first.refresh_at
    assert await cache.token() is first
    await settle(cache)
    assert cache.last_failure.reason == "invalid_client"
    assert cache.problem is None  # mail still flows on the current token
    clock.now = first.usable_until
    with pytest.raises(TokenError, match="invalid_client"):
        await cache.token()
    assert cache.problem.reason == "invalid_client"


async def test_prefetch_reports_instead_of_raising(auth, make_cache):
    cache = make_cache("prefetch")
    auth.behaviour.fail = "consent_missing"
    error = await cache.prefetch()
    assert error.reason == "consent_missing" and "AADSTS65001" in error.detail
    assert cache.problem is error


async def test_rejected_is_a_problem_until_a_token_is_accepted(make_cache):
    cache = make_cache("rejected")
    await cache.token()
    before = failures("rejected", "rejected")
    error = cache.rejected("535 5.7.3 Authentication unsuccessful")
    assert error.reason == "rejected" and cache.problem is error
    assert failures("rejected", "rejected") == before + 1
    cache.accepted()
    assert cache.problem is None


async def test_run_keeps_a_short_lived_token_fresh(auth, make_cache):
    auth.behaviour.token_lifetime = 2  # refreshed every 1.5 s
    cache = make_cache("run", clock=time.monotonic, retry_min=0.1)
    runner = asyncio.create_task(cache.run())
    try:
        seen: set[str] = set()
        async with asyncio.timeout(30):
            while len(seen) < 3:
                token = await cache.token()
                assert auth.check(token.value, MAILBOX) is None  # every token handed out is live
                seen.add(token.value)
                await asyncio.sleep(0.05)
    finally:
        runner.cancel()
        await cache.close()
    assert auth.max_inflight == 1
    assert auth.requests == len(auth.tokens())


def test_retry_delays_must_be_positive(make_cache):
    with pytest.raises(ValueError):
        make_cache("bad", retry_min=0)
