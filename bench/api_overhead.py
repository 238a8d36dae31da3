"""What the /v1 API adds to a non-streamed chat completion, against calling the engine directly.

For 1, 10 and 50 concurrent clients: the latency of `POST /v1/chat/completions` (max_tokens=1,
so the model's own share is one prefill and one token; `BENCH_MAX_TOKENS` asks for longer
answers, greedy, so that the engine in both setups gives the same tokens) through the real
stack: uvicorn, API key authentication, input safety filters, routing, admission (Redis rate
limits, budgets in PostgreSQL), audit, the job row, the enqueue through Redis, worker pickup,
the engine, output filters, settling and the event back through a Redis stream. Then the same
prompts, at the same concurrency, given straight to an engine in this process
(`Engine.generate`), in alternating rounds with the API's. The platform's added latency is the
difference of the two distributions at each percentile.

A second baseline calls the engine over HTTP (`bench/direct_asgi.py`: a bare endpoint under the
same server, with the same client), as a program would call an inference server of its own; the
difference from it leaves out what any HTTP call costs (the client library, the server's
parsing), which the in-process baseline counts as added.

It also prints the CPU time each request costs, by process (the API's web process and worker,
PostgreSQL, Redis, this client; the bare endpoint; the engine in this process), from the
processes' own counters around each round. On a machine whose cores the engine fills, the
platform's added latency follows the CPU its own code takes per request.

And it prints what each answer's `Server-Timing` header says: the platform's time (from the web
process's receipt of the request to its answer, less the model's call) and the model's. That
is how gateways publish their overhead, measured inside the server; unlike the differences above,
it leaves out the wait before a web process takes the request up and the client's own time.

    python -m genai_site.launcher run -- python bench/api_overhead.py

`BENCH_CLIENTS` (default 1,10,50) chooses the levels, and `BENCH_REQUESTS_1`, `BENCH_REQUESTS_10`
and `BENCH_REQUESTS_50` the requests at each (40, 100 and 200 by default; a p99 of 100 requests is
their second slowest, so take 1,000 or more where the p99 matters). `BENCH_MODEL_DIR` serves a
safetensors model directory instead of the default model (on a machine without its package, such
as a GPU machine with a random-weight model of its shape), and `BENCH_MODEL_DIR=tiny` a Llama of 2
layers and 64 dimensions with random weights and the default model's tokenizer: on a CPU machine,
where the default model fills the cores, it answers in about a millisecond, so that the
platform's own latency and CPU show at every level. The worker has as many task threads as
`make up` gives it (`ENGINE_MAX_BATCH`, 8 by default).
`BENCH_WORKERS` starts that many worker processes (default 1), and `WEB_CONCURRENCY` that many
web processes for the API (`genai_site.web_server.WebServer`, as `make up` starts them; a table
shows how evenly they shared the work); the bare endpoint stays one process.
`BENCH_USERS` spreads the clients over that many users (default 1), each with its own key and
budget: one user's requests wait for each other on the user's budget row. `BENCH_PG_WAITS=1`
adds a table of what PostgreSQL's backends waited on during the API's rounds.
`BENCH_CLIENT_PROCESSES` splits the clients of each round over that many client processes
(`bench/load_client.py`; their CPU counts as this process's), so that at 50 clients the client's
own queue is not measured.
"""

import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")
if os.environ.get("BENCH_MODEL_DIR") == "tiny":
    # The tiny model's operations are too small to split over cores. Split over two OpenMP
    # threads on a machine whose cores the web process, PostgreSQL and Redis share, they wait
    # for each other: the worker's engine then answered in 2.7 ms at the median but 11.8 at
    # p90 and 18.5 at p99 (2.5, 3.2 and 5.8 ms on one thread). Engines here and in the worker
    # (which inherits this) run on one thread.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import django  # noqa: E402

django.setup()

import psutil  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402

