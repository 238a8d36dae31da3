"""Daily and monthly token and cost budgets against real PostgreSQL, under real concurrency."""

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from functools import partial

import pytest
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from governance.admission import Refusal, turn_admit
from governance.audit import audit_verify
from governance.budgets import (
    budget_release,
    budget_release_all,
    budget_reserve,
    budget_settle,
    cost_of,
)
from governance.limits import limits_applying
from governance.models import AuditEvent, BudgetUsage, QuotaReservation, UsageLimit
from models_admin.models import Model, ModelVersion
from tests.factories import user_create
from tests.governance.limits_helpers import run_concurrently

pytestmark = pytest.mark.django_db(transaction=True)


def _admit(user, input_tokens: int = 100, output_tokens: int = 50, **kwargs):  # type: ignore[no-untyped-def]
    return turn_admit(
        user=user,
        input_tokens=input_tokens,
        max_output_tokens=output_tokens,
        target_type="test",
        target_id="x",
        **kwargs,
    )


def _settle(reservation_id: int, input_tokens: int, output_tokens: int) -> Decimal | None:
    return budget_settle(
        reservation_id=reservation_id, input_tokens=input_tokens, output_tokens=output_tokens
    )


def _priced_version(price_in: str, price_out: str) -> ModelVersion:
    model = Model.objects.create(name=f"priced-{price_in}-{price_out}")
    return ModelVersion.objects.create(
        model=model,
        version="1",
        artifact_path="x",
        sha256="0" * 64,
        price_per_1k_input_tokens=Decimal(price_in),
        price_per_1k_output_tokens=Decimal(price_out),
    )


def test_two_hundred_concurrent_requests_admit_exactly_what_the_daily_budget_allows() -> None:
    user = user_create()
    # 150 tokens a request: 37 fit in 5,600 (5,550), the 38th would not.
    UsageLimit.objects.create(user=user, tokens_per_day=5_600)
    outcomes = run_concurrently([lambda: _admit(user)] * 200, threads=64)
    admitted = [o for o in outcomes if isinstance(o, QuotaReservation)]
    refused = [o for o in outcomes if isinstance(o, Refusal)]
    assert len(admitted) == 37 and len(refused) == 163
    usage = BudgetUsage.objects.get(user=user, period="day")
    assert usage.tokens_reserved == 37 * 150 and usage.tokens_used == 0

    # Settle them all at once with real counts (up to the maximum each reserved).
    real = [(100, 50 - i % 50) for i in range(len(admitted))]
    costs = run_concurrently(
        [partial(_settle, r.pk, *t) for r, t in zip(admitted, real, strict=True)], threads=32
    )
    assert all(c == Decimal(0) for c in costs)
    usage.refresh_from_db()
    assert usage.tokens_reserved == 0
    assert usage.tokens_used == sum(a + b for a, b in real) <= 5_600
    assert AuditEvent.objects.filter(action="turn.admitted").count() == 37
    assert AuditEvent.objects.filter(action="turn.refused").count() == 163
    assert audit_verify().intact


def test_two_hundred_concurrent_requests_never_pass_a_groups_monthly_cost_budget() -> None:
    version = _priced_version("0.5", "1.5")  # 100 in + 50 out = 0.05 + 0.075 = 0.125
    group = Group.objects.create(name="lab")
    members = [user_create() for _ in range(4)]
    for member in members:
        member.groups.add(group)
    UsageLimit.objects.create(group=group, cost_per_month=Decimal("2.5"))  # exactly 20
    outcomes = run_concurrently(
        [partial(_admit, members[i % 4], model_version=version) for i in range(200)],
        threads=64,
    )
    admitted = [o for o in outcomes if isinstance(o, QuotaReservation)]
    assert len(admitted) == 20
    usage = BudgetUsage.objects.get(group=group, period="month")
    assert usage.cost_reserved == Decimal("2.5")
    refusal = next(o for o in outcomes if isinstance(o, Refusal))
    assert refusal.limit == "group.cost_per_month"
    assert "Monthly cost budget of group “lab” reached: 0.00 of 2.50 left" in refusal.reason
    assert "needs up to 0.125." in refusal.reason
    for reservation in admitted:
        assert budget_settle(
            reservation_id=reservation.pk, input_tokens=80, output_tokens=50
        ) == Decimal("0.115")
    usage.refresh_from_db()
    assert usage.cost_reserved == 0 and usage.cost_used == Decimal("2.3") <= Decimal("2.5")


