"""Running many admissions at once, each on its own thread and database connection."""

import threading
from collections.abc import Callable
from typing import TypeVar

from django.db import connection

T = TypeVar("T")


def run_concurrently(calls: list[Callable[[], T]], threads: int) -> list[T]:
    """Run `calls` on `threads` threads that all start together; results in call order.

    Each thread holds its own PostgreSQL connection, so `threads` stays below the server's
    connection limit while the calls still contend for the same rows and buckets.
    """
    results: list[T | None] = [None] * len(calls)
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)
    next_call = iter(range(len(calls)))
    lock = threading.Lock()

    def work() -> None:
        try:
            barrier.wait()
            while True:
                with lock:
                    index = next(next_call, None)
                if index is None:
                    return
                results[index] = calls[index]()
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            connection.close()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]