from bench.load_client import PROMPTS, Trace, http_run  # noqa: E402
from bench.machine import machine_describe  # noqa: E402
from genai_site.embedded import free_port  # noqa: E402
from genai_site.launcher import default_concurrency, worker_command  # noqa: E402
from genai_site.process import long_lived_freeze  # noqa: E402
from genai_site.web_server import WebServer, web_command  # noqa: E402
from governance.api_keys import api_key_create  # noqa: E402
from governance.models import UsageLimit  # noqa: E402
from models_admin.engine import SamplingParams, engine_get  # noqa: E402
from models_admin.importing import model_import, model_import_default  # noqa: E402
from models_admin.models import Deployment, ModelVersion  # noqa: E402
from models_admin.store import artifact_dir  # noqa: E402

ALIAS = "bench-api-overhead"
QUEUE = f"bench-api-{os.getpid()}"
LEVELS = [int(c) for c in os.environ.get("BENCH_CLIENTS", "1,10,50").split(",")]
REQUESTS = {
    clients: int(os.environ.get(f"BENCH_REQUESTS_{clients}", default))
    for clients, default in ((1, 40), (10, 100), (50, 200))
}
# BENCH_MODEL_DIR=tiny: the model's sizes.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
VAR = Path(settings.VAR_DIR)  # GENAI_VAR_DIR, where the launcher keeps its files
# As many task threads as the engine has slots, as `make up` runs it.
WORKER_THREADS = default_concurrency()
WORKERS = int(os.environ.get("BENCH_WORKERS", "1"))
# Each with a key and a daily budget of its own; client i uses user i modulo this.
USERS = int(os.environ.get("BENCH_USERS", "1"))
PG_WAITS = os.environ.get("BENCH_PG_WAITS") == "1"
MAX_TOKENS = int(os.environ.get("BENCH_MAX_TOKENS", "1"))
CLIENT_PROCESSES = int(os.environ.get("BENCH_CLIENT_PROCESSES", "1"))
WEB_PROCESSES = int(os.environ.get("WEB_CONCURRENCY") or 1)


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


def _tiny_model() -> Path:
    """A Llama of 2 layers, 64 wide, with random weights and the default model's tokenizer,
    written once under the var directory."""
    import torch

    from bench.engine_gpu import random_llama

    directory = VAR / "bench-models" / "tiny-random"
    if not (directory / "model.safetensors").exists():
        tokenizer = artifact_dir(model_import_default(alias=f"{ALIAS}-default").artifact_path)
        torch.manual_seed(0)
        random_llama(TINY, tokenizer, directory, device="cpu", dtype=torch.float32)
    return directory


def setup() -> list[str]:
    # BENCH_MODEL_DIR: a safetensors model directory to serve instead of the default model (on
    # a machine without the default model's package; the answer's text does not matter here).
    model_dir = os.environ.get("BENCH_MODEL_DIR")
    if model_dir == "tiny":
        model_dir = str(_tiny_model())
    if model_dir:
        version = model_import(
            source=Path(model_dir),
            model_name="bench-api-model",
            version=Path(model_dir).name,
            alias=ALIAS,
            stage=ModelVersion.Stage.PRODUCTION,
        )
    else:
        version = model_import_default(alias=ALIAS)
    version.temperature = 0.0
    version.save()
    # Caches off: every request must reach the engine, or the comparison would be unfair.
    Deployment.objects.filter(alias=ALIAS).update(
        queue=QUEUE, primary_version=version, exact_cache_enabled=False
    )
    keys = []
    for i in range(USERS):
        user, _ = User.objects.get_or_create(username="bench-api" + (f"-{i + 1}" if i else ""))
        UsageLimit.objects.filter(user=user).delete()
        UsageLimit.objects.create(user=user, tokens_per_day=100_000_000)
        _, raw = api_key_create(user=user, name="bench", scopes=["chat"], actor=None)
        keys.append(raw)
    return keys


def _wait_for(predicate, what: str, proc: subprocess.Popen) -> None:  # type: ignore[no-untyped-def, type-arg]
    deadline = time.monotonic() + 300  # a GPU engine compiles as it loads
    while not predicate():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"{what} did not start; see {VAR}/bench-*.log")
        time.sleep(0.2)


# Each API request's trace (`bench.load_client.Trace`), by level.
TRACES: dict[int, list[Trace]] = {}


