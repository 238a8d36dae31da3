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


def test_each_row_attends_over_exactly_its_own_span_as_exact_attention_does() -> None:
    # Grouped heads (4 and 3 per KV head, one per KV head), one split and several, rows whose
    # span ends inside a split or leaves later splits empty, and a padding row whose position
    # lies past the span (it reads the span and nothing beyond it).
    out = _interpret(
        """
        import torch, torch.nn.functional as F
        import models_admin.decode_attention as kernel

        torch.manual_seed(0)
        cases = [(1, 32, 8, 256, 1), (3, 9, 3, 130, 1), (5, 4, 2, 640, 40), (2, 8, 8, 70, 40)]
        for rows, heads, kv_heads, span, programs in cases:
            kernel._PROGRAMS = programs
            splits, _chunk = kernel.split_plan(rows, kv_heads, span, 4)
            q = torch.randn(rows, heads, 64)
            k_cache = torch.randn(rows + 2, kv_heads, span + 9, 64)
            v_cache = torch.randn(rows + 2, kv_heads, span + 9, 64)
            pos = torch.randint(0, span, (rows,))
            pos[0] = span - 1
            pos[-1] = span + 8  # a padding row, at the scratch position past the span
            seen = torch.clamp(pos + 1, max=span)
            out = kernel.decode_attention(
                q, k_cache[:rows, :, :span], v_cache[:rows, :, :span], pos
            )
            exact = torch.cat([
                F.scaled_dot_product_attention(
                    q[i : i + 1, :, None],
                    k_cache[i : i + 1, :, : int(seen[i])],
                    v_cache[i : i + 1, :, : int(seen[i])],
                    enable_gqa=True,
                )[:, :, 0]
                for i in range(rows)
            ])
            print(splits, float((out - exact).abs().max()))
        """
    )
    results = [line.split() for line in out.splitlines()]
    assert [int(splits) for splits, _ in results] == [1, 1, 10, 2]
    assert all(float(error) < 1e-5 for _, error in results), out


def test_a_decode_step_with_the_kernel_equals_the_masked_attention_step() -> None:
    out = _interpret(
        """
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig
        from models_admin.decode_attention import decode_attention
        from models_admin.llama import LlamaRunner

        config = LlamaConfig(
            vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256,
        )
        config.architectures = ["LlamaForCausalLM"]
        torch.manual_seed(0)
        runner = LlamaRunner(
            AutoModelForCausalLM.from_config(config), device=torch.device("cpu"),
            dtype=torch.float32, max_batch=4, max_len=128, cpu_weights="fp32",
        )
        runner.row_attention = False  # all rows at once over the batch's span, masked
        prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]
        runner.prefill(slots=[0, 1, 2], prompts=prompts)
        positions = [len(p) for p in prompts]
        masked = runner.decode(token_ids=[5, 6, 7], positions=positions).logits.clone()
        runner.decode_kernel, runner.attend = True, decode_attention
        ours = runner.decode(token_ids=[5, 6, 7], positions=positions).logits
        print(float((ours - masked).abs().max()), float(masked.abs().max()))
        """
    )
    difference, scale = (float(x) for x in out.split())
    assert scale > 0.1
    assert difference < 1e-5
