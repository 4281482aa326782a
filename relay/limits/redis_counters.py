"""Counters in Redis, shared by every replica behind the load balancer.

One Lua script does a whole check: it moves each entity's window and bucket to Redis's own
clock (`TIME`: the replicas' clocks do not have to agree), checks every demand, and counts
them all or none. So a message costs one round trip (`EVALSHA`), at DATA; a message that
is not delivered after all costs a second one to give its count back.

`peek` (at RCPT) asks nothing of Redis: it refuses only when the state Redis last returned
to this process already shows the limit reached, which stays true until the current
window slot ends or the bucket refills. Otherwise the check at DATA decides.

When Redis cannot be reached (refused, timed out, or any Redis error), relay keeps serving
and counts on this host's counters instead (fail open: a limit is a brake, and a Redis
outage must not stop every app's mail). Each such check is counted in
`relay_limit_fail_open_total{backend="redis"}`, a warning is logged at most once a minute,
and `/readyz` says so in its detail without failing. A background task retries with a
growing pause (up to 10 s) by running the script on a probe key, and switches back when
that works: a Redis that answers but refuses the script (a replica after a failover, at
maxmemory, an ACL without EVALSHA) stays "down" rather than flapping, and `problem()`
says it refuses rather than that it is unreachable. Counts made locally during
an outage are not copied into Redis: each replica enforced the limits on its own traffic
for that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from relay.cancel import cancel_and_wait
from relay.limits.counters import (
    CLOCK_STEP,
    FAIL_OPEN,
    CounterState,
    Demand,
    Excess,
    Taken,
    Usage,
    slot_of,
    window_totals,
)
from relay.limits.local import LocalCounters
from relay.limits.rules import DAILY, DAILY_RECIPIENTS, RATE, SLOT_SECONDS, WINDOW_SLOTS, Entity

if TYPE_CHECKING:
    from relay.limits.redis_connect import HostAddresses

log = logging.getLogger("relay.limits")

LOG_INTERVAL = 60.0
RECOVERY_PAUSES = (0.5, 1.0, 2.0, 5.0, 10.0)
FLAP_WINDOW = 60.0  # down again within this of a recovery: the same outage
MAX_CONNECTIONS = 16
USAGE_BATCH = 200  # entities per pipeline when usage is read
KEY_TTL_MS = (WINDOW_SLOTS + 1) * SLOT_SECONDS * 1000

_KINDS = {1: RATE, 2: DAILY, 3: DAILY_RECIPIENTS}

# The same steps as `CounterState` (counters.py), per key of KEYS, in one atomic script.
# Hash fields: t tokens (absent: a full bucket), a the time tokens were last computed,
# s the current slot, m / r the window's totals, m<i> / r<i> the ring of per-slot counts.
# ARGV: op (take | give | probe), now in ms (empty: Redis's TIME), the slot to give back to;
# then one argument per key: "messages recipients rate-per-second burst daily
# daily-recipients tokens" (tokens: what the demand takes from the bucket, messages or
# recipients), with "-" for a limit that is not set. (Few arguments: encoding each one
# costs the client more than the script costs Redis.)
LUA = r"""
local op = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2]) / 1000
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local slot_seconds, n_slots, ttl = @SLOT_SECONDS@, @WINDOW_SLOTS@, @KEY_TTL_MS@
local give_slot = tonumber(ARGV[3])
local current = math.floor(now / slot_seconds)

local function num(v, default)
  if v == false or v == nil or v == '' or v == '-' then return default end
  return tonumber(v)
end

