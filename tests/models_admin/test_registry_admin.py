"""The registry in the admin: breaker states, promotion and rollback, the comparison page."""

import re

import pytest
from django.test import Client

from chat.models import Conversation, Feedback, Message
from governance.models import AuditEvent, ReviewItem, ReviewPolicy
from governance.review_queue import review_item_create
from models_admin.breaker import breaker_record_failure
from models_admin.models import Deployment, ModelVersion, ShadowAnswer
from models_admin.registry import deployment_canary_set
from tests.factories import PASSWORD, user_create
from tests.models_admin.registry_helpers import deployment_create, version_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator_client(client: Client) -> Client:
    operator = user_create(username="operator", is_staff=True)
    operator.is_superuser = True
    operator.save()
    client.login(username="operator", password=PASSWORD)
    return client


def test_the_deployment_page_shows_each_versions_circuit_breaker(operator_client: Client) -> None:
    primary = version_create(version="v1", breaker_failures=1)
    deployment = deployment_create(alias="chat-z", primary=primary)
    breaker_record_failure(version_id=primary.pk, threshold=1)

    listing = operator_client.get("/admin/models_admin/deployment/").content.decode()
    assert "open (" in listing and "side by side" in listing
    page = operator_client.get(f"/admin/models_admin/deployment/{deployment.pk}/change/")
    assert page.status_code == 200 and "open (" in page.content.decode()


def test_promote_and_roll_back_from_the_admin_are_audited_with_the_operator(
    operator_client: Client,
) -> None:
    v1, v2 = version_create(version="v1"), version_create(version="v2")
    deployment = deployment_create(alias="chat-z", primary=v1)
    deployment_canary_set(deployment_id=deployment.pk, version_id=v2.pk, weight=30, actor=None)
    url = "/admin/models_admin/deployment/"
    operator_client.post(url, {"action": "promote_canary", "_selected_action": [deployment.pk]})
    assert Deployment.objects.get(pk=deployment.pk).primary_version == v2
    operator_client.post(url, {"action": "roll_back", "_selected_action": [deployment.pk]})
    assert Deployment.objects.get(pk=deployment.pk).primary_version == v1
    events = AuditEvent.objects.filter(
        action__in=["deployment.canary_promoted", "deployment.rolled_back"]
    )
    assert [e.actor_label for e in events.order_by("id")] == ["operator", "operator"]

    # Nothing to roll back to now: the operator is told, nothing changes.
    response = operator_client.post(
        url, {"action": "roll_back", "_selected_action": [deployment.pk]}, follow=True
    )
    assert "nothing to roll back to" in response.content.decode()


def test_an_archived_version_cannot_be_made_the_canary_in_the_form(operator_client: Client) -> None:
    v1 = version_create(version="v1")
    old = version_create(version="old", stage="archived")
    deployment = deployment_create(alias="chat-z", primary=v1)
    response = operator_client.post(
        f"/admin/models_admin/deployment/{deployment.pk}/change/",
        {
            "alias": "chat-z",
            "primary_version": v1.pk,
            "canary_version": old.pk,
            "canary_weight": 50,
            "queue": "inference",
            "is_active": "on",
            "cache_ttl_seconds": 60,
            "semantic_threshold": 0.95,
            "fallbacks-TOTAL_FORMS": 0,
            "fallbacks-INITIAL_FORMS": 0,
            "tiers-TOTAL_FORMS": 0,
            "tiers-INITIAL_FORMS": 0,
        },
    )
    assert (
        response.status_code == 200 and "is archived and cannot serve" in response.content.decode()
    )
    assert Deployment.objects.get(pk=deployment.pk).canary_version is None


def test_the_comparison_page_puts_primary_and_shadow_answers_side_by_side(
    operator_client: Client,
) -> None:
    v1, shadow = version_create(version="v1"), version_create(version="shadow")
    deployment = deployment_create(alias="chat-z", primary=v1, shadow_version=shadow)
    ShadowAnswer.objects.create(
        deployment=deployment,
        version=shadow,
        request_ref="message:1",
        messages=[{"role": "user", "content": "Why is the sky blue?"}],
        max_tokens=32,
        primary_version=v1,
        primary_answer="Rayleigh scattering.",
        primary_latency_ms=800,
        status="complete",
        answer="Because of scattering of light.",
        latency_ms=1200,
    )
    page = operator_client.get(f"/admin/models_admin/deployment/{deployment.pk}/compare/")
    html = page.content.decode()
    assert page.status_code == 200
    assert "Why is the sky blue?" in html and "Rayleigh scattering." in html
    assert "Because of scattering of light." in html
    assert "800.0" in html and "1200.0" in html  # mean latencies


def test_the_comparison_page_shows_each_versions_feedback_and_review_outcomes(
    operator_client: Client,
) -> None:
    v1, canary = version_create(version="v1"), version_create(version="canary")
    deployment = deployment_create(alias="chat-z", primary=v1, canary_version=canary)
    user = user_create()
    conversation = Conversation.objects.create(user=user, model_alias="chat-z")

    def answer(version: ModelVersion, text: str, ttft_ms: float) -> Message:
        question = Message.objects.create(
            conversation=conversation, role=Message.Role.USER, status="sent", content="A question?"
        )
        return Message.objects.create(
            conversation=conversation,
            reply_to=question,
            role=Message.Role.ASSISTANT,
            status=Message.Status.COMPLETE,
            content=text,
            model_version=version,
            time_to_first_token_ms=ttft_ms,
        )

    a, b = answer(v1, "four", 100), answer(v1, "eighteen", 300)
    c = answer(canary, "twelve chars", 900)
    Feedback.objects.create(message=a, user=user, rating=1)
    Feedback.objects.create(message=b, user=user, rating=1)
    Feedback.objects.create(message=c, user=user, rating=-1)
    policy = ReviewPolicy.objects.create(
        name="check canary", kind=ReviewPolicy.Kind.CANARY_CHECK, model_version=canary
    )
    item = review_item_create(
        policy=policy,
        reason="canary",
        target_type="message",
        target_id=c.pk,
        original_text=c.content,
        user_id=user.pk,
        model_version_id=canary.pk,
    )
    ReviewItem.objects.filter(pk=item.pk).update(status=ReviewItem.Status.REJECTED)

    page = operator_client.get(f"/admin/models_admin/deployment/{deployment.pk}/compare/")
    assert page.status_code == 200
    rows = {
        cells[0]: cells[1:]
        for cells in (
            re.findall(r"<td>(.*?)</td>", row)
            for row in re.findall(r"<tr><td>.*?</tr>", page.content.decode())
        )
        if len(cells) == 3
    }
    assert rows["answers"] == ["2", "1"]
    assert rows["mean answer length (characters)"] == ["6", "12"]
    assert rows["mean time to first token (ms)"] == ["200", "900"]
    assert rows["thumbs up"] == ["2", "0"] and rows["thumbs down"] == ["0", "1"]
    assert rows["held for review"] == ["0", "1"] and rows["rejected"] == ["0", "1"]
