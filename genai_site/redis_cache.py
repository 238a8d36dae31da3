"""Django's Redis cache, with one redis-py client per connection pool instead of one per call.

Django's client makes a new `redis.Redis` for every cache operation. redis-py builds a table of
reply parsers for each new client, which takes about 80 us: more than the GET it serves. A
request's leases, cancel flags and cached settings make several cache calls in each process,
so the client is made once per pool here. A redis-py client is safe to share between threads:
each command takes a connection of its own from the pool.
"""

from typing import Any

from django.core.cache.backends import redis as django_redis


class RedisCacheClient(django_redis.RedisCacheClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clients: dict[int, Any] = {}

    # The pool index and the pool are Django's own (its client's private methods, which its
    # get_client uses as here); the stubs do not declare them.
    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        index = self._get_connection_pool_index(write)  # type: ignore[attr-defined]
        client = self._clients.get(index)
        if client is None:
            pool = self._get_connection_pool(write)  # type: ignore[attr-defined]
            client = self._clients.setdefault(index, self._client(connection_pool=pool))  # type: ignore[attr-defined]
        return client


class RedisCache(django_redis.RedisCache):
    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = RedisCacheClient
