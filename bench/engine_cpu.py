"""The engine against plain transformers `generate()` and llama.cpp, on the same model and prompts.

Every answer is forced to the same length (end-of-sequence ignored) so that all rows decode the
same number of tokens. Rows:
- ours, 1 stream: each prompt alone, one after another.
- ours, N streams: N requests submitted at once from N threads (continuous batching).
- transformers `generate()` fp32: one prompt at a time, then one left-padded batch of N.
- llama.cpp on the very same GGUF file (`llama-cpp-python`, optional, bench only), 1 stream.
Also: how many of our greedy answers equal fp32 `generate()`'s, token for token.

    python -m genai_site.launcher run -- python bench/engine_cpu.py [--tokens 128] [--streams 8]
"""

import argparse
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

import torch  # noqa: E402

from bench.machine import machine_describe  # noqa: E402
from models_admin.engine import Engine, GenerationResult, SamplingParams  # noqa: E402
from models_admin.importing import (  # noqa: E402
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    artifact_convert_gguf,
    default_gguf_path,
)
from models_admin.llama import CPU_WEIGHTS  # noqa: E402
from models_admin.store import artifact_dir  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain what a hash function is.",
    "List three uses of copper.",
    "How do I enable two-factor authentication on my account?",
    "Tell me a short story about a cat who learns to fly.",
    "What are the main causes of inflation?",
    "Describe the water cycle for a ten-year-old.",
]
SYSTEM = "You are a helpful assistant. Answer concisely."


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _row(name: str, tok_s: float, ttft_ms: list[float] | None, note: str = "") -> str:
    ttft = f"{statistics.median(ttft_ms):.0f} / {_p(ttft_ms, 0.95):.0f}" if ttft_ms else "n/a"
    return f"| {name:<44} | {tok_s:>9.1f} | {ttft:>15} | {note} |"


def bench_ours(
    engine: Engine, prompts: list[list[int]], tokens: int, streams: int
) -> tuple[list[str], list[list[int]]]:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    engine.generate(prompts[0], SamplingParams(max_tokens=8))  # warm-up
    rows = []
    single: list[GenerationResult] = []
    started = time.perf_counter()
    for ids in prompts[:4]:
        single.append(engine.generate(ids, params))
    wall = time.perf_counter() - started
    decode = statistics.median(r.tokens_per_second for r in single)
    rows.append(
        _row(
            "ours, 1 stream (decode rate)",
            decode,
            [r.time_to_first_token_s * 1000 for r in single],
            f"{sum(r.completion_tokens for r in single) / wall:.1f} tok/s incl. prefill",
        )
    )

    batch_prompts = [prompts[i % len(prompts)] for i in range(streams)]
    results: list[GenerationResult | None] = [None] * streams
    barrier = threading.Barrier(streams)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = engine.generate(batch_prompts[i], params)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    done = [r for r in results if r is not None]
    rows.append(
        _row(
            f"ours, {streams} streams at once (total)",
            sum(r.completion_tokens for r in done) / wall,
            [r.time_to_first_token_s * 1000 for r in done],
            f"{statistics.median(r.tokens_per_second for r in done):.1f} tok/s per stream",
        )
    )
    greedy = SamplingParams(max_tokens=tokens)
    answers = [engine.generate(ids, greedy) for ids in prompts]
    answer_ids = [engine.tokenizer.encode(a.text, add_special_tokens=False) for a in answers]
    return rows, answer_ids


def bench_generate(
    directory: Path, prompts: list[list[int]], tokens: int, streams: int
) -> tuple[list[str], list[list[int]]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)
        rates, ttfts = [], []
        for ids in prompts[:4]:
            inputs = torch.tensor([ids])
            t0 = time.perf_counter()
            model.generate(inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            ttfts.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            model.generate(inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            rates.append(tokens / (time.perf_counter() - t0))
        rows.append(_row("transformers generate() fp32, 1 stream", statistics.median(rates), ttfts))

        batch = [prompts[i % len(prompts)] for i in range(streams)]
        width = max(len(ids) for ids in batch)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        t0 = time.perf_counter()
        model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        wall = time.perf_counter() - t0
        rows.append(
            _row(
                f"transformers generate() fp32, batch of {streams} (total)",
                tokens * streams / wall,
                None,
            )
        )
        reference = []
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
            reference.append(
                tokenizer.encode(
                    tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True),
                    add_special_tokens=False,
                )
            )
    return rows, reference


def bench_llama_cpp(prompts: list[list[int]], tokens: int) -> list[str]:
    try:
        from llama_cpp import Llama
    except ImportError:
        return [_row("llama.cpp (not installed: pip install llama-cpp-python)", 0, None)]
    llm = Llama(
        model_path=str(default_gguf_path()), n_ctx=2048, n_threads=os.cpu_count(), verbose=False
    )
    rates, ttfts = [], []
    for ids in [prompts[0], *prompts[:4]]:
        llm.reset()
        t0 = time.perf_counter()
        first = None
        count = 0
        for _ in llm.generate(ids, temp=0.0, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter()
            if count == tokens:
                break
        end = time.perf_counter()
        assert first is not None
        ttfts.append((first - t0) * 1000)
        rates.append((count - 1) / (end - first))
    # The first round warms the library up and is not counted.
    return [
        _row(
            "llama.cpp, same GGUF, 1 stream (decode rate)", statistics.median(rates[1:]), ttfts[1:]
        )
    ]


def _agreement(ours: list[list[int]], reference: list[list[int]]) -> str:
    prefixes = []
    same = 0
    for a, b in zip(ours, reference, strict=True):
        a, b = [int(t) for t in a], [int(t) for t in b]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
        same += a == b
    return (
        f"{same} of {len(ours)} greedy answers identical to fp32 generate(); "
        f"agreeing prefix per prompt (tokens; the whole answer where identical): {prefixes}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--weights", choices=list(CPU_WEIGHTS), default="auto")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    artifact = artifact_convert_gguf(
        gguf_path=default_gguf_path(), artifact_path=f"{DEFAULT_MODEL_NAME}/{DEFAULT_MODEL_VERSION}"
    )
    directory = artifact_dir(artifact.artifact_path)
    engine = Engine(
        directory,
        expected_sha256=artifact.sha256,
        max_batch=args.streams,
        max_len=2048,
        cpu_weights=args.weights,
    )
    prompts = [
        engine.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}])
        for p in PROMPTS
    ]
    rows, ours = bench_ours(engine, prompts, args.tokens, args.streams)
    decode_weights = engine.runner.decode_weights
    prefill_weights = engine.runner.prefill_weights
    del engine
    # The engine leaves other threads one core each (engine._cpu_threads_confine); the
    # baselines get every core back.
    torch.set_num_threads(threads)
    agreement = ""
    if not args.skip_generate:
        more, reference = bench_generate(directory, prompts, args.tokens, args.streams)
        rows += more
        agreement = _agreement(ours, reference)
    if not args.skip_llama_cpp:
        rows += bench_llama_cpp(prompts, args.tokens)

    print(
        f"# engine on CPU: {DEFAULT_MODEL_NAME}, {args.tokens}-token answers, "
        f"our weights {args.weights} (decode: {decode_weights}, prefill: {prefill_weights}), "
        f"torch {torch.__version__}, {threads} threads"
    )
    print(f"# machine: {machine_describe()}")
    print()
    print("| row                                          | tokens/s  | TTFT p50 / p95 ms | note |")
    print("| -------------------------------------------- | --------: | ----------------: | ---- |")
    for row in rows:
        print(row)
    if agreement:
        print()
        print(agreement)


if __name__ == "__main__":
    main()
