"""Admission fails closed while the rate limiter's Redis is down, and recovers by itself."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from governance.admission import Refusal, turn_admit
from governance.models import AuditEvent, BudgetUsage, QuotaReservation, UsageLimit
from tests.factories import user_create
from tests.redis_server import RedisServer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    previous = settings.RATE_LIMIT_REDIS_URL
    settings.RATE_LIMIT_REDIS_URL = server.url
    yield server
    settings.RATE_LIMIT_REDIS_URL = previous
    server.stop()


def _admit(user):  # type: ignore[no-untyped-def]
    return turn_admit(
        user=user, input_tokens=10, max_output_tokens=10, target_type="test", target_id="x"
    )


def test_admission_fails_closed_while_redis_is_down_and_recovers_when_it_returns(
    own_redis: RedisServer,
) -> None:
    user = user_create()
    UsageLimit.objects.create(user=user, requests_per_minute=100, tokens_per_day=1000)
    assert isinstance(_admit(user), QuotaReservation)

    own_redis.stop()
    refusal = _admit(user)
    assert isinstance(refusal, Refusal)
    assert refusal.limit == "rate_limiter_unavailable" and refusal.retry_after == 5
    assert "cannot be metered right now" in refusal.reason
    assert QuotaReservation.objects.count() == 1, "nothing was reserved for the refused request"
    assert BudgetUsage.objects.get(user=user).tokens_reserved == 20
    assert AuditEvent.objects.filter(
        action="turn.refused", details__limit="rate_limiter_unavailable"
    ).exists()

    own_redis.start()
    assert isinstance(_admit(user), QuotaReservation), "recovers without a restart"