class Clients:
    """Runs each round's requests here (`BENCH_CLIENT_PROCESSES=1`, the default) or split over
    that many client processes (`bench/load_client.py`), started once and kept."""

    def __init__(self, processes: int) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.load_client"],
                cwd=BASE_DIR,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(processes if processes > 1 else 0)
        ]

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def run(self, base: str, keys: list[str] | None, clients: int, total: int) -> list[float]:
        if not self.procs:
            latencies, traces = asyncio.run(
                http_run(
                    base=base,
                    alias=ALIAS,
                    keys=keys,
                    clients=clients,
                    total=total,
                    max_tokens=MAX_TOKENS,
                )
            )
        else:
            # Clients and requests in even shares, each process's clients numbered on from the
            # previous one's so that keys (users) are spread as in one process.
            used = self.procs[: min(len(self.procs), clients)]
            shares = [
                (
                    clients // len(used) + (i < clients % len(used)),
                    total // len(used) + (i < total % len(used)),
                )
                for i in range(len(used))
            ]
            first = 0
            for proc, (share_clients, share_total) in zip(used, shares, strict=True):
                spec = {
                    "base": base,
                    "alias": ALIAS,
                    "keys": keys,
                    "clients": share_clients,
                    "total": share_total,
                    "first_client": first,
                    "max_tokens": MAX_TOKENS,
                }
                first += share_clients
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(spec) + "\n")
                proc.stdin.flush()
            latencies, traces = [], []
            for proc in used:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"client process {proc.pid} stopped; its error is above")
                answer = json.loads(line)
                latencies += answer["latencies"]
                traces += [tuple(t) for t in answer["traces"]]
        TRACES.setdefault(clients, []).extend(traces)
        return latencies


def engine_run(engine, version, clients: int, total: int) -> list[float]:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, top_p=version.top_p)
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


def stages(clients: int) -> list[tuple[str, float, float, float]]:
    """Median, p95 and p99 (ms) of each stage of a request, from the job's own timestamps: into the
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
    for sent, received, public_id, _, _ in TRACES[clients]:
        job = rows[public_id]
        assert job.started_at is not None and job.finished_at is not None
        created, started = job.created_at.timestamp(), job.started_at.timestamp()
        finished = job.finished_at.timestamp()
        spans["in"].append((created - sent) * 1000)
        spans["queue"].append((started - created) * 1000)
        spans["worker"].append((finished - started) * 1000)
        spans["out"].append((received - finished) * 1000)
    return [
        (name, percentile(v, 0.5), percentile(v, 0.95), percentile(v, 0.99))
        for name, v in spans.items()
    ]


def _cpu_seconds(roles: dict[int, str]) -> Counter[str]:
    """CPU seconds (user + system) used so far by every process, keyed by its role: those in
    `roles` by pid, then PostgreSQL and Redis by name, the rest as "other"."""
    used: Counter[str] = Counter()
    for proc in psutil.process_iter(["pid", "name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        name = (proc.info["name"] or "").lower()
        role = roles.get(proc.info["pid"]) or (
            "postgres" if "postgres" in name else "redis" if "redis" in name else "other"
        )
        used[role] += times.user + times.system
    return used


def _pid_cpu_seconds(pids: list[int]) -> Counter[int]:
    """CPU seconds (user + system) used so far by each of `pids`."""
    used: Counter[int] = Counter()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            used[pid] = times.user + times.system
    return used


class PgWaits:
    """What PostgreSQL's busy client backends wait on, sampled every 5 ms from a thread of this
    process while the API's rounds run (`BENCH_PG_WAITS=1`; the sampling's CPU counts as this
    process's). A lock wait is shown with the start of the statement that waits."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.counts: Counter[tuple[str, str]] = Counter()
        self.samples = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psycopg

        with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'running'), "
                    "left(query, 60) FROM pg_stat_activity WHERE state = 'active' "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ).fetchall()
                self.samples += 1
                for wait, query in rows:
                    self.counts[(wait, query if wait.startswith("Lock:") else "")] += 1
                time.sleep(0.005)

    def measure(self, run, *args):  # type: ignore[no-untyped-def]
        if not self.enabled:
            return run(*args)
        self._stop.clear()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            return run(*args)
        finally:
            self._stop.set()
            thread.join()

    def table(self) -> None:
        print("| wait | busy backends on average | statement (lock waits) |")
        print("| --- | ---: | --- |")
        for (wait, query), n in self.counts.most_common(8):
            print(f"| {wait} | {n / max(1, self.samples):.3f} | {query} |")


