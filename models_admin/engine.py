"""The local transformers engine: owns one model on its device and streams tokens from it.

One engine per (artifact, hash) per worker process. This first engine decodes one sequence at
a time under a lock, with our own step loop (not `generate()`) so that a stop request takes
effect at the next step and every token's log-probability is at hand.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class EngineError(Exception):
    """A generation failed. `retryable` says whether trying again may succeed."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class ArtifactHashMismatch(EngineError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    time_to_first_token_s: float
    tokens_per_second: float
    token_logprobs: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, directory: Path, *, expected_sha256: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from models_admin.store import artifact_sha256

        actual = artifact_sha256(directory)
        if actual != expected_sha256:
            raise ArtifactHashMismatch(
                f"Weights in {directory} hash to {actual[:12]}..., the registry expects "
                f"{expected_sha256[:12]}...: refusing to serve them."
            )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        self.model: Any = model.to(self.device).eval()
        self.eos_token_ids = _eos_ids(self.model.generation_config, self.tokenizer)
        self._lock = threading.Lock()
        logger.info(
            "Loaded %s on %s (%s) in %.1fs",
            directory,
            self.device,
            dtype,
            time.perf_counter() - started,
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        with self._lock:
            return self._generate(prompt_ids, params, on_text, cancelled)

    def _generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_text: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> GenerationResult:
        import torch
        from transformers import DynamicCache

        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        started = time.perf_counter()
        first_token_at: float | None = None
        generated: list[int] = []
        logprobs: list[float] = []
        emitted = ""
        finish_reason = "length"
        cache = DynamicCache()
        inputs = torch.tensor([prompt_ids], device=self.device)
        with torch.inference_mode():
            for _ in range(params.max_tokens):
                if cancelled is not None and cancelled():
                    finish_reason = "cancelled"
                    break
                out = self.model(input_ids=inputs, past_key_values=cache, use_cache=True)
                logits = out.logits[0, -1].float()
                token, logprob = _sample(logits, params, generator)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if token in self.eos_token_ids:
                    finish_reason = "stop"
                    break
                generated.append(token)
                logprobs.append(logprob)
                text = str(self.tokenizer.decode(generated, skip_special_tokens=True))
                hit = _find_stop(text, params.stop)
                if hit is not None:
                    text = text[:hit]
                    finish_reason = "stop"
                # An incomplete UTF-8 sequence decodes to U+FFFD; wait for the next token.
                if len(text) > len(emitted) and not text.endswith("\ufffd"):
                    if on_text is not None:
                        on_text(text[len(emitted) :])
                    emitted = text
                if hit is not None:
                    break
                inputs = torch.tensor([[token]], device=self.device)
        finished = time.perf_counter()
        final = str(self.tokenizer.decode(generated, skip_special_tokens=True))
        hit = _find_stop(final, params.stop)
        if hit is not None:
            final = final[:hit]
        if len(final) > len(emitted) and on_text is not None and final.startswith(emitted):
            on_text(final[len(emitted) :])
        ttft = (first_token_at or finished) - started
        decode_time = finished - (first_token_at or finished)
        tps = (len(generated) - 1) / decode_time if len(generated) > 1 and decode_time > 0 else 0.0
        return GenerationResult(
            text=final,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(generated),
            finish_reason=finish_reason,
            time_to_first_token_s=ttft,
            tokens_per_second=tps,
            token_logprobs=logprobs,
        )


def _eos_ids(generation_config: Any, tokenizer: Any) -> set[int]:
    ids = generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def _sample(logits: Any, params: SamplingParams, generator: Any) -> tuple[int, float]:
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    if params.temperature <= 0:
        token = int(torch.argmax(logp))
        return token, float(logp[token])
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logp[token])


_engines: dict[tuple[str, str], Engine] = {}
_engines_lock = threading.Lock()


def engine_get(*, directory: Path, sha256: str) -> Engine:
    """The process's engine for an artifact, loaded (and its hash verified) on first use."""
    key = (str(directory), sha256)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = Engine(directory, expected_sha256=sha256)
            _engines[key] = engine
        return engine
