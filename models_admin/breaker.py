"""A circuit breaker per model version, its state in Redis so every worker process shares it.

closed: calls go through; failures in a row are counted, and `threshold` of them open it.
open: calls are refused (the caller falls back) until `cooldown` seconds have passed.
half-open: after the cool-down one caller (the first to take the probe) may try; success
closes the breaker, failure opens it for another cool-down. Others are refused meanwhile.

Each change is one Lua script, so two workers never both take the probe or lose a count.

A call that found its breaker closed with no failure counted records no success (there is
nothing to reset): a healthy model costs one Redis call per request, not two. A failure that
another process counts while such a call runs is then reset only by the next call's success.
"""

import logging
import time
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from typing import cast

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


# KEYS[1] state hash; ARGV: now, cooldown. Returns a `Pass`: 2 when closed with no failure
# counted, 1 when the call may go ahead otherwise, 0 when it may not.
_ALLOW = """
local state, failures = unpack(redis.call('HMGET', KEYS[1], 'state', 'failures'))
if not state or state == 'closed' then
  if tonumber(failures or '0') == 0 then return 2 end
  return 1
end
local now = tonumber(ARGV[1])
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
if state == 'open' then
  if now - opened < tonumber(ARGV[2]) then return 0 end
  redis.call('HSET', KEYS[1], 'state', 'half-open', 'probe_at', ARGV[1])
  return 1
end
-- half-open: the probe is out; a probe that never reported back is retaken after a cool-down.
local probe = tonumber(redis.call('HGET', KEYS[1], 'probe_at') or '0')
if now - probe >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'probe_at', ARGV[1])
  return 1
end
return 0
"""

# KEYS[1]; ARGV: now, threshold. Returns the new state.
_FAILURE = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if state == 'half-open' or (state == 'closed' and failures >= tonumber(ARGV[2])) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1])
  return 'open'
end
if state == 'closed' then redis.call('HSET', KEYS[1], 'state', 'closed') end
return state
"""


class Pass(IntEnum):
    """`breaker_allow`'s answer; false only when the call may not go ahead."""

    REFUSED = 0
    ALLOWED = 1
    # Closed, no failure counted: a success would change nothing, and is not recorded.
    CLEAN = 2


@dataclass(frozen=True)
class BreakerState:
    state: str
    failures: int
    opened_at: float | None

    def describe(self, cooldown_s: float) -> str:
        if self.state == OPEN and self.opened_at is not None:
            left = cooldown_s - (time.time() - self.opened_at)
            if left <= 0:
                return "open (cool-down over: the next request probes)"
            return f"open ({left:.0f}s of cool-down left, {self.failures} failures)"
        if self.state == HALF_OPEN:
            return "half-open (probing)"
        return f"closed ({self.failures} failures in a row)" if self.failures else "closed"


def _key(version_id: int) -> str:
    return f"{settings.CIRCUIT_BREAKER_KEY_PREFIX}:{version_id}"


@cache
def _client() -> redis.Redis:
    # No retries: while Redis is away a call goes ahead at once (below), not after redis-py's
    # default three retries with backoff (about 8 s).
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1.0, retry=Retry(NoBackoff(), 0))


# Without Redis the breakers cannot be read: calls go ahead (closed), as they would without
# breakers at all, rather than every model being refused.


def breaker_allow(*, version_id: int, cooldown_s: float) -> Pass:
    try:
        allowed = cast(int, _client().eval(_ALLOW, 1, _key(version_id), time.time(), cooldown_s))
    except redis.RedisError:
        logger.warning("Circuit breaker state unavailable; letting the call through")
        return Pass.ALLOWED
    return Pass(allowed)


def breaker_record_failure(*, version_id: int, threshold: int) -> str:
    try:
        state = _client().eval(_FAILURE, 1, _key(version_id), time.time(), threshold)
    except redis.RedisError:
        logger.warning("Circuit breaker state unavailable; failure not counted")
        return CLOSED
    return state.decode() if isinstance(state, bytes) else str(state)


def breaker_record_success(*, version_id: int) -> None:
    try:
        _client().hset(_key(version_id), mapping={"state": CLOSED, "failures": 0, "opened_at": 0})
    except redis.RedisError:
        logger.warning("Circuit breaker state unavailable; success not recorded")


def breaker_state(*, version_id: int) -> BreakerState:
    try:
        raw = cast(dict[bytes, bytes], _client().hgetall(_key(version_id)))
    except redis.RedisError:
        return BreakerState(state="unknown (Redis unavailable)", failures=0, opened_at=None)
    values = {k.decode(): v.decode() for k, v in raw.items()}
    opened = float(values.get("opened_at") or 0)
    return BreakerState(
        state=values.get("state", CLOSED),
        failures=int(values.get("failures") or 0),
        opened_at=opened or None,
    )


def breaker_reset(*, version_id: int) -> None:
    _client().delete(_key(version_id))
