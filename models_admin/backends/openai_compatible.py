"""A remote OpenAI-compatible server (vLLM, TGI, Ollama, llama.cpp, a hosted endpoint).

Streams `POST {base_url}/chat/completions` with httpx. The API secret is read from the
environment variable the version names, at call time, and never stored. Connection failures,
timeouts, 429 and 5xx answers are retryable; other 4xx answers are not (the request itself is
wrong). Token counts for budgets come from the version's tokenizer when it has an artifact
directory, otherwise from an estimate of 3 characters per token.
"""

import json
import logging
import os
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import httpx

from models_admin.backends.base import Prompt
from models_admin.engine import EngineError, GenerationResult, SamplingParams
from models_admin.models import ModelVersion
from models_admin.store import artifact_dir

logger = logging.getLogger(__name__)

_CHARS_PER_TOKEN = 3


class _EstimatingTokenizer:
    """For servers whose tokenizer is not in the store: ids are the prompt's UTF-8 bytes (so
    that cache keys can decode them back), counts an estimate."""

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return bytes(ids).decode(errors="replace")

    def count(self, text: str) -> int:
        return max(1, len(text) // _CHARS_PER_TOKEN)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return list(json.dumps(messages, ensure_ascii=False).encode())


@cache
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(artifact_dir(path))


class RemoteBackend:
    remote = True

    def __init__(self, version: ModelVersion):
        self.label = str(version)
        self.base_url = version.base_url.rstrip("/")
        self.model = version.remote_model or version.model.name
        self.api_key_env = version.api_key_env
        self.first_token_timeout_s = version.first_token_timeout_s
        self._estimate = None if version.artifact_path else _EstimatingTokenizer()
        self.tokenizer: Any = self._estimate or _tokenizer(version.artifact_path)

    def count_tokens(self, text: str) -> int:
        if self._estimate is not None:
            return self._estimate.count(text)
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if self._estimate is not None:
            return self._estimate.encode_chat(messages)
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.api_key_env:
            secret = os.environ.get(self.api_key_env)
            if not secret:
                raise EngineError(
                    f"{self.label}: the environment variable {self.api_key_env} "
                    "(its API secret) is not set."
                )
            headers["Authorization"] = f"Bearer {secret}"
        return headers

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        if not prompt.messages:
            raise EngineError("A remote model needs the prompt as chat messages.")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": prompt.messages,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        # The read timeout bounds the wait for each chunk, the first one included.
        timeout = httpx.Timeout(10.0, read=self.first_token_timeout_s)
        submitted = time.perf_counter()
        first_at: float | None = None
        text: list[str] = []
        chunks = 0
        usage: dict[str, Any] = {}
        finish = ""
        try:
            with (
                httpx.Client(timeout=timeout) as client,
                client.stream(
                    "POST", f"{self.base_url}/chat/completions", json=body, headers=self._headers()
                ) as response,
            ):
                if response.status_code != 200:
                    response.read()
                    raise _status_error(self.label, response)
                # Cancellation is checked at every event; leaving the block closes the stream,
                # which the server sees as the client going away.
                for line in response.iter_lines():
                    if cancelled is not None and cancelled():
                        finish = "cancelled"
                        break
                    event = _event(line)
                    if event is None:
                        continue
                    if isinstance(event, str):  # [DONE]
                        break
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content") or ""
                        if delta:
                            first_at = first_at or time.perf_counter()
                            chunks += 1
                            text.append(delta)
                            if on_text is not None:
                                on_text(delta)
                        finish = choice.get("finish_reason") or finish
        except httpx.TimeoutException as exc:
            raise EngineError(f"{self.label} timed out: {exc}", retryable=True) from exc
        except httpx.TransportError as exc:
            raise EngineError(f"{self.label} could not be reached: {exc}", retryable=True) from exc
        finished = time.perf_counter()
        completion = int(usage.get("completion_tokens") or chunks)
        decode_time = finished - (first_at or finished)
        return GenerationResult(
            text="".join(text),
            prompt_tokens=int(usage.get("prompt_tokens") or len(prompt.ids)),
            completion_tokens=completion,
            finish_reason="stop" if finish in ("", "stop") else finish,
            time_to_first_token_s=(first_at or finished) - submitted,
            tokens_per_second=(completion - 1) / decode_time
            if completion > 1 and decode_time > 0
            else 0.0,
        )


def _event(line: str) -> dict[str, Any] | str | None:
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        logger.warning("Unreadable event from the server: %.200s", data)
        return None
    return event if isinstance(event, dict) else None


def _status_error(label: str, response: httpx.Response) -> EngineError:
    try:
        detail = response.json().get("error", {})
        message = detail.get("message") if isinstance(detail, dict) else str(detail)
    except (ValueError, AttributeError):
        message = response.text[:200]
    retryable = response.status_code == 429 or response.status_code >= 500
    return EngineError(
        f"{label} answered HTTP {response.status_code}: {message or 'no detail'}",
        retryable=retryable,
    )


def remote_backend_get(version: ModelVersion) -> RemoteBackend:
    return RemoteBackend(version)
