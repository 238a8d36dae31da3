"""Decode-step attention on CUDA: each row's one query token over its own cache span.

A decode step asks little of attention (one query token a row) but asks it in every layer, so
its fixed costs count. Scaled-dot-product attention with a mask over the batch's common span
runs PyTorch's memory-efficient kernel plus the mask's preparation: 17 us a layer for one row
on an H200, more than the layer's two largest matrix products. This kernel reads each row's
length from its position (no mask), takes the query heads that share a KV head together (one
read of the keys and values for the group), and splits long spans over several programs whose
partial results a second, small kernel combines (flash-decoding), so that one row of a short
batch still keeps the device busy.

It also takes the steps on either side that a compiled step ran as kernels of their own: the
rotary embedding of q and k and the writes of the new k and v to the cache. The row's own token
is read from the qkv projection's output (the split that holds its position writes it to the
cache and counts it), so a layer's attention is these one or two kernels between the qkv and
the o projections, instead of four or five.

torch.compile leaves it out (a graph break), and the split depends only on the shapes, so a
captured graph replays it as it was captured.
"""

import functools
import os

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner step
_PROGRAMS = 2  # aim for this many programs per multiprocessor


@functools.cache
def dependent_launch(device: torch.device) -> bool:
    """Whether our decode kernels launch on `device` while the kernel before them still runs
    (programmatic dependent launch: NVIDIA GPUs of compute capability 9.0 and later; never
    in Triton's interpreter). Each such kernel waits for the one before it ahead of reading
    its outputs, so the overlap hides the gap between kernels and the last programs' tail.
    `ENGINE_DEPENDENT_LAUNCH=0` turns it off (for comparisons)."""
    if device.type != "cuda" or torch.version.hip or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("ENGINE_DEPENDENT_LAUNCH", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def _split_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    out_ptr,
    part_ptr,
    stats_ptr,
    stride_qkv,
    stride_rope,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    span,
    n_splits,
    scale,
    N_HEADS: tl.constexpr,
    N_REP: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    SINGLE: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        # Launched early (see `dependent_launch`): the next kernel may launch once every
        # program here has started; the qkv rows come from the kernel before.
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements in a large cache
    kv_head = tl.program_id(1)
    kv_heads = tl.num_programs(1)
    split = tl.program_id(2)
    pos = tl.load(pos_ptr + row)
    # Entries before `pos` come from the cache; the row's own token at `pos` comes from the
    # qkv rows, and the split whose chunk holds `pos` writes it to the cache. Padding rows sit
    # at a scratch position past the span: they read the span and write nothing.
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, tl.minimum(pos, span))
    owner = (pos >= start) & (pos < start + CHUNK) & (pos < span)

    group = tl.arange(0, GROUP)
    heads = kv_head * N_REP + group
    in_group = group < N_REP
    dims = tl.arange(0, HEAD_DIM)
    # Rotary embedding, as `LlamaRunner._rope`: x * cos + rotate_half(x) * sin, in fp32,
    # rounded to the activations' dtype as the unfused step stored it.
    partner = (dims + HEAD_DIM // 2) % HEAD_DIM
    sign = tl.where(dims < HEAD_DIM // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * stride_rope + dims).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_rope + dims).to(tl.float32) * sign
    dtype = qkv_ptr.dtype.element_ty
    qkv_row = qkv_ptr + row * stride_qkv
    q_at = qkv_row + heads[:, None] * HEAD_DIM
    q = tl.load(q_at + dims[None, :], mask=in_group[:, None], other=0.0).to(tl.float32)
    q_partner = tl.load(q_at + partner[None, :], mask=in_group[:, None], other=0.0)
    q = (q * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]).to(dtype)
    k_at = qkv_row + (N_HEADS + kv_head) * HEAD_DIM
    k_new = tl.load(k_at + dims).to(tl.float32) * cos
    k_new = (k_new + tl.load(k_at + partner).to(tl.float32) * sin).to(dtype)
    v_new = tl.load(qkv_row + (N_HEADS + kv_heads + kv_head) * HEAD_DIM + dims)

    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    written = owner & (dims < HEAD_DIM)
    tl.store(k_base + pos * stride_kt + dims, k_new.to(k_ptr.dtype.element_ty), mask=written)
    tl.store(v_base + pos * stride_vt + dims, v_new.to(v_ptr.dtype.element_ty), mask=written)

    best = tl.full([GROUP], float("-inf"), tl.float32)
    total = tl.zeros([GROUP], tl.float32)
    acc = tl.zeros([GROUP, HEAD_DIM], tl.float32)
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

    # The row's own token, in the split that holds it (left out of every other split).
    own = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
    new_best = tl.where(owner, tl.maximum(best, own), best)
    kept = tl.where(owner, tl.exp(best - new_best), 1.0)
    p = tl.where(owner, tl.exp(own - new_best), 0.0)
    total = total * kept + p
    p = p.to(dtype).to(tl.float32)
    acc = acc * kept[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
    best = new_best

    if SINGLE:
        out = acc / total[:, None]
        tl.store(
            out_ptr + row * stride_ob + heads[:, None] * HEAD_DIM + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=in_group[:, None],
        )
    else:
        # Partial results: [B, H, splits, D] sums and [B, H, splits, 2] (max, total).
        slot = (row * kv_heads * N_REP + heads) * n_splits + split
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
    PDL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    present = splits < n_splits
    slot = (row * n_heads + head) * n_splits + splits
    best = tl.load(stats_ptr + slot * 2, mask=present, other=float("-inf"))
    total = tl.load(stats_ptr + slot * 2 + 1, mask=present, other=0.0)
    # The first split always counts something: its keys, or the row's own token at position 0.
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


@torch.compiler.disable
def decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    span: int,
    heads: int,
) -> torch.Tensor:
    """The attention of one decode step, from the qkv projection's output to the o projection's
    input: rotary embedding of q and k, the new k and v written to the cache, attention.

    qkv [B, (H + 2 Hkv) D], the rows of the joined q, k and v projections; cos and sin [P, D],
    the rotary tables; k_cache and v_cache [slots, Hkv, P, D], whole; pos [B]: row i's token
    sits at pos[i] (written there) and attends over entries 0..pos[i]. A padding row's position
    lies past `span`: it attends over the whole span and writes nothing. Returns [B, H D] in
    qkv's dtype.

    Left out of torch.compile (a graph break where it is called): a compiled caller would turn
    the cache writes into a functional op, whose in-place form inductor does not always find.
    """
    rows = qkv.shape[0]
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    n_rep = heads // kv_heads
    assert heads == n_rep * kv_heads and qkv.shape[1] == (heads + 2 * kv_heads) * head_dim
    assert cos.stride() == sin.stride() and cos.stride(1) == 1 and qkv.stride(1) == 1
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    processors = (
        torch.cuda.get_device_properties(qkv.device).multi_processor_count if qkv.is_cuda else 4
    )
    splits, chunk = split_plan(rows, kv_heads, span, processors)
    out = qkv.new_empty((rows, heads * head_dim))
    single = splits == 1
    shape = (rows, heads, splits)
    part = qkv.new_empty((*shape, head_dim) if not single else (1,), dtype=torch.float32)
    stats = qkv.new_empty((*shape, 2) if not single else (1,), dtype=torch.float32)
    pdl = dependent_launch(qkv.device)
    launch = {"launch_pdl": True} if pdl else {}
    _split_kernel[(rows, kv_heads, splits)](
        qkv,
        cos,
        sin,
        k_cache,
        v_cache,
        pos,
        out,
        part,
        stats,
        qkv.stride(0),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        span,
        splits,
        head_dim**-0.5,
        N_HEADS=heads,
        N_REP=n_rep,
        GROUP=max(16, triton.next_power_of_2(n_rep)),
        HEAD_DIM=head_dim,
        BLOCK=BLOCK_N,
        CHUNK=chunk,
        SINGLE=single,
        PDL=pdl,
        **launch,
    )
    if not single:
        _combine_kernel[(rows, heads)](
            part,
            stats,
            out,
            out.stride(0),
            head_dim,
            heads,
            splits,
            SPLITS=triton.next_power_of_2(splits),
            HEAD_DIM=head_dim,
            PDL=pdl,
            **launch,
        )
    return out
