"""Requests and tokens per minute: token buckets in Redis, taken atomically by one Lua script.

Each (subject, measure) has a bucket of `limit` units, refilled at `limit / 60` units per
second. Redis keeps what has been taken and not yet refilled (the bucket's debt), not what is
left, so that an operator's new limit applies to the very next request, in either direction.
A request takes 1 unit from every requests-per-minute bucket and its maximum token count from
every tokens-per-minute bucket that applies, all or nothing: the script checks every bucket
before it changes any, and Redis runs a script without interleaving other commands, so
concurrent requests can never together take more than a bucket holds.

Redis is the only counter: when it cannot be reached, admission refuses (fails closed) rather
than letting unmetered traffic through, and the next request tries again on a fresh connection.
"""

import functools
import math
from dataclasses import dataclass

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from governance.limits import AppliedLimit, Subject

# KEYS: the buckets. ARGV: capacity, refill per second and cost for each bucket, in order.
# Returns {0, "0"} when every bucket had room and all were taken, or {i, wait} for the first
# bucket i (1-based) that had not, with the seconds until it will have ("-1": never, since the
# cost exceeds its capacity). The time comes from the Redis server, so web processes on
# machines with skewed clocks share one timeline.
TAKE_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local debts = {}
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 3
  local capacity = tonumber(ARGV[base + 1])
  local rate = tonumber(ARGV[base + 2])
  local cost = tonumber(ARGV[base + 3])
  if cost > capacity then
    return {i, '-1'}
  end
  local state = redis.call('HMGET', key, 'debt', 'ts')
  local debt = tonumber(state[1]) or 0
  local ts = tonumber(state[2]) or now
  debt = math.max(0, debt - math.max(0, now - ts) * rate)
  if debt + cost > capacity then
    return {i, tostring((debt + cost - capacity) / rate)}
  end
  debts[i] = debt + cost
end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[(i - 1) * 3 + 2])
  redis.call('HSET', key, 'debt', tostring(debts[i]), 'ts', tostring(now))
  -- Once the debt is repaid the bucket is full again: forgetting it changes nothing.
  redis.call('EXPIRE', key, math.ceil(debts[i] / rate) + 1)
end
return {0, '0'}
"""

MEASURES = {
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "tokens per minute",
}


class RateLimited(Exception):
    def __init__(self, *, subject: Subject, measure: str, limit: int, retry_after: int):
        self.subject = subject
        self.measure = measure
        self.limit = limit
        self.retry_after = retry_after
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        what = f"{self.subject.label} limit of {self.limit:,} {MEASURES[self.measure]}"
        if self.retry_after < 0:
            return (
                f"This request needs more than {what} allows, even when unused. "
                "Ask for a shorter answer or a higher limit."
            )
        return f"Rate limit reached: {what}. Try again in {self.retry_after} s."


class RateLimiterUnavailable(Exception):
    reason = (
        "Requests cannot be metered right now (the rate limiter is unreachable), so none are "
        "accepted. Try again in a few seconds."
    )
    retry_after = 5


@dataclass(frozen=True)
class Bucket:
    subject: Subject
    measure: str
    limit: int
    cost: int

    @property
    def key(self) -> str:
        return self.subject.bucket_key(self.measure)


@functools.cache
def _script(url: str) -> Script:
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=settings.RATE_LIMIT_REDIS_TIMEOUT,
        socket_timeout=settings.RATE_LIMIT_REDIS_TIMEOUT,
        # Fail fast and let the next request reconnect: a retry loop here would hold the
        # caller's transaction open while Redis is away.
        retry=Retry(NoBackoff(), 0),
    )
    return client.register_script(TAKE_LUA)


def rate_limit_buckets(*, limits: list[AppliedLimit], tokens: int) -> list[Bucket]:
    buckets = []
    for applied in limits:
        for measure, cost in (("requests_per_minute", 1), ("tokens_per_minute", tokens)):
            limit = getattr(applied.limit, measure)
            if limit is not None:
                buckets.append(Bucket(applied.subject, measure, limit, cost))
    return buckets


def rate_limit_take(*, limits: list[AppliedLimit], tokens: int) -> None:
    """Take one request and `tokens` from every bucket that applies, or raise RateLimited
    (taking nothing) or RateLimiterUnavailable."""
    buckets = rate_limit_buckets(limits=limits, tokens=tokens)
    for bucket in buckets:
        if bucket.limit == 0:  # a suspension: refill never comes
            raise RateLimited(
                subject=bucket.subject, measure=bucket.measure, limit=0, retry_after=-1
            )
    if not buckets:
        return
    args: list[str | int | float] = []
    for bucket in buckets:
        args += [bucket.limit, repr(bucket.limit / 60), bucket.cost]
    try:
        index, wait = _script(settings.RATE_LIMIT_REDIS_URL)(
            keys=[b.key for b in buckets], args=args
        )
    except redis.RedisError as exc:
        raise RateLimiterUnavailable() from exc
    if int(index) == 0:
        return
    bucket = buckets[int(index) - 1]
    seconds = float(wait)
    raise RateLimited(
        subject=bucket.subject,
        measure=bucket.measure,
        limit=bucket.limit,
        retry_after=-1 if seconds < 0 else max(1, math.ceil(seconds)),
    )
