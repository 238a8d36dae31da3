"""Operator settings that every request reads (deployments and their routes, model versions,
safety and review policies, blocked terms, the usage limits that apply to a user and key, API
keys and their owners), kept in each process until any of them changes anywhere.

A request reads them several times on its way through the web process and the worker; each
read was a query. Here a process keeps what it read under the current *generation*, a counter in
Redis: any write to one of these tables (a save, a delete, a queryset `update()`; see
`ConfigQuerySet` and `config_models_watch`) increments it once the transaction commits, and
every process then reads afresh. An operator's change still applies to the next request.

Two rules keep a process from caching what is not committed:
- a thread that changed settings inside a transaction not yet committed reads them from the
  database until that transaction ends (it alone sees its change; it may roll back);
- the generation is read before the rows, so rows read while a change commits are kept under
  the old generation and dropped at the next read.
Without Redis, nothing is cached: every read goes to the database.
"""

import copy
import logging
import pickle
import secrets
import threading
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any, TypeVar

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, models, transaction
from django.db.models.signals import m2m_changed, post_delete, post_save
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from genai_site.redis_loop import redis_loop_client

logger = logging.getLogger(__name__)

T = TypeVar("T")
_GENERATION_KEY = "genai:config:generation"


class _Copies:
    """Hands out copies of one cached value, each caller its own (model instances are mutable):
    unpickled from the value's bytes, which takes a quarter of `copy.deepcopy`'s time for a
    model instance (a Deployment: 16.5 against 79 us on 2 cores); deep-copied where the value
    cannot be pickled."""

    __slots__ = ("_blob", "_value")

    def __init__(self, value: Any) -> None:
        self._value: Any = None
        self._blob: bytes | None = None
        try:
            self._blob = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            self._value = copy.deepcopy(value)

    def copy(self) -> Any:
        if self._blob is not None:
            return pickle.loads(self._blob)
        return copy.deepcopy(self._value)


_entries: dict[Hashable, tuple[int, _Copies]] = {}
_entries_lock = threading.Lock()
# The newest generation this process has seen: entries of older ones are dropped when it moves.
_entries_generation = -1
# Beyond this many entries (one per user and key for the limits) the process starts afresh.
_MAX_ENTRIES = 10_000
_writer = threading.local()
# Set by `config_snapshot`: the generation this request or task reads under.
_pinned: ContextVar[int | None] = ContextVar("config_generation", default=None)


# Without Redis, reads go to the database: at once, not after redis-py's default retries (three,
# with backoff: about 8 s a read while Redis is away).
@cache
def _client() -> redis.Redis:
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )


# A counter that goes missing (Redis restarted without persistence, the key evicted or flushed)
# starts again at a random value, never at 0: a process may still hold entries read under the old
# counter's values, and a counter counting up from 0 again could meet one of them.
def _epoch() -> int:
    return secrets.randbelow(2**62) + 1


# Set when a change could not be announced (Redis down): the next read that reaches Redis
# announces it first, so processes that kept their entries through the outage drop them.
_owed = threading.Event()


def _generation() -> int | None:
    client = _client()
    try:
        if _owed.is_set():
            _announce(client)
        value: bytes | None = client.get(_GENERATION_KEY)  # type: ignore[assignment]
        if value is None:
            client.set(_GENERATION_KEY, _epoch(), nx=True)
            value = client.get(_GENERATION_KEY)  # type: ignore[assignment]
    except redis.RedisError:
        return None
    return int(value or 0)


async def _generation_async() -> int | None:
    if _owed.is_set():
        return await sync_to_async(_generation, thread_sensitive=False)()
    client = redis_loop_client(
        "config", socket_timeout=0.5, socket_connect_timeout=0.5, retry=AsyncRetry(NoBackoff(), 0)
    )
    try:
        value: bytes | None = await client.get(_GENERATION_KEY)
    except redis.RedisError:
        return None
    if value is None:
        return await sync_to_async(_generation, thread_sensitive=False)()
    return int(value)


def _announce(client: redis.Redis) -> None:
    client.set(_GENERATION_KEY, _epoch(), nx=True)
    client.incr(_GENERATION_KEY)
    _owed.clear()


def _bump() -> None:
    try:
        _announce(_client())
    except redis.RedisError:
        # Other processes cannot be told now: the next read of this process that reaches
        # Redis tells them. This process at least drops its own.
        _owed.set()
        logger.warning("Could not announce a settings change; other processes may lag")
    with _entries_lock:
        _entries.clear()


