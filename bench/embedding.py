"""Embedding speed of all-MiniLM-L6-v2 on this machine, per backend, and equivalence to fp32.

- chunks/s on chunks of the shipped size (200 tokens, overlap 40: the KnowledgeBase defaults),
  cut by the production chunker from bench/corpus/docs, for several batch sizes;
- one short question: p50 / p95 ms (what a search or a semantic-cache lookup pays);
- cosine of each backend's vectors to the fp32 torch ones (min over the chunks, over the questions);
- "auto": int8 for batches of short texts (questions), fp32 for passages;
- torch's own dynamic int8 quantisation (quantize_dynamic on the Linear layers), for comparison.

    python -m genai_site.launcher run -- python bench/embedding.py
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")

import django  # noqa: E402

django.setup()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.machine import machine_describe  # noqa: E402
from chat.knowledge.chunking import text_chunk  # noqa: E402
from models_admin import embeddings  # noqa: E402

CORPUS = BASE_DIR / "bench" / "corpus"
CHUNKS = 96


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _rate(embed, texts: list[str]) -> tuple[float, np.ndarray]:  # type: ignore[no-untyped-def]
    embed(texts[:8])  # warm
    started = time.perf_counter()
    vectors = np.array(embed(texts), dtype=np.float32)
    return len(texts) / (time.perf_counter() - started), vectors


def _latency(embed, questions: list[str]) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    embed(questions[:1])
    ms = []
    for q in questions:
        started = time.perf_counter()
        embed([q])
        ms.append((time.perf_counter() - started) * 1000)
    return statistics.median(ms), _p(ms, 0.95)


def _torch_int8(texts: list[str]) -> list[list[float]]:
    parts = embeddings._load("torch")
    if "int8" not in parts:
        parts["int8"] = torch.ao.quantization.quantize_dynamic(
            parts["model"], {torch.nn.Linear}, dtype=torch.qint8
        )
    tokenizer = embeddings.embedding_tokenizer()
    rows = []
    for start in range(0, len(texts), 8):
        encoded = tokenizer(
            texts[start : start + 8], padding=True, truncation=True, return_tensors="np"
        )
        rows.extend(embeddings._forward({"model": parts["int8"]}, encoded))
    return rows


def main() -> None:
    text = " ".join(p.read_text() for p in sorted((CORPUS / "docs").iterdir()))
    # Windows 10 tokens apart, so that the small corpus gives enough distinct 200-token chunks.
    pieces = text_chunk(text=text, chunk_tokens=200, overlap_tokens=190)
    chunks = [c.text for c in pieces if c.token_count == 200][:CHUNKS]
    questions = [q["question"] for q in json.loads((CORPUS / "questions.json").read_text())][:60]
    reference = np.array(embeddings.embed_texts(chunks, backend="torch"), dtype=np.float32)
    q_reference = np.array(embeddings.embed_texts(questions, backend="torch"), dtype=np.float32)
    rows = []
    variants = [(f"torch fp32, batch {b}", "torch", b) for b in (1, 8, 32)] + [
        (f"onnx-int8, batch {b}", "onnx-int8", b) for b in (1, 8, 32)
    ]
    variants.append(("auto (the default), batch 8", "auto", 8))
    for name, backend, batch in variants:

        def embed(x: list[str], backend: str = backend, batch: int = batch) -> list[list[float]]:
            return embeddings.embed_texts(x, backend=backend, batch_size=batch)

        rate, vectors = _rate(embed, chunks)
        p50, p95 = _latency(embed, questions) if batch == 8 else (None, None)
        q_vectors = np.array(embed(questions), dtype=np.float32)
        cos = (
            float((vectors * reference).sum(1).min()),
            float((q_vectors * q_reference).sum(1).min()),
        )
        rows.append((name, rate, p50, p95, cos))
    rate, vectors = _rate(_torch_int8, chunks)
    p50, p95 = _latency(_torch_int8, questions)
    q_vectors = np.array(_torch_int8(questions), dtype=np.float32)
    cos = (
        float((vectors * reference).sum(1).min()),
        float((q_vectors * q_reference).sum(1).min()),
    )
    rows.append(("torch dynamic int8, batch 8", rate, p50, p95, cos))

    load = os.getloadavg()
    print(f"# all-MiniLM-L6-v2: {len(chunks)} chunks of 200 tokens, {len(questions)} questions")
    print(f"# machine: {machine_describe()}; torch threads {torch.get_num_threads()}")
    print(f"# load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()
    print("| backend | chunks/s | question p50 ms | p95 ms | min cos to fp32: chunks | questions |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rate, p50, p95, cos in rows:
        lat = f"{p50:.1f} | {p95:.1f}" if p50 is not None else "- | -"
        print(f"| {name} | {rate:.1f} | {lat} | {cos[0]:.4f} | {cos[1]:.4f} |")
    # Multiply-adds per token: 6 layers of 4 x 384x384 (attention projections) + 2 x 384x1536
    # (feed-forward), plus attention scores and mixing, 2 x 200 x 384 per layer at 200 tokens.
    macs = 6 * (4 * 384 * 384 + 2 * 384 * 1536 + 2 * 200 * 384)
    gflop = 2 * macs * 200 / 1e9
    print()
    print(
        f"one 200-token chunk: {gflop:.1f} GFLOP; 200 chunks/s needs {200 * gflop:.0f} GFLOP/s. "
        f"Best fp32 rate above: {max(r[1] for r in rows[:3]) * gflop:.0f} GFLOP/s achieved."
    )


if __name__ == "__main__":
    main()
