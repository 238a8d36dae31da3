"""A job's progress as a Redis stream: the worker appends, any web process reads from the start.

A stream rather than a channel-layer group: a reader that subscribes late (the program asked for
`/v1/jobs/{id}/events` after the job started, or the web process created the job a moment before
it began to listen) still reads every event, in order. Entries expire with the stream.
"""

import json
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis
from django.conf import settings
from django.core.cache import cache

from genai_site.redis_loop import redis_loop_client

if TYPE_CHECKING:
    from chat.leases import HeartbeatLease

_STREAM_TTL_SECONDS = 3600
_sync_client: redis.Redis | None = None


def _key(public_id: str) -> str:
    return f"genai:job:{public_id}:events"


def _client() -> redis.Redis:
    global _sync_client
    if _sync_client is None:
        _sync_client = redis.Redis.from_url(settings.REDIS_URL)
    return _sync_client


# What a worker saves when it settles a job; its `end` event carries them (see `job_settled`).
SETTLED_FIELDS = (
    "status",
    "content",
    "error",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "finished_at",
)


def job_end_event(
    settled: dict[str, Any],
    *,
    answered: dict[str, Any] | None = None,
    model_seconds: float | None = None,
) -> dict[str, Any]:
    """The `end` event of a job the worker settled with these fields: a caller waiting on the
    job answers from them without reading the row again.

    `answered` goes with an answer sent before its settle committed (`chat.api.generation`):
    what a later run needs to settle the job as that answer, should this run's worker stop
    first (the answering run, the version that answered, which cache, if any, answered).
    `model_seconds`: how long the model's call that gave the answer took
    (`GenerationResult.model_seconds`), which the waiting call reports in its `Server-Timing`
    header."""
    return {
        "type": "end",
        "status": str(settled["status"]),
        "finish_reason": settled["finish_reason"],
        "settled": {
            **{name: settled[name] for name in SETTLED_FIELDS},
            "status": str(settled["status"]),
            "finished_at": settled["finished_at"].isoformat(),
        },
        **({"answered": answered} if answered is not None else {}),
        **({"model_seconds": model_seconds} if model_seconds is not None else {}),
    }


def job_settled(event: dict[str, Any] | None) -> dict[str, Any] | None:
    """The settled fields an `end` event carries, as the row holds them; None for an event
    without them (a cancellation, a reviewer's decision)."""
    settled = (event or {}).get("settled")
    if not isinstance(settled, dict) or not set(SETTLED_FIELDS) <= settled.keys():
        return None
    return {**settled, "finished_at": datetime.fromisoformat(settled["finished_at"])}


def job_event_publish(public_id: str, event: dict[str, Any]) -> None:
    client = _client()
    key = _key(public_id)
    pipe = client.pipeline()
    pipe.xadd(key, {"e": json.dumps(event)})
    pipe.expire(key, _STREAM_TTL_SECONDS)
    pipe.execute()


# KEYS: the lease (as the cache stores it), the job's stream; ARGV: the holder's token, the
# event, the stream's TTL. Appends only while the lease holds that token.
_PUBLISH_LEASED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


def job_event_publish_leased(
    public_id: str, event: dict[str, Any], *, lease: "HeartbeatLease"
) -> bool:
    """Append `event` if `lease` is still held by its holder, in one Redis call; False, and
    nothing appended, once the lease has lapsed or another delivery holds it. (The lease and
    the stream are on the same Redis: the cache's location is REDIS_URL.)"""
    sent = _client().eval(
        _PUBLISH_LEASED,
        2,
        cache.make_and_validate_key(lease.key),
        _key(public_id),
        str(lease.token),
        json.dumps(event),
        _STREAM_TTL_SECONDS,
    )
    return bool(sent)


def job_answer_sent(public_id: str) -> dict[str, Any] | None:
    """The `end` event that gave the job's waiting caller its answer before the job was
    settled, if there is one in the stream (see `job_end_event`)."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = _client().xrevrange(_key(public_id))  # type: ignore[assignment]
    for _, fields in entries:
        event = json.loads(fields[b"e"])
        if event.get("type") == "end":
            return event if "answered" in event and job_settled(event) is not None else None
    return None


async def job_events_read(
    public_id: str, *, block_ms: int = 1000
) -> AsyncGenerator[dict[str, Any] | None, None]:
    """Every event of the job from the first; None after each `block_ms` without one, so the
    caller can look at the job's row (the stream may have expired) or give up."""
    client = redis_loop_client("events")
    last = "0"
    while True:
        found = await client.xread({_key(public_id): last}, block=block_ms, count=100)
        if not found:
            yield None
            continue
        for entry_id, fields in found[0][1]:
            last = entry_id
            yield json.loads(fields[b"e"])
