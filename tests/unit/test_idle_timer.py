"""The idle timer (clients.session_timeout, RFC 5321 §4.5.3.2.7) of RelaySMTP, re-armed lazily:
activity only moves the expiry, and the one timer, when it fires early, is set for the rest.
Driven on a loop whose clock the test moves (no real time passes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace

from relay.listen.smtp import RelaySMTP


class SteppedLoop:
    """What the idle timer uses of a loop: time(), call_at(); the test moves the time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[asyncio.TimerHandle] = []
        self.made = 0

    def time(self) -> float:
        return self.now

    def get_debug(self) -> bool:
        return False

    def call_at(self, when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, (), self)  # type: ignore[arg-type]
        self.timers.append(handle)
        self.made += 1
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass

    def advance(self, to: float) -> None:
        """Move the clock to `to`, running the timers due on the way, in order."""
        while True:
            due = [h for h in self.timers if not h.cancelled() and h.when() <= to]
            if not due:
                break
            handle = min(due, key=lambda h: h.when())
            self.timers.remove(handle)
            self.now = handle.when()
            handle._run()
        self.now = to


def session(timeout: float = 300.0, deadline: float | None = None) -> SimpleNamespace:
    loop = SteppedLoop()
    state = SimpleNamespace(
        loop=loop,
        _timeout_duration=timeout,
        _deadline=deadline,
        _hold_expiry=None,
        _idle_expiry=0.0,
        _timeout_handle=None,
        timed_out=[],
    )
    state._timeout_cb = lambda: state.timed_out.append(loop.now)
    state._idle_timer_fired = lambda: RelaySMTP._idle_timer_fired(state)  # type: ignore[arg-type]
    state.reset = lambda duration=None: RelaySMTP._reset_timeout(state, duration)  # type: ignore[arg-type]
    return state


def test_idle_for_the_timeout_after_the_last_command_times_out_then_and_not_before():
    state = session(timeout=300)
    state.reset()  # the greeting
    for t in (100.0, 200.0, 250.0):  # commands
        state.loop.advance(t)
        state.reset()
    assert state.loop.made == 1  # activity makes no timer
    state.loop.advance(549.9)
    assert state.timed_out == []  # the first expiry (300) passed: set again for the rest
    state.loop.advance(550.0)
    assert state.timed_out == [550.0]


def test_a_session_that_stays_busy_never_times_out():
    state = session(timeout=10)
    state.reset()
    for step in range(1, 201):  # a command a second
        state.loop.advance(float(step))
        state.reset()
    assert state.timed_out == []
    assert state.loop.made <= 200 / 9 + 1  # one per 9 s (each fires 1 s early), not one per command


def test_a_shorter_duration_brings_the_timer_forward():
    state = session(timeout=300)
    state.reset()
    state.reset(10.0)  # e.g. the PROXY header's wait
    state.loop.advance(10.0)
    assert state.timed_out == [10.0]


def test_a_longer_duration_after_a_short_one_waits_the_longer():
    state = session(timeout=300)
    state.reset(10.0)  # the PROXY header's wait
    state.loop.advance(4.0)
    state.reset()  # the header came: the session's timeout from now
    state.loop.advance(303.9)
    assert state.timed_out == []
    state.loop.advance(304.0)
    assert state.timed_out == [304.0]


def test_the_timer_never_runs_past_the_session_deadline():
    state = session(timeout=300, deadline=50.0)
    state.reset()
    state.loop.advance(40.0)
    state.reset()
    state.loop.advance(50.0)
    assert state.timed_out == [50.0]


def test_a_stopped_timer_is_set_anew():
    # While the upstream answers, the timer is stopped (RelaySMTP._waiting_for_upstream).
    state = session(timeout=30)
    state.reset()
    state._timeout_handle.cancel()
    state.loop.advance(100.0)
    assert state.timed_out == []
    state.reset()
    state.loop.advance(129.0)
    assert state.timed_out == []
    state.loop.advance(130.0)
    assert state.timed_out == [130.0]


def test_a_timer_that_fires_a_millisecond_early_counts_as_due():
    state = session(timeout=30)
    state.reset()
    state.loop.now = 29.9995
    state._timeout_handle._run()
    assert state.timed_out == [29.9995]


def test_commands_while_a_transaction_holds_the_upstream_do_not_move_its_end():
    # RelaySMTP._hold_upstream: the client's time from the first RCPT to DATA is bounded by
    # session_timeout, however often it sends a NOOP.
    state = session(timeout=300)
    state.reset()
    state._hold_expiry = 300.0
    for t in range(10, 300, 10):  # a NOOP every 10 s
        state.loop.advance(float(t))
        state.reset()
    assert state.timed_out == []
    state.loop.advance(300.0)
    assert state.timed_out == [300.0]
