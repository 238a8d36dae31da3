"""Admission of one request (a chat turn, or a call to the API): may this user, through this
key, spend on it right now? Chat and the /v1 API both admit through `turn_admit`."""

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction

from governance.api_keys import api_key_require_active
from governance.audit import audit_record
from governance.budgets import BudgetExceeded, budget_reserve
from governance.holds import safety_hold_create
from governance.limits import limits_applying
from governance.models import ApiKey, QuotaReservation, SafetyHold
from governance.rate_limits import RateLimited, RateLimiterUnavailable, rate_limit_take
from governance.safety.base import Action
from governance.safety.pipeline import Verdict
from governance.safety.policy import safety_input_pipeline
from models_admin.models import ModelVersion


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted: `reason` for people, `limit` names the limit that
    refused it, `retry_after` the seconds until trying again can succeed (HTTP Retry-After)."""

    reason: str
    limit: str = ""
    retry_after: int = 0


def _refusal(exc: RateLimited | RateLimiterUnavailable | BudgetExceeded) -> Refusal:
    if isinstance(exc, RateLimiterUnavailable):
        return Refusal(
            reason=exc.reason, limit="rate_limiter_unavailable", retry_after=exc.retry_after
        )
    if isinstance(exc, RateLimited):
        # A request larger than the bucket can never pass; a minute is the honest upper bound
        # on when a changed limit would let it.
        retry_after = exc.retry_after if exc.retry_after > 0 else 60
        return Refusal(
            reason=exc.reason, limit=f"{exc.subject.kind}.{exc.measure}", retry_after=retry_after
        )
    return Refusal(reason=exc.reason, limit=exc.limit_name, retry_after=exc.retry_after)


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


@transaction.atomic(savepoint=False)
def turn_admit(
    *,
    user: User,
    input_tokens: int,
    max_output_tokens: int,
    target_type: str,
    target_id: object,
    model_version: ModelVersion | None = None,
    api_key: ApiKey | None = None,
    ip: str | None = None,
    verdict: Verdict | None = None,
    deployment_id: int | None = None,
) -> QuotaReservation | Refusal | Held:
    """Apply the input verdict (a blocked or held text reserves nothing), then check the
    rate limits and reserve the budgets for one request, and record the decision.

    `input_tokens` is the prompt (or an upper estimate of it), `max_output_tokens` the most the
    answer may take: both are held until the answer is settled. Raises ApiKeyInvalid if
    `api_key` is no longer active.
    """
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
        return Refusal(
            reason=f"Blocked by this site's safety policy: {verdict.reason}.", limit="safety"
        )
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
    if api_key is not None:
        # Read again: the key may have been revoked since the request authenticated.
        api_key_require_active(api_key_id=api_key.pk)
    tokens = input_tokens + max_output_tokens
    price_in = model_version.price_per_1k_input_tokens if model_version else Decimal(0)
    price_out = model_version.price_per_1k_output_tokens if model_version else Decimal(0)
    via = {"api_key": api_key.prefix} if api_key is not None else {}
    limits = limits_applying(user=user, api_key=api_key)
    try:
        rate_limit_take(limits=limits, tokens=tokens)
        reservation = budget_reserve(
            user=user,
            limits=limits,
            input_tokens=input_tokens,
            max_output_tokens=max_output_tokens,
            price_in=price_in,
            price_out=price_out,
            api_key=api_key,
        )
    except (RateLimited, RateLimiterUnavailable, BudgetExceeded) as exc:
        refusal = _refusal(exc)
        audit_record(
            actor=user,
            action="turn.refused",
            target_type=target_type,
            target_id=target_id,
            details={
                "limit": refusal.limit,
                "requested_tokens": tokens,
                "retry_after": refusal.retry_after,
                **via,
                **safety,
            },
            ip=ip,
        )
        return refusal
    audit_record(
        actor=user,
        action="turn.admitted",
        target_type=target_type,
        target_id=target_id,
        details={
            "reserved_tokens": tokens,
            "reserved_cost": str(reservation.cost),
            "reservation": reservation.pk,
            **via,
            **safety,
        },
        ip=ip,
    )
    return reservation
