"""Per-registry flow-control state in Redis (the broker's), shared by every worker on every host.

Three things per registry, all under ``pushworker:flow:<registry_id>:``:

- ``slots``: a ZSET of holder -> lease expiry (Redis' own clock). ``acquire`` is one Lua script:
  drop expired leases, then grant if fewer than ``cap`` remain, so check-and-add is atomic
  across processes. With ``take=False`` it only answers whether it would grant (the pipeline
  asks before a step's claim, and takes the slot after it, right before the upload). A holder
  renews its lease while its upload runs; a worker that dies stops renewing and its slot frees
  when the lease runs out: never leaked.
- ``waiters``: a ZSET of waiter -> first time it was refused, and ``seen``: waiter -> last time it
  asked. A refusal says how many live waiters came before (the "3 ahead" an operator sees) and
  whether this is the waiter's first refusal of this wait; a waiter that stops asking is dropped.
- Hand-over: ``hand_over`` releases a slot and, in the same script, reserves the freed slot
  (and any other one under ``cap``) for the first live waiters: ``reserved:<waiter>`` in
  ``slots``, with a short lease of its own. A reservation counts as a holder (so the cap holds)
  and only that waiter's ``acquire`` may take it: a newcomer or another waiter polling cannot
  take the slot meant for the head of the queue. The caller publishes each reserved waiter's
  step at once. A reservation nobody took by the end of its lease frees the slot and drops the
  waiter from the queue (it stopped answering; if it is alive, its next ask puts it back).
- ``aimd``: the adaptive cap (a float), when it last changed and when it last went down,
  replaced only by compare-and-set so two workers reacting to the same 429 lower it once.
- ``message:<waiter>``: the id of the message a refused waiter was re-queued under (its own
  message, due after its countdown), kept by the refusal. When a hand-over's run ends the
  waiter's job, ``supersede`` moves it to ``superseded:<waiter>``; that message, when it comes,
  finds the mark (``take_superseded``) and stops without touching the database. Both expire
  with the waiter's TTL: a mark nobody takes only costs the delivery the database's answer.

The request rate is the ``limits`` library's moving window on the same Redis.
Redis errors become ``worker.core.errors.BrokerUnavailable``-style ``FlowStateUnavailable``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import redis
from limits import RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from worker.core.errors import FlowStateUnavailable

PREFIX = "pushworker:flow"
#: A slot reserved for a waiter is ``RESERVED + waiter`` in the ``slots`` ZSET.
RESERVED = "reserved:"

# Shared by the scripts below: ``now`` from ARGV (-1: Redis TIME); expired leases dropped, and
# the waiter of each expired reservation with them (KEYS[1] slots, KEYS[2] waiters, KEYS[3] seen).
_EXPIRE = (
    f"local RESERVED = '{RESERVED}'\n"
    + """
local function clock(given)
  local now = tonumber(given)
  if now < 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return now
end
local function expire(now)
  for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
    if string.sub(h, 1, #RESERVED) == RESERVED then
      local w = string.sub(h, #RESERVED + 1)
      redis.call('ZREM', KEYS[2], w)
      redis.call('ZREM', KEYS[3], w)
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
"""
)

# KEYS: slots, waiters, seen, message. ARGV: holder, waiter, cap, lease, waiter_ttl, now (-1:
# Redis TIME), wake ('1': a wake message, which takes the waiter's reservation or a free slot,
# never waits), ask ('1': only say whether the slot would be granted now; nothing is taken),
# message id ('' for none: the refused message, kept in KEYS[4] for the waiter's TTL).
# Returns {granted (0/1), holders, ahead, first_refusal (0/1)}.
_ACQUIRE = (
    _EXPIRE
    + """
local now = clock(ARGV[6])
local cap = tonumber(ARGV[3])
expire(now)
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[5]))
for _, w in ipairs(stale) do
  redis.call('ZREM', KEYS[2], w)
  redis.call('ZREM', KEYS[3], w)
