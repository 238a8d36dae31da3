"""Requests and tokens per minute: Lua token buckets in the real Redis."""

import time

import pytest
from django.contrib.auth.models import Group

from governance.admission import Refusal, turn_admit
from governance.limits import limits_applying
from governance.models import QuotaReservation, UsageLimit
from governance.rate_limits import RateLimited, rate_limit_take
from tests.factories import user_create
from tests.governance.limits_helpers import run_concurrently

pytestmark = pytest.mark.django_db(transaction=True)


def _admit(user, tokens: int = 100, **kwargs):  # type: ignore[no-untyped-def]
    return turn_admit(
        user=user,
        input_tokens=tokens - 10,
        max_output_tokens=10,
        target_type="test",
        target_id="x",
        **kwargs,
    )


def test_two_hundred_concurrent_requests_take_no_more_than_the_requests_per_minute() -> None:
    user = user_create()
    UsageLimit.objects.create(user=user, requests_per_minute=60)
    limits = limits_applying(user=user)

    def take() -> bool:
        try:
            rate_limit_take(limits=limits, tokens=1)
        except RateLimited:
            return False
        return True

    started = time.monotonic()
    outcomes = run_concurrently([take] * 200, threads=200)
    elapsed = time.monotonic() - started
    # 60 at once, plus what refilled (one a second) while the 200 ran.
    assert 60 <= outcomes.count(True) <= 60 + int(elapsed) + 1


def test_refusal_says_which_limit_and_when_to_retry() -> None:
    user = user_create()
    UsageLimit.objects.create(user=user, requests_per_minute=2)
    assert isinstance(_admit(user), QuotaReservation)
    assert isinstance(_admit(user), QuotaReservation)
    refusal = _admit(user)
    assert isinstance(refusal, Refusal)
    assert refusal.limit == "user.requests_per_minute"
    assert "Rate limit reached: your limit of 2 requests per minute" in refusal.reason
    assert 29 <= refusal.retry_after <= 30  # one request refills in 30 s


def test_tokens_per_minute_counts_each_requests_maximum() -> None:
    user = user_create()
    UsageLimit.objects.create(user=user, tokens_per_minute=250)
    assert isinstance(_admit(user, 100), QuotaReservation)
    assert isinstance(_admit(user, 100), QuotaReservation)
    refusal = _admit(user, 100)
    assert isinstance(refusal, Refusal) and refusal.limit == "user.tokens_per_minute"
    too_big = _admit(user, 300)
    assert isinstance(too_big, Refusal)
    assert "needs more than your limit of 250 tokens per minute allows" in too_big.reason


def test_a_group_bucket_is_shared_by_its_members() -> None:
    group = Group.objects.create(name="shared")
    alice, bob = user_create(), user_create()
    for member in (alice, bob):
        member.groups.add(group)
    UsageLimit.objects.create(group=group, requests_per_minute=1)
    assert isinstance(_admit(alice), QuotaReservation)
    refusal = _admit(bob)
    assert isinstance(refusal, Refusal) and refusal.limit == "group.requests_per_minute"
    assert "group “shared”" in refusal.reason


def test_a_changed_limit_applies_to_the_next_request() -> None:
    user = user_create()
    limit = UsageLimit.objects.create(user=user, requests_per_minute=1)
    assert isinstance(_admit(user), QuotaReservation)
    assert isinstance(_admit(user), Refusal)
    limit.requests_per_minute = 3
    limit.save()
    assert isinstance(_admit(user), QuotaReservation)
    limit.requests_per_minute = 0  # a suspension
    limit.save()
    refusal = _admit(user)
    assert isinstance(refusal, Refusal) and refusal.retry_after == 60
