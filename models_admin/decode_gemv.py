"""Decode-step matrix products on CUDA for a few rows, with the small steps around them fused in.

A decode step of one row reads every weight once and does little else: its time is the weights'
bytes over the memory bandwidth, plus whatever the step spends between those reads. cuBLAS
reads the large products (gate/up, the lm_head) near the copy bandwidth, but the smaller ones
(qkv, o, down: 8 to 34 MB) well below it, and each layer also runs its norms, its residual adds
and silu x up as kernels of their own. This kernel reads a weight's rows in parallel programs
(each program a strip of output columns over all of K, no reduction across programs), and
takes in what lies on either side of the product:

- before it, the previous MLP's output added to the residual stream (written back once), and
  the RMS norm of that input (each program computes the rows' norm itself: a few KB);
- after it, silu(gate) x up for the joined gate/up weight, the residual add after the o
  projection, or the bias.

Intermediates are rounded to the activations' dtype where the unfused step stored them, but
for one: the norm's scale multiplies the product's sums instead of its input, so that a
program reads its input and its weights in a single pass (the results differ from the unfused
step's in the last bits). A layer's decode step is then four of these plus attention, instead
of about ten kernels.

For one row, three things make the reads run near the bandwidth (on an H100, together they
took a one-row step of the 1B benchmark model from 1.236 to 0.988 ms, about two thirds of it
from the last; bench/results/engine_gpu-h100.md):

- each program's products and squares are kept per position of the step and summed once,
  after the last step; a sum across the program's threads in every step held up the loads
  (down, 8192 deep: 20.5 -> 13.1 us);
- on compute capability 9.0 and later, each kernel is launched while the one before it still
  runs (programmatic dependent launch, `decode_attention.dependent_launch`), reads its first
  strip of weights, and only then waits for the kernel before to finish and reads its input;
- narrow strips, 2 output columns a program (4 for the lm_head), gate/up included: more
  programs in flight than the tensor-core form's 32 columns (`config_for`).

Left out of torch.compile (a graph break where it is called): the decode step that uses it is
captured as a CUDA graph and replayed, so there is nothing left for the compiler to fuse.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from models_admin.decode_attention import dependent_launch

# At most this many rows: tl.dot takes 16 rows at least, padded with masked rows.
ROWS = 16


class Config(NamedTuple):
    block_n: int  # output columns per program
    block_k: int  # inner dimension per step
    warps: int
    stages: int
    dot: bool = True  # tensor-core products over 16 padded rows; else one row, elementwise


# From sweeps on an H200 and an H100 (bench/decode_gemv.py --sweep) over the benchmark 1B
# model's products. One row: the elementwise form, 2 output columns a program (4 for a wide
# output such as the lm_head), 1024 of K a step. More rows take the tensor-core form (at 16 rows
# it was no faster than cuBLAS: the runner sends only one-row steps here, `LlamaRunner.gemv_rows`).
def config_for(n: int, k: int, rows: int) -> Config:
    if rows > 1:
        return Config(block_n=32, block_k=256, warps=4, stages=3)
    # The largest power-of-2 step up to 1024 that divides K (masked loads of a partial step
    # are not vectorised); K with none of 256 or more takes one masked step.
    block_k = 1024
    while block_k > 256 and k % block_k:
        block_k //= 2
    if k % block_k:
        block_k = min(1024, triton.next_power_of_2(k))
    block_n = 4 if n >= 16384 else 2  # the lm_head: 4
    return Config(block_n=block_n, block_k=block_k, warps=4, stages=2, dot=False)


@triton.jit
def _weights(w_rows, at, w_mask, n, K: tl.constexpr, GLU: tl.constexpr):
    """One step's strip of the weight (and of the up half, rows n..2n, for the joined gate/up)."""
    w = tl.load(w_rows + at[None, :], mask=w_mask, other=0.0)
    up = w
    if GLU:
        up = tl.load(w_rows + n * K + at[None, :], mask=w_mask, other=0.0)
    return w, up


