"""How the web server's processes share a burst of kept-alive connections: with a socket each
(`SO_REUSEPORT`, `genai_site.web_server.WebServer`) and with uvicorn's own workers on one
socket (`WEB_REUSE_PORT=0`).

    python bench/web_spread.py [--processes 8] [--clients 4] [--connections 12] [--rounds 4]

Each round, `--clients` client processes open `--connections` connections each, all at once,
and send `--requests` requests on each; every answer names the process that served it. The
application is this module's: it spins for 1 ms and answers its process id (no Django, no
database), so that only the server's own spreading is measured. It prints, for each way and
round, how many connections each process served, most first.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genai_site.embedded import free_port
from genai_site.web_server import WebServer

_PID = str(os.getpid()).encode()


async def application(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    started = time.perf_counter()
    while time.perf_counter() - started < 0.001:
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": _PID})


def _client(base: str, connections: int, requests: int) -> list[str]:
    """The serving process of each connection (its first answer's; the rest stay on it)."""

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

            async def one() -> str:
                served = [(await client.get("/")).text for _ in range(requests)]
                return served[0]

            return await asyncio.gather(*(one() for _ in range(connections)))

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--connections", type=int, default=12, help="per client process")
    parser.add_argument("--requests", type=int, default=20, help="per connection")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    total = args.clients * args.connections
    print(
        f"# {total} connections at once over {args.processes} web processes, "
        f"{args.requests} requests each, {os.cpu_count()} cores"
    )
    print()
    print("| socket | round | processes with none | connections per process, most first |")
    print("| --- | ---: | ---: | --- |")
    for way, reuse_port in (("shared", "0"), ("own", "1")):
        os.environ["WEB_REUSE_PORT"] = reuse_port
        port = free_port()
        web = WebServer(
            "127.0.0.1",
            port,
            args.processes,
            app="bench.web_spread:application",
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).start()
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(base, timeout=1)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            time.sleep(2)  # every process listening, not only the first
            with ProcessPoolExecutor(args.clients) as pool:
                for round_ in range(1, args.rounds + 1):
                    futures = [
                        pool.submit(_client, base, args.connections, args.requests)
                        for _ in range(args.clients)
                    ]
                    served = Counter(pid for f in futures for pid in f.result())
                    counts = sorted(served.values(), reverse=True)
                    idle = args.processes - len(counts)
                    print(f"| {way} | {round_} | {idle} | {', '.join(map(str, counts))} |")
        finally:
            web.stop()


if __name__ == "__main__":
    main()
