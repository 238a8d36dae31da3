"""/v1 requests pass through the same controls as chat turns: routing (canary, fallback chain),
every review policy, the key's allowed models, the input filters on embeddings, and text that
cannot be stored is refused with a clear error. Live server, real worker and model."""

import time

import httpx
import pytest
from django.contrib.auth.models import Group

from chat.models import Job
from governance.api_keys import api_key_create
from governance.models import AuditEvent, BlockedTerm, ReviewItem, ReviewPolicy
from governance.review_queue import (
    REVIEWERS_GROUP,
    Decision,
    review_item_claim_next,
    review_item_decide,
)
from models_admin.models import Deployment
from tests.chat.api_helpers import http, job_once_settled, key_for
from tests.chat.test_fallback_and_shadow import primary_down_with_fallback
from tests.factories import user_create
from tests.models_admin.test_response_cache_and_metrics import exact_cache_on_and_empty

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("chat_model")]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _job_done(api, job_id: str, timeout: float = 120) -> dict:  # type: ignore[no-untyped-def, type-arg]
    deadline = time.monotonic() + timeout
    while (body := api.get(f"/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, "the job never finished"
        time.sleep(0.2)
    return body  # type: ignore[no-any-return]


def test_a_job_falls_back_when_its_primary_is_down(live_asgi_server: str, chat_model) -> None:  # type: ignore[no-untyped-def]
    primary = primary_down_with_fallback(chat_model, version="remote-down")

    with http(live_asgi_server, key_for()) as api:
        response = api.post(
            "/chat/completions",
            json={"model": "chat-default", "messages": FRANCE, "max_tokens": 16},
        )
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
    job = job_once_settled(response.json()["id"])
    assert job.model_version_id == chat_model.pk, "the fallback answered and is recorded"
    event = AuditEvent.objects.get(action="job.generated", target_id=job.public_id)
    assert event.details["routed_to"] == str(primary)
    assert [t["outcome"] for t in event.details["targets"]] == ["failed", "served"]


def test_a_deployment_that_needs_approval_holds_jobs_until_a_reviewer_approves(
    live_asgi_server: str,
) -> None:
    deployment = Deployment.objects.get(alias="chat-default")
    ReviewPolicy.objects.create(
        name="approve all", kind=ReviewPolicy.Kind.DEPLOYMENT_APPROVAL, deployment=deployment
    )
    reviewer = user_create()
    reviewer.groups.add(Group.objects.get_or_create(name=REVIEWERS_GROUP)[0])
    with http(live_asgi_server, key_for()) as api:
        with api.stream(
            "POST",
            "/chat/completions",
            json={"model": "chat-default", "messages": FRANCE, "stream": True, "max_tokens": 16},
        ) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        # Nothing of a held answer is streamed; the last chunk names the job.
        assert '"held_for_review"' in lines[-1]
        assert not any("Paris" in line for line in lines)
        job = Job.objects.get(status=Job.Status.HELD_FOR_REVIEW)
        item = ReviewItem.objects.get(target_type="job", target_id=job.public_id)
        assert item.policy.kind == ReviewPolicy.Kind.DEPLOYMENT_APPROVAL
        assert "Paris" in item.original_text

        claimed = review_item_claim_next(reviewer=reviewer)
        assert claimed is not None and claimed.pk == item.pk
        review_item_decide(item_id=item.pk, reviewer=reviewer, decision=Decision("approve"))
        body = _job_done(api, job.public_id)
    assert body["status"] == "completed"
    assert "Paris" in body["result"]["choices"][0]["message"]["content"]


def test_a_held_job_answer_is_not_kept_in_the_exact_cache(live_asgi_server: str) -> None:
    exact_cache_on_and_empty()
    ReviewPolicy.objects.create(
        name="approve all",
        kind=ReviewPolicy.Kind.DEPLOYMENT_APPROVAL,
        deployment=Deployment.objects.get(alias="chat-default"),
    )
    body = {"model": "chat-default", "messages": FRANCE, "max_tokens": 8, "temperature": 0}
    with http(live_asgi_server, key_for()) as api:
        for _ in range(2):
            assert api.post("/chat/completions", json=body).status_code == 202
    events = AuditEvent.objects.filter(action="job.generated").order_by("id")
    assert [e.details["cache"] for e in events] == [None, None]


def test_a_key_limited_to_some_models_sees_and_uses_only_those(live_asgi_server: str) -> None:
    user = user_create()
    _, narrow = api_key_create(
        user=user,
        name="narrow",
        scopes=["chat", "embeddings", "models"],
        allowed_models=["all-MiniLM-L6-v2"],
        actor=user,
    )
    with http(live_asgi_server, narrow) as api:
        listed = [m["id"] for m in api.get("/models").json()["data"]]
        refused = api.post("/chat/completions", json={"model": "chat-default", "messages": FRANCE})
        embedded = api.post("/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "hello"})
    assert listed == ["all-MiniLM-L6-v2"]
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert embedded.status_code == 200
    assert not Job.objects.exists(), "a refused model never makes a job"


def test_embeddings_pass_the_input_filters(live_asgi_server: str) -> None:
    # The site-wide defaults (no deployment): the blocklist blocks.
    BlockedTerm.objects.create(term="forbidden-word")
    with http(live_asgi_server, key_for()) as api:
        refused = api.post(
            "/embeddings",
            json={"model": "all-MiniLM-L6-v2", "input": ["fine", "a forbidden-word here"]},
        )
        fine = api.post("/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ["fine"]})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "content_filter"
    assert fine.status_code == 200


@pytest.mark.parametrize(
    "content", ["nul \x00 inside", "lone \ud800 surrogate"], ids=["nul", "surrogate"]
)
def test_text_that_cannot_be_stored_is_a_clear_400_not_a_500(
    live_asgi_server: str, content: str
) -> None:
    import json

    raw = key_for()
    body = json.dumps({"model": "chat-default", "messages": [{"role": "user", "content": content}]})
    with http(live_asgi_server, raw) as api:
        response = api.post(
            "/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
        unknown = api.get("/jobs/job_%00")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages.0.content"
    assert unknown.status_code == 404
    assert not Job.objects.exists()


def test_api_calls_keep_the_security_headers_and_host_check_without_the_browser_middleware(
    live_asgi_server: str,
) -> None:
    with http(live_asgi_server, key_for("headers")) as client:
        response = client.get("/models")
        wrong_host = client.get("/models", headers={"Host": "attacker.example"})
    assert response.status_code == 200
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Content-Length"] == str(len(response.content))
    # Sessions, CSRF and the rest are the browser's: an API call gets no cookie.
    assert "set-cookie" not in response.headers and "vary" not in response.headers
    assert wrong_host.status_code == 400
    with httpx.Client(base_url=live_asgi_server) as browser:
        page = browser.get("/accounts/login/")
    assert page.status_code == 200 and page.headers["X-Frame-Options"] == "DENY"
    assert "csrftoken" in page.cookies and "Cookie" in page.headers["Vary"]
