"""The /v1 API with the official openai SDK as the client, against a live server, the Celery
worker and the real model. The test model answers greedily in at most 48 tokens;
"What is the capital of France?" -> "The capital of France is Paris." (see test_safety_turn).
"""

import json
import time
from typing import cast

import openai
import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import Group
from openai.types.chat import ChatCompletionMessageParam

from bench.load_client import server_timing
from chat.models import Job
from governance.models import (
    AuditEvent,
    BlockedTerm,
    QuotaReservation,
    ReviewItem,
    SafetyHold,
    SafetyPolicy,
)
from governance.review_queue import (
    REVIEWERS_GROUP,
    Decision,
    review_item_claim_next,
    review_item_decide,
)
from governance.review_targets import review_target_get
from models_admin.models import Deployment
from tests.chat.api_helpers import http, job_once_settled, key_for, sdk, sse_events
from tests.factories import user_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("chat_model")]

FRANCE: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


def test_a_completion_through_the_sdk_answers_with_usage_and_is_audited(
    live_asgi_server: str,
) -> None:
    client = sdk(live_asgi_server, key_for("ada"))
    # A field this server does not know is ignored, as OpenAI does.
    completion = client.chat.completions.create(
        model="chat-default", messages=FRANCE, max_tokens=20, extra_body={"unknown_field": 1}
    )

    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason in ("stop", "length")
    job = job_once_settled(completion.id)
    assert job.status == "completed" and job.user.username == "ada"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == job.prompt_tokens
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens == job.completion_tokens
    assert completion.usage.completion_tokens <= 20
    assert QuotaReservation.objects.get(pk=job.reservation_id or 0).status == "settled"
    actions = set(
        AuditEvent.objects.filter(target_type="job", target_id=job.public_id).values_list(
            "action", flat=True
        )
    )
    assert {"turn.admitted", "job.generated"} <= actions
    # Its caller waited for the whole answer: the worker published the end and nothing else.
    events = redis.Redis.from_url(settings.REDIS_URL).xrange(f"genai:job:{job.public_id}:events")
    assert [json.loads(f[b"e"])["type"] for _, f in cast(list, events)] == ["end"]


def test_an_answer_says_in_server_timing_what_the_platform_added_to_the_models_time(
    live_asgi_server: str,
) -> None:
    client = sdk(live_asgi_server, key_for())
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model="chat-default", messages=FRANCE, max_tokens=8
    )
    elapsed_ms = (time.perf_counter() - started) * 1000
    timing = server_timing(raw.headers["server-timing"])

    assert set(timing) == {"total", "model", "platform"}
    assert timing["platform"] == pytest.approx(timing["total"] - timing["model"], abs=0.02)
    assert 0 < timing["model"] < timing["total"] < elapsed_ms
    # Against the job's own times: the model ran between the worker's claim and its settle,
    # and the request took in everything from the job's row to that settle.
    job = job_once_settled(raw.parse().id)
    assert job.started_at and job.finished_at
    assert timing["model"] <= (job.finished_at - job.started_at).total_seconds() * 1000
    assert timing["total"] >= (job.finished_at - job.created_at).total_seconds() * 1000
    # An answer without a model's call (a refusal here) gives the total alone.
    with http(live_asgi_server, "gsk_not-a-key") as bad:
        refused = bad.post("/chat/completions", json={"model": "chat-default", "messages": FRANCE})
    assert refused.status_code == 401
    assert set(server_timing(refused.headers["server-timing"])) == {"total"}