@triton.jit
def _masks(at, live, in_n, K: tl.constexpr, EVEN_K: tl.constexpr):
    """The loads' masks for x's rows and the weight's strip at `at`."""
    x_mask = live[:, None]
    w_mask = in_n[:, None]
    if not EVEN_K:
        x_mask = x_mask & (at < K)[None, :]
        w_mask = w_mask & (at < K)[None, :]
    return x_mask, w_mask


@triton.jit
def _step(
    acc,
    acc_up,
    squares,
    w,
    up,
    at,
    x_mask,
    x_rows,
    d_rows,
    h_rows,
    norm_ptr,
    write_h,
    K: tl.constexpr,
    ADD: tl.constexpr,
    NORM: tl.constexpr,
    GLU: tl.constexpr,
    DOT: tl.constexpr,
):
    """One step over K: the product of x (times the norm's weight) with the weight's strip, and
    x's squares beside it. The elementwise form keeps its products and squares per position of
    the step ([rows, N, BLOCK_K] and [rows, BLOCK_K]) and sums them once, after the last step:
    a sum across the program's threads in every step would hold up the loads."""
    dtype = w.dtype
    x = tl.load(x_rows + at[None, :], mask=x_mask, other=0.0).to(tl.float32)
    if ADD:
        d = tl.load(d_rows + at[None, :], mask=x_mask, other=0.0).to(tl.float32)
        x = (x + d).to(dtype).to(tl.float32)
        tl.store(h_rows + at[None, :], x.to(h_rows.dtype.element_ty), mask=x_mask & write_h)
    if NORM:
        if DOT:
            squares += tl.sum(x * x, 1)
        else:
            squares += x * x
        x = x * tl.load(norm_ptr + at, mask=at < K, other=0.0).to(tl.float32)[None, :]
    if DOT:
        x16 = x.to(dtype)
        acc = tl.dot(x16, tl.trans(w), acc)
        if GLU:
            acc_up = tl.dot(x16, tl.trans(up), acc_up)
    else:
        acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
        if GLU:
            acc_up += x[:, None, :] * up.to(tl.float32)[None, :, :]
    return acc, acc_up, squares


