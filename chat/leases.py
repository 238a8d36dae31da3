"""A Redis lease that says "this work is being done" for as long as its worker process lives.

A heartbeat thread renews it, so long waits (loading a model, a queue for the engine) are
covered too; when the process dies the key expires, and whoever reaps stale work can tell.

A delivery that finds the lease taken waits for it up to one TTL and a beat. A redelivery of
work whose worker died can come before that worker's lease has lapsed, and it must take the
work over rather than drop it; a live holder renews the lease every quarter TTL, so it never
lapses within that wait, and the duplicate gives up.
"""

import logging
import threading
import time

from django.core.cache import cache

logger = logging.getLogger(__name__)


class HeartbeatLease:
    def __init__(self, *, key: str, ttl_seconds: int):
        self.key = key
        self.ttl = ttl_seconds
        self.held = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._done.wait(self.ttl / 4):
            try:
                cache.set(self.key, 1, timeout=self.ttl)
            except Exception:
                # Redis away for a moment: the next beat sets the lease again. A lease that
                # lapses meanwhile lets another delivery take the work; the claims see to it
                # that the work still completes once.
                logger.warning("Could not renew the lease %s; trying again", self.key)

    def __enter__(self) -> "HeartbeatLease":
        # add() only succeeds when no live worker holds the lease.
        deadline = time.monotonic() + self.ttl * 1.25
        while not (held := cache.add(self.key, 1, timeout=self.ttl)):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(self.ttl / 8, left))
        self.held = held
        if self.held:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self._done.set()
            self._thread.join()
            cache.delete(self.key)
