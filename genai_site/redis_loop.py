"""Redis from the event loop: a client and its connection pool per loop and purpose.

An asyncio connection belongs to the loop that opened it, so each loop gets its own pools, and
a coroutine borrows a connection instead of connecting anew. Purposes differ in their timeouts:
a blocking stream read waits as long as it asks, a settings read gives up quickly. The client is
made once too: redis-py builds a table of reply parsers for every new client (about 80 us, more
than a GET takes), and one client serves any number of coroutines of its loop, each command on
a connection of its own from the pool.

A server runs one loop for its life; `async_to_sync` outside one (tests, management commands)
makes a loop per call. The clients of loops that have closed are dropped at the next call.
"""

import asyncio
import threading
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings

_clients: dict[asyncio.AbstractEventLoop, dict[str, aioredis.Redis]] = {}
_lock = threading.Lock()


def redis_loop_client(purpose: str, **options: Any) -> aioredis.Redis:
    """This loop's client for `purpose`; `options` (timeouts) apply when its pool is made, the
    first time this loop asks for that purpose. Shared: callers do not close it."""
    loop = asyncio.get_running_loop()
    with _lock:
        clients = _clients.get(loop)
        if clients is None:
            for closed in [other for other in _clients if other.is_closed()]:
                del _clients[closed]
            clients = _clients[loop] = {}
        client = clients.get(purpose)
        if client is None:
            pool = aioredis.ConnectionPool.from_url(settings.REDIS_URL, **options)
            client = clients[purpose] = aioredis.Redis(connection_pool=pool)
    return client
