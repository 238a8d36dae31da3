"""What the /v1 API adds to a non-streamed chat completion, against calling the engine directly.

For 1, 10 and 50 concurrent clients: the latency of `POST /v1/chat/completions` (max_tokens=1,
so the model's own share is one prefill and one token) through the real stack: daphne, API key
authentication, input safety filters, routing, admission (Redis rate limits, budgets in
PostgreSQL), audit, the job row, the enqueue through Redis, worker pickup, the engine, output
filters, settling and the event back through a Redis stream. Then the same prompts, at the same
concurrency, given straight to an engine in this process (`Engine.generate`), in alternating
rounds with the API's. The platform's added latency is the difference of the two distributions
at each percentile.

    python -m genai_site.launcher run -- python bench/api_overhead.py
"""

import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")

import django  # noqa: E402

django.setup()

import httpx  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402

from bench.machine import machine_describe  # noqa: E402
from genai_site.launcher import web_command, worker_command  # noqa: E402
from governance.api_keys import api_key_create  # noqa: E402
from governance.models import UsageLimit  # noqa: E402
from models_admin.engine import SamplingParams, engine_get  # noqa: E402
from models_admin.importing import model_import_default  # noqa: E402
from models_admin.models import Deployment  # noqa: E402
from models_admin.store import artifact_dir  # noqa: E402

ALIAS = "bench-api-overhead"
QUEUE = f"bench-api-{os.getpid()}"
LEVELS = [int(c) for c in os.environ.get("BENCH_CLIENTS", "1,10,50").split(",")]
REQUESTS = {1: int(os.environ.get("BENCH_REQUESTS_1", "40")), 10: 100, 50: 200}
PROMPTS = [
    "What is the capital of France?",
    "Give me two tips for writing clear emails.",
    "What is a prime number?",
    "Name three planets in the solar system.",
    "How do plants make food?",
]
VAR = BASE_DIR / "var"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


ROUNDS = 5
# Each round gives every client several requests, so that a round is the steady state of N
# clients and not one burst of N requests starting together.
PER_CLIENT = 4


def _rounds(total: int, clients: int) -> list[int]:
    """`total` requests in up to ROUNDS shares of at least PER_CLIENT requests a client."""
    rounds = max(1, min(ROUNDS, total // (clients * PER_CLIENT)))
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


def setup() -> str:
    version = model_import_default(alias=ALIAS)
    version.temperature = 0.0
    version.save()
    # Caches off: every request must reach the engine, or the comparison would be unfair.
    Deployment.objects.filter(alias=ALIAS).update(
        queue=QUEUE, primary_version=version, exact_cache_enabled=False
    )
    user, _ = User.objects.get_or_create(username="bench-api")
    UsageLimit.objects.filter(user=user).delete()
    UsageLimit.objects.create(user=user, tokens_per_day=100_000_000)
    _, raw = api_key_create(user=user, name="bench", scopes=["chat"], actor=None)
    return raw


def _wait_for(predicate, what: str, proc: subprocess.Popen) -> None:  # type: ignore[no-untyped-def, type-arg]
    deadline = time.monotonic() + 120
    while not predicate():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"{what} did not start; see var/bench-*.log")
        time.sleep(0.2)


# (sent, received, job id) per request, wall-clock seconds: the same clock as the rows' times.
TRACES: dict[int, list[tuple[float, float, str]]] = {}


async def api_run(base: str, key: str, clients: int, total: int) -> list[float]:
    latencies: list[float] = []
    traces = TRACES.setdefault(clients, [])
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=300, limits=limits
    ) as client:

        async def one_client() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body = {
                    "model": ALIAS,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": 1,
                }
                sent = time.time()
                started = time.perf_counter()
                response = await client.post("/v1/chat/completions", json=body)
                latencies.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, response.text
                traces.append((sent, time.time(), response.json()["id"]))

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies


def engine_run(engine, version, clients: int, total: int) -> list[float]:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=1, temperature=0.0, top_p=version.top_p)
    prompts = [
        engine.encode_chat(
            [
                {"role": "system", "content": version.system_prompt},
                {"role": "user", "content": PROMPTS[i % len(PROMPTS)]},
            ]
        )
        for i in range(total)
    ]

    def one(ids: list[int]) -> float:
        started = time.perf_counter()
        engine.generate(ids, params)
        return (time.perf_counter() - started) * 1000

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(one, prompts))


