"""Rows written and read on the request path without the ORM hold what the ORM would."""

import datetime as dt

import pytest
from django.db import connection

from chat.models import Job
from genai_site.rows import row_columns, row_insert, row_load
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