def test_a_streamed_completion_arrives_in_chunks_with_a_usage_chunk_and_done(
    live_asgi_server: str,
) -> None:
    client = sdk(live_asgi_server, key_for())
    stream = client.chat.completions.create(
        model="chat-default",
        messages=FRANCE,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    job = Job.objects.get(public_id=chunks[0].id)
    assert job.content == text
    assert chunks[-1].usage.completion_tokens == job.completion_tokens
    # The stream ends with the SDK's terminator (the iterator above stops on it).
    with http(live_asgi_server, key_for()) as raw:
        with raw.stream(
            "POST",
            "/chat/completions",
            json={"model": "chat-default", "messages": FRANCE, "stream": True},
        ) as response:
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_embeddings_models_and_errors_surface_as_the_sdks_types(live_asgi_server: str) -> None:
    raw = key_for()
    client = sdk(live_asgi_server, raw)
    # The SDK asks for base64 unless told otherwise; both encodings give the same vectors.
    vectors = client.embeddings.create(
        model="all-MiniLM-L6-v2", input=["a cat sat on the mat", "a cat sat on the mat", "tax"]
    )
    floats = client.embeddings.create(
        model="all-MiniLM-L6-v2", input="tax", encoding_format="float"
    )
    a, b, c = (d.embedding for d in vectors.data)
    assert len(a) == 384 and vectors.usage.prompt_tokens > 0
    assert sum(x * y for x, y in zip(a, b, strict=True)) == pytest.approx(1.0, abs=1e-4)
    assert sum(x * y for x, y in zip(a, c, strict=True)) < 0.5
    assert floats.data[0].embedding == pytest.approx(c, abs=1e-5)

    ids = {m.id for m in client.models.list()}
    assert ids == {"chat-default", "all-MiniLM-L6-v2"}
    assert client.models.retrieve("chat-default").id == "chat-default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    with pytest.raises(openai.AuthenticationError):
        sdk(live_asgi_server, "gsk_00000000_not-a-key").models.list()
    with pytest.raises(openai.PermissionDeniedError):
        sdk(live_asgi_server, key_for(scopes=("chat",))).models.list()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(  # type: ignore[call-overload]
            model="chat-default", messages=FRANCE, max_tokens="many"
        )
    assert bad.value.code is None and "max_tokens" in bad.value.message
    with http(live_asgi_server, raw) as api:
        response = api.post(
            "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400 and response.json()["error"]["message"]
        huge = api.post("/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x" * 2_000_000})
        assert huge.status_code == 413
        assert huge.json()["error"]["code"] == "request_too_large"


def test_a_key_over_its_rate_limit_gets_the_sdks_rate_limit_error_with_retry_after(
    live_asgi_server: str,
) -> None:
    client = sdk(live_asgi_server, key_for(requests_per_minute=1))
    client.chat.completions.create(model="chat-default", messages=FRANCE, max_tokens=4)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="chat-default", messages=FRANCE, max_tokens=4)
    assert int(refused.value.response.headers["Retry-After"]) >= 1
    assert refused.value.code == "rate_limit_exceeded"
    refused_job = Job.objects.filter(status="failed").get()
    assert AuditEvent.objects.filter(
        action="turn.refused", target_type="job", target_id=refused_job.public_id
    ).exists()


