"""Daily and monthly budgets of tokens and cost: reserved before generation with the request's
maximum, settled with the real count after (or released when nothing was generated).

A reservation is one conditional UPDATE per budget row, in id order, inside one savepoint.
PostgreSQL re-checks an UPDATE's WHERE clause against the row as the previous writer left it,
so concurrent requests can never together pass a limit; if any budget refuses, the savepoint
rolls the others back. Taking the rows in id order keeps two requests from deadlocking.
"""

import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from governance.limits import AppliedLimit, Subject, user_limit
from governance.models import ApiKey, BudgetUsage, QuotaReservation, UsageLimit

Measure = Literal["tokens", "cost"]
_PERIOD_NAMES = {"day": "Daily", "month": "Monthly"}
_MICRO = Decimal("0.000001")


def cost_of(
    *, input_tokens: int, output_tokens: int, price_in: Decimal, price_out: Decimal
) -> Decimal:
    """What tokens cost at prices per 1,000 tokens, to a millionth."""
    cost = (Decimal(input_tokens) * price_in + Decimal(output_tokens) * price_out) / 1000
    return cost.quantize(_MICRO, rounding=ROUND_HALF_UP)


def period_start(period: str, now: dt.datetime) -> dt.date:
    today = now.astimezone(dt.UTC).date()
    return today if period == BudgetUsage.Period.DAY else today.replace(day=1)


def period_resets_at(period: str, start: dt.date) -> dt.datetime:
    if period == BudgetUsage.Period.DAY:
        end = start + dt.timedelta(days=1)
    else:
        end = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return dt.datetime.combine(end, dt.time(), tzinfo=dt.UTC)


class BudgetExceeded(Exception):
    def __init__(
        self,
        *,
        subject: Subject,
        period: str,
        measure: Measure,
        limit: int | Decimal,
        remaining: int | Decimal,
        requested: int | Decimal,
        resets_at: dt.datetime,
    ):
        self.subject = subject
        self.period = period
        self.measure = measure
        self.limit = limit
        self.remaining = remaining
        self.requested = requested
        self.resets_at = resets_at
        super().__init__(self.reason)

    @property
    def limit_name(self) -> str:
        return f"{self.subject.kind}.{self.measure}_per_{self.period}"

    @property
    def retry_after(self) -> int:
        return max(1, int((self.resets_at - timezone.now()).total_seconds()) + 1)

    @property
    def reason(self) -> str:
        kind = "token quota" if self.measure == "tokens" else "cost budget"
        whose = "" if self.subject.kind == "user" else f" of {self.subject.label}"
        if self.measure == "tokens":
            left, requested = f"{self.remaining:,} of {self.limit:,} tokens", f"{self.requested:,}"
        else:
            left = f"{money(Decimal(self.remaining))} of {money(Decimal(self.limit))}"
            requested = money(Decimal(self.requested))
        when = "today" if self.period == "day" else "this month"
        if self.period == "day":
            resets = f"at {self.resets_at:%H:%M} UTC"
        else:
            resets = f"on {self.resets_at:%Y-%m-%d} at {self.resets_at:%H:%M} UTC"
        return (
            f"{_PERIOD_NAMES[self.period]} {kind}{whose} reached: {left} left {when}, "
            f"this message needs up to {requested}. The quota resets {resets}."
        )


def _budgets(limit: UsageLimit) -> list[tuple[str, int | None, Decimal | None]]:
    """(period, token limit, cost limit) for each period with any limit set."""
    found = []
    for period, tokens, cost in (
        ("day", limit.tokens_per_day, limit.cost_per_day),
        ("month", limit.tokens_per_month, limit.cost_per_month),
    ):
        if tokens is not None or cost is not None:
            found.append((period, tokens, cost))
    return found


@dataclass(frozen=True)
class _Hold:
    usage: BudgetUsage
    subject: Subject
    period: str
    tokens_limit: int | None
    cost_limit: Decimal | None


def _exceeded(hold: _Hold, *, tokens: int, cost: Decimal) -> BudgetExceeded:
    usage = BudgetUsage.objects.get(pk=hold.usage.pk)
    resets_at = period_resets_at(hold.period, usage.period_start)
    if hold.tokens_limit is not None:
        left = hold.tokens_limit - usage.tokens_used - usage.tokens_reserved
        if left < tokens:
            return BudgetExceeded(
                subject=hold.subject,
                period=hold.period,
                measure="tokens",
                limit=hold.tokens_limit,
                remaining=max(0, left),
                requested=tokens,
                resets_at=resets_at,
            )
    assert hold.cost_limit is not None
    left_cost = hold.cost_limit - usage.cost_used - usage.cost_reserved
    return BudgetExceeded(
        subject=hold.subject,
        period=hold.period,
        measure="cost",
        limit=hold.cost_limit,
        remaining=max(Decimal(0), left_cost),
        requested=cost,
        resets_at=resets_at,
    )