def test_settle_counts_real_tokens_and_cost_once_and_release_returns_the_hold() -> None:
    version = _priced_version("1", "2")
    user = user_create()
    UsageLimit.objects.create(user=user, tokens_per_day=1000, cost_per_day=Decimal("10"))
    first = _admit(user, 200, 100, model_version=version)
    second = _admit(user, 200, 100, model_version=version)
    assert isinstance(first, QuotaReservation) and isinstance(second, QuotaReservation)
    assert first.cost == Decimal("0.4")
    version.price_per_1k_input_tokens = Decimal(100)  # a price edit mid-answer changes nothing
    version.save()
    assert budget_settle(reservation_id=first.pk, input_tokens=150, output_tokens=20) == Decimal(
        "0.19"
    )
    assert budget_settle(reservation_id=first.pk, input_tokens=150, output_tokens=20) is None
    assert budget_release(reservation_id=second.pk)
    assert not budget_release(reservation_id=second.pk)
    usage = BudgetUsage.objects.get(user=user, period="day")
    assert (usage.tokens_used, usage.tokens_reserved) == (170, 0)
    assert (usage.cost_used, usage.cost_reserved) == (Decimal("0.19"), 0)


def test_refusal_names_the_limit_and_when_it_resets() -> None:
    user = user_create()
    UsageLimit.objects.create(user=user, tokens_per_day=100, tokens_per_month=1000)
    refusal = _admit(user, 60, 50)
    assert isinstance(refusal, Refusal)
    assert refusal.limit == "user.tokens_per_day"
    assert "Daily token quota reached: 100 of 100 tokens left today" in refusal.reason
    assert "needs up to 110" in refusal.reason and "resets at 00:00 UTC" in refusal.reason
    now = timezone.now()
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    assert abs(refusal.retry_after - (midnight - now).total_seconds()) <= 2
    event = AuditEvent.objects.get(action="turn.refused")
    assert event.details["limit"] == "user.tokens_per_day"
    assert event.details["retry_after"] == refusal.retry_after


