"""The shared Redis clients: the cache's, one per pool, and the event loop's, one per loop and
purpose. Shared between threads (the cache) and coroutines (the loop's), against real Redis."""

import asyncio
import threading
import uuid

from django.core.cache import cache

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