end
local reserved = RESERVED .. ARGV[2]
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
local kept = redis.call('ZSCORE', KEYS[1], reserved)
local holders = redis.call('ZCARD', KEYS[1])
if mine or kept or holders < cap then
  if ARGV[8] == '1' then
    return {1, holders, 0, 0}
  end
  redis.call('ZREM', KEYS[1], reserved)
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) * 1000) + 1000)
  return {1, redis.call('ZCARD', KEYS[1]), 0, 0}
end
if ARGV[7] == '1' then
  return {0, holders, 0, 0}
end
local first = redis.call('ZADD', KEYS[2], 'NX', now, ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[2])
local ttl = math.ceil(tonumber(ARGV[5]) * 1000) + 1000
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
if ARGV[9] ~= '' then
  redis.call('SET', KEYS[4], ARGV[9], 'PX', ttl)
end
return {0, holders, redis.call('ZRANK', KEYS[2], ARGV[2]), first}
"""
)

# KEYS: slots, waiters, seen. ARGV: holder, cap, reservation lease, waiter_ttl, most (how many
# waiters to reserve for at most), now (-1: Redis TIME).
# Releases the holder's slot, then reserves free slots (up to cap) for the first live waiters
# without one, in the order they were first refused. Returns those waiters.
_HAND_OVER = (
    _EXPIRE
    + """
local now = clock(ARGV[6])
redis.call('ZREM', KEYS[1], ARGV[1])
expire(now)
local cap, most = tonumber(ARGV[2]), tonumber(ARGV[5])
local reserved = {}
if most > 0 and redis.call('ZCARD', KEYS[1]) < cap then
  for _, w in ipairs(redis.call('ZRANGE', KEYS[2], 0, 63)) do
    if #reserved >= most or redis.call('ZCARD', KEYS[1]) >= cap then
      break
    end
    local seen = redis.call('ZSCORE', KEYS[3], w)
    local key = RESERVED .. w
    if seen and tonumber(seen) > now - tonumber(ARGV[4])
        and not redis.call('ZSCORE', KEYS[1], key) then
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), key)
      table.insert(reserved, w)
    end
  end
  if #reserved > 0 then
    local longest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(longest[2]) - now) * 1000) + 1000)
  end
end
return reserved
"""
)

# KEYS: slots. ARGV: holder, lease, now (-1: Redis TIME). Returns 1 if the lease was renewed.
_RENEW = """
local now = tonumber(ARGV[3])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 1000)
return 1
"""

# KEYS: message, superseded. ARGV: ttl (ms). Moves the waiter's kept message id (if any) to its
# mark.
_SUPERSEDE = """
local id = redis.call('GET', KEYS[1])
if id then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], id, 'PX', tonumber(ARGV[1]))
end
return 0
"""

# KEYS: superseded. ARGV: message id. Takes the mark if it names this message: 1, else 0.
_TAKE_SUPERSEDED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: aimd. ARGV: expected cap ('' for none), new cap ('' to clear), the concurrency a 429
# refused ('' to keep the stored one; given: a decrease, whose time is kept as decreased_at).
# Returns 1 if replaced.
_SWAP_CAP = """
local current = redis.call('HGET', KEYS[1], 'cap')
if (current or '') ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  local t = redis.call('TIME')
  local stamp = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'cap', ARGV[2], 'changed_at', stamp)
  if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[1], 'refused_at', ARGV[3], 'decreased_at', stamp)
  end