class CpuMeter:
    """CPU ms per request, by role, and requests a second, of each kind of round at each
    level."""

    def __init__(self, roles: dict[int, str], web: list[int]) -> None:
        self.roles, self.web = roles, web
        self.used: dict[tuple[str, int], Counter[str]] = {}
        self.requests: Counter[tuple[str, int]] = Counter()
        self.wall: defaultdict[tuple[str, int], float] = defaultdict(float)
        self.web_used: dict[tuple[str, int], Counter[int]] = {}

    def measure(self, kind: str, clients: int, requests: int, run, *args):  # type: ignore[no-untyped-def]
        before, web_before = _cpu_seconds(self.roles), _pid_cpu_seconds(self.web)
        started = time.perf_counter()
        result = run(*args)
        self.wall[(kind, clients)] += time.perf_counter() - started
        after, web_after = _cpu_seconds(self.roles), _pid_cpu_seconds(self.web)
        # A process that ended meanwhile takes its time with it; none of ours does.
        self.used.setdefault((kind, clients), Counter()).update(
            {role: after[role] - before.get(role, 0.0) for role in after}
        )
        self.web_used.setdefault((kind, clients), Counter()).update(
            {pid: web_after[pid] - web_before.get(pid, 0.0) for pid in web_after}
        )
        self.requests[(kind, clients)] += requests
        return result

    def web_spread(self, levels: list[int], kind: str = "API") -> None:
        """How evenly the web processes shared the work: each one's CPU in `kind`'s rounds, in
        cores (CPU seconds over the rounds' wall time), busiest first."""
        print("| clients | web processes | busiest | idlest | each, busiest first |")
        print("| ---: | ---: | ---: | ---: | --- |")
        for clients in levels:
            used, wall = self.web_used.get((kind, clients), Counter()), self.wall[(kind, clients)]
            cores = sorted((seconds / wall for seconds in used.values()), reverse=True)
            if cores:
                each = ", ".join(f"{c:.2f}" for c in cores)
                print(f"| {clients} | {len(cores)} | {cores[0]:.2f} | {cores[-1]:.2f} | {each} |")

    def table(self, levels: list[int], kinds: list[str]) -> None:
        roles = ["web", "worker", "bare endpoint", "postgres", "redis", "this process", "other"]
        print("| clients | round | " + " | ".join(roles) + " | total | requests/s |")
        print("| ---: | --- |" + " ---: |" * (len(roles) + 2))
        for clients in levels:
            for kind in kinds:
                used, n = self.used[(kind, clients)], self.requests[(kind, clients)]
                cells = [used.get(role, 0.0) * 1000 / n for role in roles]
                values = " | ".join(f"{v:.1f}" for v in (*cells, sum(cells)))
                rate = n / self.wall[(kind, clients)]
                print(f"| {clients} | {kind} | {values} | {rate:.0f} |")


