"""Admission of one chat turn: is this text allowed, and may this user spend on it right now."""

from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction

from governance.audit import audit_record
from governance.holds import safety_hold_create
from governance.models import QuotaReservation, SafetyHold
from governance.quotas import QuotaExceeded, quota_reserve
from governance.safety.base import Action
from governance.safety.pipeline import Verdict
from governance.safety.policy import safety_input_pipeline


@dataclass(frozen=True)
class Refusal:
    reason: str


@dataclass(frozen=True)
class Held:
    """The input was kept for review instead of going to the model."""

    hold: SafetyHold
    reason: str


def turn_screen(*, text: str, deployment_id: int | None) -> Verdict:
    """Run the deployment's input filters. The verdict's `text` (redacted where the policy
    says so) is what may be stored and sent to the model."""
    return safety_input_pipeline(deployment_id=deployment_id).run(text)


def _safety_details(verdict: Verdict | None) -> dict[str, Any]:
    return {"safety": verdict.summary()} if verdict is not None and verdict.trips else {}


@transaction.atomic
def turn_admit(
    *,
    user: User,
    tokens: int,
    target_type: str,
    target_id: object,
    ip: str | None = None,
    verdict: Verdict | None = None,
    deployment_id: int | None = None,
) -> QuotaReservation | Refusal | Held:
    """Apply the input verdict, then reserve `tokens` of the user's quota for one answer, and
    record the decision. A blocked or held text reserves nothing."""
    safety = _safety_details(verdict)
    if verdict is not None and verdict.action == Action.BLOCK:
        audit_record(
            actor=user,
            action="turn.refused",
            target_type=target_type,
            target_id=target_id,
            details={"limit": "safety", **safety},
            ip=ip,
        )
        return Refusal(reason=f"Blocked by this site's safety policy: {verdict.reason}.")
    if verdict is not None and verdict.action == Action.HOLD:
        hold = safety_hold_create(
            verdict=verdict,
            direction=SafetyHold.Direction.INPUT,
            target_type=target_type,
            target_id=target_id,
            deployment_id=deployment_id,
            user_id=user.pk,
        )
        audit_record(
            actor=user,
            action="turn.held",
            target_type=target_type,
            target_id=target_id,
            details={"hold": hold.pk, "filter": hold.filter, **safety},
            ip=ip,
        )
        return Held(hold=hold, reason=f"Held for review: {verdict.reason}.")
    try:
        reservation = quota_reserve(user=user, tokens=tokens)
    except QuotaExceeded as exc:
        audit_record(
            actor=user,
            action="turn.refused",
            target_type=target_type,
            target_id=target_id,
            details={
                "limit": "daily_tokens",
                "requested": tokens,
                "remaining": exc.remaining,
                **safety,
            },
            ip=ip,
        )
        return Refusal(reason=exc.reason)
    audit_record(
        actor=user,
        action="turn.admitted",
        target_type=target_type,
        target_id=target_id,
        details={"reserved_tokens": tokens, "reservation": reservation.pk, **safety},
        ip=ip,
    )
    return reservation