local function load(key, rate, burst)
  local v = redis.call('HMGET', key, 't', 'a', 's', 'm', 'r')
  local st = {tokens = num(v[1], nil), at = num(v[2], 0), slot = num(v[3], nil),
              m = num(v[4], 0), r = num(v[5], 0), expired = {}, reset = false}
  if st.slot == nil then
    st.slot = current
  elseif current > st.slot then
    if current - st.slot >= n_slots then
      st.m, st.r, st.reset = 0, 0, true
    else
      for s = st.slot + 1, current do
        local i = s % n_slots
        local old = redis.call('HMGET', key, 'm' .. i, 'r' .. i)
        st.m = st.m - num(old[1], 0)
        st.r = st.r - num(old[2], 0)
        table.insert(st.expired, 'm' .. i)
        table.insert(st.expired, 'r' .. i)
      end
    end
    st.slot = current
  elseif st.slot > current + 1 then
    st.slot = current  -- the clock was stepped back (see CounterState.advance)
  end
  if rate == nil then
    st.tokens, st.at = nil, now
  else
    if st.tokens == nil then
      st.tokens = burst
    elseif now > st.at then
      st.tokens = math.min(burst, st.tokens + (now - st.at) * rate)
    else
      st.tokens = math.min(burst, st.tokens)
    end
    if now > st.at or now < st.at - @CLOCK_STEP@ then st.at = now end
  end
  return st
end

local function save(key, st)
  if st.reset then redis.call('DEL', key) end
  if #st.expired > 0 then redis.call('HDEL', key, unpack(st.expired)) end
  redis.call('HSET', key, 't', st.tokens == nil and '' or tostring(st.tokens), 'a', tostring(st.at),
             's', st.slot, 'm', st.m, 'r', st.r)
  redis.call('PEXPIRE', key, ttl)
end

local function show(v)
  if v == nil then return '' end
  return tostring(v)
end

if op == 'probe' then
  -- What recovery asks: can the script run and write here? (A node that answers PING may
  -- still refuse: READONLY after a failover, OOM at maxmemory, NOPERM.)
  redis.call('SET', KEYS[1], '1', 'PX', 60000)
  return {1}
end

local demands, states = {}, {}
for k = 1, #KEYS do
  local f = {}
  for word in string.gmatch(ARGV[3 + k], '%S+') do table.insert(f, word) end
  local d = {messages = tonumber(f[1]), recipients = tonumber(f[2]), rate = num(f[3], nil),
             burst = tonumber(f[4]), daily = num(f[5], nil), daily_r = num(f[6], nil),
             tokens = tonumber(f[7])}
  demands[k] = d
  states[k] = load(KEYS[k], d.rate, d.burst)
end

local function report(head)
  for k = 1, #KEYS do
    local st = states[k]
    table.insert(head, show(st.tokens))
    table.insert(head, st.m)
    table.insert(head, st.r)
  end
  return head
end

