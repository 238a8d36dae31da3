"""The review queue on real PostgreSQL: policies, claims under leases, decisions, time limits."""

import datetime as dt
import random
import threading

import pytest
from django.db import connection
from django.utils import timezone

from governance.models import AuditEvent, ReviewItem, ReviewPolicy
from governance.review_policies import AnswerFacts, review_policy_match
from governance.review_queue import (
    Decision,
    ReviewError,
    review_item_claim_next,
    review_item_decide,
    review_item_renew,
    review_overdue_apply,
)
from models_admin.models import Deployment
from tests.governance.review_helpers import (
    item_create,
    policy_create,
    reviewer_create,
    version_create,
)

Kind = ReviewPolicy.Kind


def _facts(**overrides: object) -> AnswerFacts:
    base: dict[str, object] = {
        "deployment_id": None,
        "model_version_id": None,
        "mean_logprob": -0.5,
        "knowledge_base_ids": [],
        "sensitive_knowledge_base_ids": [],
        "canary": None,
    }
    base.update(overrides)
    return AnswerFacts(**base)  # type: ignore[arg-type]


@pytest.mark.django_db
def test_without_active_policies_nothing_is_held() -> None:
    policy_create(Kind.DEPLOYMENT_APPROVAL, is_active=False)
    assert review_policy_match(facts=_facts()) is None


@pytest.mark.django_db
def test_deployment_approval_holds_only_that_deployments_answers() -> None:
    version_create(alias="strict")
    version_create(name="other", alias="relaxed")
    strict = Deployment.objects.get(alias="strict")
    relaxed = Deployment.objects.get(alias="relaxed")
    policy = policy_create(Kind.DEPLOYMENT_APPROVAL, deployment=strict)
    match = review_policy_match(facts=_facts(deployment_id=strict.pk))
    assert match is not None and match.policy == policy and not match.deliver_now
    assert review_policy_match(facts=_facts(deployment_id=relaxed.pk)) is None


@pytest.mark.django_db
def test_version_check_holds_that_version_and_not_others_nor_non_canary_answers() -> None:
    checked = version_create(version="canary")
    other = version_create(version="stable")
    policy_create(Kind.CANARY_CHECK, model_version=checked)
    assert review_policy_match(facts=_facts(model_version_id=checked.pk)) is not None
    assert review_policy_match(facts=_facts(model_version_id=checked.pk, canary=True)) is not None
    assert review_policy_match(facts=_facts(model_version_id=checked.pk, canary=False)) is None
    assert review_policy_match(facts=_facts(model_version_id=other.pk)) is None


@pytest.mark.django_db
def test_low_confidence_holds_below_the_threshold_only() -> None:
    policy_create(Kind.LOW_CONFIDENCE, logprob_threshold=-1.0)
    match = review_policy_match(facts=_facts(mean_logprob=-1.5))
    assert match is not None and "-1.50 < -1" in match.reason
    assert review_policy_match(facts=_facts(mean_logprob=-0.2)) is None
    assert review_policy_match(facts=_facts(mean_logprob=None)) is None


@pytest.mark.django_db
def test_sensitive_knowledge_holds_only_answers_that_used_a_sensitive_base() -> None:
    policy_create(Kind.SENSITIVE_KNOWLEDGE)
    held = review_policy_match(
        facts=_facts(knowledge_base_ids=[1, 2], sensitive_knowledge_base_ids=[2])
    )
    assert held is not None and held.policy.kind == Kind.SENSITIVE_KNOWLEDGE
    assert review_policy_match(facts=_facts(knowledge_base_ids=[1])) is None


@pytest.mark.django_db
def test_a_random_sample_is_delivered_and_reviewed_after_at_about_its_rate() -> None:
    policy_create(Kind.RANDOM_SAMPLE, sample_percent=25)
    rng = random.Random(7)
    matches = [review_policy_match(facts=_facts(), rng=rng) for _ in range(400)]
    picked = [m for m in matches if m is not None]
    assert all(m.deliver_now and m.policy.kind == Kind.RANDOM_SAMPLE for m in picked)
    assert 60 <= len(picked) <= 140


@pytest.mark.django_db
def test_a_holding_policy_wins_over_a_sample() -> None:
    policy_create(Kind.RANDOM_SAMPLE, sample_percent=100)
    policy_create(Kind.LOW_CONFIDENCE, logprob_threshold=0.0)
    match = review_policy_match(facts=_facts(mean_logprob=-0.1))
    assert match is not None and match.policy.kind == Kind.LOW_CONFIDENCE and not match.deliver_now


@pytest.mark.django_db
def test_claim_next_gives_the_oldest_item_and_a_reload_gives_the_same_one() -> None:
    policy = policy_create()
    first, second = item_create(policy, 1), item_create(policy, 2)
    ann = reviewer_create("ann")
    assert review_item_claim_next(reviewer=ann) == first
    assert review_item_claim_next(reviewer=ann) == first
    bob = reviewer_create("bob")
    assert review_item_claim_next(reviewer=bob) == second
    assert review_item_claim_next(reviewer=reviewer_create("cy")) is None
    assert AuditEvent.objects.filter(action="review.claimed").count() == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_never_give_one_item_to_two_reviewers() -> None:
    policy = policy_create()
    items = [item_create(policy, n) for n in range(24)]
    reviewers = [reviewer_create(f"r{n}") for n in range(6)]
    claimed: dict[str, list[int]] = {r.username: [] for r in reviewers}
    start = threading.Barrier(len(reviewers))
    errors: list[BaseException] = []

    def work(reviewer):  # type: ignore[no-untyped-def]
        try:
            start.wait()
            while True:
                item = review_item_claim_next(reviewer=reviewer)
                if item is None:
                    return
                claimed[reviewer.username].append(item.pk)
                # Decide it, so the next claim moves on to another item.
                review_item_decide(
                    item_id=item.pk, reviewer=reviewer, decision=Decision(action="approve")
                )
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(r,)) for r in reviewers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    every = [pk for pks in claimed.values() for pk in pks]
    assert sorted(every) == sorted(i.pk for i in items), "each item claimed exactly once"
    assert sum(1 for pks in claimed.values() if pks) > 1, "the work was shared"
    assert ReviewItem.objects.filter(status="approved").count() == len(items)
    assert AuditEvent.objects.filter(action="review.approved").count() == len(items)


