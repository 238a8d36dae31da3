"""A lean Llama-architecture forward pass over a slotted KV cache, for continuous batching.

The engine keeps every sequence in flight in one KV cache of `max_batch` slots. Active
sequences occupy slots 0..B-1 (compacted: when one leaves, the last moves into its slot), so a
decode step reads `cache[:B]` as a plain view and runs one batched forward for all of them.

Why our own forward rather than the transformers model object: per decode step the model object
spends more time in Python (cache classes, masks, hooks) than the 135M model spends computing on
two CPU cores, and its continuous-batching manager measured slower than a plain padded batch on
this hardware (docs/architecture.md, "Inference engine"). The weights, the rotary table and the
tokenizer still come from transformers; only the step itself is ours.

On the CPU, linear layers keep their weights in fp16 (fbgemm's packed fp16 GEMM, fp32
activations): half the memory traffic of fp32, and greedy answers equal to fp32 ones on our test
prompts. On CUDA everything is bf16 with scaled-dot-product attention.
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


class UnsupportedModel(Exception):
    pass


class _Linear:
    """y = x W^T (+ b) for 2-D x, with weights held in the device's fastest exact-enough form."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, packed_fp16: bool):
        self.packed: Any = None
        self.weight: Any = None
        self.bias: Any = None
        if packed_fp16:
            b = bias.float().contiguous() if bias is not None else None
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), b)
        else:
            self.weight = weight.contiguous()
            self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        if self.weight is None:
            return 0
        return self.weight.numel() * self.weight.element_size()


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    qkv: _Linear
    o: _Linear
    mlp_norm: torch.Tensor
    gate_up: _Linear
    down: _Linear


class StepResult:
    """One forward's outcome: each row's greedy pick and, for sampling, the logits [n, V].

    On a GPU the picks travel to pinned host memory with an asynchronous copy, so that the
    caller can queue the next forward before it waits for this one (`picks()` waits).
    `logits` is only valid until the next decode step runs (a captured graph reuses it).
    """

    def __init__(self, logits: torch.Tensor, picks: torch.Tensor, ready: Any = None):
        self.logits = logits
        self._picks = picks  # [2, n] float: token ids (exact below 2**24), log-probabilities
        self._ready = ready

    def picks(self) -> list[tuple[int, float]]:
        if self._ready is not None:
            self._ready.synchronize()
        tokens, logprobs = self._picks.tolist()
        return [(int(t), float(v)) for t, v in zip(tokens, logprobs, strict=True)]