if op == 'give' then
  for k = 1, #KEYS do
    local st, d = states[k], demands[k]
    if redis.call('EXISTS', KEYS[k]) == 1 then
      if d.rate ~= nil and st.tokens ~= nil then st.tokens = math.min(d.burst, st.tokens + d.tokens) end
      if give_slot <= st.slot and st.slot - give_slot < n_slots then
        local i = give_slot % n_slots
        local m = math.min(d.messages, num(redis.call('HGET', KEYS[k], 'm' .. i), 0))
        local r = math.min(d.recipients, num(redis.call('HGET', KEYS[k], 'r' .. i), 0))
        save(KEYS[k], st)
        -- (Only what is not zero: Lua's -0 reaches Redis as "-0", which HINCRBY refuses.)
        if m > 0 then
          redis.call('HINCRBY', KEYS[k], 'm' .. i, -m)
          redis.call('HINCRBY', KEYS[k], 'm', -m)
        end
        if r > 0 then
          redis.call('HINCRBY', KEYS[k], 'r' .. i, -r)
          redis.call('HINCRBY', KEYS[k], 'r', -r)
        end
      else
        save(KEYS[k], st)
      end
      local totals = redis.call('HMGET', KEYS[k], 'm', 'r')
      st.m, st.r = num(totals[1], 0), num(totals[2], 0)
    end
  end
  return report({1, current, show(now)})
end

for k = 1, #KEYS do
  local st, d = states[k], demands[k]
  local kind, used, limit, wait = 0, 0, 0, 0
  local needed = math.min(d.tokens, d.burst)
  if d.rate ~= nil and needed > 0 and st.tokens < needed then
    kind, used, limit, wait = 1, st.tokens, d.burst, (needed - st.tokens) / d.rate
  elseif d.daily ~= nil and st.m + d.messages > d.daily then
    kind, used, limit, wait = 2, st.m, d.daily, (st.slot + 1) * slot_seconds - now
  elseif d.daily_r ~= nil and st.r + d.recipients > d.daily_r then
    kind, used, limit, wait = 3, st.r, d.daily_r, (st.slot + 1) * slot_seconds - now
  end
  if kind > 0 then
    return report({0, current, show(now), k, kind, show(used), show(limit), show(wait)})
  end
end

local i = current % n_slots
for k = 1, #KEYS do
  local st, d = states[k], demands[k]
  if d.rate ~= nil then st.tokens = st.tokens - d.tokens end
  st.m = st.m + d.messages
  st.r = st.r + d.recipients
  save(KEYS[k], st)
  redis.call('HINCRBY', KEYS[k], 'm' .. i, d.messages)
  redis.call('HINCRBY', KEYS[k], 'r' .. i, d.recipients)
end
return report({1, current, show(now)})
"""
LUA = (
    LUA.replace("@SLOT_SECONDS@", str(SLOT_SECONDS))
    .replace("@WINDOW_SLOTS@", str(WINDOW_SLOTS))
    .replace("@KEY_TTL_MS@", str(KEY_TTL_MS))
    .replace("@CLOCK_STEP@", repr(CLOCK_STEP))
)


def _usage_of(fields: dict[bytes, bytes], now: float) -> Usage:
    """One entity's usage at `now` from its hash (the fields of the script above)."""
    if b"s" not in fields:
        return Usage(0, 0)
    slot = int(fields[b"s"])

    def ring() -> tuple[list[int], list[int]]:
        messages, recipients = [0] * WINDOW_SLOTS, [0] * WINDOW_SLOTS
        for name, value in fields.items():
            if len(name) > 1 and name[1:].isdigit():
                column = messages if name[:1] == b"m" else recipients if name[:1] == b"r" else None
                if column is not None:
                    column[int(name[1:]) % WINDOW_SLOTS] = int(value)
        return messages, recipients

    return Usage(*window_totals(slot, int(fields.get(b"m", 0)), int(fields.get(b"r", 0)), now, ring))


@dataclass(frozen=True, slots=True)
class _Seen:
    """An entity's state as Redis last returned it to this process."""

    tokens: float | None
    messages: int
    recipients: int
    slot: int
    redis_now: float
    local_now: float  # time.monotonic() when it arrived


class SecretChanges(Protocol):
    """Where a rotated password comes from (relay.secrets.store.SecretStore)."""

    def subscribe(self, listener: Callable[[str, Any], None]) -> None: ...

    def unsubscribe(self, listener: Callable[[str, Any], None]) -> None: ...


class RedisCounters:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        fallback: LocalCounters,
        password: str | Callable[[], str | None] | None = None,
        timeout: float = 1.0,
        key_prefix: str = "relay:limits:",
        ca_file: Path | None = None,
        clock: Callable[[], float] | None = None,
        resolver: HostAddresses | None = None,
    ) -> None:
        """`password`: the password, or where to read the current one at each new
        connection (a secret that rotates: see `follow_secret`). `resolver`: resolves the
        host name (dns.nameservers) instead of the system's resolver."""
        # Imported here: only a relay configured with `backend: redis` pays for the client.
        from redis.exceptions import RedisError, ResponseError

        FAIL_OPEN.labels(self.name)  # at 0 from the start, for increase() (RelayLimitsNotShared)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._refusals: tuple[type[BaseException], ...] = (ResponseError,)
        self._url = url
        self._password = password
        self._ca_file = ca_file
        self._resolver = resolver
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._fallback = fallback
        self._timeout = timeout
        self._prefix = key_prefix
        self._clock = clock
        self._client, self._script = self._connect()
        self._retiring: set[asyncio.Task[Any]] = set()  # retired clients' closes, old recoveries
        self._unclaimed: set[asyncio.Future[Any]] = set()  # cancelled takes' calls and their give-backs
        self._secrets: SecretChanges | None = None
        self._password_ref: str | None = None
        self._seen: dict[str, _Seen] = {}
        self._down_since: float | None = None
        self._down_wall = 0.0
        self._down_reason = ""
        self._fallbacks_unlogged = 0
        self._last_logged = -LOG_INTERVAL
        self._recovery: asyncio.Task[None] | None = None
        self._refused = False  # the last failure was Redis refusing the script
        self._attempt = 0  # recovery attempts; kept across a flap (see _went_down)
        self._up_since = -FLAP_WINDOW
        self._last_recovery_logged = -LOG_INTERVAL
        self.round_trips = 0  # EVALSHA calls made (for tests and the bench)

    def _connect(self) -> tuple[Any, Any]:
        return connect(
            self._url, password=self._password, timeout=self._timeout, ca_file=self._ca_file, resolver=self._resolver
        )

    def follow_secret(self, secrets: SecretChanges, ref: str) -> None:
        """Reconnect with the new password when the secret `ref` changes."""
        self._secrets, self._password_ref = secrets, ref
        secrets.subscribe(self._secret_changed)

    def _secret_changed(self, ref: str, _value: object) -> None:
        if ref != self._password_ref:
            return
        # New calls go through a new pool, whose connections authenticate with the new
        # password; the old pool is closed once no call can still be using it (every call
        # is bounded by `timeout`). Not the value: only the reference is logged.
        log.info("redis password changed; reconnecting", extra={"secret": ref})
        retired = self._client
        self._client, self._script = self._connect()
        loop = asyncio.get_running_loop()
        self._until_closed(loop.create_task(self._retire(retired), name="limits-redis-retire"))
        if not self.available:
            # Down, perhaps because Redis already wanted the new password: try it now.
            self._attempt = 0
            if self._recovery is not None:
                # The old recovery ends first: one that let a single cancel go by (relay.cancel)
                # would run beside the new one until Redis is back.
                self._until_closed(self._recovery)
                self._until_closed(
                    loop.create_task(cancel_and_wait({self._recovery}), name="limits-redis-recovery-end")
                )
            self._recovery = loop.create_task(self._recover(), name="limits-redis-recovery")

    def _until_closed(self, task: asyncio.Task[Any]) -> None:
        """Held until it is done; close() ends it if it still runs then."""
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, client: Any) -> None:
        try:
            await asyncio.sleep(self._timeout)
        finally:
            with contextlib.suppress(*self._errors):
                await client.aclose()

    @property
    def available(self) -> bool:
        return self._down_since is None

    # -- the contract (see counters.py) ------------------------------------------------
    def peek(self, demands: Sequence[Demand]) -> Excess | None:
        if not self.available:
            return self._fallback.peek(demands)
        for demand in demands:
            seen = self._seen.get(demand.entity.key)
            if seen is None:
                continue
            now = seen.redis_now + (time.monotonic() - seen.local_now)
            state = CounterState()
            state.tokens = float("nan") if seen.tokens is None else seen.tokens
            state.at, state.slot = seen.redis_now, seen.slot
            if slot_of(now) == seen.slot:
                # Totals only shrink when a slot ends; until then, what was over stays over.
                state.messages, state.recipients = seen.messages, seen.recipients
            state.advance(now, demand.limits)
            excess = state.excess(demand, now)
            if excess is not None:
                return excess
        return None

    async def take(self, demands: Sequence[Demand]) -> Taken | Excess:
        if not demands:
            return Taken((), 0, self.name)
        if not self.available:
            return self._fall_back(demands)
        call = asyncio.ensure_future(self._run("take", demands))
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The caller is gone (a client that vanished at DATA, a stop) while the script
            # was sent or about to be: Redis may count the message when it runs it, and no
            # one would give that count back. The call finishes on its own (bounded by
            # `timeout`); a count it took is given back then.
            call.add_done_callback(lambda done: self._give_back_unclaimed(done, demands))
            self._track_unclaimed(call)
            raise
        except self._errors as exc:
            self._went_down(exc)
            return self._fall_back(demands)
        status, slot, redis_now = int(reply[0]), int(reply[1]), float(reply[2])
        if status == 1:
            self._remember(demands, reply[3:], slot, redis_now)
            return Taken(tuple(demands), slot, self.name)
        index, kind, used, limit, wait = reply[3:8]
        self._remember(demands, reply[8:], slot, redis_now)
        demand = demands[int(index) - 1]
        return Excess(demand.entity, _KINDS[int(kind)], float(used), float(limit), max(0.0, float(wait)))

    def _give_back_unclaimed(self, call: asyncio.Future[list[Any]], demands: Sequence[Demand]) -> None:
        """`take`'s script, finished after its caller was cancelled: what it counted goes back.
        Not knowable, and so left counted (erring on the safe side): a call that failed or
        timed out, where Redis may or may not have run the script."""
        if call.cancelled() or call.exception() is not None:
            return  # the exception is retrieved: no "never retrieved" warning
        reply = call.result()
        if int(reply[0]) != 1:
            return  # refused: nothing was counted
        taken = Taken(tuple(demands), int(reply[1]), self.name)
        self._track_unclaimed(
            asyncio.get_running_loop().create_task(self.give_back(taken), name="limits-redis-unclaimed")
        )

    def _track_unclaimed(self, task: asyncio.Future[Any]) -> None:
        """Held until done; close() lets it finish (bounded) before it closes the client."""
        self._unclaimed.add(task)
        task.add_done_callback(self._unclaimed.discard)

    async def give_back(self, taken: Taken) -> None:
        if taken.backend == self._fallback.name:
            self._fallback.give_back_now(taken)
            return
        if not self.available or not taken.demands:
            return  # lost with the outage: the count errs on the safe side
        try:
            reply = await self._run("give", taken.demands, give_slot=taken.slot)
        except self._errors as exc:
            self._went_down(exc)
            return
        # What `peek` answers from must show the count given back (else the retry of a
        # message the upstream refused is refused at RCPT until the slot ends).
        self._remember(taken.demands, reply[3:], int(reply[1]), float(reply[2]))

    async def usage(self, entities: Sequence[Entity]) -> dict[Entity, Usage]:
        """Usage across every replica, read from Redis (nothing while it is unreachable:
        this host's counts alone would understate it).

        Read-only and cheap, since every scrape of every worker of every replica asks: no
        script (a script blocks Redis for every replica's messages while it runs), one
        `HGETALL` per entity in pipelines of USAGE_BATCH, the window moved in Python. A
        failure here says nothing about the messages' path: it never marks Redis down."""
        if not self.available or not entities:
            return {}
        out: dict[Entity, Usage] = {}
        try:
            now = self._clock() if self._clock is not None else None
            for start in range(0, len(entities), USAGE_BATCH):
                batch = entities[start : start + USAGE_BATCH]
                async with asyncio.timeout(self._timeout), self._slots:
                    pipe = self._client.pipeline(transaction=False)
                    if now is None:
                        pipe.time()
                    for entity in batch:
                        pipe.hgetall(self._prefix + entity.key)
                    replies = await pipe.execute()
                if now is None:
                    seconds, micros = replies.pop(0)
                    now = int(seconds) + int(micros) / 1e6
                for entity, fields in zip(batch, replies, strict=True):
                    out[entity] = _usage_of(fields, now)
        except self._errors as exc:
            log.debug("limit usage not read from redis", extra={"reason": f"{type(exc).__name__}: {exc}"[:200]})
            return {}
        return out

    def problem(self) -> str | None:
        if self.available:
            return self._fallback.problem()
        since = datetime.fromtimestamp(self._down_wall, UTC)
        return (
            f"{self._what_is_wrong()} since {since:%Y-%m-%dT%H:%M:%SZ} ({self._down_reason}); "
            "limits are counted on this host only"
        )

    async def close(self) -> None:
        if self._secrets is not None:
            self._secrets.unsubscribe(self._secret_changed)
            self._secrets = None
        if self._recovery is not None:
            await cancel_and_wait({self._recovery})
        await cancel_and_wait(list(self._retiring))  # a retire closes its client when cancelled
        for _ in range(2):  # a take's call, then the give-back it may start
            if self._unclaimed:
                # Each is one script call, bounded by `timeout`: let them reach Redis.
                await asyncio.wait(list(self._unclaimed), timeout=self._timeout)
        await cancel_and_wait(list(self._unclaimed))
        with contextlib.suppress(*self._errors):
            await self._client.aclose()
        await self._fallback.close()

    # -- Redis -------------------------------------------------------------------------
    async def _run(self, op: str, demands: Sequence[Demand], give_slot: int = 0) -> list[Any]:
        args: list[str | int] = [op, "" if self._clock is None else int(self._clock() * 1000), give_slot]
        for demand in demands:
            limits = demand.limits
            args.append(
                f"{demand.messages} {demand.recipients} "
                f"{'-' if limits.rate is None else repr(limits.rate.per_second)} {limits.burst} "
                f"{'-' if limits.daily is None else limits.daily} "
                f"{'-' if limits.daily_recipients is None else limits.daily_recipients} {demand.tokens}"
            )
        keys = [self._prefix + demand.entity.key for demand in demands]
        self.round_trips += 1
        async with asyncio.timeout(self._timeout), self._slots:
            reply: list[Any] = await self._script(keys=keys, args=args)
            return reply

    def _remember(self, demands: Sequence[Demand], states: list[Any], slot: int, redis_now: float) -> None:
        local_now = time.monotonic()
        for i, demand in enumerate(demands):
            tokens = states[3 * i]
            self._seen[demand.entity.key] = _Seen(
                None if tokens in (b"", "") else float(tokens),
                int(states[3 * i + 1]),
                int(states[3 * i + 2]),
                slot,
                redis_now,
                local_now,
            )

    # -- outage ------------------------------------------------------------------------
    def _fall_back(self, demands: Sequence[Demand]) -> Taken | Excess:
        FAIL_OPEN.labels(self.name).inc()
        self._fallbacks_unlogged += 1
        self._log_outage()
        return self._fallback.take_now(demands)

    def _went_down(self, exc: BaseException) -> None:
        self._down_reason = _describe(exc)
        self._refused = isinstance(exc, self._refusals)
        if self._down_since is None:
            now = time.monotonic()
            if now - self._up_since > FLAP_WINDOW:
                self._attempt = 0  # up long enough: this is a new outage, not the same one back
            self._down_since = now
            self._down_wall = time.time()
            self._seen.clear()
            self._log_outage()
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover(), name="limits-redis-recovery")

    def _log_outage(self) -> None:
        now = time.monotonic()
        if now - self._last_logged < LOG_INTERVAL:
            return
        self._last_logged = now
        log.warning(
            f"{self._what_is_wrong()}; limits counted on this host only (fail open)",
            extra={"reason": self._down_reason, "checks_since_last_log": self._fallbacks_unlogged},
        )
        self._fallbacks_unlogged = 0

    def _what_is_wrong(self) -> str:
        # A refusal is configuration to fix (the node is a replica, at maxmemory, or the ACL
        # user may not run scripts), not a network outage.
        return "redis refuses the limit script" if self._refused else "redis unreachable"

    async def _recover(self) -> None:
        """Switch back once the script itself runs again (PING answers on a node that
        refuses it), pausing longer each time; a flap right after a recovery continues the
        back-off rather than starting it over."""
        while self._down_since is not None:
            await asyncio.sleep(RECOVERY_PAUSES[min(self._attempt, len(RECOVERY_PAUSES) - 1)])
            self._attempt += 1
            try:
                async with asyncio.timeout(self._timeout), self._slots:
                    await self._script(keys=[self._prefix + "probe"], args=["probe", "", 0])
            except self._errors as exc:
                self._down_reason = _describe(exc)
                self._refused = isinstance(exc, self._refusals)
                continue
            now = time.monotonic()
            down_for = now - self._down_since
            self._down_since = None
            self._up_since = now
            if now - self._last_recovery_logged >= LOG_INTERVAL:
                self._last_recovery_logged = now
                log.warning(
                    "redis reachable again; limits shared across replicas again",
                    extra={"down_s": round(down_for, 1), "checks_on_local_counters": self._fallbacks_unlogged},
                )
                self._fallbacks_unlogged = 0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__


