"""Decode-step attention on CUDA: each row's one query token over its own cache span.

A decode step asks little of attention (one query token a row) but asks it in every layer, so
its fixed costs count. Scaled-dot-product attention with a mask over the batch's common span
runs PyTorch's memory-efficient kernel plus the mask's preparation: 17 us a layer for one row
on an H200, more than the layer's two largest matrix products. This kernel reads each row's
length from its position (no mask), takes the query heads that share a KV head together (one
read of the keys and values for the group), and splits long spans over several programs whose
partial results a second, small kernel combines (flash-decoding), so that one row of a short
batch still keeps the device busy.

It is an opaque custom op (`genai::decode_attention`): torch.compile leaves it whole, and the
split depends only on the shapes, so a captured graph replays it as it was captured.
"""

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner step
_PROGRAMS = 2  # aim for this many programs per multiprocessor


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    out_ptr,
    part_ptr,
    stats_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    span,
    n_splits,
    scale,
    N_REP: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements in a large cache
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Padding rows sit at a scratch position past the span: they read the span and no further.
    length = tl.minimum(tl.load(pos_ptr + row) + 1, span)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)

    group = tl.arange(0, GROUP)
    heads = kv_head * N_REP + group
    in_group = group < N_REP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + row * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=in_group[:, None],
        other=0.0,
    )
    best = tl.full([GROUP], float("-inf"), tl.float32)
    total = tl.zeros([GROUP], tl.float32)
    acc = tl.zeros([GROUP, HEAD_DIM], tl.float32)
    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    for step in range(CHUNK // BLOCK):
        first = start + step * BLOCK
        if first < end:
            keys = first + tl.arange(0, BLOCK)
            valid = keys < end
            k = tl.load(
                k_base + keys[:, None] * stride_kt + dims[None, :], mask=valid[:, None], other=0.0
            )
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            kept = tl.exp(best - new_best)
            p = tl.exp(scores - new_best[:, None])
            total = total * kept + tl.sum(p, 1)
            v = tl.load(
                v_base + keys[:, None] * stride_vt + dims[None, :], mask=valid[:, None], other=0.0
            )
            acc = acc * kept[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best

    if SINGLE:
        out = acc / total[:, None]
        tl.store(
            out_ptr + row * stride_ob + heads[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=in_group[:, None],
        )
    else:
        # Partial results: [B, H, splits, D] sums and [B, H, splits, 2] (max, total).
        slot = (row * tl.num_programs(1) * N_REP + heads) * n_splits + split
        tl.store(part_ptr + slot[:, None] * HEAD_DIM + dims[None, :], acc, mask=in_group[:, None])
        tl.store(stats_ptr + slot * 2, best, mask=in_group)
        tl.store(stats_ptr + slot * 2 + 1, total, mask=in_group)


@triton.jit
def _combine_kernel(
    part_ptr,
    stats_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    n_heads,
    n_splits,
    SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    present = splits < n_splits
    slot = (row * n_heads + head) * n_splits + splits
    best = tl.load(stats_ptr + slot * 2, mask=present, other=float("-inf"))
    total = tl.load(stats_ptr + slot * 2 + 1, mask=present, other=0.0)
    # The first split always holds keys (every row sees at least its own token).
    weight = tl.where(present & (total > 0), tl.exp(best - tl.max(best, 0)), 0.0)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(
        part_ptr + slot[:, None] * HEAD_DIM + dims[None, :], mask=present[:, None], other=0.0
    )
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def split_plan(rows: int, kv_heads: int, span: int, processors: int) -> tuple[int, int]:
    """(splits, keys per split) for `rows` x `kv_heads` programs over `span` keys."""
    blocks = triton.cdiv(span, BLOCK_N)
    wanted = triton.cdiv(_PROGRAMS * processors, rows * kv_heads)
    splits = max(1, min(blocks, wanted))
    chunk = triton.cdiv(blocks, splits) * BLOCK_N
    return triton.cdiv(span, chunk), chunk


@torch.library.custom_op("genai::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """q [B, H, D]; keys and values [B, Hkv, span, D] (cache views); pos [B]: row i attends
    over its entries 0..pos[i], or over the whole span where pos[i] lies past it (padding rows).
    Returns [B, H, D] in q's dtype."""
    rows, heads, head_dim = q.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    n_rep = heads // kv_heads
    processors = (
        torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    )
    splits, chunk = split_plan(rows, kv_heads, span, processors)
    out = torch.empty_like(q)
    single = splits == 1
    part = q.new_empty((rows, heads, splits, head_dim) if not single else (1,), dtype=torch.float32)
    stats = q.new_empty((rows, heads, splits, 2) if not single else (1,), dtype=torch.float32)
    _split_kernel[(rows, kv_heads, splits)](
        q,
        keys,
        values,
        pos,
        out,
        part,
        stats,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        out.stride(0),
        out.stride(1),
        span,
        splits,
        head_dim**-0.5,
        N_REP=n_rep,
        GROUP=max(16, triton.next_power_of_2(n_rep)),
        HEAD_DIM=head_dim,
        BLOCK=BLOCK_N,
        CHUNK=chunk,
        SINGLE=single,
    )
    if not single:
        _combine_kernel[(rows, heads)](
            part,
            stats,
            out,
            out.stride(0),
            out.stride(1),
            heads,
            splits,
            SPLITS=triton.next_power_of_2(splits),
            HEAD_DIM=head_dim,
        )
    return out


@decode_attention.register_fake
def _(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)
