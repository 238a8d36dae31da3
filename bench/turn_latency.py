"""Platform overhead on the first token of a chat turn.

For N turns: the time from sending the user's text on the chat socket to the first token of the
answer arriving on that socket, against the engine's own time to first token for the same turn
(measured inside the engine, saved on the message). The difference is what the platform adds:
admission and audit, the enqueue and worker pickup through Redis, the claim, building the
context, and the trip back through the channel layer and the consumer.

Real parts: PostgreSQL, Redis (broker and channel layer), a Celery worker subprocess, the
model, and the ASGI application with its consumer (driven in-process by Channels'
WebsocketCommunicator, so the server's socket I/O is the one part not measured).

    make bench            # or: python -m genai_site.launcher run -- python bench/turn_latency.py
"""

import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")

import django  # noqa: E402

django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402

from bench.load_client import PROMPTS  # noqa: E402
from bench.machine import machine_describe  # noqa: E402
from chat.models import Message  # noqa: E402
from chat.services import conversation_create  # noqa: E402
from genai_site.launcher import worker_command  # noqa: E402
from models_admin.importing import model_import_default  # noqa: E402
from models_admin.models import Deployment  # noqa: E402
from tests.chat.wsclient import communicator, receive, send  # noqa: E402
from tests.factories import session_cookie_for  # noqa: E402

TURNS = int(os.environ.get("BENCH_TURNS", "20"))
ALIAS = "bench-turn-latency"
QUEUE = f"bench-{os.getpid()}"


def setup() -> tuple[User, str]:
    version = model_import_default(alias=ALIAS)
    Deployment.objects.filter(alias=ALIAS).update(queue=QUEUE, primary_version=version)
    user, _ = User.objects.get_or_create(username="bench-latency")
    return user, session_cookie_for(user)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(q * (len(ordered) - 1)))
    return ordered[index]


async def one_turn(user: User, cookie: str, prompt: str) -> tuple[float, float, float]:
    conversation = await sync_to_async(conversation_create)(user=user)
    conversation.model_alias = ALIAS
    await conversation.asave()
    comm = communicator(conversation.pk, cookie)
    assert (await comm.connect())[0]
    started = time.perf_counter()
    await send(comm, text=prompt)
    first_token_at = None
    answer_id = None
    while True:
        frame = await receive(comm, timeout=120)
        for message_id, status, text in frame.messages:
            if status in ("pending", "streaming") and answer_id is None:
                answer_id = message_id
            if message_id == answer_id and text and first_token_at is None:
                first_token_at = time.perf_counter()
            if message_id == answer_id and status in ("complete", "stopped", "failed"):
                await comm.disconnect()
                answer = await Message.objects.aget(pk=answer_id)
                assert answer.status == "complete", answer.error
                assert first_token_at is not None
                return (
                    (first_token_at - started) * 1000,
                    answer.time_to_first_token_ms or 0.0,
                    answer.tokens_per_second or 0.0,
                )


async def run(user: User, cookie: str) -> list[tuple[float, float, float]]:
    await one_turn(user, cookie, "Hello!")  # warm-up: the worker loads the model
    results = []
    for i in range(TURNS):
        results.append(await one_turn(user, cookie, PROMPTS[i % len(PROMPTS)]))
    return results


def main() -> None:
    user, cookie = setup()
    log = open(BASE_DIR / "var" / "bench-worker.log", "w")
    worker = subprocess.Popen(
        [*worker_command(queues=QUEUE, concurrency=1), "-n", f"bench@{platform.node()}"],
        cwd=BASE_DIR,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while "ready." not in (BASE_DIR / "var" / "bench-worker.log").read_text(errors="replace"):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("the bench worker did not start; see var/bench-worker.log")
            time.sleep(0.2)
        results = asyncio.run(run(user, cookie))
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    socket_ms = [r[0] for r in results]
    engine_ms = [r[1] for r in results]
    overhead_ms = [s - e for s, e in zip(socket_ms, engine_ms, strict=True)]
    tps = [r[2] for r in results]
    print(f"# turn latency: {TURNS} turns, SmolLM2-135M-Instruct fp32, one worker thread")
    print(f"# machine: {machine_describe()}")
    print()
    print("| measure                                  | median (ms) | p95 (ms) |")
    print("| ---------------------------------------- | ----------: | -------: |")
    for name, values in [
        ("socket send -> first token on socket", socket_ms),
        ("engine time to first token", engine_ms),
        ("platform overhead (difference)", overhead_ms),
    ]:
        print(
            f"| {name:<40} | {statistics.median(values):>11.1f} | "
            f"{percentile(values, 0.95):>8.1f} |"
        )
    print()
    print(f"model decode speed: median {statistics.median(tps):.1f} tokens/s (one stream)")


if __name__ == "__main__":
    main()