def connect(
    url: str,
    *,
    password: str | Callable[[], str | None] | None,
    timeout: float,
    ca_file: Path | None,
    resolver: HostAddresses | None,
) -> tuple[Any, Any]:
    """A client (with its own connection pool) and the limit script registered on it."""
    import redis.asyncio as aioredis
    from redis.asyncio.connection import ConnectionPool, parse_url
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from relay.limits.redis_connect import Credentials, resolving

    options: dict[str, Any] = dict(parse_url(url))
    if url.startswith("rediss://"):
        # Explicit: redis-py before 6 does not check the host name by default.
        options["ssl_check_hostname"] = True
        if ca_file is not None:
            options["ssl_ca_certs"] = str(ca_file)
    username = options.pop("username", None)
    if password is not None:
        # Read at each new connection: a rotated password needs no restart.
        options["credential_provider"] = Credentials(username, password if callable(password) else lambda: password)
    elif username is not None:
        options["username"] = username
    if resolver is not None:
        options["connection_class"] = resolving(options.get("connection_class"), resolver)
    # Fail fast and let this class decide what a failure means: no retries inside the
    # client, every wait bounded by `timeout`. At most MAX_CONNECTIONS calls at once, queued
    # first come first served (redis-py's blocking pool lets a busy task take a freed
    # connection again ahead of the waiters, which starves some of them into timeouts).
    pool = ConnectionPool(
        max_connections=MAX_CONNECTIONS,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        **options,
    )
    client = aioredis.Redis(connection_pool=pool)
    return client, client.register_script(LUA)


async def probe(
    url: str,
    *,
    password: str | Callable[[], str | None] | None = None,
    timeout: float = 1.0,
    key_prefix: str = "relay:limits:",
    ca_file: Path | None = None,
    resolver: HostAddresses | None = None,
) -> tuple[str, str] | None:
    """What `relay check` asks: does the limit script run there, as the relay would run it
    (connect, TLS, AUTH, a write under `key_prefix`)? None if it does, else what is wrong
    (`unreachable` or `refused`, and the error): the same test as the recovery's."""
    from redis.exceptions import RedisError, ResponseError

    client, script = connect(url, password=password, timeout=timeout, ca_file=ca_file, resolver=resolver)
    try:
        async with asyncio.timeout(timeout):
            await script(keys=[key_prefix + "probe"], args=["probe", "", 0])
    except ResponseError as exc:
        return "refused", _describe(exc)
    except (RedisError, OSError, TimeoutError) as exc:
        return "unreachable", _describe(exc)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()
    return None
