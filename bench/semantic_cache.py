"""Wrong hits, right hits and lookup latency of the response caches, on a labeled set.

`bench/data/semantic_cache_pairs.jsonl`: pairs of a cached question and a new one, labeled
same (paraphrase) or not (near miss, opposite meaning). Each pair gets its own namespace with
only its cached question in it, so each lookup is the decision for that pair alone. For several
thresholds, with and without the polarity / number guard:
- right hits: paraphrases answered from the cache;
- wrong hits: pairs of different meaning answered from the cache (the figure to keep under 1%).
Then the latency of one lookup (embedding included) and of an exact-cache read, p50 / p95.

    python -m genai_site.launcher run -- python bench/semantic_cache.py
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

from django.core.management import call_command  # noqa: E402
from pgvector.django import CosineDistance  # noqa: E402

from bench.machine import machine_describe  # noqa: E402
from models_admin import caches  # noqa: E402
from models_admin.embeddings import embed_texts  # noqa: E402
from models_admin.engine import GenerationResult, SamplingParams  # noqa: E402
from models_admin.importing import model_import_default  # noqa: E402
from models_admin.models import SemanticCacheEntry  # noqa: E402

DATA = BASE_DIR / "bench" / "data" / "semantic_cache_pairs.jsonl"
THRESHOLDS = [0.80, 0.85, 0.88, 0.90, 0.92, 0.95]
NAMESPACE = "bench-semantic"


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    call_command("migrate", "--no-input", verbosity=0)
    version = model_import_default()
    pairs = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    SemanticCacheEntry.objects.filter(namespace__startswith=NAMESPACE).delete()
    answer = GenerationResult(
        text="(cached answer)",
        prompt_tokens=1,
        completion_tokens=1,
        finish_reason="stop",
        time_to_first_token_s=0,
        tokens_per_second=0,
    )
    vectors = embed_texts([caches.prompt_normalize(p["cached"]) for p in pairs])
    for i, (pair, vector) in enumerate(zip(pairs, vectors, strict=True)):
        caches.semantic_cache_store(
            version_id=version.pk,
            namespace=f"{NAMESPACE}-{i}",
            prompt=pair["cached"],
            vector=vector,
            result=answer,
            ttl_seconds=3600,
        )
    # Similarity of each pair, as the database computes it.
    queries = embed_texts([caches.prompt_normalize(p["query"]) for p in pairs])
    similarity = []
    for i, query in enumerate(queries):
        entry = (
            SemanticCacheEntry.objects.filter(namespace=f"{NAMESPACE}-{i}")
            .annotate(distance=CosineDistance("embedding", query))
            .get()
        )
        similarity.append(1 - entry.distance)  # type: ignore[attr-defined]
    guard = [caches.meaning_differs(p["cached"], p["query"]) for p in pairs]

    kinds = sorted({p["kind"] for p in pairs})
    counts = {k: sum(p["kind"] == k for p in pairs) for k in kinds}
    print(
        f"# semantic cache on {len(pairs)} labeled pairs: "
        + ", ".join(f"{counts[k]} {k}" for k in kinds)
    )
    print(f"# machine: {machine_describe()}")
    print()
    print("| threshold | guard | paraphrases hit | wrong hits (all) | opposite | near miss |")
    print("| --------: | ----- | --------------: | ---------------: | -------: | --------: |")
    for threshold in THRESHOLDS:
        for use_guard in (False, True):
            hit = [
                s >= threshold and not (use_guard and g)
                for s, g in zip(similarity, guard, strict=True)
            ]

            def rate(selected: list[bool], flags: list[bool] = hit) -> str:
                n = sum(selected)
                k = sum(f for f, s in zip(flags, selected, strict=True) if s)
                return f"{k}/{n} ({100 * k / n:.1f}%)" if n else "n/a"

            same = [p["same"] for p in pairs]
            different = [not s for s in same]
            print(
                f"| {threshold:.2f} | {'on' if use_guard else 'off'} | {rate(same)} | "
                f"{rate(different)} | {rate([p['kind'] == 'opposite' for p in pairs])} | "
                f"{rate([p['kind'] == 'near_miss' for p in pairs])} |"
            )

    # Latency of a lookup as the worker makes it (embedding, then the indexed query).
    lookups = []
    for i, pair in enumerate(pairs[:100]):
        t0 = time.perf_counter()
        caches.semantic_cache_lookup(
            version_id=version.pk,
            namespace=f"{NAMESPACE}-{i}",
            prompt=pair["query"],
            threshold=0.9,
        )
        lookups.append((time.perf_counter() - t0) * 1000)
    params = SamplingParams(temperature=0)
    key = caches.exact_cache_key(
        version_id=version.pk, sha256=version.sha256, prompt_text="bench", params=params
    )
    assert key is not None
    caches.exact_cache_put(key=key, result=answer, ttl_seconds=60)
    exact = []
    for _ in range(200):
        t0 = time.perf_counter()
        caches.exact_cache_get(key=key)
        exact.append((time.perf_counter() - t0) * 1000)
    print()
    print("| lookup | p50 ms | p95 ms |")
    print("| ------ | -----: | -----: |")
    semantic_p50, semantic_p95 = statistics.median(lookups), _p(lookups, 0.95)
    print(f"| semantic (embedding + pgvector query) | {semantic_p50:.1f} | {semantic_p95:.1f} |")
    print(f"| exact (Redis GET) | {statistics.median(exact):.2f} | {_p(exact, 0.95):.2f} |")
    SemanticCacheEntry.objects.filter(namespace__startswith=NAMESPACE).delete()


if __name__ == "__main__":
    main()