# A savepoint of its own: a budget that refuses undoes the holds already taken in the others.
@transaction.atomic
def budget_reserve(
    *,
    user: User,
    limits: list[AppliedLimit],
    input_tokens: int,
    max_output_tokens: int,
    price_in: Decimal = Decimal(0),
    price_out: Decimal = Decimal(0),
    api_key: ApiKey | None = None,
) -> QuotaReservation:
    """Hold the request's maximum in every budget that applies, or raise BudgetExceeded and
    hold nothing. Never over-admits."""
    tokens = input_tokens + max_output_tokens
    cost = cost_of(
        input_tokens=input_tokens,
        output_tokens=max_output_tokens,
        price_in=price_in,
        price_out=price_out,
    )
    now = timezone.now()
    holds = []
    for applied in limits:
        for period, tokens_limit, cost_limit in _budgets(applied.limit):
            lookup: dict[str, Any] = {
                "period": period,
                "period_start": period_start(period, now),
                **applied.subject.usage_filter,
            }
            usage, _ = BudgetUsage.objects.get_or_create(**lookup)
            holds.append(_Hold(usage, applied.subject, period, tokens_limit, cost_limit))
    holds.sort(key=lambda h: h.usage.pk)
    for hold in holds:
        room = Q()
        if hold.tokens_limit is not None:
            room &= Q(tokens_used__lte=hold.tokens_limit - tokens - F("tokens_reserved"))
        if hold.cost_limit is not None:
            room &= Q(cost_used__lte=hold.cost_limit - cost - F("cost_reserved"))
        won = BudgetUsage.objects.filter(room, pk=hold.usage.pk).update(
            tokens_reserved=F("tokens_reserved") + tokens, cost_reserved=F("cost_reserved") + cost
        )
        if not won:
            raise _exceeded(hold, tokens=tokens, cost=cost)
    reservation = QuotaReservation.objects.create(
        user=user,
        api_key=api_key,
        tokens=tokens,
        cost=cost,
        price_input_per_1k=price_in,
        price_output_per_1k=price_out,
    )
    QuotaReservation.usages.through.objects.bulk_create(
        [
            QuotaReservation.usages.through(quotareservation=reservation, budgetusage=h.usage)
            for h in holds
        ]
    )
    return reservation


def _finish(reservation: QuotaReservation, status: str, tokens: int, cost: Decimal) -> bool:
    """Close a held reservation (False if it was already closed) and move its hold into use.
    Its `tokens` and `cost` are those it was made with: they never change."""
    won = QuotaReservation.objects.filter(
        pk=reservation.pk, status=QuotaReservation.Status.HELD
    ).update(status=status, settled_tokens=tokens, settled_cost=cost)
    if not won:
        return False
    # One row at a time, in id order, as budget_reserve takes them.
    for usage_id in reservation.usages.order_by("id").values_list("id", flat=True):
        BudgetUsage.objects.filter(pk=usage_id).update(
            tokens_reserved=F("tokens_reserved") - reservation.tokens,
            tokens_used=F("tokens_used") + tokens,
            cost_reserved=F("cost_reserved") - reservation.cost,
            cost_used=F("cost_used") + cost,
        )
    return True


@transaction.atomic(savepoint=False)
def budget_settle(*, reservation_id: int, input_tokens: int, output_tokens: int) -> Decimal | None:
    """Count what the answer really used, at the prices of its reservation. Returns its cost,
    or None if the reservation was already settled or released."""
    reservation = QuotaReservation.objects.filter(pk=reservation_id).first()
    if reservation is None:
        return None
    cost = cost_of(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        price_in=reservation.price_input_per_1k,
        price_out=reservation.price_output_per_1k,
    )
    finished = _finish(
        reservation, QuotaReservation.Status.SETTLED, input_tokens + output_tokens, cost
    )
    return cost if finished else None


@transaction.atomic(savepoint=False)
def budget_release(*, reservation_id: int) -> bool:
    """Give a held reservation back unused (the answer never started)."""
    reservation = QuotaReservation.objects.filter(pk=reservation_id).first()
    if reservation is None:
        return False
    return _finish(reservation, QuotaReservation.Status.RELEASED, 0, Decimal(0))


@dataclass(frozen=True)
class BudgetMeter:
    """One of a user's own budgets, as the chat page shows it."""

    period: str
    measure: Measure
    limit: int | Decimal
    used: int | Decimal
    reserved: int | Decimal
    resets_at: dt.datetime

    @property
    def remaining(self) -> int | Decimal:
        return max(0, self.limit - self.used - self.reserved)

    @property
    def label(self) -> str:
        when = "Today" if self.period == "day" else "This month"
        if self.measure == "tokens":
            return f"{when}: {self.remaining:,} of {self.limit:,} tokens left"
        left, limit = money(Decimal(self.remaining)), money(Decimal(self.limit))
        return f"{when}: {left} of {limit} left to spend"


def money(amount: Decimal) -> str:
    """At least two decimals, and no trailing zeros past them: 1.00, 0.9465, 0.000115."""
    exponent = amount.normalize().as_tuple().exponent
    places = max(2, -exponent) if isinstance(exponent, int) else 2
    return f"{amount:,.{places}f}"


def budget_meters(*, user: User) -> list[BudgetMeter]:
    """The user's own budgets (theirs or the default) with what is left of each now."""
    limit = user_limit(user=user)
    if limit is None:
        return []
    now = timezone.now()
    starts = {period: period_start(period, now) for period in ("day", "month")}
    usages = {
        u.period: u
        for u in BudgetUsage.objects.filter(
            Q(period="day", period_start=starts["day"])
            | Q(period="month", period_start=starts["month"]),
            user=user,
        )
    }
    meters = []
    for period, tokens_limit, cost_limit in _budgets(limit):
        usage = usages.get(period)
        resets_at = period_resets_at(period, starts[period])
        if tokens_limit is not None:
            meters.append(
                BudgetMeter(
                    period,
                    "tokens",
                    tokens_limit,
                    usage.tokens_used if usage else 0,
                    usage.tokens_reserved if usage else 0,
                    resets_at,
                )
            )
        if cost_limit is not None:
            meters.append(
                BudgetMeter(
                    period,
                    "cost",
                    cost_limit,
                    usage.cost_used if usage else Decimal(0),
                    usage.cost_reserved if usage else Decimal(0),
                    resets_at,
                )
            )
    return meters
