"""What the review queue costs: claim-next + decide with a deep queue, alone and with several
reviewers at once, and the policy check each answer pays.

Runs against the real PostgreSQL (the dev database the launcher starts); its rows are removed at
the end (the audit events it writes stay, as the audit log is append-only).

    python -m genai_site.launcher run -- python manage.py migrate
    python -m genai_site.launcher run -- python bench/review_queue.py
"""

import datetime as dt
import os
import statistics
import sys
import threading
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")

import django  # noqa: E402

django.setup()

from django.contrib.auth.models import User  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from bench.machine import machine_describe  # noqa: E402
from governance.models import ReviewItem, ReviewPolicy  # noqa: E402
from governance.review_policies import AnswerFacts, review_policy_match  # noqa: E402
from governance.review_queue import (  # noqa: E402
    Decision,
    review_item_claim_next,
    review_item_decide,
)

QUEUE_DEPTH = int(os.environ.get("BENCH_QUEUE_DEPTH", "20000"))
OPERATIONS = int(os.environ.get("BENCH_OPERATIONS", "400"))
THREADS = int(os.environ.get("BENCH_THREADS", "4"))
TARGET = "bench-review"


def _fill(policy: ReviewPolicy) -> None:
    now = timezone.now()
    ReviewItem.objects.bulk_create(
        [
            ReviewItem(
                policy=policy,
                kind=policy.kind,
                reason="bench",
                target_type=TARGET,
                target_id=str(n),
                original_text="An answer of a few words.",
                due_at=now + dt.timedelta(hours=1),
            )
            for n in range(QUEUE_DEPTH)
        ],
        batch_size=2000,
    )


def _reviewers(n: int) -> list[User]:
    return [User.objects.get_or_create(username=f"bench-reviewer-{i}")[0] for i in range(n)]


def _claim_and_decide(reviewer: User, count: int, out: list[float], seen: list[int]) -> None:
    try:
        for _ in range(count):
            started = time.perf_counter()
            item = review_item_claim_next(reviewer=reviewer)
            assert item is not None
            review_item_decide(item_id=item.pk, reviewer=reviewer, decision=Decision("approve"))
            out.append(time.perf_counter() - started)
            seen.append(item.pk)
    finally:
        connection.close()


def _row(label: str, threads: int, times: list[float], wall: float) -> str:
    ms = sorted(t * 1000 for t in times)
    p95 = ms[int(len(ms) * 0.95) - 1]
    return (
        f"| {label} | {threads} | {statistics.median(ms):.1f} | {p95:.1f} | {len(ms) / wall:.0f} |"
    )


def _claims(threads: int) -> str:
    times: list[float] = []
    seen: list[int] = []
    workers = [
        threading.Thread(target=_claim_and_decide, args=(r, OPERATIONS // threads, times, seen))
        for r in _reviewers(threads)
    ]
    started = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    wall = time.perf_counter() - started
    assert len(seen) == len(set(seen)) == OPERATIONS, "an item was claimed twice, or lost"
    return _row("claim next + approve", threads, times, wall)


def _policy_check() -> str:
    facts = AnswerFacts(deployment_id=None, model_version_id=None, mean_logprob=-0.5)
    times = []
    started = time.perf_counter()
    for _ in range(OPERATIONS):
        t0 = time.perf_counter()
        assert review_policy_match(facts=facts) is None
        times.append(time.perf_counter() - t0)
    return _row("policy check per answer", 1, times, time.perf_counter() - started)


def main() -> None:
    queue_policy = ReviewPolicy.objects.create(
        name="bench", kind=ReviewPolicy.Kind.DEPLOYMENT_APPROVAL, is_active=False
    )
    checked = [
        ReviewPolicy(name="bench low", kind="low_confidence", logprob_threshold=-9.0),
        ReviewPolicy(name="bench sensitive", kind="sensitive_knowledge"),
        ReviewPolicy(name="bench sample", kind="random_sample", sample_percent=0.0),
    ]
    try:
        _fill(queue_policy)
        rows = [_claims(1), _claims(THREADS)]
        for policy in checked:
            policy.save()
        rows.append(_policy_check())
    finally:
        ReviewItem.objects.filter(target_type=TARGET).delete()
        ReviewPolicy.objects.filter(name__startswith="bench").delete()

    print(f"# review queue: {QUEUE_DEPTH} pending items, {OPERATIONS} operations per row")
    print(f"# machine: {machine_describe()}")
    print("# policy check: three active policies (low confidence, sensitive knowledge, sample)")
    print()
    print("| operation | threads | median (ms) | p95 (ms) | per second |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
