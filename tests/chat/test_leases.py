"""The generation lease, against the real Redis cache."""

import time
import uuid

from django.core.cache import cache

from chat.leases import HeartbeatLease


def test_a_lease_left_by_a_dead_worker_is_taken_once_it_lapses() -> None:
    key = f"tests:lease:{uuid.uuid4().hex}"
    cache.set(key, 1, timeout=1)  # a worker that died: nothing renews its lease
    started = time.monotonic()
    with HeartbeatLease(key=key, ttl_seconds=2) as lease:
        waited = time.monotonic() - started
        assert lease.held
    assert 0.5 < waited < 2.5
    assert cache.get(key) is None


def test_a_lease_renewed_by_a_live_worker_is_not_taken() -> None:
    key = f"tests:lease:{uuid.uuid4().hex}"
    with HeartbeatLease(key=key, ttl_seconds=1) as live:
        assert live.held
        started = time.monotonic()
        with HeartbeatLease(key=key, ttl_seconds=1) as duplicate:
            assert not duplicate.held
        # It waited out more than one TTL: a dead holder's lease would have lapsed by then.
        assert time.monotonic() - started >= 1.2
        assert cache.get(key) == 1
