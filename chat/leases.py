"""A Redis lease that says "this work is being done" for as long as its worker process lives.

A heartbeat renews it, so long waits (loading a model, a queue for the engine) are covered too;
when the process dies the key expires, and whoever reaps stale work can tell. One heartbeat
thread per process renews every lease the process holds, in one Redis call: a lease costs no
thread of its own to start and stop with each piece of work.

A delivery that finds the lease taken waits for it up to one TTL and a beat. A redelivery of
work whose worker died can come before that worker's lease has lapsed, and it must take the
work over rather than drop it; a live holder renews the lease every quarter TTL, so it never
lapses within that wait, and the duplicate gives up.
"""

import logging
import os
import secrets
import threading
import time
from collections import defaultdict

from django.core.cache import cache

logger = logging.getLogger(__name__)


class _Heartbeat:
    """The process's heartbeat thread and the leases it renews."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[int, int]] = {}  # key -> (TTL, token)
        # Held while renewing: a lease let go waits for a renewal in flight, so that the
        # renewal cannot set the key again after the holder has deleted it.
        self.renewing = threading.Lock()
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None

    def add(self, key: str, ttl: int, token: int) -> None:
        with self.changed:
            self.held[key] = (ttl, token)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(
                    target=self._run, name="lease-heartbeat", daemon=True
                )
                self.thread.start()
            self.changed.notify()

    def remove(self, key: str) -> None:
        with self.renewing, self.changed:
            self.held.pop(key, None)

    def _run(self) -> None:
        due: dict[str, float] = {}
        while True:
            with self.changed:
                now = time.monotonic()
                for key, (ttl, _) in self.held.items():
                    due.setdefault(key, now + ttl / 4)
                for key in [k for k in due if k not in self.held]:
                    del due[key]
                wait = min(due.values(), default=now + 60) - now
                if wait > 0:
                    self.changed.wait(wait)
                    continue
            self._renew(due)

    def _renew(self, due: dict[str, float]) -> None:
        with self.renewing:
            with self.changed:
                held = list(self.held.items())
            now = time.monotonic()
            by_ttl: dict[int, dict[str, int]] = defaultdict(dict)
            for key, (ttl, token) in held:
                if due.get(key, now) <= now:
                    by_ttl[ttl][key] = token
                    due[key] = now + ttl / 4
            for ttl, keys in by_ttl.items():
                try:
                    cache.set_many(keys, timeout=ttl)
                except Exception:
                    # Redis away for a moment: the next beat sets the leases again. A lease
                    # that lapses meanwhile lets another delivery take the work; the claims
                    # see to it that the work still completes once.
                    logger.warning("Could not renew %d lease(s); trying again", len(keys))


_heartbeat = _Heartbeat()


def _heartbeat_reset() -> None:
    """A forked child holds none of its parent's leases and runs none of its threads: it
    starts afresh (and not with a lock some parent thread held at the fork)."""
    global _heartbeat
    _heartbeat = _Heartbeat()


os.register_at_fork(after_in_child=_heartbeat_reset)


class HeartbeatLease:
    """`key` holds `token`, this holder's own number, while the lease is held: a Redis script
    can tell whether this holder still has it (`chat.api.events.job_event_publish_leased`)."""

    def __init__(self, *, key: str, ttl_seconds: int):
        self.key = key
        self.ttl = ttl_seconds
        self.held = False
        self.token = secrets.randbits(62) + 1

    def __enter__(self) -> "HeartbeatLease":
        # add() only succeeds when no live worker holds the lease.
        deadline = time.monotonic() + self.ttl * 1.25
        while not (held := cache.add(self.key, self.token, timeout=self.ttl)):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(self.ttl / 8, left))
        self.held = held
        if self.held:
            _heartbeat.add(self.key, self.ttl, self.token)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.held:
            _heartbeat.remove(self.key)
            cache.delete(self.key)
