"""Where the engine's time goes on a CUDA GPU: device time per decode step and per prefill chunk.

Companion of bench/engine_gpu.py (same random-weight models, no Django):

    python bench/engine_gpu_steps.py --tokenizer DIR [--models "llama-1b (random)"] [--eager]

Prints, per model: the decode step's device time (its captured graph replayed back to back,
timed with CUDA events) at 1 and 32 rows, with the bandwidth utilisation that time allows; the
same step as the engine runs it (tokens/s of one stream, host work included); a prefill
forward's device time for 1 to 16 prompts of 512 tokens (TFLOP/s counting the linear layers);
the host's time to launch a prefill, captured and not; and time to first token of 32 streams of
512-token prompts for several prefill chunk budgets.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

import torch  # noqa: E402

from bench.engine_gpu import _p, build_model, copy_bandwidth, run_streams  # noqa: E402
from bench.machine import machine_describe  # noqa: E402
from models_admin.engine import Engine  # noqa: E402
from models_admin.store import artifact_sha256  # noqa: E402


def device_ms(call: Callable[[], object], back_to_back: int, repeat: int = 15) -> float:
    """Median time per call in ms of `back_to_back` calls queued at once (CUDA events).

    Calls queued back to back keep the device busy as long as the host queues faster than the
    device runs: the figure is the device's time per call, or the host's where that is longer.
    """
    for _ in range(3):
        call()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(back_to_back):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / back_to_back)
    return statistics.median(times)


class _Rows(list[str]):
    """Rows printed as they come (a run cut short still shows what it measured)."""

    def append(self, row: str) -> None:
        print(row, flush=True)
        super().append(row)


def profile(
    directory: Path,
    params: int,
    bandwidth: float,
    long: list[list[int]],
    short: list[list[int]],
    budgets: list[int],
) -> list[str]:
    weight_bytes = 2 * params
    engine = Engine(
        directory, expected_sha256=artifact_sha256(directory), max_batch=32, max_len=2048
    )
    runner = engine.runner
    rows = _Rows()
    # Decode step device time: the slots hold a 200-token prefix, the graphs replay.
    runner.prefill(slots=list(range(32)), prompts=[long[i][:200] for i in range(32)])
    for b in (1, 32):
        positions = [200] * b

        def step(positions: list[int] = positions) -> object:
            return runner.decode(token_ids=None, positions=positions)

        ms = device_ms(step, 20)
        mbu = weight_bytes / (ms / 1000) / bandwidth
        rows.append(f"| decode step device time, {b} rows | {ms:.3f} ms | MBU {mbu:.0%} |")
    # The same through the engine (host work, sampling, handing tokens out).
    run_streams(engine, [short[0]], 128)
    single = [run_streams(engine, [p], 128)[1][0] for p in short]
    rate = statistics.median(r.tokens_per_second for r in single)
    mbu = weight_bytes * rate / bandwidth
    rows.append(
        f"| engine, 1 stream | {1000 / rate:.3f} ms/token, {rate:.0f} tok/s | MBU {mbu:.0%} |"
    )
    # Queuing a step ahead must not change answers (one stream at a time: the same kernels).
    check = [p[:100] for p in long[:3]]
    ahead = [run_streams(engine, [p], 64)[1][0].text for p in check]
    original = type(runner).asynchronous
    type(runner).asynchronous = property(lambda self: False)  # type: ignore[method-assign,assignment]
    stepwise = [run_streams(engine, [p], 64)[1][0].text for p in check]
    type(runner).asynchronous = original  # type: ignore[method-assign]
    rows.append(f"| answers queued ahead equal step-by-step ones | {ahead == stepwise} | |")
    # Which kernels the decode step's device time goes to (the body run outside its graph).
    ids = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.full((1,), 200, dtype=torch.long, device="cuda")
    for _ in range(3):
        runner.decode_body(ids, pos, 256)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            runner.decode_body(ids, pos, 256)
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
    )
    # Prefill forwards of n 512-token prompts (FLOPs of the linear layers only).
    linear = sum(
        layer.qkv.nbytes + layer.o.nbytes + layer.gate_up.nbytes + layer.down.nbytes
        for layer in runner.layers
    )
    for n in (1, 2, 4, 8, 16):

        def prefill(n: int = n) -> object:
            return runner.prefill(slots=list(range(n)), prompts=long[:n])

        ms = device_ms(prefill, 3, 5)
        tflops = linear * n * 512 / (ms / 1000) / 1e12
        rows.append(f"| prefill {n} x 512 tokens | {ms:.2f} ms | {tflops:.0f} TFLOP/s |")
    # The host's side of a prefill: the call's own time, without waiting for the device.
    for graphed in (True, False):
        runner.use_graphs = graphed
        launches = []
        for _ in range(5):
            torch.cuda.synchronize()
            started = time.perf_counter()
            result = runner.prefill(slots=list(range(4)), prompts=long[:4])
            launches.append((time.perf_counter() - started) * 1000)
            result.picks()
        how = "captured graph" if graphed else "compiled forwards launched from Python"
        rows.append(
            f"| prefill 4 x 512 tokens, host time of the call ({how}) "
            f"| {statistics.median(launches[1:]):.2f} ms | |"
        )
    runner.use_graphs = True
    # Time to first token at 32 streams of 512-token prompts, per chunk budget.
    for budget in budgets:
        engine.prefill_tokens = budget
        engine.runner.warm_up(budget)  # captures the chunk shapes this budget allows
        run_streams(engine, long, 16)
        firsts: list[float] = []
        for _ in range(3):
            _total, done, _cpu = run_streams(engine, long, 16)
            firsts += [r.time_to_first_token_s * 1000 for r in done]
        rows.append(
            f"| TTFT 32 x 512, chunks of {budget} tokens | "
            f"p50 {statistics.median(firsts):.1f} ms | p95 {_p(firsts, 0.95):.1f} ms |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--models", default="llama-1b (random)")
    parser.add_argument("--eager", action="store_true", help="forwards not compiled")
    parser.add_argument("--budgets", default="1024,2048,4096")
    args = parser.parse_args()
    if args.eager:
        os.environ["ENGINE_COMPILE"] = "0"
    bandwidth = copy_bandwidth()
    print(f"# forwards compiled: {not args.eager}; torch {torch.__version__}")
    print(f"# machine: {machine_describe()}; copy {bandwidth / 1e12:.2f} TB/s (read+write)")
    generator = torch.Generator().manual_seed(0)
    long = [torch.randint(3, 49000, (512,), generator=generator).tolist() for _ in range(32)]
    short = [torch.randint(3, 49000, (40,), generator=generator).tolist() for _ in range(3)]
    budgets = [int(b) for b in args.budgets.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            directory, params = build_model(name, args.tokenizer, Path(tmp))
            rows = profile(directory, params, bandwidth, long, short, budgets)
            print()
            print(f"## {name}: {params / 1e6:.0f}M parameters, bf16")
            print()
            print("| what | time | |")
            print("| --- | ---: | --- |")
            for row in rows:
                print(row)
            sys.stdout.flush()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
