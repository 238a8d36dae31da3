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
prompts. A model whose weights already sit on a 4-bit grid (one imported from a Q4_0 / Q4_1 GGUF
file) also decodes with them in that form: 4-bit groups of 32 with a scale and an offset each,
read by PyTorch's int4 CPU kernel (bf16 activations). A decode step of one sequence reads a
quarter of the bytes and takes about half the time in its linear layers; prompts are still
prefilled with 16-bit weights, where the int4 kernel is slower: bf16 where the CPU has AMX
tiles (matrix units for bf16), fp16 packed otherwise. On CUDA everything is bf16:
prefill attends with scaled-dot-product (flash) attention, decode steps with our own kernel
(`models_admin.decode_attention`), and both are captured as CUDA graphs.
"""

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch._dynamo.config as dynamo_config
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# A captured prefill's width (padded prompt length) is a multiple of this many tokens.
PREFILL_WIDTH_STEP = 64

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


class UnsupportedModel(Exception):
    pass


class _Linear:
    """y = x W^T (+ b) for 2-D x, with weights held in the device's fastest exact-enough form."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        packed_fp16: bool,
        bf16: bool = False,
    ):
        self.packed: Any = None
        self.weight: Any = None
        self.bias: Any = None
        self.bf16 = bf16
        if bf16:
            # bf16 weights and activations, fp32 out: the CPU's matrix units (AMX) where fp16
            # has none.
            self.weight = weight.to(torch.bfloat16).contiguous()
            self.bias = bias.float() if bias is not None else None
        elif packed_fp16:
            b = bias.float().contiguous() if bias is not None else None
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), b)
        else:
            self.weight = weight.contiguous()
            self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        if self.bf16:
            y = F.linear(x.to(torch.bfloat16), self.weight).float()
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        if self.weight is None:
            return 0
        return self.weight.numel() * self.weight.element_size()


# Weights on the CPU: "fp32", "fp16" (packed), "int4" (4-bit decode weights for every layer that
# fits the kernel, fp16 otherwise) or "auto" (int4 where the weights already sit on a 4-bit grid).
CPU_WEIGHTS = ("auto", "int4", "fp16", "fp32")
# Prefill weights on the CPU beside 4-bit decode weights: "auto" (bf16 where the CPU has AMX
# tiles, fp16 packed otherwise), "bf16" or "fp16".
CPU_PREFILL = ("auto", "bf16", "fp16")
# How the host waits for a GPU step's picks (`LlamaRunner.sleep_while_waiting`).
GPU_WAIT = ("sleep", "spin")


