"""Ingestion throughput and search latency of knowledge bases.

Ingestion: N generated documents (distinct text, so no chunk is deduplicated) go through the
production path, `document_upload` then `document_ingest` (parse, chunk with the embedding
tokenizer, embed with all-MiniLM-L6-v2 in batches, store chunks + full-text vectors in one
transaction), one after the other in this process, as one worker thread would run them.

Search: the 60 questions of bench/corpus/questions.json against the generated knowledge base
plus the shipped corpus, through `passages_search` in each mode; the latency includes embedding
the question on the CPU.

    python -m genai_site.launcher run -- python bench/ingest.py
"""

import json
import os
import platform
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

from django.conf import settings  # noqa: E402

from chat.knowledge.evaluation import MODES, corpus_ingest  # noqa: E402
from chat.knowledge.ingestion import document_ingest, document_upload  # noqa: E402
from chat.knowledge.retrieval import passages_search  # noqa: E402
from chat.models import Chunk, KnowledgeBase  # noqa: E402
from models_admin.embeddings import embed_texts  # noqa: E402

DOCUMENTS = int(os.environ.get("BENCH_DOCUMENTS", "30"))
WORDS_PER_DOCUMENT = int(os.environ.get("BENCH_WORDS", "1200"))
CORPUS = BASE_DIR / "bench" / "corpus"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def generated_documents(rng: random.Random) -> list[tuple[str, bytes]]:
    vocabulary = sorted(
        {
            w.strip(".,:;()#").lower()
            for p in (CORPUS / "docs").iterdir()
            for w in p.read_text().split()
        }
        - {""}
    )
    docs = []
    for i in range(DOCUMENTS):
        sentences = []
        words = 0
        while words < WORDS_PER_DOCUMENT:
            n = rng.randint(8, 20)
            sentences.append(" ".join(rng.choice(vocabulary) for _ in range(n)).capitalize() + ".")
            words += n
        docs.append((f"generated-{i:03d}.txt", " ".join(sentences).encode()))
    return docs


def main() -> None:
    rng = random.Random(42)
    embed_texts(["warm up the model"])  # loading the model is not ingestion
    KnowledgeBase.objects.filter(name="bench: ingest").delete()
    kb = KnowledgeBase.objects.create(
        name="bench: ingest", chunk_tokens=200, chunk_overlap_tokens=40
    )
    docs = generated_documents(rng)
    started = time.perf_counter()
    for name, data in docs:
        document = document_upload(knowledge_base=kb, filename=name, data=data, actor=None)
        document_ingest(document_id=document.pk, generation=document.generation)
    elapsed = time.perf_counter() - started
    chunks = Chunk.objects.filter(knowledge_base=kb).count()
    assert kb.documents.filter(status="ready").count() == DOCUMENTS

    corpus = corpus_ingest(
        corpus_dir=CORPUS / "docs", name="bench: corpus", chunk_tokens=64, overlap_tokens=16
    )
    questions = [q["question"] for q in json.loads((CORPUS / "questions.json").read_text())]
    latencies: dict[str, list[float]] = {}
    for mode in MODES:
        timings = []
        for question in questions:
            t = time.perf_counter()
            passages_search(
                query=question, knowledge_base_ids=[kb.pk, corpus.pk], limit=5, mode=mode
            )
            timings.append((time.perf_counter() - t) * 1000)
        latencies[mode] = timings
    total_chunks = Chunk.objects.filter(knowledge_base__in=[kb, corpus]).count()
    kb.delete()
    corpus.delete()

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    print(f"# knowledge base ingestion and search, {time.strftime('%Y-%m-%d')}")
    print(f"# machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}")
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    print()
    print(f"ingestion: {DOCUMENTS} documents of ~{WORDS_PER_DOCUMENT} words, chunks of 200 tokens")
    print("(overlap 40), one process, all-MiniLM-L6-v2 on the CPU")
    print(f"(EMBEDDING_BACKEND={settings.EMBEDDING_BACKEND})")
    print()
    print("| measure | value |")
    print("| --- | ---: |")
    print(f"| documents | {DOCUMENTS} |")
    print(f"| chunks | {chunks} |")
    print(f"| wall time (s) | {elapsed:.1f} |")
    print(f"| documents/s | {DOCUMENTS / elapsed:.2f} |")
    print(f"| chunks/s | {chunks / elapsed:.1f} |")
    print()
    print(f"search: {len(questions)} questions, top 5, over {total_chunks} chunks in two")
    print("knowledge bases; includes embedding the question")
    print()
    print("| mode | p50 (ms) | p95 (ms) |")
    print("| --- | ---: | ---: |")
    for label, timings in latencies.items():
        print(f"| {label} | {statistics.median(timings):.1f} | {percentile(timings, 0.95):.1f} |")


if __name__ == "__main__":
    main()
