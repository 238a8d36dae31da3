"""The engine behind a bare HTTP endpoint: the baseline that `bench/api_overhead.py` compares the
/v1 API with when both are called over HTTP, as programs call any inference server.

`POST /` with `{"messages": [...], "max_tokens": N}` answers the engine's text and token counts.
No key, no admission, no audit, no queue: one JSON parse, the engine (in this process, as in a
worker), one JSON answer, under the same server as the platform (uvicorn, as
`genai_site.launcher.web_command` runs it). The engine serves the primary version of the
deployment named by `BENCH_DIRECT_ALIAS`.

    uvicorn --port 8001 bench.direct_asgi:application
"""

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")
django.setup()

from genai_site.process import long_lived_freeze  # noqa: E402
from models_admin.engine import SamplingParams, engine_get  # noqa: E402
from models_admin.models import Deployment  # noqa: E402
from models_admin.store import artifact_dir  # noqa: E402

_version = Deployment.objects.get(alias=os.environ["BENCH_DIRECT_ALIAS"]).primary_version
assert _version is not None
_engine = engine_get(
    directory=artifact_dir(_version.artifact_path),
    sha256=_version.sha256,
    context_window=_version.context_window,
)
# Its start-up objects out of full garbage collections, as the platform's web processes and
# workers leave theirs (genai_site.process).
long_lived_freeze()
# A thread per request in flight, as the benchmark's in-process baseline has: the engine
# batches up to its own slots and queues the rest, as it does for the worker's threads.
_threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="direct")


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    messages = [{"role": "system", "content": _version.system_prompt}, *body["messages"]]
    params = SamplingParams(
        max_tokens=body["max_tokens"], temperature=_version.temperature, top_p=_version.top_p
    )
    result = _engine.generate(_engine.encode_chat(messages), params)
    return {
        "text": result.text,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
    }


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(_threads, _answer, json.loads(body))
    payload = json.dumps(answer).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