def _amx() -> bool:
    """Whether this CPU has AMX tiles (bf16 matrix products in hardware)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


INT4_GROUP = 32
_Int4Groups = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _int4_groups(weight: torch.Tensor) -> _Int4Groups | None:
    """4-bit codes [N, K] (int32), scales and minimums [N, K / 32] of groups of 32 inputs.

    Round to nearest between each group's minimum and maximum, as GGUF's Q4_1 does: for weights
    dequantised from such a file this finds the file's own codes again. None when the shape
    does not fit PyTorch's int4 CPU kernel (K a multiple of 32, N of 16).
    """
    n, k = weight.shape
    if k % INT4_GROUP or n % 16:
        return None
    groups = weight.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    low = groups.amin(-1)
    scale = ((groups.amax(-1) - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    return codes.to(torch.int32).reshape(n, k), scale, low


def on_int4_grid(weight: torch.Tensor, found: _Int4Groups | None = None) -> bool:
    """Whether 4-bit groups of 32 hold these weights as they are (to 1% of a step). `found`:
    the weights' groups when the caller has them already (`_int4_groups`)."""
    found = found or _int4_groups(weight)
    if found is None:
        return False
    codes, scale, low = found
    n, k = weight.shape
    rebuilt = codes.reshape(n, k // INT4_GROUP, INT4_GROUP) * scale[..., None] + low[..., None]
    error = (rebuilt - weight.float().reshape(rebuilt.shape)).abs() / scale[..., None]
    return bool(error.max() <= 0.01)


class _Int4Linear:
    """y = x W^T (+ b) with W in 4-bit groups of 32 (bf16 scale and offset per group).

    PyTorch's int4 CPU kernel takes bf16 activations and gives bf16 outputs (accumulating in
    fp32); the result returns to fp32 for the rest of the step. Its rows do not depend on each
    other (nor, with `LlamaRunner.row_attention`, does the rest of a step), so a sequence
    decodes the same tokens alone or in a batch.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: Any):
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # The kernel computes (code - 8) * scale + zero.
        zero = low + 8 * scale
        self.scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        self.scales_zeros = self.scales_zeros.to(torch.bfloat16)
        self.bias = bias.float() if bias is not None else None

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scales_zeros.nbytes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.packed, INT4_GROUP, self.scales_zeros
        ).float()
        return y + self.bias if self.bias is not None else y


class _Sizes(torch.nn.Module):
    """The model's head counts and head size. Held by a module, whose ints torch.compile
    keeps constant; on any other object, `dynamic=True` makes each of them a symbol."""

    def __init__(self, *, n_heads: int, n_kv: int, head_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv = n_kv
        self.head_dim = head_dim


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    qkv: _Linear | _Int4Linear
    o: _Linear | _Int4Linear
    mlp_norm: torch.Tensor
    gate_up: _Linear | _Int4Linear
    down: _Linear | _Int4Linear


class StepResult:
    """One forward's outcome: each row's greedy pick and, for sampling, the logits [n, V].

    On a GPU the picks travel to pinned host memory with an asynchronous copy, so that the
    caller can queue the next forward before it waits for this one (`picks()` waits).
    `logits` is only valid until the next decode step or prefill runs (captured graphs reuse
    their outputs, and share one memory pool).
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


class PrefixCache:
    """Cache entries of prompt prefixes, by the prefix's tokens; least recently used go first.

    An entry is one block of positions `[start, end)`: per layer, its keys and values
    ([kv heads, end - start, head dim] each). Its key is every token up to `end`, because the
    entries of a block depend on all the tokens before it.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self._entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = (
            OrderedDict()
        )

    def get(self, tokens: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        block = self._entries.get(tokens)
        if block is not None:
            self._entries.move_to_end(tokens)
            self.hits += 1
        return block

    def put(self, tokens: tuple[int, ...], block: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        size = sum(k.nbytes + v.nbytes for k, v in block)
        if size > self.max_bytes or tokens in self._entries:
            return
        self._entries[tokens] = block
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in old)


def prefix_blocks(length: int) -> list[int]:
    """Where a prompt of `length` tokens is cut for prefilling: 16, 32, 64, ... then its end.

    The cuts depend on nothing but the length, so a prompt is computed the same way whether
    its first blocks come from the cache or not; doubling keeps a long prompt to a few
    forwards.
    """
    ends = []
    end = 16
    while end < length:
        ends.append(end)
        end *= 2
    return [*ends, length]


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
        cpu_weights: str = "fp16",
        cpu_prefill: str = "auto",
        gpu_wait: str = "sleep",
        compile_steps: bool = False,
        compile_scope: str = "layer",
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
        self.sizes = _Sizes(
            n_heads=config.num_attention_heads,
            n_kv=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None)
            or config.hidden_size // config.num_attention_heads,
        )
        self.eps = float(config.rms_norm_eps)
        self.vocab = config.vocab_size
        if cpu_weights not in CPU_WEIGHTS:
            raise ValueError(f"cpu_weights is one of {CPU_WEIGHTS}, not {cpu_weights!r}")
        if cpu_prefill not in CPU_PREFILL:
            raise ValueError(f"cpu_prefill is one of {CPU_PREFILL}, not {cpu_prefill!r}")
        if gpu_wait not in GPU_WAIT:
            raise ValueError(f"gpu_wait is one of {GPU_WAIT}, not {gpu_wait!r}")
        cpu = device.type == "cpu"
        packed = cpu and cpu_weights != "fp32"

        inner = hf_model.model

        def joined(*modules: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
            weight = torch.cat([m.weight.detach() for m in modules])
            biases = [m.bias for m in modules]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [
                        b.detach() if b is not None else torch.zeros(m.weight.shape[0])
                        for b, m in zip(biases, modules, strict=True)
                    ]
                )
            return weight, bias

        def lin(weight: torch.Tensor, bias: torch.Tensor | None, bf16: bool = False) -> _Linear:
            bias = bias.to(device, dtype) if bias is not None else None
            return _Linear(weight.to(device, dtype), bias, packed_fp16=packed, bf16=bf16)

        linears = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears.append(
                {
                    "qkv": joined(attn.q_proj, attn.k_proj, attn.v_proj),
                    "o": joined(attn.o_proj),
                    "gate_up": joined(mlp.gate_proj, mlp.up_proj),
                    "down": joined(mlp.down_proj),
                }
            )
        # Each weight's 4-bit groups, found once: to check the grid and to pack them.
        groups: list[dict[str, _Int4Groups | None]] = []
        if cpu and cpu_weights in ("int4", "auto"):
            groups = [
                {name: _int4_groups(w) for name, (w, _b) in parts.items()} for parts in linears
            ]
        int4 = cpu and cpu_weights == "int4"
        if cpu and cpu_weights == "auto":
            int4 = all(
                on_int4_grid(parts[name][0], found[name])
                for parts, found in zip(linears, groups, strict=True)
                for name in parts
            )
        self.decode_weights = "int4" if int4 else ("fp16" if packed else str(dtype))
        # With 4-bit decode weights (bf16 activations already), prompts are prefilled with
        # bf16 weights where the CPU multiplies them in hardware: on a 2-core Xeon with AMX a
        # layer's products for a 128-token prompt took 1.2 ms instead of 3.2 with fp16 packed.
        prefill_bf16 = int4 and (cpu_prefill == "bf16" or (cpu_prefill == "auto" and _amx()))
        self.prefill_weights = "bf16" if prefill_bf16 else ("fp16" if int4 else self.decode_weights)

        # Prefill reads `layers`; decode steps read `decode_layers` (the same objects unless
        # the decode weights are 4-bit).
        self.layers: list[_Layer] = []
        self.decode_layers: list[_Layer] = []
        for i, (layer, parts) in enumerate(zip(inner.layers, linears, strict=True)):
            norms = (
                layer.input_layernorm.weight.detach().to(device, dtype),
                layer.post_attention_layernorm.weight.detach().to(device, dtype),
            )

            def layer_of(made: dict[str, _Linear | _Int4Linear], norms: Any = norms) -> _Layer:
                return _Layer(
                    attn_norm=norms[0],
                    qkv=made["qkv"],
                    o=made["o"],
                    mlp_norm=norms[1],
                    gate_up=made["gate_up"],
                    down=made["down"],
                )

            prefill: dict[str, _Linear | _Int4Linear] = {
                name: lin(w, b, bf16=prefill_bf16) for name, (w, b) in parts.items()
            }
            self.layers.append(layer_of(prefill))
            if not int4:
                self.decode_layers.append(self.layers[-1])
                continue
            decode = dict(prefill)
            for name, (w, b) in parts.items():
                found = groups[i][name]
                if found is not None:
                    decode[name] = _Int4Linear(*found, b)
                elif prefill_bf16:  # a shape the 4-bit kernel does not take: fp16 packed
                    decode[name] = lin(w, b)
            self.decode_layers.append(layer_of(decode))
        self.embed = inner.embed_tokens.weight.detach().to(device, dtype)
        self.final_norm = inner.norm.weight.detach().to(device, dtype)
        self.lm_head = lin(*joined(hf_model.lm_head))

        # One position past the context window: decode padding rows sit there (the masked path
        # writes their k and v there; the kernel writes nothing for them), and no attention
        # span ever covers the whole cache (see `scratch`).
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
        # How the host waits for a step's picks: asleep (the event's blocking sync), or spinning
        # a core until the device is done. Spinning held a core for the whole of every step; on
        # an H100, SmolLM2-135M's engine alone took 558 µs of CPU a token at one stream against
        # 207 asleep, at the same speed, and 8 workers on one GPU took 149 ms of CPU per 32-token
        # /v1 answer at 10 clients against 19 (bench/results/engine_gpu-h100.md and
        # api_overhead-gpu.md). Spinning is the lower latency on cores of its own: 3% more
        # tokens/s at 8 streams, 0.9 ms sooner to the first token.
        self.sleep_while_waiting = gpu_wait == "sleep"
        # On the CPU each row of a decode step attends alone over exactly its own span. Over a
        # batch's common span (masked), the sums inside attention are grouped differently as
        # the span changes, so a row's output would depend, in its last bits, on the other
        # rows; with bf16 activations (the int4 weights) such differences grow into different
        # greedy tokens. One call per row costs about 0.3 ms per layer at 8 rows on 2 cores.
        self.row_attention = device.type == "cpu"
        # On CUDA each row attends over its own span in our own kernel (`decode_attention`),
        # without a mask; SDPA over the batch's span with a mask where the kernel cannot run.
        self.attend: Any = _decode_kernel(self.head_dim) if device.type == "cuda" else None
        self.decode_kernel = self.attend is not None
        # Steps of up to `gemv_rows` rows also run their matrix products in our own kernel
        # (`decode_gemv`), with the norms, residual adds and silu x up fused in. One row:
        # at 16 the kernel was no faster than cuBLAS (bench/decode_gemv.py). (A one-row step
        # compiles nothing; `warm_up`'s two-row step compiles the layer for the larger ones.)
        self.gemv: Any = _decode_gemv(dtype) if self.decode_kernel else None
        self.gemv_rows = 1
        self._last_tokens = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._prefill_graphs: dict[tuple[int, int], _PrefillGraph] = {}
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
            # The model's sizes are constants of its compilations (`_model_sizes_static`), so
            # a worker serving several models compiles each forward per model (and per prompt
            # count 1 or more): past dynamo's default of 8 a function, later models would run
            # uncompiled.
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)

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
        if compile_steps:
            self._model_sizes_static()

    @property
    def n_heads(self) -> int:
        return self.sizes.n_heads

    @property
    def n_kv(self) -> int:
        return self.sizes.n_kv

    @property
    def head_dim(self) -> int:
        return self.sizes.head_dim

    def _model_sizes_static(self) -> None:
        """Hold the model's own sizes constant in compiled forwards; only the tokens' vary.

        Compiled with `dynamic=True`, every size of every tensor a forward reads is a symbol,
        the weights' included: inductor's kernels then index with sizes passed at run time
        (a division per element where silu x up splits gate/up's output) instead of constants.
        Weights, norms and the caches' heads and head size never change for a model; tokens,
        rows, spans and the caches' slots and length do. On an H100 a 4 x 512 prefill of a
        1B model took 10.9 ms with every size symbolic and 8.7-8.8 ms with these fixed.
        """

        def tensors(*holders: Any) -> Iterator[torch.Tensor]:
            """The tensors among `holders` and among their attributes (a linear's weights)."""
            for holder in holders:
                if torch.is_tensor(holder):
                    yield holder
                else:
                    yield from (v for v in vars(holder).values() if torch.is_tensor(v))

        mark = torch._dynamo.mark_static
        for layer in (*self.layers, *self.decode_layers):
            for tensor in tensors(*vars(layer).values()):
                mark(tensor)
        for tensor in tensors(self.embed, self.final_norm, self.lm_head):
            mark(tensor)
        for cache in (*self.k_cache, *self.v_cache):
            mark(cache, 1)
            mark(cache, 3)

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
        ready = torch.cuda.Event(blocking=self.sleep_while_waiting)
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
        t = self.prefill_width(max(len(p) for p in prompts))
        graphed = self.device.type == "cuda" and self.use_graphs
        ids = self._to_device([p + [0] * (t - len(p)) for p in prompts])
        rows = self._to_device(slots)
        # Index of each prompt's last token in the flattened [n * t] rows.
        last = self._to_device([i * t + len(p) - 1 for i, p in enumerate(prompts)])
        if graphed:
            return self._prefill_graphed(ids, rows, last)
        logits = self.prefill_body(ids, rows, last)
        _tokens, picks = _greedy(logits)
        return self._result(logits, picks)

    def prefill_width(self, longest: int) -> int:
        """The width a prefill of prompts up to `longest` tokens runs at (padded on a GPU).

        Prefills are captured per (prompts, width), the width rounded up to a multiple of
        PREFILL_WIDTH_STEP tokens.
        """
        if self.device.type != "cuda" or not self.use_graphs:
            return longest
        return min(-(-longest // PREFILL_WIDTH_STEP) * PREFILL_WIDTH_STEP, self.max_len)

    def _prefill_graphed(
        self, ids: torch.Tensor, rows: torch.Tensor, last: torch.Tensor
    ) -> StepResult:
        n, width = ids.shape
        graph = self._prefill_graphs.get((n, width))
        if graph is None:
            graph = _PrefillGraph(self, ids, rows, last)
            self._prefill_graphs[(n, width)] = graph
        else:
            graph.ids.copy_(ids)
            graph.rows.copy_(rows)
            graph.last.copy_(last)
        graph.graph.replay()
        # The next chunk may replay the same graph before these logits are read (sampling).
        return self._result(graph.logits.clone(), graph.picks)

    @torch.inference_mode()
    def prefill_blocks(
        self, *, slot: int, prompt: list[int], prefixes: PrefixCache | None
    ) -> StepResult:
        """Prefill one prompt block by block (`prefix_blocks`), taking leading blocks that
        `prefixes` holds from it and adding the ones computed here (all but the last).
        """
        ends = prefix_blocks(len(prompt))
        start = 0
        for end in ends[:-1]:
            block = prefixes.get(tuple(prompt[:end])) if prefixes is not None else None
            if block is None:
                break
            for (k, v), k_cache, v_cache in zip(block, self.k_cache, self.v_cache, strict=True):
                k_cache[slot, :, start:end] = k
                v_cache[slot, :, start:end] = v
            start = end
        for end in ends:
            if end <= start:
                continue
            h = self._extend_body(prompt[start:end], slot, start)
            if end == len(prompt):
                logits = self.logits(h[-1:])
                _tokens, picks = _greedy(logits)
                return self._result(logits, picks)
            if prefixes is not None:
                block = [
                    (k[slot, :, start:end].clone(), v[slot, :, start:end].clone())
                    for k, v in zip(self.k_cache, self.v_cache, strict=True)
                ]
                prefixes.put(tuple(prompt[:end]), block)
            start = end
        raise AssertionError("the last block ends the prompt")

    def _extend_body(self, tokens: list[int], slot: int, start: int) -> torch.Tensor:
        """Tokens at positions start.. of one slot, attending to its cache before them too:
        the hidden states [t, hidden] after the last layer (unnormalised)."""
        t = len(tokens)
        end = start + t
        h = self.embed[self._to_device(tokens)]
        cos = self.cos[start:end].unsqueeze(1)
        sin = self.sin[start:end].unsqueeze(1)
        # Query i (position start + i) sees keys 0 .. start + i.
        visible = torch.ones(t, end, dtype=torch.bool, device=self.device).tril(start)
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            q, k, v = self._qkv(layer, h, cos, sin)
            k_cache[slot, :, start:end] = k.transpose(0, 1)
            v_cache[slot, :, start:end] = v.transpose(0, 1)
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k_cache[slot : slot + 1, :, :end],
                v_cache[slot : slot + 1, :, :end],
                attn_mask=visible,
                enable_gqa=True,
            )
            h = h + layer.o(attn[0].transpose(0, 1).reshape(t, -1))
            h = h + self._mlp(layer, h)
        return h

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

    def _decode_body(
        self, ids: torch.Tensor, pos: torch.Tensor, span: int, spans: list[int] | None = None
    ) -> torch.Tensor:
        """The decode step on tensors: logits [B, V] (CUDA captures it as a graph).

        With `spans` (each row's own attention span), every row attends alone over exactly its
        own cache entries; otherwise all rows attend at once over `span` entries, masked.
        """
        b = ids.shape[0]
        if self.gemv is not None and b <= self.gemv_rows:
            return self._decode_body_fused(ids, pos, span)
        h = self.embed[ids]
        # The kernel's path reads the rotary tables at each row's position itself.
        cos = sin = rows = None
        if not self.decode_kernel:
            cos = self.cos[pos].unsqueeze(1)
            sin = self.sin[pos].unsqueeze(1)
            rows = torch.arange(b, device=self.device)
        mask = None
        if spans is None and not self.decode_kernel:
            # Slot i may only see its own first pos[i] + 1 cache entries. An additive mask made
            # once per step (a boolean one is converted again inside every attention call).
            visible = torch.arange(span, device=self.device)[None, :] <= pos[:, None]
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
            mask = mask.masked_fill(~visible, float("-inf"))[:, None, None, :]
        # Each layer hands its MLP output on unadded: the next layer adds it just before its
        # norm, so that compiled one layer at a time, the add and the norm still fuse.
        delta = torch.zeros_like(h)
        for i, layer in enumerate(self.decode_layers):
            h, delta = self.decode_layer(
                layer,
                self.k_cache[i],
                self.v_cache[i],
                h,
                delta,
                cos,
                sin,
                rows,
                pos,
                span,
                mask,
                spans,
            )
        return self.logits(h + delta)

    def _decode_body_fused(self, ids: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """The decode step in our kernels alone: per layer, the qkv product (taking in the
        previous MLP's output and the norm), attention, the o product with the residual add,
        gate/up with the norm and silu x up, and down."""
        gemv, eps = self.gemv, self.eps
        h = self.embed[ids]
        delta = None
        for i, layer in enumerate(self.decode_layers):
            added = torch.empty_like(h) if delta is not None else None
            qkv = gemv(
                h, *_dense(layer.qkv), norm=layer.attn_norm, eps=eps, delta=delta, added=added
            )
            h = added if added is not None else h
            attn = self.attend(
                qkv, self.cos, self.sin, self.k_cache[i], self.v_cache[i], pos, span, self.n_heads
            )
            h = gemv(attn, *_dense(layer.o), residual=h)
            act = gemv(h, *_dense(layer.gate_up), norm=layer.mlp_norm, eps=eps, glu=True)
            delta = gemv(act, *_dense(layer.down))
        final = dict(norm=self.final_norm, eps=eps, delta=delta, added=torch.empty_like(h))
        return gemv(h, *_dense(self.lm_head), **final, out_dtype=torch.float32)

    def _decode_layer(
        self,
        layer: _Layer,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        h: torch.Tensor,
        delta: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        rows: torch.Tensor | None,
        pos: torch.Tensor,
        span: int,
        mask: torch.Tensor | None,
        spans: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer of the decode step: (h, MLP output) for the next layer to add."""
        b = h.shape[0]
        h = h + delta
        if self.decode_kernel:
            # Rotary embedding, cache writes and attention in one call (`decode_attention`).
            qkv = layer.qkv(self._norm(h, layer.attn_norm))
            attn = self.attend(qkv, self.cos, self.sin, k_cache, v_cache, pos, span, self.n_heads)
            h = h + layer.o(attn)
            return h, self._mlp(layer, h)
        assert cos is not None and sin is not None and rows is not None
        q, k, v = self._qkv(layer, h, cos, sin)
        k_cache[rows, :, pos] = k
        v_cache[rows, :, pos] = v
        # Grouped-query attention without expanding the cache: the query heads that share a KV
        # head take the place of the query length (one token each).
        q = q.view(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        if spans is None:
            assert mask is not None
            keys = k_cache[:b, :, :span]
            values = v_cache[:b, :, :span]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            attn = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[i : i + 1], k_cache[i : i + 1, :, :n], v_cache[i : i + 1, :, :n]
                    )
                    for i, n in enumerate(spans)
                ]
            )
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
        spans = [p + 1 for p in positions] if self.row_attention else None
        logits = self.decode_body(ids, pos, span, spans)
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

    def warm_up(self, prefill_tokens: int = 0) -> None:
        """Compile and capture ahead of the first request (prefill of 1 and of 2 prompts, the
        decode step of 1 and of 2 rows). If compilation fails, fall back to the plain forwards.

        With `prefill_tokens` (the engine's chunk budget), the prefill of every chunk shape
        within it is captured too: n prompts of width w (a multiple of PREFILL_WIDTH_STEP) for
        n * w up to the budget. Chunks take whatever has arrived, so their shapes vary; a graph
        captured while serving synchronises the device and costs the chunk tens of ms.
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
            self._prefill_graphs.clear()
            # Captures into a pool whose graphs were dropped trip the caching allocator.
            self.graph_pool = torch.cuda.graph_pool_handle()
            # Our kernels have no fallback: if they were what failed, fail here, at load.
            self.decode(token_ids=[1], positions=[len(prompt)]).picks()
        if not self.use_graphs:
            return
        last_width = min(prefill_tokens, self.max_len) // PREFILL_WIDTH_STEP * PREFILL_WIDTH_STEP
        for width in range(PREFILL_WIDTH_STEP, last_width + 1, PREFILL_WIDTH_STEP):
            for n in range(1, min(prefill_tokens // width, self.max_batch) + 1):
                if (n, width) not in self._prefill_graphs:
                    self.prefill(slots=list(range(n)), prompts=[[1] * width] * n)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def slot_move(self, *, source: int, target: int, length: int) -> None:
        """Copy a sequence's cache from one slot to another (compaction after a departure)."""
        for k, v in zip(self.k_cache, self.v_cache, strict=True):
            k[target, :, :length] = k[source, :, :length]
            v[target, :, :length] = v[source, :, :length]


def _decode_kernel(head_dim: int) -> Any:
    """`decode_attention` where it serves this model here (Triton present, a power-of-2 head)."""
    if head_dim & (head_dim - 1) or head_dim < 16:
        return None
    try:
        from models_admin.decode_attention import decode_attention
    except ImportError:  # no Triton
        return None
    return decode_attention


def _dense(linear: _Linear | _Int4Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A product's weight and bias as tensors (CUDA decode steps: never packed, never int4)."""
    assert isinstance(linear, _Linear) and linear.weight is not None
    return linear.weight, linear.bias


def _decode_gemv(dtype: torch.dtype) -> Any:
    """`decode_gemv.gemv` where it serves here: Triton present, bf16 activations. (Its
    tensor-core form rounds x times the norm's weight to the 16-bit type before the norm's
    scale: fp16 could overflow there; fp32 inputs would be rounded to tf32.)"""
    if dtype != torch.bfloat16:
        return None
    try:
        from models_admin.decode_gemv import gemv
    except ImportError:  # no Triton
        return None
    return gemv


def _captured(
    pool: Any, forward: Callable[[], torch.Tensor], warm_runs: int
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`forward` run `warm_runs` times on a side stream, then captured with its greedy picks
    into `pool`: (graph, logits, tokens, picks), the outputs as the graph's static tensors.

    Greedy picks are in the graph but outside the compiled forward: the reductions over the
    vocabulary are planned per batch size, which would recompile the forward.
    """
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warm_runs):
                _greedy(forward())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = forward()
            tokens, picks = _greedy(logits)
    return graph, logits, tokens, picks


class _PrefillGraph:
    """One captured prefill for a fixed (prompts, width), made with its first chunk's inputs.

    A prefill launched from Python costs the host 9 to 15 ms for a 1B model of 16 layers
    (compiled one layer at a time), whatever the chunk's size: up to 2048 tokens the device
    waited for the host. Replayed, the launch is one call.
    """

    def __init__(
        self, runner: LlamaRunner, ids: torch.Tensor, rows: torch.Tensor, last: torch.Tensor
    ):
        # The warm-up really runs: with these inputs it writes only the slots being filled.
        self.ids, self.rows, self.last = ids.clone(), rows.clone(), last.clone()
        self.graph, self.logits, _tokens, self.picks = _captured(
            runner.graph_pool, lambda: runner.prefill_body(self.ids, self.rows, self.last), 1
        )


class _DecodeGraph:
    """One captured decode step for a fixed (batch, span): static inputs, replay, static output."""

    def __init__(self, runner: LlamaRunner, batch: int, span: int):
        device = runner.device
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        # Capture runs the step at the inputs' positions: point them at the scratch one, past
        # the span, which no sequence reaches.
        self.pos = torch.full((batch,), runner.scratch, dtype=torch.long, device=device)
        self.graph, self.logits, self.tokens, self.picks = _captured(
            runner.graph_pool, lambda: runner.decode_body(self.ids, self.pos, span), 2
        )
