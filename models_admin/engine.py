"""The local transformers engine: one per model per worker process, batching every sequence.

Celery tasks (threads) call `Engine.generate`, which queues a request and blocks reading tokens
back. One decoding thread owns the model: between steps it admits waiting requests (prefill into
a free KV slot), then runs one batched forward for every sequence in flight (continuous
batching); a sequence leaves when it ends, is cancelled or hits its limit, and its slot goes to
the next request. Detokenisation, stop strings and the caller's callbacks run on the caller's
thread, so the decoding thread does nothing but model steps and sampling.
"""

import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models_admin import metrics
from models_admin.sampling import find_stop, sample_rows

if TYPE_CHECKING:
    from models_admin.llama import StepResult

logger = logging.getLogger(__name__)

# How long a caller waits for tokens before it checks its own `cancelled` callback again (it is
# also checked after every batch of tokens). Each wake-up takes the interpreter from the
# decoding thread: with many callers waiting, 50 ms cost several ms of CPU per request.
_POLL_SECONDS = 0.2


class EngineError(Exception):
    """A generation failed. `retryable` says whether trying again may succeed."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class ArtifactHashMismatch(EngineError):
    pass


class InsufficientMemory(EngineError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Keep going past the end-of-sequence token (benchmarks force fixed-length answers).
    ignore_eos: bool = False


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    time_to_first_token_s: float
    tokens_per_second: float
    queue_wait_s: float = 0.0
    token_logprobs: list[float] = field(default_factory=list)
    # Which response cache answered ("exact", "semantic"), or "" when the model did.
    cache: str = ""
    # The model's call that gave this answer, from the request to its end (its wait for a slot
    # in the engine included), as the platform's caller timed it; 0 for a cache's answer.
    model_seconds: float = 0.0

    @property
    def mean_logprob(self) -> float | None:
        if not self.token_logprobs:
            return None
        return sum(self.token_logprobs) / len(self.token_logprobs)


@dataclass
class _Finish:
    reason: str
    error: EngineError | None = None


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    generator: Any
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    events: "queue.SimpleQueue[tuple[int, float] | _Finish]" = field(
        default_factory=queue.SimpleQueue
    )
    cancel: threading.Event = field(default_factory=threading.Event)
    # Owned by the decoding thread.
    length: int = 0
    last_token: int = 0
    produced: int = 0


@dataclass
class EngineStats:
    """Live figures of the decoding loop (read by the metrics exporter)."""

    in_flight: int = 0
    waiting: int = 0
    steps: int = 0
    tokens: int = 0
    last_batch: int = 0


class _IncrementalText:
    """Text of a growing token list, decoding only a short window per new token.

    Decoding the whole answer after every token costs O(n) each time; here each token costs
    a decode of the last few tokens. The window starts a few tokens back so that a token
    which only completes a multi-byte character (shown as U+FFFD alone) is handled.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text

    def add(self, token: int) -> None:
        self.tokens.append(token)
        window = self.tokens[self._prefix :]
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(window)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix = self._read
            self._read = len(self.tokens)

    def final(self) -> str:
        return self._decode(self.tokens)

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)) if tokens else ""


