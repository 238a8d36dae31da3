"""The shared Redis clients: the cache's, one per pool, the event loop's, one per loop and
purpose, and the Celery broker channel's. Shared between threads (the cache) and coroutines
(the loop's), against real Redis."""

import asyncio
import threading
import uuid

import pytest
import redis
from django.core.cache import cache

from genai_site.broker import Channel
from genai_site.celery import app
from genai_site.redis_loop import redis_loop_client


def test_the_cache_reuses_one_client_and_threads_each_read_their_own_values() -> None:
    backend = cache._cache  # type: ignore[attr-defined]
    assert backend.get_client() is backend.get_client(write=True)
    prefix = uuid.uuid4().hex
    wrong: list[str] = []

    def worker(n: int) -> None:
        for i in range(50):
            key = f"{prefix}:{n}:{i}"
            cache.set(key, (n, i), timeout=30)
            if cache.get(key) != (n, i):
                wrong.append(key)
            cache.delete(key)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_a_loop_keeps_one_client_per_purpose_and_a_new_loop_gets_its_own() -> None:
    key = f"redis-loop-test:{uuid.uuid4().hex}"

    async def on_one_loop() -> tuple[object, object, list[bytes | None]]:
        first, again = redis_loop_client("test-a"), redis_loop_client("test-a")
        other = redis_loop_client("test-b", socket_timeout=0.5)
        assert first is again and first is not other
        await first.set(key, b"v", ex=30)

        # Coroutines of the loop share the client, each command on a connection of its own:
        # a blocking read does not hold up the others.
        async def wait_on_an_empty_list() -> None:
            await first.execute_command("BLPOP", f"{key}:empty", 1)

        blocked = asyncio.create_task(wait_on_an_empty_list())
        values = await asyncio.gather(*(first.get(key) for _ in range(20)))
        assert not blocked.done()
        await blocked
        return first, other, values

    first_loop, _, values = asyncio.run(on_one_loop())
    assert values == [b"v"] * 20
    second_loop, _, _ = asyncio.run(on_one_loop())
    assert second_loop is not first_loop


def test_the_broker_channel_publishes_and_delivers_with_the_client_it_keeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[object] = []
    real_init = redis.Redis.__init__

    def counted(self: redis.Redis, *args: object, **kwargs: object) -> None:
        made.append(self)
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]

    queue_name = f"broker-test-{uuid.uuid4().hex}"
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue(queue_name, no_ack=False)
        try:
            assert isinstance(queue.channel, Channel)
            queue.put({"n": -1})
            queue.get(timeout=5).ack()
            monkeypatch.setattr(redis.Redis, "__init__", counted)
            for n in range(20):
                queue.put({"n": n})
            received = []
            for _ in range(20):
                message = queue.get(timeout=5)
                received.append(message.payload["n"])
                message.ack()
            assert received == list(range(20))
            assert made == []
        finally:
            monkeypatch.undo()
            queue.channel.queue_delete(queue_name)  # type: ignore[attr-defined]
            queue.close()
