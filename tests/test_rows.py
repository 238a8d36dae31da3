"""Rows written and read on the request path without the ORM hold what the ORM would."""

import datetime as dt

import pytest
from django.db import connection

from chat.models import Job
from genai_site.rows import row_columns, row_insert, row_load, row_update
from governance.api_keys import api_key_create
from tests.factories import user_create

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_row_inserted_and_loaded_without_the_orm_equals_what_the_orm_reads() -> None:
    user = user_create()
    api_key, _ = api_key_create(user=user, name="rows", scopes=["chat"], actor=None)
    job = row_insert(
        Job(
            public_id="job_" + "0" * 24,
            user=user,
            api_key=api_key,
            model_alias="chat-default",
            request={"messages": [{"role": "user", "content": "héllo"}], "stop": [], "seed": 1.5},
            finished_at=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        )
    )
    assert job.pk is not None and not job._state.adding
    by_orm = Job.objects.get(pk=job.pk)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {row_columns(Job)} FROM chat_job WHERE id = %s", [job.pk])
        loaded = row_load(Job, cursor.fetchone())
    for field in Job._meta.concrete_fields:
        assert getattr(loaded, field.attname) == getattr(by_orm, field.attname), field.name
    assert loaded.request["messages"][0]["content"] == "héllo"
    assert loaded.created_at is not None and loaded.created_at == job.created_at


def test_a_row_updated_without_the_orm_holds_what_update_writes_and_only_where_it_matches() -> None:
    user = user_create()
    job = Job.objects.create(
        public_id="job_" + "2" * 24, user=user, model_alias="chat-default", request={}
    )
    finished = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    changed = {"status": Job.Status.COMPLETED, "content": "é", "finished_at": finished}
    # A stale run matches nothing.
    assert row_update(Job, changed, id=job.pk, run=job.run + 1) == 0
    assert Job.objects.get(pk=job.pk).status == Job.Status.QUEUED
    assert row_update(Job, {**changed, "user_id": user.pk}, id=job.pk, run=job.run) == 1
    saved = Job.objects.get(pk=job.pk)
    assert (saved.status, saved.content, saved.finished_at) == ("completed", "é", finished)
