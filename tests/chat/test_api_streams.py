"""Waiting on a job in the web process: a quiet job costs the waiting request no connection."""

import asyncio
import json
import secrets

import pytest
from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import connection

from chat.api.events import job_event_publish
from chat.api.services import job_cancel_key
from chat.api.streams import completion_chunks, job_progress
from chat.models import Job
from tests.chat.api_helpers import api_key_for
from tests.factories import user_create

pytestmark = pytest.mark.django_db(transaction=True)


def _queued_job() -> Job:
    return Job.objects.create(
        public_id="job_" + secrets.token_hex(12),
        user=user_create(),
        model_alias="chat-default",
        request={"messages": [{"role": "user", "content": "hi"}], "progress": False},
    )


def _holds_a_connection() -> bool:
    return connection.connection is not None


async def test_a_caller_waiting_on_a_job_that_reports_nothing_yet_holds_no_connection() -> None:
    job = await sync_to_async(_queued_job)()
    assert await sync_to_async(_holds_a_connection)()
    progress = job_progress(job)
    # No event for a second: the reader looks at the row, then waits again.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(progress), timeout=1.6)
    await progress.aclose()
    assert not await sync_to_async(_holds_a_connection)()


async def _streamed(job: Job) -> list[object]:
    api_key, _ = await sync_to_async(api_key_for)()
    chunks = [chunk async for chunk in completion_chunks(job, api_key=api_key, include_usage=False)]
    data = [chunk.removeprefix("data: ").strip() for chunk in chunks]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


async def test_a_stream_whose_job_starts_again_after_text_was_sent_ends_with_an_error() -> None:
    job = await sync_to_async(_queued_job)()
    # The first run sent text, then its worker died; the job was queued and runs again.
    for event in (
        {"type": "state", "status": "running", "run": 1},
        {"type": "delta", "text": "Once upon"},
        {"type": "state", "status": "queued", "run": 1},
        {"type": "state", "status": "running", "run": 2},
        {"type": "delta", "text": "Once upon"},
    ):
        job_event_publish(job.public_id, event)

    role, text, error, done = await asyncio.wait_for(_streamed(job), timeout=30)
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # type: ignore[index]
    assert text["choices"][0]["delta"] == {"content": "Once upon"}  # type: ignore[index]
    assert "runs again from the start" in error["error"]["message"]  # type: ignore[index]
    assert job.public_id in error["error"]["message"]  # type: ignore[index]
    assert done == "[DONE]"
    # The reader did not leave: the job is not cancelled, and its answer will be kept.
    assert cache.get(job_cancel_key(job.public_id)) is None


async def test_a_stream_whose_job_starts_again_before_any_text_goes_on_with_the_new_run() -> None:
    job = await sync_to_async(_queued_job)()
    for event in (
        {"type": "state", "status": "running", "run": 1},
        {"type": "state", "status": "queued", "run": 1},
        {"type": "state", "status": "running", "run": 2},
        {"type": "delta", "text": "Hello"},
    ):
        job_event_publish(job.public_id, event)
    await Job.objects.filter(pk=job.pk).aupdate(
        status=Job.Status.COMPLETED, content="Hello", finish_reason="stop", run=2
    )
    job_event_publish(job.public_id, {"type": "end", "status": "completed"})

    chunks = await asyncio.wait_for(_streamed(job), timeout=30)
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]  # type: ignore[index]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hello"}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert chunks[-1] == "[DONE]"