def stages(clients: int) -> list[tuple[str, float, float]]:
    """Median and p95 (ms) of each stage of a request, from the job's own timestamps: into the
    web process and admitted (sent -> row created), waiting for a worker (created -> claimed),
    in the worker (claimed -> settled, the engine included), and back out (settled -> the
    client has the response). The row is written after admission, so "in" includes it."""
    from chat.models import Job

    rows = {
        j.public_id: j
        for j in Job.objects.filter(public_id__in=[t[2] for t in TRACES[clients]]).only(
            "public_id", "created_at", "started_at", "finished_at"
        )
    }
    spans: dict[str, list[float]] = {"in": [], "queue": [], "worker": [], "out": []}
    for sent, received, public_id in TRACES[clients]:
        job = rows[public_id]
        assert job.started_at is not None and job.finished_at is not None
        created, started = job.created_at.timestamp(), job.started_at.timestamp()
        finished = job.finished_at.timestamp()
        spans["in"].append((created - sent) * 1000)
        spans["queue"].append((started - created) * 1000)
        spans["worker"].append((finished - started) * 1000)
        spans["out"].append((received - finished) * 1000)
    return [(name, percentile(v, 0.5), percentile(v, 0.95)) for name, v in spans.items()]


def main() -> None:
    key = setup()
    version = Deployment.objects.get(alias=ALIAS).primary_version
    port = 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker_log = VAR / "bench-api-worker.log"
    worker = subprocess.Popen(
        [*worker_command(queues=QUEUE, concurrency=8), "-n", f"bench-api@{platform.node()}"],
        cwd=BASE_DIR,
        stdout=worker_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    web = subprocess.Popen(
        web_command("127.0.0.1", port),
        cwd=BASE_DIR,
        stdout=(VAR / "bench-api-web.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    # The direct engine lives in this process, loaded before the runs; the two are measured
    # in alternating rounds, so that a drift in the machine's speed (it moves by several ms
    # within minutes on these cores) falls on both alike.
    api: dict[int, list[float]] = {c: [] for c in LEVELS}
    direct: dict[int, list[float]] = {c: [] for c in LEVELS}
    try:
        engine = engine_get(
            directory=artifact_dir(version.artifact_path),
            sha256=version.sha256,
            context_window=version.context_window,
        )
        _wait_for(lambda: "ready." in worker_log.read_text(errors="replace"), "worker", worker)

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        _wait_for(listening, "daphne", web)
        base = f"http://127.0.0.1:{port}"
        asyncio.run(api_run(base, key, 2, 10))  # warm-up: the worker loads the model
        engine_run(engine, version, 2, 10)
        for clients in LEVELS:
            total = REQUESTS.get(clients, 100)
            for share in _rounds(total, clients):
                api[clients] += asyncio.run(api_run(base, key, clients, share))
                direct[clients] += engine_run(engine, version, clients, share)
    finally:
        for proc in (web, worker):
            proc.terminate()
            proc.wait(timeout=30)

    print("# /v1 API overhead: non-streamed chat completion, max_tokens=1")
    print(f"# machine: {machine_describe()}")
    print("# model: SmolLM2-135M-Instruct; worker: 8 threads; web: one daphne process")
    print()
    print(
        "| clients | requests | API median | API p95 | API p99 | engine median | engine p95 "
        "| engine p99 | added median | added p95 | added p99 |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in LEVELS:
        a, e = api[c], direct[c]
        row = [percentile(a, q) for q in (0.5, 0.95, 0.99)]
        eng = [percentile(e, q) for q in (0.5, 0.95, 0.99)]
        added = [x - y for x, y in zip(row, eng, strict=True)]
        cells = " | ".join(f"{v:.1f}" for v in (*row, *eng, *added))
        print(f"| {c} | {len(a)} | {cells} |")
    print()
    print("All figures in milliseconds. 'added' = API percentile minus engine percentile.")
    print(f"mean API latency at 1 client: {statistics.mean(api[LEVELS[0]]):.1f} ms")
    print()
    print(f"Where a request's time goes at {LEVELS[0]} client(s) (from the job rows' timestamps):")
    print()
    print("| stage | median ms | p95 ms |")
    print("| --- | ---: | ---: |")
    labels = {
        "in": "client sent -> job row created (web: auth, routing, filters, admission)",
        "queue": "job created -> claimed by a worker (commit, enqueue, broker, pickup, lease)",
        "worker": "claimed -> settled (engine, output filters, settle transaction)",
        "out": "settled -> client has the response (rest of the settle, commit, end event, JSON)",
    }
    for name, median, p95 in stages(LEVELS[0]):
        print(f"| {labels[name]} | {median:.1f} | {p95:.1f} |")


if __name__ == "__main__":
    main()
