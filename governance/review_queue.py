"""The human review queue: create items, claim under a lease, decide, and apply time limits.

Every change here that a person (or the overdue sweep) makes is audited in the same
transaction. Decisions are announced with `review_targets.review_decided`, which the target's
app receives to apply them (chat updates the message and the user's page).
"""

import datetime as dt
import difflib
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from governance.audit import audit_record
from governance.models import ReviewItem, ReviewPolicy, SafetyHold
from governance.review_policies import PolicyMatch, review_match_or_safety_hold
from governance.review_targets import review_decided

Status = ReviewItem.Status

REVIEWERS_GROUP = "Reviewers"


class ReviewError(Exception):
    """A review action that cannot be done; the message is for the reviewer."""


def reviewer_check(user: User) -> bool:
    return bool(
        user.is_authenticated
        and (user.is_superuser or user.groups.filter(name=REVIEWERS_GROUP).exists())
    )


def _lease() -> dt.timedelta:
    return dt.timedelta(seconds=settings.REVIEW_LEASE_SECONDS)


@transaction.atomic
def review_item_create(
    *,
    policy: ReviewPolicy,
    reason: str,
    target_type: str,
    target_id: object,
    original_text: str,
    user_id: int | None,
    deployment_id: int | None = None,
    model_version_id: int | None = None,
    knowledge_base_ids: list[int] | None = None,
    safety_hold: SafetyHold | None = None,
    delivered: bool = False,
    details: dict[str, object] | None = None,
) -> ReviewItem:
    """Queue a target for review, or return the item already pending for it."""
    existing = ReviewItem.objects.filter(
        target_type=target_type, target_id=str(target_id), status=Status.PENDING
    ).first()
    if existing is not None:
        return existing
    item = ReviewItem.objects.create(
        policy=policy,
        kind=policy.kind,
        reason=reason,
        details=details or {},
        target_type=target_type,
        target_id=str(target_id),
        user_id=user_id,
        deployment_id=deployment_id,
        model_version_id=model_version_id,
        knowledge_base_ids=knowledge_base_ids or [],
        safety_hold=safety_hold,
        delivered=delivered,
        original_text=original_text,
        due_at=timezone.now() + dt.timedelta(minutes=policy.time_limit_minutes),
    )
    audit_record(
        actor=None,
        action="review.queued",
        target_type="review_item",
        target_id=item.pk,
        details={
            "policy": policy.pk,
            "kind": policy.kind,
            "reason": reason,
            "target": f"{target_type}:{target_id}",
            "delivered": delivered,
        },
    )
    return item


def review_item_queue_answer(
    *,
    match: PolicyMatch | None,
    safety_hold: SafetyHold | None,
    target_type: str,
    target_id: object,
    text: str,
    user_id: int | None,
    deployment_id: int | None,
    model_version_id: int | None,
    knowledge_base_ids: list[int] | None = None,
    mean_logprob: float | None = None,
) -> ReviewItem:
    """Queue a held (or sampled) answer of any target: under the policy that matched it, or
    the safety-hold policy for a filter's hold. Call inside the transaction that settles it."""
    match = review_match_or_safety_hold(
        match=match, safety_hold=safety_hold, deployment_id=deployment_id
    )
    return review_item_create(
        policy=match.policy,
        reason=match.reason,
        target_type=target_type,
        target_id=target_id,
        original_text=text,
        user_id=user_id,
        deployment_id=deployment_id,
        model_version_id=model_version_id,
        knowledge_base_ids=knowledge_base_ids,
        safety_hold=safety_hold,
        delivered=match.deliver_now,
        details={"mean_logprob": mean_logprob} if mean_logprob is not None else {},
    )


def _claimable(now: dt.datetime) -> QuerySet[ReviewItem]:
    return ReviewItem.objects.filter(status=Status.PENDING).filter(
        Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lte=now)
    )


