"""Decode-step matrix products on CUDA: our fused kernel (models_admin/decode_gemv.py) against
what the compiled step runs (cuBLAS, with inductor's kernels for the norms and adds around it).

    python bench/decode_gemv.py [--rows 1 16] [--sweep] [--products qkv o ...]

For each product of the benchmark's 1B model (bench/engine_gpu.py), with what the decode step
takes into it, times one call inside a CUDA graph and prints the weight bytes read per second.
With --sweep, also every kernel configuration of a grid, and the best one per product and row
count (the figures `decode_gemv.config_for` is set from).
"""

import argparse
import functools
import itertools
import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine_describe
from models_admin.decode_gemv import Config, config_for, gemv

HIDDEN, INTER, QKV, VOCAB = 2048, 8192, 3072, 49152
EPS = 1e-5
PRODUCTS = ("qkv", "o", "gate_up", "down", "lm_head")


def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + EPS)).to(x.dtype) * weight


def problem(name: str, rows: int) -> tuple[dict[str, Any], Callable[..., Any], Any]:
    """(tensors, the unfused reference, our call) for one product at `rows` rows."""
    dev, dt = "cuda", torch.bfloat16
    n, k = {
        "qkv": (QKV, HIDDEN),
        "o": (HIDDEN, HIDDEN),
        "gate_up": (2 * INTER, HIDDEN),
        "down": (HIDDEN, INTER),
        "lm_head": (VOCAB, HIDDEN),
    }[name]
    t = {
        "x": torch.randn(rows, k, device=dev, dtype=dt),
        "d": torch.randn(rows, k, device=dev, dtype=dt),
        "nw": torch.rand(k, device=dev, dtype=dt) + 0.5,
        # Copies enough to pass 200 MB in turn: none is still in L2 (50 MB) when read again.
        "ws": [
            torch.randn(n, k, device=dev, dtype=dt) * k**-0.5
            for _ in range(max(1, -(-200_000_000 // (2 * n * k))))
        ],
        "r": torch.randn(rows, n, device=dev, dtype=dt),
        "added": torch.empty(rows, k, device=dev, dtype=dt),
    }

    def reference(x: Any, d: Any, nw: Any, w: Any, r: Any) -> Any:
        if name in ("qkv", "lm_head"):
            out = F.linear(norm(x + d, nw), w)
            return (x + d, out.float() if name == "lm_head" else out)
        if name == "o":
            return r + F.linear(x, w)
        if name == "gate_up":
            gate, up = F.linear(norm(x, nw), w).chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.linear(x, w)

    def ours(config: Config | None, w: torch.Tensor) -> Any:
        x, d, nw, r, added = (t[key] for key in ("x", "d", "nw", "r", "added"))
        if name in ("qkv", "lm_head"):
            dtype = torch.float32 if name == "lm_head" else None
            out = gemv(x, w, norm=nw, eps=EPS, delta=d, added=added, out_dtype=dtype, config=config)
            return (added, out)
        if name == "o":
            return gemv(x, w, residual=r, config=config)
        if name == "gate_up":
            return gemv(x, w, norm=nw, eps=EPS, glu=True, config=config)
        return gemv(x, w, config=config)

    return t, reference, ours


def graph_us(fn: Callable[[torch.Tensor], Any], weights: list[torch.Tensor]) -> float:
    """Device time of one call of `fn(weight)`, captured in a CUDA graph 200 times over, the
    weights taken in turn."""
    replays = 200
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for w in weights[:3]:
            fn(w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(replays):
            fn(weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays)
    return sorted(times)[len(times) // 2]


def grid(name: str, rows: int) -> list[Config]:
    """The configurations a sweep tries: the tensor-core form (at one row, for gate/up alone,
    the only product it ever won), and at one row the elementwise form."""
    dot = [
        Config(bn, bk, warps, stages)
        for bn, bk, warps, stages in itertools.product((16, 32), (128, 256, 512), (4, 8), (2, 3, 4))
    ]
    if rows > 1:
        return dot
    return (dot if name == "gate_up" else []) + [
        Config(bn, bk, warps, stages, dot=False)
        for bn, bk, warps, stages in itertools.product(
            (2, 4, 8, 16), (256, 512, 1024), (4, 8), (1, 2, 3)
        )
    ]


def _warm(jobs: list[tuple[str, int, Config]]) -> None:
    """Compile (into Triton's on-disk cache) each (product, rows, config): one process of many."""
    torch.manual_seed(0)
    for name, rows, config in jobs:
        try:
            t, _reference, ours = problem(name, rows)
            ours(config, t["ws"][0])
        except Exception as error:  # a configuration the compiler refuses (shared memory)
            print(f"  {name} {rows} {config}: {type(error).__name__}", flush=True)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--products", nargs="+", choices=PRODUCTS, default=PRODUCTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(machine_describe())
    if args.sweep:
        jobs = [(n, r, c) for r in args.rows for n in args.products for c in grid(n, r)]
        workers = min(len(jobs), max(1, (os.cpu_count() or 2) - 2))
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            pool.map(_warm, [jobs[i::workers] for i in range(workers)])
    print()
    print("| product | rows | weights MB | compiled + cuBLAS | ours (config_for) | best of sweep |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for rows in args.rows:
        for name in args.products:
            t, reference, ours = problem(name, rows)
            ws = t["ws"]
            mb = ws[0].numel() * 2 / 1e6
            x, d, nw, r = (t[key] for key in ("x", "d", "nw", "r"))
            compiled = torch.compile(reference, dynamic=False)
            # Equal to the reference but for the order of the sums.
            want, got = compiled(x, d, nw, ws[0], r), ours(None, ws[0])
            want = want[1] if isinstance(want, tuple) else want
            got = got[1] if isinstance(got, tuple) else got
            error = float((want.float() - got.float()).abs().max())
            tolerance = 0.05 * float(want.float().abs().max())
            assert error <= tolerance, (name, rows, error)

            def rate(us: float, mb: float = mb) -> str:
                return f"{us:.2f} us, {mb / us:.2f} TB/s"

            def unfused(w: torch.Tensor, f: Any = compiled, t: dict[str, Any] = t) -> Any:
                return f(t["x"], t["d"], t["nw"], w, t["r"])

            def fused(w: torch.Tensor, ours: Any = ours, config: Config | None = None) -> Any:
                return ours(config, w)

            base = graph_us(unfused, ws)
            mine = graph_us(fused, ws)
            best = ""
            if args.sweep:
                timed = []
                for config in grid(name, rows):
                    try:
                        out = fused(ws[0], config=config)
                    except Exception:  # refused by the compiler (shared memory, registers)
                        continue
                    out = out[1] if isinstance(out, tuple) else out
                    if float((want.float() - out.float()).abs().max()) > tolerance:
                        print(f"  {name} {rows} {config}: wrong results", flush=True)
                        continue
                    us = graph_us(functools.partial(fused, config=config), ws)
                    timed.append((us, config))
                if timed:
                    timed.sort()
                    us, config = timed[0]
                    best = f"{rate(us)} {tuple(config)}"
                    runners_up = ", ".join(f"{u:.2f} {tuple(c)}" for u, c in timed[1:4])
                    print(f"  {name} {rows}: next best {runners_up}", flush=True)
            n = ws[0].shape[0] // (2 if name == "gate_up" else 1)
            chosen = tuple(config_for(n, x.shape[1], rows))
            print(
                f"| {name} | {rows} | {mb:.1f} | {rate(base)} | {rate(mine)} {chosen} | {best} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
