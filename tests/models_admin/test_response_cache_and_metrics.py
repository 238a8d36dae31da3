"""The exact response cache and the /metrics endpoint, through real turns on the real worker."""

import re
import time

import pytest
import redis
from django.conf import settings
from django.test import Client

from chat.feedback import feedback_submit
from chat.models import Message
from chat.services import conversation_create, turn_submit
from governance.models import AuditEvent, BudgetUsage, ReviewPolicy
from models_admin.models import Deployment, SemanticCacheEntry
from tests.factories import user_create

pytestmark = [pytest.mark.django_db(transaction=True)]

ROUTE = "chat-default"


def exact_cache_on_and_empty() -> None:
    # Redis outlives each test's database: start with no cached answers.
    client = redis.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter(match="*answer:exact:*"):
        client.delete(key)
    Deployment.objects.filter(alias=ROUTE).update(exact_cache_enabled=True)


@pytest.fixture(autouse=True)
def _exact_cache_on_and_empty(chat_model) -> None:  # type: ignore[no-untyped-def]
    exact_cache_on_and_empty()


QUESTION = "Name two planets of the solar system."


def _answered(user, text: str, conversation=None) -> Message:  # type: ignore[no-untyped-def]
    conversation = conversation or conversation_create(user=user)
    outcome = turn_submit(user=user, conversation_id=conversation.pk, text=text)
    assert outcome.answer is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = Message.objects.get(pk=outcome.answer.pk)
        if not answer.is_active:
            return answer
        time.sleep(0.1)
    raise AssertionError("the answer did not finish in time")


def _generated_events() -> list[dict]:  # type: ignore[type-arg]
    return [e.details for e in AuditEvent.objects.filter(action="turn.generated").order_by("id")]


def test_a_repeated_deterministic_question_is_answered_from_the_cache_free_of_charge() -> None:
    user = user_create()
    first = _answered(user, QUESTION)
    used_after_first = BudgetUsage.objects.get(user=user, period="day").tokens_used
    # Whitespace differences do not defeat the cache: the prompt is normalised.
    second = _answered(user, f"  {QUESTION.replace(' ', '  ')} ")

    assert first.status == second.status == "complete"
    assert second.content == first.content
    assert [e["cache"] for e in _generated_events()] == [None, "exact"]
    assert BudgetUsage.objects.get(user=user, period="day").tokens_used == used_after_first


def test_a_different_question_or_a_switched_off_cache_goes_to_the_model() -> None:
    user = user_create()
    _answered(user, QUESTION)
    _answered(user, "Name two moons of Jupiter.")
    Deployment.objects.filter(alias="chat-default").update(
        exact_cache_enabled=False, semantic_cache_enabled=False
    )
    _answered(user, QUESTION)
    assert [e["cache"] for e in _generated_events()] == [None, None, None]


def test_sampled_answers_are_never_in_the_exact_cache(chat_model) -> None:  # type: ignore[no-untyped-def]
    chat_model.temperature = 0.7
    chat_model.save()
    user = user_create()
    _answered(user, QUESTION)
    _answered(user, QUESTION)
    assert [e["cache"] for e in _generated_events()] == [None, None]


def test_an_answer_rated_down_is_not_served_again_even_when_it_was_itself_a_cache_hit() -> None:
    user = user_create()
    _answered(user, QUESTION)
    hit = _answered(user, QUESTION)
    feedback_submit(user=user, message_id=hit.pk, rating=-1)
    _answered(user, QUESTION)
    # The model's new answer is cached in its turn.
    _answered(user, QUESTION)
    assert [e["cache"] for e in _generated_events()] == [None, "exact", None, "exact"]


def _semantic_cache_on() -> None:
    Deployment.objects.filter(alias="chat-default").update(
        semantic_cache_enabled=True, semantic_threshold=0.9
    )


def test_a_paraphrased_single_turn_question_is_answered_by_meaning() -> None:
    _semantic_cache_on()
    user = user_create()
    first = _answered(user, QUESTION)
    second = _answered(user, "Please name two planets of the solar system!")
    assert second.status == "complete" and second.content == first.content
    assert [e["cache"] for e in _generated_events()] == [None, "semantic"]


def test_a_question_of_opposite_meaning_is_not_answered_from_the_cache() -> None:
    _semantic_cache_on()
    user = user_create()
    _answered(user, "How do I enable dark mode in the app?")
    _answered(user, "How do I disable dark mode in the app?")
    assert [e["cache"] for e in _generated_events()] == [None, None]


def test_an_answer_held_for_review_is_not_kept_for_answering_by_meaning() -> None:
    _semantic_cache_on()
    ReviewPolicy.objects.create(
        name="needs approval",
        kind=ReviewPolicy.Kind.DEPLOYMENT_APPROVAL,
        deployment=Deployment.objects.get(alias=ROUTE),
    )
    user = user_create()
    first = _answered(user, QUESTION)
    assert first.status == "held"
    assert not SemanticCacheEntry.objects.exists()
    _answered(user, "Please name two planets of the solar system!")
    assert [e["cache"] for e in _generated_events()] == [None, None]


def test_a_follow_up_question_is_not_answered_by_meaning() -> None:
    _semantic_cache_on()
    user = user_create()
    _answered(user, QUESTION)
    conversation = conversation_create(user=user)
    _answered(user, "Hello!", conversation)
    _answered(user, "Please name two planets of the solar system!", conversation)
    assert [e["cache"] for e in _generated_events()] == [None, None, None]


def _sample(body: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_show_the_workers_measurements_to_staff_only(chat_model) -> None:  # type: ignore[no-untyped-def]
    user = user_create()
    answer = _answered(user, "Say hello in French.")
    version = str(chat_model)

    anonymous = Client().get("/metrics")
    assert anonymous.status_code == 401
    client = Client()
    client.force_login(user)
    assert client.get("/metrics").status_code == 403

    client.force_login(user_create(is_staff=True))
    response = client.get("/metrics")
    assert response.status_code == 200
    body = response.content.decode()
    route = {"deployment": "chat-default", "version": version}
    assert _sample(body, "genai_time_to_first_token_seconds_count", **route) >= 1
    assert _sample(body, "genai_tokens_per_second_count", **route) >= 1
    assert _sample(body, "genai_output_tokens_total", **route) >= (answer.completion_tokens or 0)
    assert _sample(body, "genai_answers_total", outcome="complete", **route) >= 1
    assert _sample(body, "genai_engine_batch_size_count") >= 1
    assert re.search(r"genai_queue_wait_seconds_bucket\{", body)
    assert "genai_cache_lookups_total" in body


def test_a_scraper_reads_metrics_with_the_token_and_not_without(settings) -> None:  # type: ignore[no-untyped-def]
    settings.METRICS_TOKEN = "scrape-me"
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    ok = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me")
    assert ok.status_code == 200 and ok["Content-Type"].startswith("text/plain")