end
return 1
"""


@dataclass(frozen=True)
class SlotGrant:
    """The answer to one ``acquire``."""

    granted: bool
    #: Holders of a slot after the call (the new one included when granted).
    holders: int
    #: Waiters that asked before this one and still wait (0 when granted).
    ahead: int = 0
    #: True on the first refusal of a wait (so the wait is recorded once).
    first_refusal: bool = False


@dataclass(frozen=True)
class AdaptiveCap:
    cap: float
    #: Redis' clock, seconds since the epoch.
    changed_at: float
    #: How many pushes were running when the registry last answered 429.
    refused_at: int | None = None
    #: When the cap last went down (Redis' clock); increases do not move it.
    decreased_at: float = 0.0


def _keys(registry_id: int) -> tuple[str, str, str]:
    base = f"{PREFIX}:{registry_id}"
    return f"{base}:slots", f"{base}:waiters", f"{base}:seen"


def _aimd_key(registry_id: int) -> str:
    return f"{PREFIX}:{registry_id}:aimd"


def _message_key(registry_id: int, waiter: str) -> str:
    return f"{PREFIX}:{registry_id}:message:{waiter}"


def _superseded_key(registry_id: int, waiter: str) -> str:
    return f"{PREFIX}:{registry_id}:superseded:{waiter}"


class RedisFlowState:
    """The Redis implementation of ``worker.seams.protocols.FlowState``."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url
        self._client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._acquire = self._client.register_script(_ACQUIRE)
        self._renew = self._client.register_script(_RENEW)
        self._swap = self._client.register_script(_SWAP_CAP)
        self._hand_over = self._client.register_script(_HAND_OVER)
        self._supersede = self._client.register_script(_SUPERSEDE)
        self._take_superseded = self._client.register_script(_TAKE_SUPERSEDED)
        self._limiter: MovingWindowRateLimiter | None = None

    def acquire(
        self,
        registry_id: int,
        holder: str,
        waiter: str,
        cap: int,
        *,
        lease: float,
        waiter_ttl: float,
        now: float | None = None,
        wake: bool = False,
        take: bool = True,
        message_id: str | None = None,
    ) -> SlotGrant:
        """A slot for ``holder``: its waiter's reservation, or a free one under ``cap``; else a
        place in the queue (not for a ``wake`` message: the waiter's own message waits).
        ``take=False`` only asks: the answer a take would get now, with nothing taken (a
        reservation stays its waiter's, a free slot stays free), the queue kept as a refusal
        keeps it. ``message_id``: the asking message, kept as the waiter's if it is refused
        (it is re-queued under that id), for ``supersede``."""
        args = [holder, waiter, cap, lease, waiter_ttl, -1 if now is None else now]
        args += ["1" if wake else "", "" if take else "1", message_id or ""]
        keys = [*_keys(registry_id), _message_key(registry_id, waiter)]
        answer = cast(list[int], self._call(self._acquire, keys, args))
        granted, holders, ahead, first = (int(value) for value in answer)
        return SlotGrant(bool(granted), holders, ahead, bool(first))

    def hand_over(
        self,
        registry_id: int,
        holder: str,
        cap: int,
        *,
        reservation: float,
        waiter_ttl: float,
        most: int = 1,
        now: float | None = None,
    ) -> list[str]:
        """Release ``holder``'s slot and reserve free slots (up to ``cap``, at most ``most``) for
        the first live waiters, for ``reservation`` seconds; returns those waiters, in order."""
        args = [holder, cap, reservation, waiter_ttl, most, -1 if now is None else now]
        answer = cast(list[Any], self._call(self._hand_over, list(_keys(registry_id)), args))
        return [w.decode() if isinstance(w, bytes) else str(w) for w in answer or []]

    def cancel_reservation(self, registry_id: int, waiter: str) -> None:
        """Free a slot reserved for ``waiter`` (its step could not be published)."""
        slots = _keys(registry_id)[0]
        self._call(lambda: self._client.zrem(slots, RESERVED + waiter))

    def renew(
        self, registry_id: int, holder: str, *, lease: float, now: float | None = None
    ) -> bool:
        slots = _keys(registry_id)[0]
        answer = self._call(self._renew, [slots], [holder, lease, -1 if now is None else now])
        return bool(answer)

    def release(self, registry_id: int, holder: str) -> None:
        self._call(lambda: self._client.zrem(_keys(registry_id)[0], holder))

    def forget_waiter(self, registry_id: int, waiter: str) -> None:
        slots, waiters, seen = _keys(registry_id)
        self._call(lambda: self._client.zrem(waiters, waiter))
        self._call(lambda: self._client.zrem(seen, waiter))
        self._call(lambda: self._client.zrem(slots, RESERVED + waiter))

    def supersede(self, registry_id: int, waiter: str, *, ttl: float) -> None:
        """The waiter's step has run to its end elsewhere: mark the message it was last
        re-queued under, if a refusal kept one (for ``ttl`` seconds), so that it stops when it
        comes."""
        keys = [_message_key(registry_id, waiter), _superseded_key(registry_id, waiter)]
        self._call(self._supersede, keys, [math.ceil(ttl * 1000)])

    def take_superseded(self, registry_id: int, waiter: str, message_id: str) -> bool:
        """True, once, for the message ``supersede`` marked for this waiter."""
        keys = [_superseded_key(registry_id, waiter)]
        return bool(self._call(self._take_superseded, keys, [message_id]))

    def holders(self, registry_id: int, *, now: float | None = None) -> int:
        """Holders whose lease has not run out."""
        slots = _keys(registry_id)[0]
        if now is None:
            seconds, micros = cast(tuple[int, int], self._call(self._client.time))
            now = seconds + micros / 1e6
        low = f"({now}"
        return int(cast(int, self._call(lambda: self._client.zcount(slots, low, "+inf"))))

    def adaptive_cap(self, registry_id: int) -> AdaptiveCap | None:
        raw = cast(
            dict[bytes, bytes], self._call(lambda: self._client.hgetall(_aimd_key(registry_id)))
        )
        if b"cap" not in raw:
            return None
        refused = raw.get(b"refused_at")
        return AdaptiveCap(
            float(raw[b"cap"]),
            float(raw.get(b"changed_at", b"0")),
            None if refused is None else int(refused),
            float(raw.get(b"decreased_at", b"0")),
        )

    def swap_cap(
        self,
        registry_id: int,
        expected: float | None,
        new: float | None,
        *,
        refused_at: int | None = None,
    ) -> bool:
        args = [
            "" if expected is None else repr(float(expected)),
            "" if new is None else repr(float(new)),
            "" if refused_at is None else str(int(refused_at)),
        ]
        return bool(self._call(self._swap, [_aimd_key(registry_id)], args))

    def first_rate_wait(self, registry_id: int, waiter: str, *, ttl: float) -> bool:
        """True if ``waiter`` starts a wait for the rate (none marked in the last ``ttl`` s);
        each call keeps the mark for another ``ttl`` s, so a wait is first once."""
        key = f"{PREFIX}:{registry_id}:ratewait:{waiter}"
        millis = math.ceil(ttl * 1000)
        if self._call(lambda: self._client.set(key, b"1", nx=True, px=millis)):
            return True
        self._call(lambda: self._client.pexpire(key, millis))
        return False

    def take_request(self, registry_id: int, per_second: float) -> float:
        """Count one request against the registry's rate; 0 if allowed, else seconds to wait."""
        item = rate_item(per_second)
        limiter = self._rate_limiter()
        key = f"registry-{registry_id}"
        if self._call(lambda: limiter.hit(item, key)):
            return 0.0
        stats = self._call(lambda: limiter.get_window_stats(item, key))
        reset = float(stats.reset_time)
        seconds, micros = cast(tuple[int, int], self._call(self._client.time))
        return max(0.05, reset - (seconds + micros / 1e6))

    def _rate_limiter(self) -> MovingWindowRateLimiter:
        if self._limiter is None:
            storage = RedisStorage(self.url, key_prefix=f"{PREFIX}:rate")
            self._limiter = MovingWindowRateLimiter(storage)
        return self._limiter

    def _call(
        self, function: Any, keys: list[str] | None = None, args: list[Any] | None = None
    ) -> Any:
        try:
            if keys is None and args is None:
                return function()
            return function(keys=keys, args=args)
        except redis.RedisError as exc:
            raise FlowStateUnavailable(
                f"the flow-control state in Redis is unreachable: {type(exc).__name__}"
            ) from None


def rate_item(per_second: float) -> RateLimitItemPerSecond:
    """``limits``' whole-number window for a rate: 10/s -> 10 per 1 s, 0.5/s -> 1 per 2 s."""
    if per_second >= 1:
        return RateLimitItemPerSecond(max(1, math.floor(per_second)), 1)
    return RateLimitItemPerSecond(1, max(1, round(1 / per_second)))