def test_monthly_refusal_resets_on_the_first_of_next_month() -> None:
    user = user_create()
    UsageLimit.objects.create(user=user, tokens_per_month=100)
    refusal = _admit(user, 60, 50)
    assert isinstance(refusal, Refusal) and refusal.limit == "user.tokens_per_month"
    today = timezone.now().date()
    first = (today.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    assert f"resets on {first:%Y-%m-%d} at 00:00 UTC" in refusal.reason
    assert refusal.retry_after > (first - today).days * 86400 - 86400


def test_a_refused_budget_holds_nothing_in_the_others() -> None:
    user = user_create()
    group = Group.objects.create(name="tight")
    user.groups.add(group)
    UsageLimit.objects.create(user=user, tokens_per_day=10_000)
    UsageLimit.objects.create(group=group, tokens_per_day=100)
    refusal = _admit(user)
    assert isinstance(refusal, Refusal) and refusal.limit == "group.tokens_per_day"
    assert not BudgetUsage.objects.filter(user=user, tokens_reserved__gt=0).exists()
    assert not QuotaReservation.objects.exists()


def test_a_reservation_over_budget_rows_already_there_is_one_statement_and_refuses_whole() -> None:
    user = user_create()
    group = Group.objects.create(name="tight-later")
    user.groups.add(group)
    UsageLimit.objects.create(user=user, tokens_per_day=10_000, tokens_per_month=100_000)
    UsageLimit.objects.create(group=group, tokens_per_day=400)
    limits = limits_applying(user=user)
    first = budget_reserve(user=user, limits=limits, input_tokens=100, max_output_tokens=50)
    assert first.usages.count() == 3  # the period's first request created the rows

    with CaptureQueriesContext(connection) as queries:
        second = budget_reserve(user=user, limits=limits, input_tokens=100, max_output_tokens=50)
    statements = [q["sql"] for q in queries if q["sql"] not in ("BEGIN", "COMMIT")]
    assert len(statements) == 1, statements
    assert set(second.usages.values_list("pk", flat=True)) == set(
        first.usages.values_list("pk", flat=True)
    )
    held = dict(BudgetUsage.objects.values_list("period", "tokens_reserved").filter(user=user))
    assert held == {"day": 300, "month": 300}
    assert BudgetUsage.objects.get(group=group).tokens_reserved == 300

    # The group's budget has 100 tokens left: the request is refused and holds nothing.
    refusal = _admit(user)
    assert isinstance(refusal, Refusal) and refusal.limit == "group.tokens_per_day"
    assert dict(BudgetUsage.objects.values_list("period", "tokens_reserved").filter(user=user)) == {
        "day": 300,
        "month": 300,
    }
    assert BudgetUsage.objects.get(group=group).tokens_reserved == 300
    assert QuotaReservation.objects.count() == 2


def test_the_default_row_applies_to_users_without_their_own() -> None:
    UsageLimit.objects.update_or_create(
        user=None, group=None, api_key=None, defaults={"tokens_per_day": 150}
    )
    plain, special = user_create(), user_create()
    UsageLimit.objects.create(user=special, tokens_per_day=10_000)
    assert isinstance(_admit(plain), QuotaReservation)
    assert isinstance(_admit(plain), Refusal)
    assert all(isinstance(_admit(special), QuotaReservation) for _ in range(3))


def test_malformed_limits_are_rejected_with_a_reason() -> None:
    user = user_create()
    group = Group.objects.create(name="g")
    cases = [
        (UsageLimit(user=user, group=group), "choose one of them"),
        (
            UsageLimit(user=user, tokens_per_day=10, tokens_per_month=5),
            "more tokens than its month",
        ),
        (UsageLimit(user=user, cost_per_day=Decimal("-1")), "greater than or equal to 0"),
        (UsageLimit(user=user, cost_per_day=Decimal(3), cost_per_month=Decimal(2)), "higher cost"),
    ]
    for limit, reason in cases:
        with pytest.raises(ValidationError) as exc:
            limit.full_clean()
        assert reason in " ".join(exc.value.messages)
    UsageLimit.objects.filter(user=None, group=None, api_key=None).delete()
    UsageLimit.objects.create(tokens_per_day=5)
    with pytest.raises(ValidationError) as exc:
        UsageLimit(tokens_per_day=6).full_clean()
    assert "already a limit for this subject" in " ".join(exc.value.messages)


def test_a_settled_cost_is_rounded_half_up_to_a_millionth_as_reservations_are() -> None:
    # 1 input token at 0.0005 per 1,000 costs 0.0000005: half a millionth, rounded up.
    version = _priced_version("0.0005", "0.0015")
    user = user_create()
    UsageLimit.objects.create(user=user, cost_per_day=Decimal("100"))
    cases = [(1, 0), (0, 1), (3, 7), (12_345, 678), (999_999, 1)]
    for input_tokens, output_tokens in cases:
        reservation = _admit(user, 10, 10, model_version=version)
        assert isinstance(reservation, QuotaReservation)
        expected = cost_of(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            price_in=Decimal("0.0005"),
            price_out=Decimal("0.0015"),
        )
        assert _settle(reservation.pk, input_tokens, output_tokens) == expected
    assert cost_of(
        input_tokens=1, output_tokens=0, price_in=Decimal("0.0005"), price_out=Decimal(0)
    ) == Decimal("0.000001")


def test_a_user_added_to_a_group_meets_its_limits_from_the_next_request() -> None:
    user = user_create()
    UsageLimit.objects.create(user=user, tokens_per_day=10_000)
    group = Group.objects.create(name="small-spenders")
    UsageLimit.objects.create(group=group, tokens_per_day=100)
    assert isinstance(_admit(user), QuotaReservation)  # the limits that apply are now cached
    user.groups.add(group)
    refusal = _admit(user)
    assert isinstance(refusal, Refusal) and refusal.limit == "group.tokens_per_day"
    user.groups.remove(group)
    assert isinstance(_admit(user), QuotaReservation)


def test_settling_moves_the_hold_into_use_on_every_budget_row_while_others_reserve() -> None:
    # Each request reserves on two rows (the user's day, the group's month) and settles both in
    # one statement; admissions and settles of 48 requests at once must neither deadlock nor
    # lose a token.
    group = Group.objects.create(name="team")
    user = user_create()
    user.groups.add(group)
    UsageLimit.objects.create(user=user, tokens_per_day=1_000_000)
    UsageLimit.objects.create(group=group, tokens_per_month=1_000_000)

    def admit_and_settle(i: int) -> int:
        reservation = _admit(user, 100, 50)
        assert isinstance(reservation, QuotaReservation)
        assert _settle(reservation.pk, 90, i % 50) == Decimal(0)
        return 90 + i % 50

    used = run_concurrently([partial(admit_and_settle, i) for i in range(48)], threads=16)
    for usage in BudgetUsage.objects.filter(period__in=["day", "month"]):
        assert usage.tokens_reserved == 0
        assert usage.tokens_used == sum(used)
    assert BudgetUsage.objects.count() == 2


def test_releasing_several_reservations_gives_every_hold_back_once() -> None:
    # Reservations over different rows (two groups' months, two users' days), released
    # together in an order other than their rows': each hold comes back, once.
    first, second = Group.objects.create(name="one"), Group.objects.create(name="two")
    users = [user_create() for _ in range(2)]
    users[0].groups.add(second)
    users[1].groups.add(first)
    for group in (first, second):
        UsageLimit.objects.create(group=group, tokens_per_month=10_000)
    for user in users:
        UsageLimit.objects.create(user=user, tokens_per_day=10_000)
    held = [_admit(user) for user in users for _ in range(2)]
    assert all(isinstance(r, QuotaReservation) for r in held)
    settled = held.pop()
    assert _settle(settled.pk, 100, 10) == Decimal(0)
    ids = [r.pk for r in reversed(held)] + [settled.pk]
    assert budget_release_all(reservation_ids=ids) == 3
    assert budget_release_all(reservation_ids=ids) == 0
    for usage in BudgetUsage.objects.all():
        assert usage.tokens_reserved == 0
        assert usage.tokens_used == (
            110 if usage.user_id == users[1].pk or usage.group_id == first.pk else 0
        )


def test_releasing_reservations_while_workers_settle_them_neither_deadlocks_nor_counts_twice() -> (
    None
):
    # A settle locks its reservation, then the budget rows; releasing several locks them in
    # the same order. Each reservation ends settled or released, once.
    user = user_create()
    UsageLimit.objects.create(user=user, tokens_per_day=1_000_000, tokens_per_month=10_000_000)
    settled = 0
    for _ in range(5):
        held = [_admit(user, 100, 50) for _ in range(12)]
        ids = [r.pk for r in held]
        calls: list[Callable[[], object]] = [
            partial(budget_release_all, reservation_ids=list(reversed(ids)))
        ]
        calls += [partial(_settle, pk, 100, 20) for pk in ids]
        run_concurrently(calls, threads=len(calls))
        statuses = list(
            QuotaReservation.objects.filter(pk__in=ids).values_list("status", flat=True)
        )
        assert set(statuses) <= {"settled", "released"}
        settled += statuses.count("settled")
        for usage in BudgetUsage.objects.filter(user=user):
            assert usage.tokens_reserved == 0
            assert usage.tokens_used == 120 * settled
