"""The generation lease, against the real Redis cache."""

import time
import uuid
from pathlib import Path

from django.core.cache import cache
from redis.backoff import NoBackoff
from redis.retry import Retry

from chat.leases import HeartbeatLease
from chat.leases import _heartbeat as heartbeat
from tests.redis_server import RedisServer


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
        assert cache.get(key) == live.token


def test_the_heartbeat_outlives_a_redis_outage_and_sets_the_lease_again(
    tmp_path: Path, settings
) -> None:  # type: ignore[no-untyped-def]
    server = RedisServer(tmp_path)
    server.start()
    # The cache on a Redis of the test's own, without retries, so that beats fail at once.
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": server.url,
            "OPTIONS": {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": 0.2},
        }
    }
    key = f"tests:lease:{uuid.uuid4().hex}"
    try:
        with HeartbeatLease(key=key, ttl_seconds=1) as lease:
            assert lease.held
            server.stop()
            time.sleep(1.0)  # several beats fail
            server.start()  # empty: the lease is gone with the old server
            deadline = time.monotonic() + 5
            while cache.get(key) is None:
                assert time.monotonic() < deadline, "the heartbeat stopped beating"
                time.sleep(0.1)
            assert heartbeat.thread is not None and heartbeat.thread.is_alive()
    finally:
        server.stop()


def test_a_forked_child_renews_none_of_its_parents_leases() -> None:
    import os

    from chat import leases

    key = f"tests:lease:{uuid.uuid4().hex}"
    with HeartbeatLease(key=key, ttl_seconds=5) as lease:
        assert lease.held and key in leases._heartbeat.held
        pid = os.fork()
        if pid == 0:  # the child: a heartbeat of its own, holding nothing
            os._exit(0 if leases._heartbeat.held == {} and leases._heartbeat.thread is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert key in leases._heartbeat.held, "the parent still renews its lease"