@pytest.mark.django_db
def test_an_expired_lease_returns_the_item_and_the_old_claim_cannot_decide() -> None:
    item = item_create(policy_create(), 1)
    ann, bob = reviewer_create("ann"), reviewer_create("bob")
    assert review_item_claim_next(reviewer=ann) == item
    assert review_item_claim_next(reviewer=bob) is None
    ReviewItem.objects.filter(pk=item.pk).update(
        lease_expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    assert review_item_claim_next(reviewer=bob) == item
    with pytest.raises(ReviewError, match="Claim this item"):
        review_item_decide(item_id=item.pk, reviewer=ann, decision=Decision(action="approve"))
    with pytest.raises(ReviewError, match="Claim this item"):
        review_item_renew(item_id=item.pk, reviewer=ann)
    review_item_decide(item_id=item.pk, reviewer=bob, decision=Decision(action="approve"))
    item.refresh_from_db()
    assert item.status == "approved" and item.decided_by == bob
    claims = AuditEvent.objects.filter(action="review.claimed").order_by("id")
    assert claims.last().details["expired_claim_of"] == ann.pk  # type: ignore[union-attr]


@pytest.mark.django_db
def test_renewing_extends_the_lease_and_is_audited() -> None:
    item = item_create(policy_create(), 1)
    ann = reviewer_create("ann")
    review_item_claim_next(reviewer=ann)
    ReviewItem.objects.filter(pk=item.pk).update(
        lease_expires_at=timezone.now() + dt.timedelta(seconds=5)
    )
    renewed = review_item_renew(item_id=item.pk, reviewer=ann)
    assert renewed.lease_expires_at is not None
    assert renewed.lease_expires_at > timezone.now() + dt.timedelta(seconds=60)
    assert AuditEvent.objects.filter(action="review.renewed", target_id=str(item.pk)).exists()


@pytest.mark.django_db
def test_an_edit_keeps_the_original_and_a_diff() -> None:
    item = item_create(policy_create(), 1, text="Paris is in Spain.")
    ann = reviewer_create("ann")
    review_item_claim_next(reviewer=ann)
    review_item_decide(
        item_id=item.pk, reviewer=ann, decision=Decision(action="edit", text="Paris is in France.")
    )
    item.refresh_from_db()
    assert item.status == "edited"
    assert item.original_text == "Paris is in Spain." and item.final_text == "Paris is in France."
    assert "-Paris is in Spain." in item.diff and "+Paris is in France." in item.diff
    assert AuditEvent.objects.get(action="review.edited").actor_id == ann.pk


@pytest.mark.django_db
def test_a_bad_decision_is_refused_with_a_reason_and_changes_nothing() -> None:
    item = item_create(policy_create(), 1)
    ann = reviewer_create("ann")
    review_item_claim_next(reviewer=ann)
    for decision, message in [
        (Decision(action="reject", user_message="Sorry."), "reason"),
        (Decision(action="reject", reason="wrong"), "message the user"),
        (Decision(action="edit", text="  "), "empty"),
        (Decision(action="edit", text="The answer."), "changes nothing"),
        (Decision(action="delete"), "Unknown action"),
    ]:
        with pytest.raises(ReviewError, match=message):
            review_item_decide(item_id=item.pk, reviewer=ann, decision=decision)
    item.refresh_from_db()
    assert item.status == "pending" and item.claimed_by == ann
    review_item_decide(
        item_id=item.pk,
        reviewer=ann,
        decision=Decision(action="reject", reason="wrong", user_message="Sorry."),
    )
    with pytest.raises(ReviewError, match="already decided"):
        review_item_decide(item_id=item.pk, reviewer=ann, decision=Decision(action="approve"))


@pytest.mark.django_db
def test_overdue_items_follow_their_policy_rule_once() -> None:
    stay = item_create(policy_create(overdue_action="stay_held"), 1)
    release = item_create(
        policy_create(overdue_action="release", overdue_message="Released unreviewed."), 2
    )
    reject = item_create(
        policy_create(overdue_action="reject", overdue_message="Could not review in time."), 3
    )
    fresh = item_create(policy_create(time_limit_minutes=600), 4)
    later = timezone.now() + dt.timedelta(minutes=61)
    assert review_overdue_apply(now=later) == {"stay_held": 1, "release": 1, "reject": 1}
    assert review_overdue_apply(now=later) == {"stay_held": 0, "release": 0, "reject": 0}
    for item in (stay, release, reject, fresh):
        item.refresh_from_db()
    assert stay.status == "pending" and stay.overdue_applied_at is not None
    assert release.status == "released" and release.final_text == "The answer."
    assert release.user_message == "Released unreviewed."
    assert reject.status == "rejected" and reject.user_message == "Could not review in time."
    assert fresh.status == "pending" and fresh.overdue_applied_at is None
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"review.overdue", "review.released", "review.rejected"} <= actions


@pytest.mark.django_db
def test_one_pending_item_per_target() -> None:
    policy = policy_create()
    assert item_create(policy, 1) == item_create(policy, 1)
    assert ReviewItem.objects.count() == 1