def config_changed() -> None:
    """Announce a change to cached settings: at commit, or at once outside a transaction."""
    if connection.in_atomic_block:
        _writer.dirty = True
    transaction.on_commit(_bump)


def _writing_in_transaction() -> bool:
    if not getattr(_writer, "dirty", False):
        return False
    if connection.in_atomic_block:
        return True
    _writer.dirty = False  # that transaction has ended: committed (and announced) or rolled back
    return False


def config_cached(key: Hashable, load: Callable[[], T]) -> T:
    """`load()`'s value for `key`, read once per generation in this process. The caller gets
    its own copy: model instances are mutable."""
    if _writing_in_transaction():
        return load()
    generation = _pinned.get()
    if generation is None:
        generation = _generation()
    if generation is None:
        return load()
    with _entries_lock:
        entry = _entries.get(key)
    if entry is None or entry[0] != generation:
        value = load()
        _entry_store(key, generation, value)
        return value
    return entry[1].copy()  # type: ignore[no-any-return]


async def config_cached_async(key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
    """`config_cached` for the event loop: the generation is read without blocking the loop,
    and `load` runs only when this process holds nothing for `key` under it. Nothing is kept
    when `load` raises."""
    generation = await _generation_async()
    if generation is None:
        return await load()
    with _entries_lock:
        entry = _entries.get(key)
    if entry is not None and entry[0] == generation:
        return entry[1].copy()  # type: ignore[no-any-return]
    value = await load()
    _entry_store(key, generation, value)
    return value


def _entry_store(key: Hashable, generation: int, value: Any) -> None:
    """Keeps `value` as it is now: the caller may change its own afterwards."""
    global _entries_generation
    entry = (generation, _Copies(value))
    with _entries_lock:
        if generation > _entries_generation or len(_entries) >= _MAX_ENTRIES:
            _entries.clear()
            _entries_generation = max(generation, _entries_generation)
        _entries[key] = entry


@contextmanager
def config_snapshot() -> Iterator[None]:
    """One request's or task's reads: the generation is read once, on entry, and the settings
    read inside are those of that moment (one Redis round trip instead of one per read). A
    change that commits meanwhile applies from the next request."""
    token = _pinned.set(_generation())
    try:
        yield
    finally:
        _pinned.reset(token)


def config_cache_clear() -> None:
    """Drop every process's cached settings (a change made behind the ORM's back: raw SQL, a
    restored dump, a test database flushed between tests)."""
    _bump()


class ConfigQuerySet(models.QuerySet):  # type: ignore[type-arg]
    """A queryset whose bulk writes announce the change like a save does."""

    def update(self, **kwargs: Any) -> int:
        rows = super().update(**kwargs)
        config_changed()
        return rows

    def delete(self) -> tuple[int, dict[str, int]]:
        result = super().delete()
        config_changed()
        return result

    def bulk_create(self, *args: Any, **kwargs: Any) -> list[Any]:
        created = super().bulk_create(*args, **kwargs)
        config_changed()
        return created

    def bulk_update(self, *args: Any, **kwargs: Any) -> int:
        rows = super().bulk_update(*args, **kwargs)
        config_changed()
        return rows


def _on_write(sender: type[models.Model], **kwargs: Any) -> None:
    config_changed()


def _on_save_unless(ignored: frozenset[str]) -> Callable[..., None]:
    def on_save(sender: type[models.Model], update_fields: Any = None, **kwargs: Any) -> None:
        if update_fields and set(update_fields) <= ignored:
            return
        config_changed()

    return on_save


def config_models_watch(*models_: type[models.Model], ignoring: Iterable[str] = ()) -> None:
    """Announce every save and delete of these models (called from their apps' `ready`). A
    save of only `ignoring`'s fields (`save(update_fields=...)`) is not a change."""
    on_save = _on_save_unless(frozenset(ignoring))
    for model in models_:
        # Held strongly: `on_save` is a closure that nothing else refers to.
        post_save.connect(
            on_save, sender=model, weak=False, dispatch_uid=f"config-cache-save-{model}"
        )
        post_delete.connect(_on_write, sender=model, dispatch_uid=f"config-cache-delete-{model}")


def _on_m2m(sender: type[models.Model], action: str, **kwargs: Any) -> None:
    if action.startswith("post_"):
        config_changed()


def config_relations_watch(*throughs: type[models.Model]) -> None:
    """Announce every change to these many-to-many relations (`add`, `remove`, `clear`, `set`)."""
    for through in throughs:
        m2m_changed.connect(_on_m2m, sender=through, dispatch_uid=f"config-cache-m2m-{through}")
