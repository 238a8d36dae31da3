"""Admission of one chat turn: is this user allowed to spend on this request right now."""

from dataclasses import dataclass

from django.contrib.auth.models import User
from django.db import transaction

from governance.audit import audit_record
from governance.models import QuotaReservation
from governance.quotas import QuotaExceeded, quota_reserve


@dataclass(frozen=True)
class Refusal:
    reason: str


@transaction.atomic
def turn_admit(
    *,
    user: User,
    tokens: int,
    target_type: str,
    target_id: object,
    ip: str | None = None,
) -> QuotaReservation | Refusal:
    """Reserve `tokens` of the user's quota for one answer and record the decision."""
    try:
        reservation = quota_reserve(user=user, tokens=tokens)
    except QuotaExceeded as exc:
        audit_record(
            actor=user,
            action="turn.refused",
            target_type=target_type,
            target_id=target_id,
            details={"limit": "daily_tokens", "requested": tokens, "remaining": exc.remaining},
            ip=ip,
        )
        return Refusal(reason=exc.reason)
    audit_record(
        actor=user,
        action="turn.admitted",
        target_type=target_type,
        target_id=target_id,
        details={"reserved_tokens": tokens, "reservation": reservation.pk},
        ip=ip,
    )
    return reservation
