"""Waiting on a job in the web process: a quiet job costs the waiting request no connection."""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from chat.api.streams import job_progress
from chat.models import Job
from tests.factories import user_create

pytestmark = pytest.mark.django_db(transaction=True)


def _queued_job() -> Job:
    return Job.objects.create(
        public_id="job_" + "1" * 24,
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
