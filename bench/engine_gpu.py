"""The engine on a CUDA GPU against transformers' sequential `generate()` and its `generate_batch`.

Models: a Llama-architecture model of about 1B parameters and SmolLM2-135M's architecture, both
with random weights (throughput does not depend on the values; every answer is forced to the
same length by ignoring end-of-sequence). Runs without Django or a database:

    python bench/engine_gpu.py --tokenizer DIR [--streams 32] [--prompt-tokens 512] [--eager]

DIR holds a tokenizer (the default model's tokenizer files). Prints, per model: sequential
`generate()` tokens/s, `generate_batch` at N streams, ours at 1 and N streams, our time to first
token at N streams with long prompts, and model bandwidth utilisation at one stream. For ours, also
the host's CPU time per token (every thread of this process), and both again with the host
spinning while it waits for the device instead of sleeping (`LlamaRunner.sleep_while_waiting`).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from bench.machine import machine_describe  # noqa: E402
from models_admin.engine import Engine, GenerationResult, SamplingParams  # noqa: E402
from models_admin.store import artifact_sha256  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "llama-1b (random)": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
    "smollm2-135m (random)": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    ),
}


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - t0)


def random_llama(
    sizes: dict[str, Any],
    tokenizer_dir: Path,
    directory: Path,
    *,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """A Llama of `sizes` (SmolLM2's vocabulary) with random weights, saved in `directory` with
    the tokenizer in `tokenizer_dir`; returns its parameter count."""
    settings: dict[str, Any] = {
        "vocab_size": 49152,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **sizes,
    }
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and ("token" in f.name or f.name.endswith(".jinja")):
            shutil.copy(f, directory / f.name)
    return sum(p.numel() for p in model.parameters())


def build_model(name: str, tokenizer_dir: Path, root: Path) -> tuple[Path, int]:
    directory = root / name.split()[0]
    params = random_llama(CONFIGS[name], tokenizer_dir, directory)
    torch.cuda.empty_cache()
    return directory, params


def bench_transformers(
    directory: Path, prompts: list[list[int]], tokens: int
) -> tuple[list[str], float]:
    from transformers import GenerationConfig

    loaded: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    model = loaded.cuda().eval()
    rows: list[str] = []
    with torch.inference_mode():
        inputs = torch.tensor([prompts[0]], device="cuda")
        model.generate(inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runs = 3
        for ids in prompts[:runs]:
            model.generate(
                torch.tensor([ids], device="cuda"),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
        torch.cuda.synchronize()
        sequential = runs * tokens / (time.perf_counter() - t0)
        rows.append(f"| transformers generate(), sequential | {sequential:.0f} | | 1.0x | | |")
    # generate_batch manages its own inference mode (it fails inside ours).
    try:
        config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        model.generate_batch(inputs=prompts[:2], generation_config=config)
        t0 = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config)
        wall = time.perf_counter() - t0
        produced = sum(len(o.generated_tokens) for o in outputs.values())
        total = produced / wall
        rows.append(
            f"| transformers generate_batch, {len(prompts)} streams ({produced} tokens) "
            f"| {total:.0f} | | {total / sequential:.1f}x | | |"
        )
    except Exception as exc:  # its API moves between releases; say why it is missing
        failure = f"failed: {type(exc).__name__}: {exc}"
        rows.append(f"| transformers generate_batch | {failure} | | | | |")
    del model
    torch.cuda.empty_cache()
    return rows, sequential


def run_streams(
    engine: Engine, prompts: list[list[int]], tokens: int
) -> tuple[float, list[GenerationResult], float]:
    """Tokens per second over all streams, each stream's result, and this process's CPU time
    (all its threads) per token in microseconds."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    results: list[GenerationResult | None] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = engine.generate(prompts[i], params)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    done = [r for r in results if r is not None]
    produced = sum(r.completion_tokens for r in done)
    return produced / wall, done, cpu / produced * 1e6


def bench_ours(
    directory: Path,
    params_count: int,
    streams: int,
    short: list[list[int]],
    long: list[list[int]],
    tokens: int,
    bandwidth: float,
    sequential: float,
) -> list[str]:
    engine = Engine(
        directory, expected_sha256=artifact_sha256(directory), max_batch=streams, max_len=2048
    )
    # Warm-up: captures the CUDA graphs of every (batch, span) bucket the runs below use.
    run_streams(engine, long, tokens)
    run_streams(engine, long[:1], tokens)
    run_streams(engine, short, tokens)
    rows = []
    runs = [run_streams(engine, [p], tokens) for p in short[:3]]
    single = [done[0] for _, done, _ in runs]
    rate = statistics.median(r.tokens_per_second for r in single)
    cpu = statistics.median(c for _, _, c in runs)
    weight_bytes = params_count * 2  # bf16
    mbu = weight_bytes * rate / bandwidth
    first_ms = statistics.median(r.time_to_first_token_s for r in single) * 1000
    rows.append(
        f"| ours, 1 stream | {rate:.0f} | {first_ms:.1f} "
        f"| {rate / sequential:.1f}x | {cpu:.0f} | MBU {mbu * 100:.0f}% |"
    )
    total, done, cpu = run_streams(engine, short, tokens)
    ttft = [r.time_to_first_token_s * 1000 for r in done]
    rows.append(
        f"| ours, {streams} streams, short prompts | {total:.0f} | "
        f"{statistics.median(ttft):.1f} / {_p(ttft, 0.95):.1f} | {total / sequential:.1f}x "
        f"| {cpu:.0f} | |"
    )
    total, done, cpu = run_streams(engine, long, tokens)
    ttft = [r.time_to_first_token_s * 1000 for r in done]
    rows.append(
        f"| ours, {streams} streams, {len(long[0])}-token prompts | {total:.0f} | "
        f"{statistics.median(ttft):.1f} / {_p(ttft, 0.95):.1f} | {total / sequential:.1f}x "
        f"| {cpu:.0f} | |"
    )
    # The host spinning on the device instead of sleeping (LlamaRunner.sleep_while_waiting).
    engine.runner.sleep_while_waiting = False
    for count in (1, streams):
        total, done, cpu = run_streams(engine, short[:count], tokens)
        if count == 1:
            total = done[0].tokens_per_second  # as the row "ours, 1 stream": decode steps only
        first = statistics.median(r.time_to_first_token_s * 1000 for r in done)
        rows.append(
            f"| ours, {count} stream(s), short prompts, host spins while waiting | {total:.0f} "
            f"| {first:.1f} | {total / sequential:.1f}x | {cpu:.0f} | |"
        )
    engine.runner.sleep_while_waiting = True
    engine.runner.use_graphs = False
    _, done, cpu = run_streams(engine, short[:1], tokens)
    eager_rate = done[0].tokens_per_second
    rows.append(
        f"| ours, 1 stream, CUDA graphs off | {eager_rate:.0f} | "
        f"| {eager_rate / sequential:.1f}x | {cpu:.0f} | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--models", default=",".join(CONFIGS))
    parser.add_argument(
        "--eager", action="store_true", help="plain forwards (no torch.compile; ENGINE_COMPILE=0)"
    )
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    if args.eager:
        os.environ["ENGINE_COMPILE"] = "0"

    bandwidth = copy_bandwidth()
    generator = torch.Generator().manual_seed(0)
    short = [
        torch.randint(3, 49000, (40 + i,), generator=generator).tolist()
        for i in range(args.streams)
    ]
    long = [
        torch.randint(3, 49000, (args.prompt_tokens,), generator=generator).tolist()
        for _ in range(args.streams)
    ]
    print(
        f"# engine on GPU: {args.tokens}-token answers, torch {torch.__version__}, "
        f"forwards compiled: {not args.eager}"
    )
    print(
        f"# machine: {machine_describe()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read+write)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            directory, params_count = build_model(name, args.tokenizer, Path(tmp))
            rows, sequential = bench_transformers(directory, short, args.tokens)
            rows += bench_ours(
                directory,
                params_count,
                args.streams,
                short,
                long,
                args.tokens,
                bandwidth,
                sequential,
            )
            print()
            print(f"## {name}: {params_count / 1e6:.0f}M parameters, bf16")
            print()
            print(
                "| row | tokens/s | TTFT p50 / p95 ms | vs sequential generate() "
                "| host CPU µs/token | |"
            )
            print("| --- | ---: | ---: | ---: | ---: | --- |")
            for row in rows:
                print(row)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