def _serving_pids(web: WebServer) -> list[int]:
    """The web processes that listen: `web`'s own, or the workers of uvicorn's supervisor."""
    pids = []
    for pid in web.pids:
        parent = psutil.Process(pid)
        for proc in parent.children(recursive=True) or [parent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(c.status == psutil.CONN_LISTEN for c in proc.net_connections("tcp")):
                    pids.append(proc.pid)
    return pids


def _serving(web: WebServer) -> int:
    return len(_serving_pids(web))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _table(
    levels: list[int], measured: dict[int, list[float]], base: dict[int, list[float]]
) -> None:
    print(
        "| clients | requests | API median | API p95 | API p99 | baseline median | baseline p95 "
        "| baseline p99 | added median | added p95 | added p99 |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in levels:
        a, e = measured[c], base[c]
        row = [percentile(a, q) for q in (0.5, 0.95, 0.99)]
        eng = [percentile(e, q) for q in (0.5, 0.95, 0.99)]
        added = [x - y for x, y in zip(row, eng, strict=True)]
        cells = " | ".join(f"{v:.1f}" for v in (*row, *eng, *added))
        print(f"| {c} | {len(a)} | {cells} |")


def main() -> None:
    keys = setup()
    version = Deployment.objects.get(alias=ALIAS).primary_version
    port = free_port()
    worker_logs = [VAR / f"bench-api-worker{i}.log" for i in range(WORKERS)]
    workers = [
        subprocess.Popen(
            [
                *worker_command(queues=QUEUE, concurrency=WORKER_THREADS),
                "-n",
                f"bench-api{i}@{platform.node()}",
            ],
            cwd=BASE_DIR,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        for i, log in enumerate(worker_logs)
    ]
    web = WebServer(
        "127.0.0.1",
        port,
        WEB_PROCESSES,
        cwd=BASE_DIR,
        stdout=(VAR / "bench-api-web.log").open("w"),
        stderr=subprocess.STDOUT,
    ).start()
    procs: list[subprocess.Popen] = [*workers, *web.procs]  # type: ignore[type-arg]
    # The direct engine lives in this process, loaded before the runs; the two are measured
    # in alternating rounds, so that a drift in the machine's speed (it moves by several ms
    # within minutes on these cores) falls on both alike.
    api: dict[int, list[float]] = {c: [] for c in LEVELS}
    direct: dict[int, list[float]] = {c: [] for c in LEVELS}
    over_http: dict[int, list[float]] = {c: [] for c in LEVELS}
    try:
        direct_port = free_port()
        while direct_port == port:
            direct_port = free_port()
        bare = subprocess.Popen(
            web_command("127.0.0.1", direct_port, "bench.direct_asgi:application"),
            cwd=BASE_DIR,
            env={
                **{k: v for k, v in os.environ.items() if k != "WEB_CONCURRENCY"},
                "BENCH_DIRECT_ALIAS": ALIAS,
            },
            stdout=(VAR / "bench-api-direct.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(bare)
        client = Clients(CLIENT_PROCESSES)
        procs += client.procs
        roles = {
            **{worker.pid: "worker" for worker in workers},
            **{pid: "web" for pid in web.pids},
            bare.pid: "bare endpoint",
            os.getpid(): "this process",
            # The client's processes, if any, count as this one.
            **{pid: "this process" for pid in client.pids},
        }
        engine = engine_get(
            directory=artifact_dir(version.artifact_path),
            sha256=version.sha256,
            context_window=version.context_window,
        )
        # This process measures (the engine in process, and the client when it runs here):
        # a full garbage collection of its start-up objects would stop it, as it stops the
        # platform's own processes without this (genai_site.process).
        long_lived_freeze()
        for worker, log in zip(workers, worker_logs, strict=True):
            _wait_for(lambda log=log: "ready." in log.read_text(errors="replace"), "worker", worker)

        _wait_for(lambda: _serving(web) == WEB_PROCESSES, "every web process", web.procs[0])
        _wait_for(lambda: _listening(direct_port), "the bare engine endpoint", bare)
        # Web processes that uvicorn starts itself (WEB_REUSE_PORT=0) count as the web's.
        for pid, role in list(roles.items()):
            for child in psutil.Process(pid).children(recursive=True):
                roles.setdefault(child.pid, role)
        meter = CpuMeter(roles, _serving_pids(web))
        waits = PgWaits(PG_WAITS)
        base = f"http://127.0.0.1:{port}"
        bare_base = f"http://127.0.0.1:{direct_port}"
        # Warm-up: each worker loads the model, each web process its code.
        warm = 2 * max(WORKERS, WEB_PROCESSES)
        client.run(base, keys, max(warm, USERS), 5 * max(warm, USERS))
        client.run(bare_base, None, 2, 10)
        engine_run(engine, version, 2, 10)
        TRACES.clear()  # the stages are the measured rounds' only
        for clients in LEVELS:
            total = REQUESTS.get(clients, 100)
            for share in _rounds(total, clients):
                api[clients] += meter.measure(
                    "API", clients, share, waits.measure, client.run, base, keys, clients, share
                )
                direct[clients] += meter.measure(
                    "engine in process", clients, share, engine_run, engine, version, clients, share
                )
                over_http[clients] += meter.measure(
                    "bare endpoint", clients, share, client.run, bare_base, None, clients, share
                )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"# /v1 API overhead: non-streamed chat completion, max_tokens={MAX_TOKENS}")
    print(f"# machine: {machine_describe()}")
    model = os.environ.get("BENCH_MODEL_DIR") or "SmolLM2-135M-Instruct"
    print(
        f"# model: {model}; workers: {WORKERS} x {WORKER_THREADS} threads; "
        f"web: {WEB_PROCESSES} uvicorn process(es)"
        f"{', a socket each' if web.reuse_port else ''}; users: {USERS}; "
        f"client processes: {max(1, CLIENT_PROCESSES)}"
    )
    print()
    print("Baseline: the engine in this process (`Engine.generate`), no HTTP.")
    print()
    _table(LEVELS, api, direct)
    print()
    print("Baseline: the engine behind a bare HTTP endpoint (`bench/direct_asgi.py`), same client.")
    print()
    _table(LEVELS, api, over_http)
    print()
    print("All figures in milliseconds. 'added' = API percentile minus baseline percentile.")
    print()
    print(
        "As the platform reports it (each answer's Server-Timing header: `platform` is its total"
        " less the model's call, from the web process's receipt of the request to its answer):"
    )
    print()
    print("| clients | platform median | p95 | p99 | model median | p95 | p99 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    unnamed = 0
    for clients in LEVELS:
        timed = [(p, m) for *_, p, m in TRACES[clients] if p is not None and m is not None]
        unnamed += len(TRACES[clients]) - len(timed)
        platform_ms = [p for p, _ in timed]
        model_ms = [m for _, m in timed]
        cells = [percentile(v, q) for v in (platform_ms, model_ms) for q in (0.5, 0.95, 0.99)]
        print(f"| {clients} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    if unnamed:
        # Answered from the job's row: the wait read the row when no event came for a second,
        # or when it ran out, and found the job done (`chat.api.streams.job_wait`).
        print(f"({unnamed} answer(s) named no model call and are left out of this table)")
    print()
    print("CPU time per request (ms), by process, and requests a second, in each kind of round:")
    print()
    meter.table(LEVELS, ["API", "engine in process", "bare endpoint"])
    print()
    print("Each web process's CPU in the API's rounds, in cores:")
    print()
    meter.web_spread(LEVELS)
    # Closed-loop clients: a client served faster sends more requests, so the median leans
    # towards the faster ones where the web processes serve them unevenly; the mean does not.
    for clients in LEVELS:
        mean, baseline = statistics.mean(api[clients]), statistics.mean(direct[clients])
        print(
            f"mean API latency at {clients} client(s): {mean:.1f} ms "
            f"({mean - baseline:.1f} added to the engine in process)"
        )
    print()
    print("Where a request's time goes (from the job rows' timestamps):")
    print()
    print("| clients | stage | median ms | p95 ms | p99 ms |")
    print("| ---: | --- | ---: | ---: | ---: |")
    labels = {
        "in": "client sent -> job row created (web: auth, routing, filters, admission)",
        "queue": "job created -> claimed by a worker (commit, enqueue, broker, pickup, lease)",
        "worker": "claimed -> settled (engine, output filters, settle transaction)",
        "out": "settled -> client has the response (rest of the settle, commit, end event, JSON)",
    }
    for clients in LEVELS:
        for name, median, p95, p99 in stages(clients):
            print(f"| {clients} | {labels[name]} | {median:.1f} | {p95:.1f} | {p99:.1f} |")
    if waits.enabled:
        print()
        print(f"PostgreSQL's waits during the API's rounds ({waits.samples} samples, all levels):")
        print()
        waits.table()


if __name__ == "__main__":
    main()