def test_an_async_job_runs_streams_its_events_and_only_its_owner_sees_it(
    live_asgi_server: str,
) -> None:
    raw = key_for("owner")
    with http(live_asgi_server, raw) as api:
        created = api.post("/jobs", json={"model": "chat-default", "messages": FRANCE})
        assert created.status_code == 202
        job_id = created.json()["id"]
        assert created.json()["status"] in ("queued", "running")
        with api.stream("GET", f"/jobs/{job_id}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = list(sse_events(response))
        names = [name for name, _ in events]
        assert names[-1] == "end" and "delta" in names
        final = events[-1][1]["job"]
        assert final["status"] == "completed"
        streamed = "".join(data["text"] for name, data in events if name == "delta")
        assert streamed == final["result"]["choices"][0]["message"]["content"]
        assert api.get(f"/jobs/{job_id}").json()["status"] == "completed"

    with http(live_asgi_server, key_for("stranger")) as other:
        assert other.get(f"/jobs/{job_id}").status_code == 404
        assert other.post(f"/jobs/{job_id}/cancel").status_code == 404
        assert other.get(f"/jobs/{job_id}/events").status_code == 404


def test_a_cancelled_job_stops_generating_and_keeps_its_partial_answer(
    live_asgi_server: str, chat_model
) -> None:  # type: ignore[no-untyped-def]
    chat_model.max_output_tokens = 400
    chat_model.save()
    raw = key_for()
    story = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    with http(live_asgi_server, raw) as api:
        job_id = api.post(
            "/jobs", json={"model": "chat-default", "messages": story, "max_tokens": 400}
        ).json()["id"]
        with api.stream("GET", f"/jobs/{job_id}/events") as response:
            for name, _ in sse_events(response):
                if name == "delta":
                    break
        cancelled = api.post(f"/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200
        deadline = time.monotonic() + 60
        while (job := Job.objects.get(public_id=job_id)).status == "running":
            assert time.monotonic() < deadline, "the job never stopped"
            time.sleep(0.1)
        body = api.get(f"/jobs/{job_id}").json()
    assert job.status == "cancelled" and job.finish_reason == "cancelled"
    assert 0 < (job.completion_tokens or 0) < 400
    assert body["result"]["choices"][0]["message"]["content"] == job.content
    assert QuotaReservation.objects.get(pk=job.reservation_id or 0).status == "settled"
    assert AuditEvent.objects.filter(action="job.cancel_requested", target_id=job_id).exists()


def test_a_held_answer_returns_the_job_not_the_text_and_creates_a_hold(
    live_asgi_server: str,
) -> None:
    deployment = Deployment.objects.get(alias="chat-default")
    SafetyPolicy.objects.create(deployment=deployment, output_blocklist="hold")
    BlockedTerm.objects.create(term="Paris")
    raw = key_for()
    with http(live_asgi_server, raw) as api:
        waited = api.post("/chat/completions", json={"model": "chat-default", "messages": FRANCE})
        assert waited.status_code == 202
        body = waited.json()
        assert body["object"] == "job" and body["status"] == "held_for_review"
        assert body["result"] is None and "Paris" not in waited.text

        with api.stream(
            "POST",
            "/chat/completions",
            json={"model": "chat-default", "messages": FRANCE, "stream": True},
        ) as response:
            chunks = [data for _, data in sse_events_until_done(response)]
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "held_for_review"
    assert final["job_id"].startswith("job_")
    assert not any("Paris" in (c["choices"][0]["delta"].get("content") or "") for c in chunks)

    for job_id in (body["id"], final["job_id"]):
        job = Job.objects.get(public_id=job_id)
        assert job.status == "held_for_review" and "Paris" in job.content
        hold = SafetyHold.objects.get(pk=job.safety_hold_id or 0)
        assert hold.target_type == "job" and hold.target_id == job_id
        assert hold.direction == "output" and hold.status == "pending"


def test_a_held_job_is_decided_in_the_review_queue_and_the_program_gets_the_outcome(
    live_asgi_server: str,
) -> None:
    deployment = Deployment.objects.get(alias="chat-default")
    SafetyPolicy.objects.create(deployment=deployment, output_blocklist="hold")
    BlockedTerm.objects.create(term="Paris")
    raw = key_for()
    reviewer = user_create()
    reviewer.groups.add(Group.objects.get_or_create(name=REVIEWERS_GROUP)[0])
    with http(live_asgi_server, raw) as api:
        held = [
            api.post("/chat/completions", json={"model": "chat-default", "messages": FRANCE})
            for _ in range(2)
        ]
        assert [r.status_code for r in held] == [202, 202]
        first, second = (r.json()["id"] for r in held)

        items = {i.target_id: i for i in ReviewItem.objects.filter(target_type="job")}
        assert set(items) == {first, second}
        context = review_target_get("job").render_context(items[first])
        assert context.history[-1] == ("user", FRANCE[-1]["content"])
        assert "Paris" in context.text
        assert context.owner == Job.objects.get(public_id=first).user

        claimed = review_item_claim_next(reviewer=reviewer)
        assert claimed is not None and claimed.target_id == first  # oldest first
        review_item_decide(item_id=claimed.pk, reviewer=reviewer, decision=Decision("approve"))
        claimed = review_item_claim_next(reviewer=reviewer)
        assert claimed is not None and claimed.target_id == second
        review_item_decide(
            item_id=claimed.pk,
            reviewer=reviewer,
            decision=Decision("reject", reason="off policy", user_message="Not answerable."),
        )

        approved = api.get(f"/jobs/{first}").json()
        rejected = api.get(f"/jobs/{second}").json()
    assert approved["status"] == "completed"
    assert "Paris" in approved["result"]["choices"][0]["message"]["content"]
    assert rejected["status"] == "failed" and rejected["result"] is None
    assert rejected["error"]["message"] == "Not answerable."
    assert AuditEvent.objects.filter(action="job.generated", details__review_item=items[first].pk)


def sse_events_until_done(response):  # type: ignore[no-untyped-def]
    for line in response.iter_lines():
        if line == "data: [DONE]":
            return
        if line.startswith("data: "):
            yield "message", json.loads(line[len("data: ") :])