class Engine:
    def __init__(
        self,
        directory: Path,
        *,
        expected_sha256: str,
        max_batch: int | None = None,
        max_len: int | None = None,
        cpu_weights: str | None = None,
    ):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from models_admin.llama import LlamaRunner, PrefixCache
        from models_admin.store import artifact_sha256

        actual = artifact_sha256(directory)
        if actual != expected_sha256:
            raise ArtifactHashMismatch(
                f"Weights in {directory} hash to {actual[:12]}..., the registry expects "
                f"{expected_sha256[:12]}...: refusing to serve them."
            )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if max_batch is None:
            max_batch = int(os.environ.get("ENGINE_MAX_BATCH", "8"))
        if cpu_weights is None:
            cpu_weights = os.environ.get("ENGINE_CPU_WEIGHTS", "auto")
        config = AutoConfig.from_pretrained(directory)
        max_len = max_len or int(getattr(config, "max_position_embeddings", 2048))
        _memory_check(directory, config, max_batch=max_batch, max_len=max_len, dtype=dtype)

        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.max_batch = max_batch
        self.max_len = max_len

        def load() -> None:
            hf_model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
            self.eos_token_ids = _eos_ids(hf_model.generation_config, self.tokenizer)
            self.runner = LlamaRunner(
                hf_model,
                device=self.device,
                dtype=dtype,
                max_batch=max_batch,
                max_len=max_len,
                cpu_weights=cpu_weights,
                cpu_prefill=os.environ.get("ENGINE_CPU_PREFILL", "auto"),
                gpu_wait=os.environ.get("ENGINE_GPU_WAIT", "sleep"),
                # On a GPU the forwards are fused by torch.compile unless ENGINE_COMPILE=0.
                compile_steps=self.device.type == "cuda"
                and os.environ.get("ENGINE_COMPILE") != "0",
                compile_scope=os.environ.get("ENGINE_COMPILE_SCOPE", "layer"),
            )
            self.runner.warm_up(self.prefill_tokens)
            if self.device.type == "cuda":
                # Objects alive after the load are never garbage: left out of collections, a
                # full collection no longer stalls the decoding thread for milliseconds.
                gc.collect()
                gc.freeze()

        # Prompt tokens per prefill forward: bounds the wait of those already decoding. On the
        # CPU a prefill is compute-bound and its time grows with the tokens in it, so prompts
        # go one per forward (a chunk always takes its first prompt) and each gets its first
        # token as soon as it is done: with 8 chat prompts arriving at once, time to first
        # token p50 went from 431 ms (all in one forward) to 289 ms, for about 10% more prefill
        # time in total. A prompt prefilled alone also gives the same cache entries whatever
        # arrives beside it (see `LlamaRunner.row_attention`).
        default_budget = "2048" if self.device.type == "cuda" else "1"
        self.prefill_tokens = int(os.environ.get("ENGINE_PREFILL_TOKENS", default_budget))
        # On the CPU a prompt prefilled alone is cut into blocks, and the cache entries of
        # blocks that other prompts began with (a shared system prompt) are copied, not
        # computed again.
        self.prefixes: PrefixCache | None = None
        if self.device.type == "cpu":
            megabytes = int(os.environ.get("ENGINE_PREFIX_CACHE_MB", "128"))
            self.prefixes = PrefixCache(megabytes << 20) if megabytes > 0 else None
        self.stats = EngineStats()
        self.label = f"{directory.parent.name}/{directory.name}"
        self._batch_size = metrics.BATCH_SIZE.labels(model=self.label)
        self._in_flight = metrics.IN_FLIGHT.labels(model=self.label)
        self._waiting: list[_Request] = []
        self._active: list[_Request] = []
        self._wake = threading.Condition()
        # On the CPU the decoding thread loads the model itself (see `_cpu_threads_confine`);
        # on a GPU the model is loaded, compiled and captured here.
        on_cpu = self.device.type == "cpu"
        if not on_cpu:
            load()
        loaded = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run,
            args=(load if on_cpu else None, loaded, failure),
            name="engine",
            daemon=True,
        )
        self._thread.start()
        loaded.wait()
        if failure:
            raise failure[0]
        if on_cpu:
            _cpu_threads_confine()
        logger.info(
            "Loaded %s on %s (%s, weights %s for decode and %s for prefill, %d slots of %d "
            "tokens) in %.1fs",
            directory,
            self.device,
            dtype,
            self.runner.decode_weights,
            self.runner.prefill_weights,
            max_batch,
            max_len,
            time.perf_counter() - started,
        )

    # -- the caller's side (any thread) ------------------------------------------------------

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
        """Generate one answer; blocks until it ends. Safe to call from many threads at once."""
        import torch

        if not prompt_ids:
            raise EngineError("The prompt is empty.")
        room = self.max_len - len(prompt_ids)
        if room < 1:
            raise EngineError(
                f"The prompt has {len(prompt_ids)} tokens; the model takes at most {self.max_len}."
            )
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = _Request(
            prompt_ids=list(prompt_ids),
            params=params,
            max_new=min(params.max_tokens, room),
            generator=generator,
        )
        with self._wake:
            self._waiting.append(request)
            self.stats.waiting = len(self._waiting)
            self._wake.notify()
        return self._collect(request, on_text, cancelled)

    def _collect(
        self,
        request: _Request,
        on_text: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> GenerationResult:
        text = _IncrementalText(self.tokenizer)
        logprobs: list[float] = []
        emitted = ""
        first_token_at: float | None = None
        finish_reason = ""
        last_check = 0.0
        while not finish_reason:
            try:
                events = [request.events.get(timeout=_POLL_SECONDS)]
            except queue.Empty:
                events = []
            # Everything that arrived meanwhile is handled in one go: with many streams the
            # callers must not compete with the decoding thread for the interpreter.
            while True:
                try:
                    events.append(request.events.get_nowait())
                except queue.Empty:
                    break
            now = time.perf_counter()
            for event in events:
                if isinstance(event, _Finish):
                    if event.error is not None:
                        raise event.error
                    finish_reason = event.reason
                    break
                token, logprob = event
                first_token_at = first_token_at or now
                text.add(token)
                logprobs.append(logprob)
            hit = find_stop(text.text, request.params.stop)
            shown = text.text if hit is None else text.text[:hit]
            if len(shown) > len(emitted):
                if on_text is not None:
                    on_text(shown[len(emitted) :])
                emitted = shown
            if hit is not None:
                request.cancel.set()
                finish_reason = "stop"
            # Checked after every batch of tokens and, while waiting, every _POLL_SECONDS: a
            # stop takes effect at the next step.
            elif (
                not finish_reason
                and cancelled is not None
                and (events or now - last_check >= _POLL_SECONDS)
            ):
                last_check = now
                if cancelled():
                    request.cancel.set()
                    finish_reason = "cancelled"
        finished = time.perf_counter()
        final = text.final()
        hit = find_stop(final, request.params.stop)
        if hit is not None:
            final = final[:hit]
        if len(final) > len(emitted) and on_text is not None and final.startswith(emitted):
            on_text(final[len(emitted) :])
        generated = len(text.tokens)
        ttft = (first_token_at or finished) - request.submitted_at
        decode_time = finished - (first_token_at or finished)
        tps = (generated - 1) / decode_time if generated > 1 and decode_time > 0 else 0.0
        started = request.started_at or finished
        return GenerationResult(
            text=final,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=generated,
            finish_reason=finish_reason,
            time_to_first_token_s=ttft,
            tokens_per_second=tps,
            queue_wait_s=max(0.0, started - request.submitted_at),
            token_logprobs=logprobs,
        )

    # -- the decoding thread -----------------------------------------------------------------

    def _run(
        self,
        load: Callable[[], None] | None,
        loaded: threading.Event,
        failure: list[BaseException],
    ) -> None:
        try:
            if load is not None:
                import torch

                # Every core, whatever an earlier engine's confinement left for new threads.
                torch.set_num_threads(_cpu_cores())
                load()
        except BaseException as exc:
            failure.append(exc)
            return
        finally:
            loaded.set()
        self._loop()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._active:
                    self._wake.wait()
            joining = self._take_waiting()
            self._in_flight.set(len(self._active) + len(joining) + len(self._waiting))
            try:
                self._admit(joining)
                self._retire()
                if self._active:
                    self._decode()
                    self._retire()
            except Exception as exc:  # the loop must outlive any one bad batch
                logger.exception("Decoding step failed; failing the sequences in flight")
                error = EngineError(f"The model failed: {exc}", retryable=True)
                for request in self._active:
                    request.events.put(_Finish("error", error))
                self._active = []
            self.stats.in_flight = len(self._active)
            if not self._active and not self._waiting:
                self._in_flight.set(0)

    def _admit(self, joining: list[_Request]) -> None:
        """Prefill newcomers into free slots, several prompts per forward up to a token budget.

        Each chunk's first tokens go out as soon as that chunk is done, and the next chunk is
        already queued on the device by then, so the device never waits for the host between
        chunks: with many prompts arriving at once, the median one gets its first token after
        about half of all the prefill work, not after all of it. Requests that arrive while
        chunks are being prefilled join the next chunk (while slots are free) instead of
        waiting for a decode step: a burst's first request is usually admitted alone, before
        the rest have arrived.
        """
        live = self._started(joining)
        pending: tuple[list[_Request], StepResult] | None = None
        while True:
            if not live:
                live = self._started(self._take_waiting())
                if not live:
                    break
            # A chunk always takes its first prompt; the budget counts padded widths, so that
            # every chunk within it has a prefill captured at warm-up.
            chunk = [live.pop(0)]
            longest = len(chunk[0].prompt_ids)
            while live:
                longest = max(longest, len(live[0].prompt_ids))
                if self.runner.prefill_width(longest) * (len(chunk) + 1) > self.prefill_tokens:
                    break
                chunk.append(live.pop(0))
            launched = self._prefill(chunk)
            if pending is not None:
                self._emit(*pending)
                pending = None
            if launched is None:
                continue
            if self.runner.asynchronous:
                pending = (chunk, launched)
            else:
                # On the CPU the prefill has already run: holding its first tokens back until
                # the next chunk is done would only delay them by that chunk's time.
                self._emit(chunk, launched)
        if pending is not None:
            self._emit(*pending)

    def _take_waiting(self) -> list[_Request]:
        """As many waiting requests as there are free slots."""
        with self._wake:
            free = self.max_batch - len(self._active)
            taken, self._waiting = self._waiting[:free], self._waiting[free:]
            self.stats.waiting = len(self._waiting)
        return taken

    @staticmethod
    def _started(requests: list[_Request]) -> list[_Request]:
        """Stamp the admission time; requests cancelled while waiting end here."""
        live: list[_Request] = []
        for request in requests:
            request.started_at = time.perf_counter()
            if request.cancel.is_set():
                request.events.put(_Finish("cancelled"))
            else:
                live.append(request)
        return live

    def _prefill(self, chunk: list[_Request]) -> "StepResult | None":
        """Queue one chunk's prefill; its sequences take the next slots. None if it failed."""
        first_slot = len(self._active)
        slots = list(range(first_slot, first_slot + len(chunk)))
        try:
            if self.prefixes is not None and len(chunk) == 1:
                result = self.runner.prefill_blocks(
                    slot=slots[0], prompt=chunk[0].prompt_ids, prefixes=self.prefixes
                )
            else:
                result = self.runner.prefill(slots=slots, prompts=[r.prompt_ids for r in chunk])
        except Exception as exc:
            logger.exception("Prefill failed")
            for request in chunk:
                request.events.put(_Finish("error", EngineError(f"The model failed: {exc}")))
            return None
        for request in chunk:
            request.length = len(request.prompt_ids)
            self._active.append(request)
        return result

    def _decode(self) -> None:
        """Decode steps for the sequences in flight, until the batch has to change.

        On a GPU the next step is queued before this one's tokens are read (its input tokens
        are this step's greedy picks, still on the device), so the host's work per step (handing
        tokens out, bookkeeping) overlaps the device's. That holds while every sequence is
        greedy and none can end at this step by its length; after an end-of-sequence the step
        already queued is read for the others, then the batch changes.
        """
        batch = list(self._active)
        step = self.runner.decode(
            token_ids=[r.last_token for r in batch], positions=[r.length - 1 for r in batch]
        )
        while True:
            ahead = None
            if self.runner.asynchronous and self._may_run_ahead(batch):
                ahead = self.runner.decode(token_ids=None, positions=[r.length for r in batch])
            self._count_step(batch)
            self._emit(batch, step)
            if ahead is None:
                return
            step = ahead
            if any(r.produced < 0 for r in batch):
                self._count_step(batch)
                self._emit(batch, step)
                return

    def _may_run_ahead(self, batch: list[_Request]) -> bool:
        if self._waiting and len(batch) < self.max_batch:
            return False  # newcomers join at the next step
        for r in batch:
            if (
                r.params.temperature > 0
                or r.cancel.is_set()
                or r.produced + 1 >= r.max_new
                or r.length + 1 >= self.max_len
            ):
                return False
        return True

    def _count_step(self, batch: list[_Request]) -> None:
        self.stats.steps += 1
        self.stats.last_batch = len(batch)
        self._batch_size.observe(len(batch))

    def _emit(self, batch: list[_Request], result: "StepResult") -> None:
        """Hand each row's next token to its caller; mark sequences that are done.

        Rows of sequences that ended earlier (a step queued ahead of their end) are skipped.
        """
        picks = result.picks()
        if any(r.params.temperature > 0 for r in batch):
            picks = sample_rows(
                result.logits, [r.params for r in batch], [r.generator for r in batch], picks
            )
        for request, (token, logprob) in zip(batch, picks, strict=True):
            if request.produced < 0:
                continue
            if request.cancel.is_set():
                request.events.put(_Finish("cancelled"))
                request.produced = -1
                continue
            if token in self.eos_token_ids and not request.params.ignore_eos:
                request.events.put(_Finish("stop"))
                request.produced = -1
                continue
            request.events.put((token, logprob))
            self.stats.tokens += 1
            request.last_token = token
            request.length += 1
            request.produced += 1
            if request.produced >= request.max_new or request.length >= self.max_len:
                request.events.put(_Finish("length"))
                request.produced = -1

    def _retire(self) -> None:
        """Drop finished and cancelled sequences, keeping the active slots contiguous.

        A freed slot takes the last live sequence; sequences that ended at the end of the list
        just go. Moving a sequence copies its cache entries (two copies a layer, launched from
        here), so when a whole batch ends at one step nothing is copied: moving each ended
        sequence into the slot of the one before it took the host about 19 ms for 32 sequences
        of a 16-layer model, time in which no new request could be admitted.
        """
        i = 0
        while i < len(self._active):
            if not self._ended(self._active[i]):
                i += 1
                continue
            while len(self._active) > i + 1 and self._ended(self._active[-1]):
                self._active.pop()
            last = self._active.pop()
            if len(self._active) > i:
                # The last live sequence moves into the freed slot (its length - 1 entries are
                # written; the newest token is written at the next step).
                self.runner.slot_move(source=len(self._active), target=i, length=last.length)
                self._active[i] = last

    @staticmethod
    def _ended(request: _Request) -> bool:
        """Whether a sequence leaves the batch; one cancelled between steps is told so here."""
        if request.produced >= 0 and not request.cancel.is_set():
            return False
        if request.produced >= 0:
            request.events.put(_Finish("cancelled"))
            request.produced = -1
        return True


def _cpu_cores() -> int:
    """OMP_NUM_THREADS when it is set (its first level), else the cores this process may use."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else len(os.sched_getaffinity(0))


def _cpu_threads_confine() -> None:
    """Leave the CPU's parallelism to the decoding threads: other threads run torch on one core.

    PyTorch parallelises an operation over OpenMP threads, and every thread that starts such an
    operation gets its own team of them. Once there are more of those threads than cores,
    libgomp stops letting idle ones spin between operations, and each of the decode step's
    hundreds of operations then waits for a sleeping thread to wake: measured on 2 cores, a
    step of SmolLM2-135M took 20 ms instead of 12 once a second thread (the one that had
    loaded the model) had run any parallel operation. So the decoding thread loads its model
    itself, and afterwards threads that have not yet run torch (Celery's task threads) run it
    on one thread each. Called from the thread that created the engine, which is included.
    """
    import torch

    torch.set_num_threads(1)


def _memory_check(
    directory: Path, config: Any, *, max_batch: int, max_len: int, dtype: Any
) -> None:
    """Weights plus the KV cache budget must fit the device, or the load stops with a reason."""
    import torch

    from models_admin.llama import LlamaRunner

    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    kv = LlamaRunner.kv_bytes(config, max_batch=max_batch, max_len=max_len, dtype=dtype)
    # Loading goes through an fp32 copy of the weights before they are packed for serving.
    needed = 2 * weights + kv
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        where = "GPU"
    else:
        free = _available_ram()
        where = "RAM"
    if free and needed > free:
        raise InsufficientMemory(
            f"The model needs about {needed / 2**30:.1f} GiB of {where} "
            f"({weights / 2**30:.1f} GiB weights, {kv / 2**30:.1f} GiB KV cache for "
            f"{max_batch} sequences of {max_len} tokens); {free / 2**30:.1f} GiB is free. "
            "Lower ENGINE_MAX_BATCH or the model's context window."
        )


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _eos_ids(generation_config: Any, tokenizer: Any) -> set[int]:
    ids = generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


_engines: dict[tuple[str, str], Engine] = {}
_engines_lock = threading.Lock()


def engine_get(*, directory: Path, sha256: str, context_window: int | None = None) -> Engine:
    """The process's engine for an artifact, loaded (and its hash verified) on first use.

    `context_window` sizes the KV cache (default: the model's own maximum).
    """
    key = (str(directory), sha256)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = Engine(directory, expected_sha256=sha256, max_len=context_window)
            _engines[key] = engine
        return engine
