"""Canary weights, stickiness, tiers and archived versions, as routing decides them."""

from collections import Counter

import pytest
from django.contrib.auth.models import User

from chat.services import TurnRejected, conversation_create, turn_submit
from governance.models import AuditEvent, UsageLimit
from models_admin.models import DeploymentFallback, ModelVersion, TierRule
from models_admin.registry import (
    RegistryError,
    deployment_canary_set,
    deployment_promote_canary,
    deployment_rollback,
    version_stage_set,
)
from models_admin.routing import DeploymentUnavailable, route_choose
from tests.factories import user_create
from tests.models_admin.registry_helpers import deployment_create, version_create

pytestmark = pytest.mark.django_db


def test_a_canary_at_20_percent_takes_a_fifth_of_1000_conversations_and_each_stays_put() -> None:
    primary = version_create(version="v1")
    canary = version_create(version="v2", stage=ModelVersion.Stage.STAGING)
    deployment = deployment_create(alias="chat-x", primary=primary)
    deployment_canary_set(deployment_id=deployment.pk, version_id=canary.pk, weight=20, actor=None)

    picks = {c: route_choose(alias="chat-x", sticky_key=c).version.pk for c in range(1, 1001)}
    share = Counter(picks.values())[canary.pk] / 1000
    # Binomial(1000, 0.2) has a standard deviation of 1.3 points: 4 points is three of them.
    assert 0.16 <= share <= 0.24, share
    again = {c: route_choose(alias="chat-x", sticky_key=c).version.pk for c in range(1, 1001)}
    assert again == picks, "a conversation must stay on the version it started with"

    # Raising the weight moves more conversations to the canary, never one away from it.
    deployment_canary_set(deployment_id=deployment.pk, version_id=canary.pk, weight=50, actor=None)
    wider = {c: route_choose(alias="chat-x", sticky_key=c).version.pk for c in range(1, 1001)}
    assert all(wider[c] == canary.pk for c, v in picks.items() if v == canary.pk)
    assert 0.46 <= Counter(wider.values())[canary.pk] / 1000 <= 0.54


def test_a_turn_is_answered_by_the_version_its_conversation_is_routed_to() -> None:
    primary = version_create(version="v1")
    canary = version_create(version="v2", stage=ModelVersion.Stage.STAGING)
    deployment = deployment_create(alias="chat-default", primary=primary, queue="unserved")
    deployment_canary_set(deployment_id=deployment.pk, version_id=canary.pk, weight=50, actor=None)
    UsageLimit.objects.get_or_create(
        user=None, group=None, api_key=None, defaults={"tokens_per_day": 200_000}
    )
    user = user_create()
    seen = set()
    for _ in range(12):
        conversation = conversation_create(user=user)
        outcome = turn_submit(user=user, conversation_id=conversation.pk, text="Hi")
        assert outcome.answer is not None
        expected = route_choose(alias="chat-default", sticky_key=conversation.pk).version
        assert outcome.answer.model_version_id == expected.pk
        seen.add(expected.pk)
    assert seen == {primary.pk, canary.pk}


def test_tier_rules_send_long_prompts_to_the_larger_deployment() -> None:
    small = deployment_create(alias="chat-fast", primary=version_create(version="small"))
    large = deployment_create(alias="chat-large", primary=version_create(version="large"))
    TierRule.objects.create(deployment=small, target=large, min_prompt_chars=2000)
    TierRule.objects.create(deployment=small, target=large, user_choice="large", position=1)

    assert route_choose(alias="chat-fast", sticky_key=1, prompt_chars=50).deployment == small
    assert route_choose(alias="chat-fast", sticky_key=1, prompt_chars=5000).deployment == large
    chosen = route_choose(alias="chat-fast", sticky_key=1, user_choice="large")
    assert chosen.deployment == large and chosen.version.version == "large"


def test_an_archived_version_never_serves() -> None:
    primary = version_create(version="v1")
    old = version_create(version="v0")
    deployment = deployment_create(alias="chat-default", primary=primary, queue="unserved")

    with pytest.raises(RegistryError, match="primary of chat-default"):
        version_stage_set(version_id=primary.pk, stage="archived", actor=None)
    version_stage_set(version_id=old.pk, stage="archived", actor=None)
    with pytest.raises(RegistryError, match="archived"):
        deployment_canary_set(deployment_id=deployment.pk, version_id=old.pk, weight=50, actor=None)

    # An archived primary (archived behind the registry's back) refuses the turn, saying why.
    ModelVersion.objects.filter(pk=primary.pk).update(stage="archived")
    with pytest.raises(DeploymentUnavailable, match="archived"):
        route_choose(alias="chat-default", sticky_key=1)
    user = user_create()
    conversation = conversation_create(user=user)
    with pytest.raises(TurnRejected, match="archived"):
        turn_submit(user=user, conversation_id=conversation.pk, text="Hello")
    # With a servable fallback, the fallback answers instead.
    fallback = version_create(version="v3")
    DeploymentFallback.objects.create(deployment=deployment, version=fallback)
    assert route_choose(alias="chat-default", sticky_key=1).version == fallback


def test_stage_changes_need_a_passed_evaluation_or_an_audited_override() -> None:
    operator = User.objects.create_user(username="op", is_staff=True)
    version = version_create(version="v9", stage=ModelVersion.Stage.DRAFT)

    with pytest.raises(RegistryError, match="cannot move to production"):
        version_stage_set(version_id=version.pk, stage="production", actor=operator)
    version_stage_set(version_id=version.pk, stage="staging", actor=operator)
    with pytest.raises(RegistryError, match="has not passed its evaluation"):
        version_stage_set(version_id=version.pk, stage="production", actor=operator)
    version_stage_set(
        version_id=version.pk, stage="production", actor=operator, override_evaluation=True
    )

    events = list(AuditEvent.objects.filter(action="model_version.stage_changed").order_by("id"))
    assert [(e.details["from"], e.details["to"]) for e in events] == [
        ("draft", "staging"),
        ("staging", "production"),
    ]
    assert events[-1].details["evaluation_overridden"] is True
    assert all(e.actor == operator for e in events)


def test_promoting_the_canary_and_rolling_back_are_audited() -> None:
    operator = User.objects.create_user(username="op", is_staff=True)
    v1, v2 = version_create(version="v1"), version_create(version="v2")
    deployment = deployment_create(alias="chat-y", primary=v1)
    with pytest.raises(RegistryError, match="no canary"):
        deployment_promote_canary(deployment_id=deployment.pk, actor=operator)
    deployment_canary_set(deployment_id=deployment.pk, version_id=v2.pk, weight=10, actor=operator)
    deployment = deployment_promote_canary(deployment_id=deployment.pk, actor=operator)
    assert deployment.primary_version == v2 and deployment.canary_version is None
    deployment = deployment_rollback(deployment_id=deployment.pk, actor=operator)
    assert deployment.primary_version == v1 and deployment.canary_version == v2
    assert deployment.canary_weight == 0
    actions = list(
        AuditEvent.objects.filter(target_type="deployment")
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == [
        "deployment.canary_set",
        "deployment.canary_promoted",
        "deployment.rolled_back",
    ]
