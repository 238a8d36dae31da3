"""The CUDA decode-attention kernel, run by Triton's interpreter on the CPU.

The interpreter executes the kernel's own code (loads, masks, the split and its combination)
on CPU tensors; only the compiler and the device are left out. Each check runs in a fresh
interpreter process: Triton reads TRITON_INTERPRET when the kernel is defined.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def _interpret(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_each_row_writes_its_token_and_attends_over_exactly_its_own_span() -> None:
    # Grouped heads (4 and 3 per KV head, one per KV head), one split and several, rows whose
    # token falls inside a split or at a split's first entry, a row at position 0, and a
    # padding row whose position lies past the span (it reads the span, writes nothing).
    out = _interpret(
        """
        import torch, torch.nn.functional as F
        import models_admin.decode_attention as kernel

        def rope(x, cos, sin):
            half = x.shape[-1] // 2
            return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

        torch.manual_seed(0)
        cases = [(1, 32, 8, 256, 1), (4, 9, 3, 130, 1), (5, 4, 2, 640, 40), (4, 8, 8, 70, 40)]
        for rows, heads, kv_heads, span, programs in cases:
            kernel._PROGRAMS = programs
            splits, chunk = kernel.split_plan(rows, kv_heads, span, 4)
            positions = span + 9
            qkv = torch.randn(rows, (heads + 2 * kv_heads) * 64)
            angles = torch.rand(positions, 64) * 6.3
            cos, sin = angles.cos(), angles.sin()
            k_cache = torch.randn(rows + 2, kv_heads, positions, 64)
            v_cache = torch.randn(rows + 2, kv_heads, positions, 64)
            k_before, v_before = k_cache.clone(), v_cache.clone()
            pos = torch.randint(1, span, (rows,))
            pos[0] = span - 1
            if rows > 1:
                pos[1] = min(chunk, span - 1)  # the first entry of the second split
                pos[2] = 0
                pos[-1] = span + 8  # a padding row, at the scratch position past the span
            out = kernel.decode_attention(qkv, cos, sin, k_cache, v_cache, pos, span, heads)

            q, k, v = qkv.view(rows, -1, 64).split([heads, kv_heads, kv_heads], dim=1)
            k_want, v_want = k_before.clone(), v_before.clone()
            errors = []
            for i in range(rows):
                p = int(pos[i])
                seen = min(p + 1, span)
                if p < span:
                    k_want[i, :, p] = rope(k[i], cos[p], sin[p])
                    v_want[i, :, p] = v[i]
                exact = F.scaled_dot_product_attention(
                    rope(q[i], cos[p], sin[p])[None, :, None],
                    k_want[i : i + 1, :, :seen],
                    v_want[i : i + 1, :, :seen],
                    enable_gqa=True,
                )
                errors.append(float((out[i] - exact.flatten()).abs().max()))
            cache_error = max(
                float((k_cache - k_want).abs().max()), float((v_cache - v_want).abs().max())
            )
            print(splits, max(errors), cache_error)
        """
    )
    results = [line.split() for line in out.splitlines()]
    assert [int(splits) for splits, _, _ in results] == [1, 1, 10, 2]
    assert all(float(error) < 1e-5 for _, error, _ in results), out
    assert all(float(error) < 1e-6 for _, _, error in results), out


def test_a_decode_step_with_the_kernel_equals_the_masked_attention_step() -> None:
    out = _interpret(
        """
        from models_admin.decode_attention import decode_attention
        from tests.models_admin.runner_steps import small_runner, two_steps

        runner = small_runner()
        runner.row_attention = False  # all rows at once over the batch's span, masked
        masked = two_steps(runner)
        runner.decode_kernel, runner.attend = True, decode_attention
        ours = two_steps(runner)
        print(float((ours - masked).abs().max()), float(masked.abs().max()))
        """
    )
    difference, scale = (float(x) for x in out.split())
    assert scale > 0.1
    assert difference < 1e-5
