"""Reading a job's progress in the web process (async): waiting for it, relaying it as SSE."""

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from chat.api.errors import ApiError, unavailable
from chat.api.events import job_events_read, job_settled
from chat.api.presenters import chunk_body, job_body, job_error, sse, usage_body
from chat.api.services import job_cancel
from chat.models import Job
from governance.models import ApiKey

logger = logging.getLogger(__name__)


def _job_status(pk: int) -> str | None:
    """The job's state, with the connection given back at once: a caller may wait minutes
    (a job that reports only its end is quiet until then) and must not hold one meanwhile."""
    try:
        return Job.objects.filter(pk=pk).values_list("status", flat=True).first()
    finally:
        close_old_connections()


async def job_progress(job: Job) -> AsyncGenerator[dict[str, Any], None]:
    """The job's events up to and including its end. A job that already ended, or whose
    stream expired, ends from its row."""
    if job.is_final:
        yield {"type": "end", "status": job.status}
        return
    async with aclosing(job_events_read(job.public_id)) as events:
        async for event in events:
            if event is None:
                status = await sync_to_async(_job_status)(job.pk)
                if status is None or status in (
                    Job.Status.HELD_FOR_REVIEW,
                    Job.Status.COMPLETED,
                    Job.Status.FAILED,
                    Job.Status.CANCELLED,
                ):
                    yield {"type": "end", "status": status}
                    return
                continue
            yield event
            if event.get("type") == "end":
                return


async def job_wait(job: Job) -> tuple[Job, float | None]:
    """The job once it has ended, or as it is after API_WAIT_SECONDS, and how long the model
    took to answer when the worker's end event says. That event carries the fields the worker
    settles: the job is answered from them without reading its row again. (For a caller that
    waits for the whole answer, the worker sends them before its settle commits; see
    `chat.api.generation`.)"""

    async def until_end() -> dict[str, Any] | None:
        async with aclosing(job_progress(job)) as progress:
            async for event in progress:
                if event["type"] == "end":
                    return event
        return None

    end = None
    try:
        end = await asyncio.wait_for(until_end(), timeout=settings.API_WAIT_SECONDS)
    except TimeoutError:
        pass
    settled = job_settled(end)
    if settled is None:
        return await Job.objects.aget(pk=job.pk), None
    for name, value in settled.items():
        setattr(job, name, value)
    model_seconds = (end or {}).get("model_seconds")
    return job, model_seconds if isinstance(model_seconds, int | float) else None


async def completion_chunks(
    job: Job, *, api_key: ApiKey, include_usage: bool
) -> AsyncIterator[str]:
    """A chat completion as OpenAI's stream: chunks, then `data: [DONE]`. A held answer ends
    with `finish_reason: "held_for_review"` and the job's id in `job_id`. A reader that goes
    away cancels the job."""
    ended = False
    try:
        yield sse(chunk_body(job, {"role": "assistant", "content": ""}))
        run, sent = None, False
        async with aclosing(job_progress(job)) as progress:
            async for event in progress:
                if event["type"] == "delta":
                    sent = True
                    yield sse(chunk_body(job, {"content": event["text"]}))
                elif event["type"] == "state" and event.get("status") == "running":
                    if sent and event.get("run") != run:
                        # The worker died mid-answer and another runs the job from the start:
                        # its text cannot follow what was sent. The job goes on; its result
                        # is at /v1/jobs/{id}.
                        ended = True
                        yield sse(_restarted(job).body())
                        yield sse("[DONE]")
                        return
                    run = event.get("run")
        ended = True
        final = await Job.objects.aget(pk=job.pk)
        if final.status == Job.Status.FAILED:
            yield sse(job_error(final).body())
        else:
            extra = (
                {"job_id": final.public_id} if final.status == Job.Status.HELD_FOR_REVIEW else {}
            )
            reason = final.finish_reason or (
                "held_for_review" if final.status == Job.Status.HELD_FOR_REVIEW else "stop"
            )
            yield sse(chunk_body(final, {}, reason, **extra))
            if include_usage:
                yield sse({**chunk_body(final, {}), "choices": [], "usage": usage_body(final)})
        yield sse("[DONE]")
    finally:
        if not ended:
            try:
                await sync_to_async(job_cancel)(api_key=api_key, public_id=job.public_id)
            except Exception:
                logger.exception("Could not cancel job %s after its reader left", job.public_id)


def _restarted(job: Job) -> ApiError:
    return unavailable(
        "The worker stopped in the middle of this answer. The job runs again from the start: "
        f"its answer will be at /v1/jobs/{job.public_id}."
    )


async def job_event_stream(job: Job) -> AsyncIterator[str]:
    """`/v1/jobs/{id}/events`: each event as `event: <type>`; the last one carries the job."""
    async with aclosing(job_progress(job)) as progress:
        async for event in progress:
            if event["type"] == "end":
                break
            yield sse(event, event=event["type"])
    final = await Job.objects.aget(pk=job.pk)
    yield sse({"type": "end", "job": job_body(final)}, event="end")