def review_item_claim_next(*, reviewer: User, kind: str | None = None) -> ReviewItem | None:
    """Give `reviewer` the oldest unclaimed item (or one whose lease ran out) under a lease.

    The reviewer's own live claim comes back first, so a reload never takes a second item.
    Rows locked by a concurrent claim are skipped, so two reviewers never get the same item.
    """
    now = timezone.now()
    with transaction.atomic():
        own = ReviewItem.objects.filter(
            status=Status.PENDING, claimed_by=reviewer, lease_expires_at__gt=now
        ).first()
        if own is not None:
            return own
        candidates = _claimable(now)
        if kind:
            candidates = candidates.filter(kind=kind)
        item = (
            candidates.select_for_update(skip_locked=True, of=("self",))
            .order_by("created_at", "id")
            .first()
        )
        if item is None:
            return None
        previous = item.claimed_by_id
        item.claimed_by = reviewer
        item.lease_expires_at = now + _lease()
        item.save(update_fields=["claimed_by", "lease_expires_at"])
        audit_record(
            actor=reviewer,
            action="review.claimed",
            target_type="review_item",
            target_id=item.pk,
            details={
                "lease_expires_at": item.lease_expires_at.isoformat(),
                "expired_claim_of": previous,
            },
        )
        return item


def _locked_own_claim(item_id: int, reviewer: User) -> ReviewItem:
    item = ReviewItem.objects.select_for_update().filter(pk=item_id).first()
    if item is None:
        raise ReviewError("No such review item.")
    if item.status != Status.PENDING:
        raise ReviewError(f"This item was already decided ({item.status}).")
    if item.claimed_by_id != reviewer.pk or item.lease_expires_at is None:
        raise ReviewError("Claim this item before acting on it.")
    if item.lease_expires_at <= timezone.now():
        raise ReviewError("Your claim on this item expired; claim it again.")
    return item


@transaction.atomic
def review_item_renew(*, item_id: int, reviewer: User) -> ReviewItem:
    item = _locked_own_claim(item_id, reviewer)
    item.lease_expires_at = timezone.now() + _lease()
    item.save(update_fields=["lease_expires_at"])
    audit_record(
        actor=reviewer,
        action="review.renewed",
        target_type="review_item",
        target_id=item.pk,
        details={"lease_expires_at": item.lease_expires_at.isoformat()},
    )
    return item


@transaction.atomic
def review_item_release(*, item_id: int, reviewer: User) -> ReviewItem:
    """Give a claimed item back to the queue undecided."""
    item = _locked_own_claim(item_id, reviewer)
    item.claimed_by = None
    item.lease_expires_at = None
    item.save(update_fields=["claimed_by", "lease_expires_at"])
    audit_record(
        actor=reviewer, action="review.released", target_type="review_item", target_id=item.pk
    )
    return item


def text_diff(original: str, edited: str) -> str:
    return "\n".join(
        difflib.unified_diff(
            original.splitlines(), edited.splitlines(), "original", "edited", lineterm=""
        )
    )


@dataclass(frozen=True)
class Decision:
    action: str  # "approve" | "edit" | "reject"
    text: str = ""  # the edited text, for "edit"
    reason: str = ""  # why, for "reject" (kept for reviewers and the audit)
    user_message: str = ""  # what the user reads, for "reject"


def _decision_validate(decision: Decision, original: str) -> None:
    if decision.action == "edit":
        if not decision.text.strip():
            raise ReviewError("An edited answer cannot be empty.")
        if decision.text == original:
            raise ReviewError("The edit changes nothing; approve instead.")
    elif decision.action == "reject":
        if not decision.reason.strip():
            raise ReviewError("Give a reason for the rejection.")
        if not decision.user_message.strip():
            raise ReviewError("Write the message the user will see.")
    elif decision.action != "approve":
        raise ReviewError(f"Unknown action '{decision.action[:20]}'.")