def _greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's most likely token and its log-probability: ([n] long, [2, n] float)."""
    logp = torch.log_softmax(logits, dim=-1)
    tokens = torch.argmax(logp, dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    return tokens, torch.stack([tokens.to(chosen.dtype), chosen])


class LlamaRunner:
    """Weights, rotary table and slotted KV cache of one model; prefill and batched decode."""

    # The forwards the step calls: the plain methods, or their compiled versions.
    decode_body: Any
    prefill_body: Any
    decode_layer: Any
    prefill_layer: Any
    logits: Any

    def __init__(
        self,
        hf_model: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_batch: int,
        max_len: int,
        cpu_fp16_weights: bool = True,
        compile_steps: bool = False,
        compile_scope: str = "model",
        compile_backend: Any = "inductor",
    ):
        config = hf_model.config
        architectures = set(getattr(config, "architectures", None) or [])
        if not architectures & SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"The batched engine serves {sorted(SUPPORTED_ARCHITECTURES)}; "
                f"this model is {sorted(architectures) or 'of unknown architecture'}."
            )
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.max_len = max_len
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = float(config.rms_norm_eps)
        self.vocab = config.vocab_size
        packed = device.type == "cpu" and cpu_fp16_weights

        inner = hf_model.model

        def lin(*modules: Any) -> _Linear:
            weight = torch.cat([m.weight.detach() for m in modules]).to(device, dtype)
            biases = [m.bias for m in modules]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [
                        b.detach() if b is not None else torch.zeros(m.weight.shape[0])
                        for b, m in zip(biases, modules, strict=True)
                    ]
                ).to(device, dtype)
            return _Linear(weight, bias, packed_fp16=packed)

        self.layers: list[_Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    attn_norm=layer.input_layernorm.weight.detach().to(device, dtype),
                    qkv=lin(attn.q_proj, attn.k_proj, attn.v_proj),
                    o=lin(attn.o_proj),
                    mlp_norm=layer.post_attention_layernorm.weight.detach().to(device, dtype),
                    gate_up=lin(mlp.gate_proj, mlp.up_proj),
                    down=lin(mlp.down_proj),
                )
            )
        self.embed = inner.embed_tokens.weight.detach().to(device, dtype)
        self.final_norm = inner.norm.weight.detach().to(device, dtype)
        self.lm_head = lin(hf_model.lm_head)

        # One position past the context window: decode padding rows write there, and no
        # attention span ever covers the whole cache (see `scratch`).
        self.scratch = max_len
        rotary = inner.rotary_emb
        inv_freq = rotary.inv_freq.detach().float().to(device)
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        positions = torch.arange(max_len + 1, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * scaling).to(dtype)
        self.sin = (emb.sin() * scaling).to(dtype)

        self.use_graphs = device.type == "cuda"
        self._last_tokens = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self.graph_pool: Any = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # The forwards, plain or fused by torch.compile (fewer, larger kernels, and far fewer
        # launches from Python: an eager prefill of a 1B model spends ~12 ms launching its
        # kernels on the H100's host). Symbolic shapes: one compilation serves every batch,
        # prompt length and graph bucket (sizes 1 get their own, made by `warm_up`).
        # Scope "model" compiles each forward whole; "layer" compiles one layer, which every
        # layer then reuses (its weights are arguments), plus the logits. Inductor's time grows
        # faster than the graph: a whole 30-layer decode step took about 210 s to compile on
        # the 2-core CPU against 87 s for 16 layers; one layer costs the same at any depth.
        if compile_scope not in ("model", "layer"):
            raise ValueError(f"compile_scope is 'model' or 'layer', not {compile_scope!r}")
        self.compile_scope = compile_scope
        self.compiled = compile_steps
        self._plain_forwards()
        if compile_steps:
            # Sizes equal at the first compilation would otherwise share one symbol, and the
            # compiled forward would hold them equal: warmed up with 2 rows, a model of 2 KV
            # heads (as Qwen2-0.5B has) compiled its decode step again for every other batch size.
            fx_config.use_duck_shape = False

            def compiled(fn: Any) -> Any:
                return torch.compile(fn, dynamic=True, backend=compile_backend)

            if compile_scope == "model":
                self.decode_body = compiled(self._decode_body)
                self.prefill_body = compiled(self._prefill_body)
            else:
                self.decode_layer = compiled(self._decode_layer)
                self.prefill_layer = compiled(self._prefill_layer)
                self.logits = compiled(self._logits)
        if device.type == "cuda":
            # cuDNN's attention builds a plan per new sequence length (tens of ms each time a
            # prompt of a new length arrives); flash / memory-efficient kernels need none.
            torch.backends.cuda.enable_cudnn_sdp(False)

        # The extra position keeps `cache[:b, :, :span]` a strided view for every span: a
        # compiled step guards on whether that view is contiguous, and a span of the whole
        # cache would compile the step again (minutes for a 30-layer model) mid-serving.
        shape = (max_batch, self.n_kv, max_len + 1, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]

    def _plain_forwards(self) -> None:
        self.decode_body = self._decode_body
        self.prefill_body = self._prefill_body
        self.decode_layer = self._decode_layer
        self.prefill_layer = self._prefill_layer
        self.logits = self._logits

    # -- memory ------------------------------------------------------------------------------

    @staticmethod
    def kv_bytes(config: Any, *, max_batch: int, max_len: int, dtype: torch.dtype) -> int:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
        positions = max_len + 1  # one scratch position per slot
        return per_token * max_batch * positions * torch.tensor([], dtype=dtype).element_size()

    # -- the step ----------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Plain ops: F.rms_norm measured slower than this on the CPU for these sizes.
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(self.dtype) * weight

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _qkv(
        self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k and v [T, Hkv, D] for T token rows; cos/sin [T, 1, D]."""
        t = h.shape[0]
        qkv = layer.qkv(self._norm(h, layer.attn_norm))
        q_end = self.n_heads * self.head_dim
        k_end = q_end + self.n_kv * self.head_dim
        q = qkv[:, :q_end].view(t, self.n_heads, self.head_dim)
        k = qkv[:, q_end:k_end].view(t, self.n_kv, self.head_dim)
        v = qkv[:, k_end:].view(t, self.n_kv, self.head_dim)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        """The MLP's output, not yet added to `h` (see `_decode_layer`)."""
        gate_up = layer.gate_up(self._norm(h, layer.mlp_norm))
        gate, up = gate_up.chunk(2, dim=-1)
        return layer.down(F.silu(gate) * up)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._norm(h, self.final_norm)).float()

    def _to_device(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        """A host list as a device tensor without waiting for the device's queue.

        A plain `torch.tensor(..., device="cuda")` copies from pageable memory, which waits for
        everything queued before it; from pinned memory the copy just joins the queue.
        """
        tensor = torch.tensor(values)
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _result(self, logits: torch.Tensor, picks: torch.Tensor) -> StepResult:
        if self.device.type != "cuda":
            return StepResult(logits, picks)
        host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
        host.copy_(picks, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return StepResult(logits, host, ready)

    @torch.inference_mode()
    def prefill(self, *, slots: list[int], prompts: list[list[int]]) -> StepResult:
        """Run several prompts into their slots in one forward; the outcome at each last position.

        Prompts are right-padded to the longest. Causal attention over the padded batch is
        exact for every real position (padding only ever follows it), so the flash kernel runs
        with no mask at all. Padded positions are written to the cache but never read (a
        decode step masks everything past a sequence's own length and overwrites those
        positions first). Returns n rows; on a GPU nothing here waits for the device.
        """
        t = max(len(p) for p in prompts)
        ids = self._to_device([p + [0] * (t - len(p)) for p in prompts])
        rows = self._to_device(slots)
        # Index of each prompt's last token in the flattened [n * t] rows.
        last = self._to_device([i * t + len(p) - 1 for i, p in enumerate(prompts)])
        logits = self.prefill_body(ids, rows, last)
        _tokens, picks = _greedy(logits)
        return self._result(logits, picks)

    def _prefill_body(
        self, ids: torch.Tensor, rows: torch.Tensor, last: torch.Tensor
    ) -> torch.Tensor:
        """Prompts ids [n, t] into cache slots `rows`; logits [n, V] at flat positions `last`."""
        n, t = ids.shape
        h = self.embed[ids].reshape(n * t, -1)
        cos = self.cos[:t].repeat(n, 1).unsqueeze(1)
        sin = self.sin[:t].repeat(n, 1).unsqueeze(1)
        delta = torch.zeros_like(h)
        for i, layer in enumerate(self.layers):
            h, delta = self.prefill_layer(
                layer, self.k_cache[i], self.v_cache[i], h, delta, cos, sin, ids, rows
            )
        return self.logits((h + delta)[last])

    def _prefill_layer(
        self,
        layer: _Layer,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        h: torch.Tensor,
        delta: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ids: torch.Tensor,
        rows: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer of the prefill over [n * t] token rows (`ids` [n, t] gives n and t)."""
        n, t = ids.shape
        h = h + delta
        q, k, v = self._qkv(layer, h, cos, sin)
        q = q.view(n, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
        k_cache[rows, :, :t] = k
        v_cache[rows, :, :t] = v
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + layer.o(attn.transpose(1, 2).reshape(n * t, -1))
        return h, self._mlp(layer, h)

    def _decode_body(self, ids: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """The decode step on tensors: logits [B, V] (CUDA captures it as a graph)."""
        b = ids.shape[0]
        h = self.embed[ids]
        cos = self.cos[pos].unsqueeze(1)
        sin = self.sin[pos].unsqueeze(1)
        rows = torch.arange(b, device=self.device)
        # Slot i may only see its own first pos[i] + 1 cache entries. An additive mask made once
        # per step (a boolean one is converted again inside every attention call).
        visible = torch.arange(span, device=self.device)[None, :] <= pos[:, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(~visible, float("-inf"))[:, None, None, :]
        # Each layer hands its MLP output on unadded: the next layer adds it just before its
        # norm, so that compiled one layer at a time, the add and the norm still fuse.
        delta = torch.zeros_like(h)
        for i, layer in enumerate(self.layers):
            h, delta = self.decode_layer(
                layer, self.k_cache[i], self.v_cache[i], h, delta, cos, sin, rows, pos, mask
            )
        return self.logits(h + delta)

    def _decode_layer(
        self,
        layer: _Layer,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        h: torch.Tensor,
        delta: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer of the decode step: (h, MLP output) for the next layer to add."""
        b = h.shape[0]
        span = mask.shape[-1]
        h = h + delta
        q, k, v = self._qkv(layer, h, cos, sin)
        k_cache[rows, :, pos] = k
        v_cache[rows, :, pos] = v
        # Grouped-query attention without expanding the cache: the query heads that share a KV
        # head take the place of the query length (one token each).
        q = q.view(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        keys = k_cache[:b, :, :span]
        values = v_cache[:b, :, :span]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        h = h + layer.o(attn.reshape(b, -1))
        return h, self._mlp(layer, h)

    @property
    def asynchronous(self) -> bool:
        """Whether `decode` returns before the device has finished (the caller may run ahead)."""
        return self.device.type == "cuda"

    @torch.inference_mode()
    def decode(self, *, token_ids: list[int] | None, positions: list[int]) -> StepResult:
        """One step for the sequences in slots 0..B-1: token i sits at positions[i].

        `token_ids=None` feeds each row the greedy pick of the previous decode step, still on
        the device: the caller can queue step n + 1 before it has read step n (the rows must be
        the same sequences in the same slots).
        """
        b = len(positions)
        span = max(positions) + 1
        if self.device.type == "cuda" and self.use_graphs:
            return self._decode_graphed(token_ids, positions, span)
        ids = self._last_tokens[:b] if token_ids is None else self._to_device(token_ids)
        pos = self._to_device(positions)
        logits = self.decode_body(ids, pos, span)
        tokens, picks = _greedy(logits)
        self._last_tokens = tokens
        return self._result(logits[:b], picks[:, :b])

    # -- CUDA graphs ---------------------------------------------------------------------------
    # A decode step is ~10 small kernels per layer; launched one by one from Python, a step of
    # a small model costs more in launches than in arithmetic. Each (batch, span) bucket is
    # captured once, greedy picks included, and replayed. Padding rows use free slots and the
    # scratch position past the context window, which no sequence reaches.

    def _bucket(self, value: int, smallest: int, largest: int) -> int:
        size = smallest
        while size < value:
            size *= 2
        return min(size, largest)

    def _decode_graphed(
        self, token_ids: list[int] | None, positions: list[int], span: int
    ) -> StepResult:
        b = len(positions)
        batch = self._bucket(b, 1, self.max_batch)
        span_bucket = self._bucket(span, 128, self.max_len)
        graph = self._graphs.get((batch, span_bucket))
        if graph is None:
            graph = _DecodeGraph(self, batch, span_bucket)
            self._graphs[(batch, span_bucket)] = graph
        scratch = self.scratch
        pad = batch - b
        if token_ids is None:
            graph.ids[:b].copy_(self._last_tokens[:b])
        else:
            graph.ids.copy_(self._to_device(token_ids + [0] * pad))
        graph.pos.copy_(self._to_device(positions + [scratch] * pad))
        graph.graph.replay()
        self._last_tokens = graph.tokens
        return self._result(graph.logits[:b], graph.picks[:, :b])

    def warm_up(self) -> None:
        """Compile and capture ahead of the first request (prefill of 1 and of 2 prompts, the
        decode step of 1 and of 2 rows). If compilation fails, fall back to the plain forwards.
        """
        if self.device.type != "cuda":
            return
        prompt = list(range(1, 17))
        try:
            for n in (1, 2):
                self.prefill(slots=list(range(n)), prompts=[prompt] * n).picks()
                self.decode(token_ids=[1] * n, positions=[len(prompt)] * n).picks()
        except Exception:
            if not self.compiled:
                raise
            logger.exception("torch.compile failed; serving with the plain forwards")
            self.compiled = False
            self._plain_forwards()
            self._graphs.clear()

    @torch.inference_mode()
    def slot_move(self, *, source: int, target: int, length: int) -> None:
        """Copy a sequence's cache from one slot to another (compaction after a departure)."""
        for k, v in zip(self.k_cache, self.v_cache, strict=True):
            k[target, :, :length] = k[source, :, :length]
            v[target, :, :length] = v[source, :, :length]


class _DecodeGraph:
    """One captured decode step for a fixed (batch, span): static inputs, replay, static output."""

    def __init__(self, runner: LlamaRunner, batch: int, span: int):
        device = runner.device
        scratch = runner.scratch
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        # Capture writes the cache at the inputs' positions: point them at the scratch one.
        self.pos = torch.full((batch,), scratch, dtype=torch.long, device=device)
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    _greedy(runner.decode_body(self.ids, self.pos, span))
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=runner.graph_pool):
                # Greedy picks in the graph but outside the compiled body: the reductions over
                # the vocabulary are planned per batch size, which would recompile the body.
                self.logits = runner.decode_body(self.ids, self.pos, span)
                self.tokens, self.picks = _greedy(self.logits)
