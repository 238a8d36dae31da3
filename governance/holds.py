"""Texts held by a safety filter for a person to review (`SafetyHold`)."""

from django.db import transaction

from governance.models import SafetyHold
from governance.safety.pipeline import Verdict


@transaction.atomic
def safety_hold_create(
    *,
    verdict: Verdict,
    direction: str,
    target_type: str,
    target_id: object,
    deployment_id: int | None,
    user_id: int | None,
) -> SafetyHold:
    """Record that `verdict` held the target's text. The caller writes the audit event."""
    trip = verdict.deciding
    assert trip is not None, "only a verdict that holds creates a hold"
    return SafetyHold.objects.create(
        direction=direction,
        target_type=target_type,
        target_id=str(target_id),
        deployment_id=deployment_id,
        user_id=user_id,
        filter=trip.filter,
        reason=trip.reason,
        findings=verdict.summary(),
    )
