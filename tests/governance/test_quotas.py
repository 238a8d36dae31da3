import threading

import pytest
from django.db import connection

from governance.models import DailyTokenQuota, TokenUsage
from governance.quotas import QuotaExceeded, quota_release, quota_reserve, quota_settle
from tests.factories import user_create

pytestmark = pytest.mark.django_db(transaction=True)


def test_concurrent_reservations_never_pass_the_daily_limit() -> None:
    user = user_create()
    DailyTokenQuota.objects.create(user=user, tokens_per_day=1000)
    admitted: list[int] = []
    refused: list[int] = []

    def reserve() -> None:
        try:
            quota_reserve(user=user, tokens=150)
            admitted.append(1)
        except QuotaExceeded:
            refused.append(1)
        finally:
            connection.close()

    threads = [threading.Thread(target=reserve) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 6 and len(refused) == 10  # 6 * 150 = 900 <= 1000 < 1050
    assert TokenUsage.objects.get(user=user).reserved == 900


def test_settle_counts_real_tokens_once_and_release_returns_the_hold() -> None:
    user = user_create()
    DailyTokenQuota.objects.create(user=user, tokens_per_day=1000)
    first = quota_reserve(user=user, tokens=300)
    second = quota_reserve(user=user, tokens=300)
    assert quota_settle(reservation_id=first.pk, tokens_used=120)
    assert not quota_settle(reservation_id=first.pk, tokens_used=120)
    assert quota_release(reservation_id=second.pk)
    usage = TokenUsage.objects.get(user=user)
    assert (usage.used, usage.reserved) == (120, 0)


def test_refusal_names_the_limit_and_the_reset_time() -> None:
    user = user_create()
    DailyTokenQuota.objects.create(user=user, tokens_per_day=100)
    with pytest.raises(QuotaExceeded) as exc:
        quota_reserve(user=user, tokens=101)
    assert "Daily token quota reached" in exc.value.reason
    assert "100 of 100 tokens left" in exc.value.reason and "00:00 UTC" in exc.value.reason


def test_the_default_row_applies_to_users_without_their_own() -> None:
    DailyTokenQuota.objects.update_or_create(user=None, defaults={"tokens_per_day": 50})
    user = user_create()
    with pytest.raises(QuotaExceeded):
        quota_reserve(user=user, tokens=51)
    quota_reserve(user=user, tokens=50)
