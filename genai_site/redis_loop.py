"""Redis from the event loop: a connection pool per loop and purpose.

An asyncio connection belongs to the loop that opened it, so each loop gets its own pools, and
a coroutine borrows a connection instead of connecting anew. Purposes differ in their timeouts:
a blocking stream read waits as long as it asks, a settings read gives up quickly.

A server runs one loop for its life; `async_to_sync` outside one (tests, management commands)
makes a loop per call. The pools of loops that have closed are dropped at the next call.
"""

import asyncio
import threading
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings

_pools: dict[asyncio.AbstractEventLoop, dict[str, aioredis.ConnectionPool]] = {}
_lock = threading.Lock()


def redis_loop_client(purpose: str, **options: Any) -> aioredis.Redis:
    """A client on this loop's pool for `purpose`; `options` (timeouts) apply when the pool is
    made, the first time this loop asks for that purpose."""
    loop = asyncio.get_running_loop()
    with _lock:
        pools = _pools.get(loop)
        if pools is None:
            for closed in [other for other in _pools if other.is_closed()]:
                del _pools[closed]
            pools = _pools[loop] = {}
        pool = pools.get(purpose)
        if pool is None:
            pool = pools[purpose] = aioredis.ConnectionPool.from_url(settings.REDIS_URL, **options)
    return aioredis.Redis(connection_pool=pool)
