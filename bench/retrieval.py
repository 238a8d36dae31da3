"""Search at 100,000 chunks: latency of the vector and hybrid search, recall@10 of HNSW.

The chunks are synthetic but shaped like real ones: 2,000 base passages are recombined from the
shipped corpus (`bench/corpus/docs`) and embedded with all-MiniLM-L6-v2; each stored chunk is a
base passage's embedding plus small noise (renormalised), with the passage text and a unique
word. They are loaded with COPY into `chat_chunk` under a scratch knowledge base (the HNSW index
is maintained as rows arrive, as in production), searched through the production functions,
then deleted.

- vector: `chunks_nearest` for 200 query vectors (noisy copies of base passages), top 10; the
  SQL alone, since the question's embedding is the same cost for every mode (measured apart);
- recall@10: the HNSW answer against the exact one (`enable_indexscan = off`) per query;
- hybrid: `passages_search` (embedding the question + HNSW + full text + fusion) for 100
  questions.

    python -m genai_site.launcher run -- python bench/retrieval.py [--chunks 100000]
"""

import argparse
import os
import random
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
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from bench.machine import machine_describe  # noqa: E402
from chat.knowledge.retrieval import chunks_nearest, passages_search  # noqa: E402
from chat.models import Document, KnowledgeBase  # noqa: E402
from models_admin.embeddings import embed_texts  # noqa: E402

CORPUS = BASE_DIR / "bench" / "corpus" / "docs"
SCRATCH = "bench-retrieval-100k"


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _base_passages(n: int, rng: random.Random) -> list[str]:
    sentences = [
        s.strip()
        for f in sorted(CORPUS.iterdir())
        for s in f.read_text().replace("\n", " ").split(". ")
        if len(s.split()) >= 6
    ]
    return [". ".join(rng.sample(sentences, 3)) + "." for _ in range(n)]


def _load(kb: KnowledgeBase, texts: list[str], vectors: np.ndarray, chunks: int) -> float:
    document = Document.objects.create(
        knowledge_base=kb, filename="synthetic.txt", status=Document.Status.READY
    )
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with connection.cursor() as cursor, transaction.atomic():
        raw = cursor.cursor
        columns = (
            "document_id, knowledge_base_id, position, text, content_sha256, token_count, "
            "start_char, end_char, embedding"
        )
        with raw.copy(f"COPY chat_chunk ({columns}) FROM STDIN") as copy:
            for i in range(chunks):
                base = i % len(texts)
                v = vectors[base] + rng.normal(0, 0.02, vectors.shape[1])
                v /= np.linalg.norm(v)
                text = f"{texts[base]} ref{i}"
                literal = "[" + ",".join(f"{x:.6f}" for x in v) + "]"
                copy.write_row(
                    (document.pk, kb.pk, i, text, f"{i:064x}", 60, 0, len(text), literal)
                )
        cursor.execute(
            "UPDATE chat_chunk SET search_vector = to_tsvector('english', text) "
            "WHERE knowledge_base_id = %s",
            [kb.pk],
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--bases", type=int, default=2000)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the scratch chunks in place, and reuse them if a kept run left them",
    )
    args = parser.parse_args()
    call_command("migrate", "--no-input", verbosity=0)
    kept = KnowledgeBase.objects.filter(name=SCRATCH).first()
    if kept is not None and not (args.keep and kept.chunks.count() == args.chunks):
        kept.delete()
        kept = None
    kb = kept or KnowledgeBase.objects.create(name=SCRATCH)
    rng = random.Random(0)
    texts = _base_passages(args.bases, rng)
    t0 = time.perf_counter()
    vectors = np.array(embed_texts(texts), dtype=np.float32)
    embed_rate = len(texts) / (time.perf_counter() - t0)
    try:
        load_s = None if kept else _load(kb, texts, vectors, args.chunks)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE chat_chunk")
        noise = np.random.default_rng(1)
        queries = []
        for _ in range(200):
            v = vectors[rng.randrange(len(texts))] + noise.normal(0, 0.05, vectors.shape[1])
            queries.append((v / np.linalg.norm(v)).tolist())
        for q in queries[:10]:  # warm the index pages
            chunks_nearest(embedding=q, knowledge_base_ids=[kb.pk], limit=10)
        vector_ms, recalls = [], []
        for q in queries:
            t = time.perf_counter()
            found = chunks_nearest(embedding=q, knowledge_base_ids=[kb.pk], limit=10)
            vector_ms.append((time.perf_counter() - t) * 1000)
            exact = chunks_nearest(
                embedding=q, knowledge_base_ids=[kb.pk], limit=10, exact_scan_below=10**9
            )
            recalls.append(len({i for i, _ in found} & {i for i, _ in exact}) / 10)
        questions = [" ".join(t.split()[:12]) + "?" for t in rng.sample(texts, 100)]
        hybrid_ms = []
        for question in questions:
            t = time.perf_counter()
            passages_search(query=question, knowledge_base_ids=[kb.pk], limit=5)
            hybrid_ms.append((time.perf_counter() - t) * 1000)
        embed_ms = []
        for question in questions[:50]:
            t = time.perf_counter()
            embed_texts([question])
            embed_ms.append((time.perf_counter() - t) * 1000)
    finally:
        if not args.keep:
            kb.delete()

    print(f"# search at {args.chunks:,} chunks of 384 dimensions ({args.bases} base passages)")
    print(f"# machine: {machine_describe()}")
    print()
    print("| measure | p50 | p95 |")
    print("| --- | ---: | ---: |")
    for name, values in [
        ("vector search, SQL (ms)", vector_ms),
        ("hybrid search incl. embedding (ms)", hybrid_ms),
        ("embedding one question (ms)", embed_ms),
    ]:
        print(f"| {name} | {statistics.median(values):.1f} | {_p(values, 0.95):.1f} |")
    print()
    mean_recall = statistics.mean(recalls)
    print(f"recall@10 of HNSW against exact: mean {mean_recall:.3f}, min {min(recalls):.1f}")
    if load_s is not None:
        print(
            f"COPY + full-text vectors for {args.chunks:,} chunks (HNSW maintained): "
            f"{load_s:.0f} s ({args.chunks / load_s:.0f} chunks/s, embedding not included)"
        )
    print(f"embedding throughput, short passages in batches of 8: {embed_rate:.0f} passages/s")


if __name__ == "__main__":
    main()
