"""The CUDA decode-step products (models_admin/decode_gemv.py), run by Triton's interpreter.

As in test_decode_attention.py, each check runs in a fresh interpreter process on the CPU.
"""

import pytest

from tests.models_admin.test_decode_attention import _interpret

pytest.importorskip("triton")


def test_each_fused_product_equals_the_unfused_steps() -> None:
    # Tensor-core and elementwise forms; a row count below the padded 16 and the full 16; an
    # inner dimension that is not a multiple of the step and output columns that end mid-strip.
    out = _interpret(
        """
        import torch, torch.nn.functional as F
        from models_admin.decode_gemv import Config, gemv

        def norm(x, weight):
            variance = x.float().pow(2).mean(-1, keepdim=True)
            return (x.float() * torch.rsqrt(variance + 1e-5)).to(x.dtype) * weight

        torch.manual_seed(0)
        worst = 0.0
        for rows, n, k, config in [
            (3, 40, 96, Config(16, 64, 4, 2)),
            (16, 48, 128, Config(32, 64, 4, 2)),
            (1, 40, 96, Config(8, 32, 4, 1, dot=False)),
            (1, 40, 96, Config(8, 64, 4, 1, dot=False)),  # K not a multiple of the step
            (1, 37, 40, Config(8, 64, 4, 1, dot=False)),  # K within one step; a short last strip
            (1, 37, 96, Config(2, 32, 4, 2, dot=False)),  # two columns a program, as config_for
        ]:
            x, d = torch.randn(rows, k), torch.randn(rows, k)
            nw, b = torch.rand(k) + 0.5, torch.randn(n)
            w, w2, b2 = torch.randn(n, k), torch.randn(2 * n, k), torch.randn(2 * n)
            r = torch.randn(rows, n)
            added = torch.full((rows, k), float("nan"))
            cases = [
                (gemv(x, w, config=config), x @ w.T),
                (gemv(x, w, b, config=config), F.linear(x, w, b)),
                (gemv(x, w, residual=r, config=config), r + x @ w.T),
                (gemv(x, w, norm=nw, eps=1e-5, config=config), norm(x, nw) @ w.T),
                (
                    gemv(x, w, norm=nw, eps=1e-5, delta=d, added=added, config=config),
                    norm(x + d, nw) @ w.T,
                ),
                (added, x + d),
                (
                    gemv(x, w, b, norm=nw, eps=1e-5, residual=r, config=config),
                    r + F.linear(norm(x, nw), w, b),
                ),
                (
                    gemv(x, w2, b2, norm=nw, eps=1e-5, glu=True, config=config),
                    F.silu(F.linear(norm(x, nw), w2[:n], b2[:n]))
                    * F.linear(norm(x, nw), w2[n:], b2[n:]),
                ),
                (
                    gemv(x, w2, norm=nw, eps=1e-5, glu=True, config=config),
                    F.silu(norm(x, nw) @ w2[:n].T) * (norm(x, nw) @ w2[n:].T),
                ),
            ]
            for got, want in cases:
                assert got.shape == want.shape, (got.shape, want.shape)
                worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        # 16-bit inputs, fp32 logits out (the interpreter's tl.dot takes fp16, not bf16).
        rounding = 0.0
        for dtype, rows, config in [
            (torch.float16, 2, Config(16, 32, 4, 2)),
            (torch.bfloat16, 1, Config(8, 32, 4, 1, dot=False)),
        ]:
            x, w = torch.randn(rows, 64).to(dtype), torch.randn(32, 64).to(dtype)
            logits = gemv(x, w, out_dtype=torch.float32, config=config)
            assert logits.dtype == torch.float32
            want = x.float() @ w.float().T
            # Rounded once to the 16-bit type: within a unit in the last place (half of one
            # on the device; the interpreter's bf16 conversion truncates).
            ulp = want.abs().to(dtype).float() * torch.finfo(dtype).eps
            rounding = max(rounding, float(((logits - want).abs() / ulp.clamp(min=1e-6)).max()))
        print(worst, rounding)
        """
    )
    worst, rounding = (float(v) for v in out.split())
    assert worst < 1e-5
    assert rounding <= 1.0


def test_a_decode_step_in_the_fused_kernels_equals_the_step_around_cublas() -> None:
    # A model with biases (as Qwen2's qkv): each product's bias after the norm's scale.
    out = _interpret(
        """
        from models_admin.decode_attention import decode_attention
        from models_admin.decode_gemv import gemv
        from tests.models_admin.runner_steps import PROMPTS, small_runner, two_steps

        runner = small_runner(biases=True)
        runner.decode_kernel, runner.attend = True, decode_attention
        unfused = two_steps(runner)
        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            return gemv(*args, **kwargs)

        runner.gemv = counted
        runner.gemv_rows = 4  # three rows: the tensor-core form
        fused = two_steps(runner)
        fused_calls = len(calls)
        runner.gemv_rows = 2  # three rows: the step around the library's products again
        again = two_steps(runner)
        print(float((fused - unfused).abs().max()), float(unfused.abs().max()))
        print(float((again - unfused).abs().max()), fused_calls, len(calls))

        # One row (the elementwise form), as a single stream decodes.
        runner.gemv = None
        unfused = two_steps(runner, PROMPTS[:1])
        runner.gemv, runner.gemv_rows = counted, 1
        one_row = two_steps(runner, PROMPTS[:1])
        print(float((one_row - unfused).abs().max()), float(unfused.abs().max()), len(calls))
        """
    )
    first, second, third = out.strip().splitlines()
    difference, scale = (float(x) for x in first.split())
    assert scale > 0.1
    assert difference < 1e-5
    other, fused_calls, calls = second.split()
    assert float(other) == 0.0
    # Two steps of 2 layers x 4 products, and the lm_head.
    assert int(fused_calls) == int(calls) == 2 * (2 * 4 + 1)
    one_row, one_row_scale, total_calls = third.split()
    assert float(one_row_scale) > 0.1
    assert float(one_row) < 1e-5
    # Two more steps of one row each.
    assert int(total_calls) == 4 * (2 * 4 + 1)
