"""The load-generating client of bench/api_overhead.py: non-streamed chat completions from N
concurrent clients over httpx, each request's latency and its (sent, received, job id).

At 50 clients against a fast engine one client process is its own bound: it spends 5.7-6.6 ms
of CPU a request, so at 250-430 requests/s it fills a core and its own queue adds to what it
measures. `api_overhead.py` runs the requests in this process when `BENCH_CLIENT_PROCESSES` is
1, and otherwise in that many copies of this module, each started once as

    python -m bench.load_client

reading one round a line on stdin (JSON: base, alias, keys, clients, total, first_client,
max_tokens) and answering each with a line of JSON (latencies, traces). It imports nothing of the
project's, so a copy costs only httpx.
"""

import asyncio
import gc
import json
import logging
import sys
import time

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Give me two tips for writing clear emails.",
    "What is a prime number?",
    "Name three planets in the solar system.",
    "How do plants make food?",
]
# A line per request from the client library would cost this process time in the API's and the
# bare endpoint's rounds alike.
logging.getLogger("httpx").setLevel(logging.WARNING)

# (sent, received, job id, the platform's and the model's ms from the Server-Timing header;
# None for an answer the web process read from the job's row, which names no model call)
Trace = tuple[float, float, str, float | None, float | None]


def server_timing(header: str) -> dict[str, float]:
    """`Server-Timing: total;dur=12.3, model;dur=1.6, ...` as {"total": 12.3, "model": 1.6}."""
    metrics = {}
    for metric in header.split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                metrics[name] = float(value)
    return metrics


async def http_run(
    *,
    base: str,
    alias: str,
    keys: list[str] | None,
    clients: int,
    total: int,
    first_client: int = 0,
    max_tokens: int = 1,
) -> tuple[list[float], list[Trace]]:
    """`total` requests from `clients` clients at once: to the /v1 API, client i with
    `keys[(first_client + i) % len(keys)]`, or to the bare engine endpoint without keys.
    Returns each request's latency (ms) and, for the API, its trace: sent and received in
    wall-clock seconds (the same clock as the job rows' times), the job's id, and the platform's
    and the model's time as the response's Server-Timing header gives them (ms)."""
    latencies: list[float] = []
    traces: list[Trace] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:

        async def one_client(n: int) -> None:
            headers = {"Authorization": f"Bearer {keys[n % len(keys)]}"} if keys else {}
            while not queue.empty():
                i = queue.get_nowait()
                body = {
                    "model": alias,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens,
                }
                sent = time.time()
                started = time.perf_counter()
                response = await client.post(
                    "/v1/chat/completions" if keys else "/", json=body, headers=headers
                )
                latencies.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, response.text
                if keys:
                    timing = server_timing(response.headers["server-timing"])
                    traces.append(
                        (
                            sent,
                            time.time(),
                            response.json()["id"],
                            timing.get("platform"),
                            timing.get("model"),
                        )
                    )

        await asyncio.gather(*(one_client(first_client + n) for n in range(clients)))
    return latencies, traces


def main() -> None:
    # Its imports left out of full garbage collections, as the platform's processes do theirs
    # (genai_site.process): a collection would stop the clock of every request in flight.
    gc.collect()
    gc.freeze()
    for line in sys.stdin:
        latencies, traces = asyncio.run(http_run(**json.loads(line)))
        print(json.dumps({"latencies": latencies, "traces": traces}), flush=True)


if __name__ == "__main__":
    main()
