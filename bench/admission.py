"""What admission costs per request: rate limits (Redis, Lua), budgets (PostgreSQL) and audit.

Runs `governance.admission.turn_admit` (settling each reservation right after) against the real
PostgreSQL and Redis, for subjects with no limits, with a user's full set of limits, and with a
user's and a group's limits together; then the same with several threads at once, to see how
much the serialized parts (the audit chain's lock, a shared budget row) cost under contention.
For the one-thread rows it also prints the CPU time a request took in this process and in its
PostgreSQL backend (only where PostgreSQL runs on this machine). Run it with
`DATABASE_PREPARED=0` to compare with statements bound and planned anew each time.

    python -m genai_site.launcher run -- python bench/admission.py
"""

import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")

import django  # noqa: E402
import psutil  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth.models import Group, User  # noqa: E402
from django.db import connection  # noqa: E402

from governance.admission import turn_admit  # noqa: E402
from governance.budgets import budget_settle  # noqa: E402
from governance.models import QuotaReservation, UsageLimit  # noqa: E402

REQUESTS = int(os.environ.get("BENCH_REQUESTS", "300"))
THREADS = int(os.environ.get("BENCH_THREADS", "8"))
BIG = 10**9


def _user(name: str, group: Group | None = None, **limits: Any) -> User:
    user, _ = User.objects.get_or_create(username=f"bench-admission-{name}")
    UsageLimit.objects.filter(user=user).delete()
    # A row of the user's own, even an empty one (no limits), replaces the default row.
    UsageLimit.objects.create(user=user, **limits)
    if group is not None:
        user.groups.add(group)
    return user


def scenarios() -> dict[str, User]:
    # A run-unique prefix keeps earlier runs' buckets out of the way.
    settings.RATE_LIMIT_KEY_PREFIX = f"genai:ratelimit:bench-{os.getpid()}"
    full: dict[str, Any] = {
        "requests_per_minute": BIG,
        "tokens_per_minute": BIG,
        "tokens_per_day": BIG,
        "tokens_per_month": BIG,
        "cost_per_day": Decimal(10**7),
        "cost_per_month": Decimal(10**7),
    }
    group, _ = Group.objects.get_or_create(name="bench-admission")
    UsageLimit.objects.update_or_create(group=group, defaults=full)
    return {
        "no limits": _user("none"),
        "user: rpm, tpm, day and month tokens and cost": _user("full", **full),
        "user + group (shared rows), all limits": _user("grouped", group=group, **full),
    }


def admit_and_settle(user: User) -> float:
    started = time.perf_counter()
    outcome = turn_admit(
        user=user, input_tokens=200, max_output_tokens=100, target_type="bench", target_id="x"
    )
    elapsed = time.perf_counter() - started
    if not isinstance(outcome, QuotaReservation):
        raise RuntimeError(outcome.reason)
    budget_settle(reservation_id=outcome.pk, input_tokens=150, output_tokens=60)
    return elapsed


def sequential(user: User) -> list[float]:
    return [admit_and_settle(user) for _ in range(REQUESTS)]


def _backend_cpu_seconds() -> float | None:
    """CPU time of this connection's PostgreSQL backend so far, if it runs on this machine."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def concurrent(user_for: Callable[[int], User]) -> tuple[float, list[float]]:
    times: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)

    def work(index: int) -> None:
        barrier.wait()
        for _ in range(REQUESTS // THREADS):
            elapsed = admit_and_settle(user_for(index))
            with lock:
                times.append(elapsed)
        connection.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, times


def ms(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.2f}"


def main() -> None:
    users = scenarios()
    print(f"# admission: {REQUESTS} requests per row, admit + settle, audit on")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print()
    prepared = settings.DATABASES["default"].get("OPTIONS", {}).get("server_side_binding")
    print(f"# prepared statements: {'on' if prepared else 'off'}")
    print()
    print(
        "| scenario | threads | median admit (ms) | p95 admit (ms) | requests/s "
        "| CPU here (ms) | PostgreSQL CPU (ms) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, user in users.items():
        for _ in range(10):
            admit_and_settle(user)  # warm the connection, its statements and the script cache
        backend_before = _backend_cpu_seconds()
        cpu_before = time.process_time()
        started = time.perf_counter()
        times = sequential(user)
        rate = len(times) / (time.perf_counter() - started)
        cpu = (time.process_time() - cpu_before) / len(times) * 1000
        backend_after = _backend_cpu_seconds()
        backend = (
            f"{(backend_after - backend_before) / len(times) * 1000:.2f}"
            if backend_before is not None and backend_after is not None
            else "n/a"
        )
        print(
            f"| {name} | 1 | {statistics.median(times) * 1000:.2f} | "
            f"{ms(times, 0.95)} | {rate:.0f} | {cpu:.2f} | {backend} |"
        )
    grouped = users["user + group (shared rows), all limits"]
    members = [
        _user(
            f"member{i}", group=Group.objects.get(name="bench-admission"), requests_per_minute=BIG
        )
        for i in range(THREADS)
    ]
    for label, user_for in (
        ("one user, all limits", lambda i: grouped),
        ("one user each, one shared group", lambda i: members[i]),
    ):
        wall, times = concurrent(user_for)
        print(
            f"| {label} | {THREADS} | {statistics.median(times) * 1000:.2f} | "
            f"{ms(times, 0.95)} | {len(times) / wall:.0f} | | |"
        )


if __name__ == "__main__":
    main()