def _finish(
    item: ReviewItem, *, status: str, actor: User | None, decision: Decision, note: str = ""
) -> None:
    item.status = status
    item.decided_by = actor
    item.decided_at = timezone.now()
    item.lease_expires_at = None
    if status == Status.EDITED:
        item.final_text = decision.text
        item.diff = text_diff(item.original_text, decision.text)
    elif status in (Status.APPROVED, Status.RELEASED):
        item.final_text = item.original_text
    else:
        item.final_text = ""
        item.reject_reason = decision.reason
        item.user_message = decision.user_message
    item.save()
    if item.safety_hold_id:
        SafetyHold.objects.filter(pk=item.safety_hold_id).update(
            status=SafetyHold.Status.REJECTED
            if status == Status.REJECTED
            else SafetyHold.Status.APPROVED,
            claimed_by=actor,
            claimed_at=item.decided_at,
            decided_at=item.decided_at,
            decision_note=decision.reason or note,
        )
    audit_record(
        actor=actor,
        action=f"review.{status}",
        target_type="review_item",
        target_id=item.pk,
        details={
            "target": f"{item.target_type}:{item.target_id}",
            "kind": item.kind,
            "policy": item.policy_id,
            **({"diff_lines": item.diff.count("\n") + 1} if item.diff else {}),
            **({"reason": decision.reason} if decision.reason else {}),
            **({"note": note} if note else {}),
        },
    )
    review_decided.send(sender=ReviewItem, item=item)


@transaction.atomic
def review_item_decide(*, item_id: int, reviewer: User, decision: Decision) -> ReviewItem:
    item = _locked_own_claim(item_id, reviewer)
    _decision_validate(decision, item.original_text)
    status = {"approve": Status.APPROVED, "edit": Status.EDITED, "reject": Status.REJECTED}[
        decision.action
    ]
    _finish(item, status=status, actor=reviewer, decision=decision)
    return item


def review_overdue_apply(*, now: dt.datetime | None = None) -> dict[str, int]:
    """Apply each overdue item's policy rule once: stay held (marked), release, or reject."""
    now = now or timezone.now()
    counts = {"stay_held": 0, "release": 0, "reject": 0}
    while True:
        with transaction.atomic():
            item = (
                ReviewItem.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("policy")
                .filter(status=Status.PENDING, due_at__lte=now, overdue_applied_at__isnull=True)
                .order_by("due_at", "id")
                .first()
            )
            if item is None:
                return counts
            rule = item.policy.overdue_action
            message = item.policy.overdue_message
            item.overdue_applied_at = now
            if item.delivered:
                # The user already has the text; a late review only shows as overdue.
                rule = ReviewPolicy.Overdue.STAY_HELD
            if rule == ReviewPolicy.Overdue.RELEASE:
                item.user_message = message
                _finish(
                    item,
                    status=Status.RELEASED,
                    actor=None,
                    decision=Decision(action="approve"),
                    note="time limit passed",
                )
            elif rule == ReviewPolicy.Overdue.REJECT:
                _finish(
                    item,
                    status=Status.REJECTED,
                    actor=None,
                    decision=Decision(
                        action="reject",
                        reason="time limit passed",
                        user_message=message or "This answer could not be reviewed in time.",
                    ),
                )
            else:
                item.save(update_fields=["overdue_applied_at"])
                audit_record(
                    actor=None,
                    action="review.overdue",
                    target_type="review_item",
                    target_id=item.pk,
                    details={"rule": rule},
                )
            counts[rule] += 1


def review_queue_items(
    *,
    kind: str | None = None,
    model_version_id: int | None = None,
    knowledge_base_id: int | None = None,
    older_than_minutes: int | None = None,
) -> QuerySet[ReviewItem]:
    items = (
        ReviewItem.objects.filter(status=Status.PENDING)
        .select_related("policy", "model_version", "claimed_by")
        .order_by("created_at", "id")
    )
    if kind:
        items = items.filter(kind=kind)
    if model_version_id:
        items = items.filter(model_version_id=model_version_id)
    if knowledge_base_id:
        items = items.filter(knowledge_base_ids__contains=[knowledge_base_id])
    if older_than_minutes:
        items = items.filter(
            created_at__lte=timezone.now() - dt.timedelta(minutes=older_than_minutes)
        )
    return items


def review_queue_counts() -> dict[str, int]:
    """Pending items by kind."""
    rows = (
        ReviewItem.objects.filter(status=Status.PENDING)
        .values("kind")
        .annotate(n=Count("id"))
        .order_by("kind")
    )
    return {row["kind"]: row["n"] for row in rows}