@triton.jit
def _gemv_kernel(
    x_ptr,
    d_ptr,
    norm_ptr,
    w_ptr,
    b_ptr,
    r_ptr,
    y_ptr,
    h_ptr,
    rows,
    n,
    eps,
    stride_x,
    stride_d,
    stride_r,
    stride_y,
    stride_h,
    K: tl.constexpr,
    ADD: tl.constexpr,
    NORM: tl.constexpr,
    GLU: tl.constexpr,
    BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    dtype = w_ptr.dtype.element_ty
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    live = m < rows
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = cols < n
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + m[:, None] * stride_x
    d_rows = d_ptr + m[:, None] * stride_d
    h_rows = h_ptr + m[:, None] * stride_h
    w_rows = w_ptr + cols[:, None].to(tl.int64) * K

    # One pass over K; the norm's scale, one number a row, multiplies the sums at the end.
    # (Unfused, x times its scale was rounded before the weight multiplied it: the results
    # differ in the last bits.) The first program also writes the residual stream x + d.
    if DOT:
        squares = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        squares = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if GLU:
            acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    x_mask, w_mask = _masks(ks, live, in_n, K, EVEN_K)
    if PDL:
        # Launched while the kernel before it runs (programmatic dependent launch): the next
        # kernel may start as soon as every program here has. Weights are never written during
        # a step, so the first step's strip is read before waiting for the kernel before,
        # whose outputs (x, d, the residual) are read only after.
        tl.extra.cuda.gdc_launch_dependents()
    w, up = _weights(w_rows, ks, w_mask, n, K, GLU)
    if PDL:
        tl.extra.cuda.gdc_wait()
    write_h = pid == 0
    acc, acc_up, squares = _step(
        acc, acc_up, squares, w, up, ks, x_mask, x_rows, d_rows, h_rows, norm_ptr, write_h,
        K, ADD, NORM, GLU, DOT,
    )  # fmt: skip
    for start in range(BLOCK_K, K, BLOCK_K):
        at = start + ks
        x_mask, w_mask = _masks(at, live, in_n, K, EVEN_K)
        w, up = _weights(w_rows, at, w_mask, n, K, GLU)
        acc, acc_up, squares = _step(
            acc, acc_up, squares, w, up, at, x_mask, x_rows, d_rows, h_rows, norm_ptr, write_h,
            K, ADD, NORM, GLU, DOT,
        )  # fmt: skip
    if not DOT:
        squares = tl.sum(squares, 1)
        acc = tl.sum(acc, 2)
        if GLU:
            acc_up = tl.sum(acc_up, 2)
    if NORM:
        scale = tl.rsqrt(squares / K + eps)[:, None]
        acc *= scale
        acc_up *= scale

    out_mask = live[:, None] & in_n[None, :]
    if BIAS:
        acc += tl.load(b_ptr + cols, mask=in_n, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_up += tl.load(b_ptr + n + cols, mask=in_n, other=0.0).to(tl.float32)[None, :]
    out = acc.to(dtype).to(tl.float32)
    if GLU:
        out = (out * tl.sigmoid(out)).to(dtype).to(tl.float32)
        out = out * acc_up.to(dtype).to(tl.float32)
    if RESIDUAL:
        residual = tl.load(r_ptr + m[:, None] * stride_r + cols[None, :], mask=out_mask, other=0.0)
        out = out.to(dtype).to(tl.float32) + residual.to(tl.float32)
    tl.store(
        y_ptr + m[:, None] * stride_y + cols[None, :],
        out.to(dtype).to(y_ptr.dtype.element_ty),
        mask=out_mask,
    )


@torch.compiler.disable
def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    delta: torch.Tensor | None = None,
    added: torch.Tensor | None = None,
    glu: bool = False,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """y = f(x) W^T (+ b), then g, for x [rows, K] with rows <= ROWS; W [N, K] (or [2N, K]).

    - `norm` (with `eps`): f(x) is the RMS norm of x times `norm`, as `LlamaRunner._norm`
      but for rounding (see above);
    - `delta` (with `norm` and `added`): x + delta first, written to `added` [rows, K];
    - `glu`: W joins gate and up ([2N, K]); y = silu(x Wg^T) * (x Wu^T), [rows, N];
    - `residual` [rows, N]: y + residual.

    y comes back in `out_dtype` (by default x's), converted from x's dtype.
    """
    rows, k = x.shape
    out_rows = weight.shape[0] // 2 if glu else weight.shape[0]
    assert rows <= ROWS and weight.shape[1] == k and weight.dtype == x.dtype
    assert x.stride(1) == 1 and weight.is_contiguous()
    assert delta is None or (norm is not None and added is not None)
    if delta is not None:
        assert added is not None and delta.shape == x.shape == added.shape
        assert delta.stride(1) == 1 and added.stride(1) == 1
    if residual is not None:
        assert residual.shape == (rows, out_rows) and residual.stride(1) == 1
    if norm is not None:
        assert norm.shape == (k,) and norm.is_contiguous()
    if bias is not None:
        assert bias.shape == (weight.shape[0],) and bias.is_contiguous()
    chosen = config or config_for(out_rows, k, rows)
    assert chosen.dot or rows == 1
    y = x.new_empty((rows, out_rows), dtype=out_dtype or x.dtype)
    pdl = dependent_launch(x.device)
    _gemv_kernel[(triton.cdiv(out_rows, chosen.block_n),)](
        x,
        delta if delta is not None else x,
        norm if norm is not None else x,
        weight,
        bias if bias is not None else x,
        residual if residual is not None else x,
        y,
        added if added is not None else x,
        rows,
        out_rows,
        eps,
        x.stride(0),
        delta.stride(0) if delta is not None else 0,
        residual.stride(0) if residual is not None else 0,
        y.stride(0),
        added.stride(0) if added is not None else 0,
        K=k,
        ADD=delta is not None,
        NORM=norm is not None,
        GLU=glu,
        BIAS=bias is not None,
        RESIDUAL=residual is not None,
        EVEN_K=k % chosen.block_k == 0,
        DOT=chosen.dot,
        PDL=pdl,
        BLOCK_M=ROWS if chosen.dot else 1,
        BLOCK_N=chosen.block_n,
        BLOCK_K=chosen.block_k,
        num_warps=chosen.warps,
        num_stages=chosen.stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    return y
