"""Per-user daily token quotas: reserved before generation, settled with the real count after.

Reservation is one conditional UPDATE, so concurrent turns cannot together pass the limit:
PostgreSQL re-checks the WHERE clause against the row as the previous writer left it.
"""

import datetime as dt
from dataclasses import dataclass

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from governance.models import DailyTokenQuota, QuotaReservation, TokenUsage


class QuotaExceeded(Exception):
    def __init__(self, *, limit: int, remaining: int, requested: int, resets_at: dt.datetime):
        self.limit = limit
        self.remaining = remaining
        self.requested = requested
        self.resets_at = resets_at
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        return (
            f"Daily token quota reached: {self.remaining} of {self.limit} tokens left today, "
            f"this message needs up to {self.requested}. "
            f"The quota resets at {self.resets_at:%H:%M} UTC."
        )


@dataclass(frozen=True)
class QuotaStatus:
    limit: int
    used: int
    reserved: int
    resets_at: dt.datetime

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)


def _today() -> dt.date:
    return timezone.now().astimezone(dt.UTC).date()


def quota_resets_at(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def quota_limit_for(user: User) -> int:
    row = (
        DailyTokenQuota.objects.filter(user=user).first()
        or DailyTokenQuota.objects.filter(user__isnull=True).first()
    )
    return row.tokens_per_day if row is not None else 0


def quota_status(user: User) -> QuotaStatus:
    day = _today()
    usage = TokenUsage.objects.filter(user=user, day=day).first()
    return QuotaStatus(
        limit=quota_limit_for(user),
        used=usage.used if usage else 0,
        reserved=usage.reserved if usage else 0,
        resets_at=quota_resets_at(day),
    )


@transaction.atomic
def quota_reserve(*, user: User, tokens: int) -> QuotaReservation:
    """Hold `tokens` of today's quota, or raise QuotaExceeded. Never over-admits."""
    day = _today()
    limit = quota_limit_for(user)
    usage, _ = TokenUsage.objects.get_or_create(user=user, day=day)
    won = TokenUsage.objects.filter(pk=usage.pk, used__lte=limit - tokens - F("reserved")).update(
        reserved=F("reserved") + tokens
    )
    if not won:
        usage.refresh_from_db()
        raise QuotaExceeded(
            limit=limit,
            remaining=max(0, limit - usage.used - usage.reserved),
            requested=tokens,
            resets_at=quota_resets_at(day),
        )
    return QuotaReservation.objects.create(usage=usage, tokens=tokens)


@transaction.atomic
def quota_settle(*, reservation_id: int, tokens_used: int) -> bool:
    """Turn a held reservation into real use. Returns False if it was already settled."""
    won = QuotaReservation.objects.filter(
        pk=reservation_id, status=QuotaReservation.Status.HELD
    ).update(status=QuotaReservation.Status.SETTLED, settled_tokens=tokens_used)
    if not won:
        return False
    reservation = QuotaReservation.objects.get(pk=reservation_id)
    TokenUsage.objects.filter(pk=reservation.usage_id).update(
        reserved=F("reserved") - reservation.tokens, used=F("used") + tokens_used
    )
    return True


@transaction.atomic
def quota_release(*, reservation_id: int) -> bool:
    """Give a held reservation back unused (the answer never started)."""
    won = QuotaReservation.objects.filter(
        pk=reservation_id, status=QuotaReservation.Status.HELD
    ).update(status=QuotaReservation.Status.RELEASED, settled_tokens=0)
    if not won:
        return False
    reservation = QuotaReservation.objects.get(pk=reservation_id)
    TokenUsage.objects.filter(pk=reservation.usage_id).update(
        reserved=F("reserved") - reservation.tokens
    )
    return True
