"""ConnectionPool.close (a stop, or a reload that retired the upstream) against a real
upstream: when it returns, every connection of the pool is closed and none of its tasks runs.

Before, the reaper was cancelled but not awaited, and a connection given back just before the
close was still quitting in a task of its own: both outlived the close (at a stop, the event
loop then closed under them)."""

from __future__ import annotations

from relay.deliver.pool import ConnectionPool
from tests.support.upstream import Upstream, plain_upstream_pool


def pool_to(port: int) -> ConnectionPool:
    return plain_upstream_pool(port)[1]


async def test_close_ends_the_reaper_and_a_quit_under_way():
    with Upstream() as upstream:
        pool = pool_to(upstream.port)
        conn = await pool.acquire()  # starts the reaper
        pool.release(conn, reusable=False)  # quitting in the background
        reaper = pool._reaper
        assert reaper is not None and not reaper.done()
        await pool.close()
        assert reaper.done()
        assert not conn.alive and not pool._closing


async def test_close_quits_the_idle_connections():
    with Upstream() as upstream:
        pool = pool_to(upstream.port)
        first, second = await pool.acquire(), await pool.acquire()
        pool.release(first, reusable=True)
        pool.release(second, reusable=True)
        await pool.close()
        assert not first.alive and not second.alive
        assert pool._reaper is not None and pool._reaper.done()
