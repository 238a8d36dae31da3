"""Wrong hits, right hits and lookup latency of the response caches, on two labeled sets.

`bench/data/semantic_cache_pairs.jsonl` (the set the guard was tuned on) and
`bench/data/semantic_cache_pairs_holdout.jsonl` (new pairs written before the tuning, never
tuned on): pairs of a cached question and a new one, labeled same (paraphrase) or not (near
miss, opposite meaning). Each pair gets its own namespace with only its cached question in it,
so each lookup is the decision for that pair alone. For several thresholds, with no guard, with
the polarity / number test alone (the earlier guard) and with the whole word-level guard
(`question_match.meaning_differs`, what the cache uses):
- right hits: paraphrases answered from the cache;
- wrong hits: pairs of different meaning answered from the cache (the figure to keep under 1%).
Then the latency of one lookup (embedding and guard included) and of an exact-cache read.

    python -m genai_site.launcher run -- python bench/semantic_cache.py
"""

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
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
from models_admin.models import ModelVersion, SemanticCacheEntry  # noqa: E402
from models_admin.question_match import meaning_differs, polarity_or_number_differs  # noqa: E402

DATA = [
    ("tuning set", BASE_DIR / "bench" / "data" / "semantic_cache_pairs.jsonl"),
    ("held-out set", BASE_DIR / "bench" / "data" / "semantic_cache_pairs_holdout.jsonl"),
]
THRESHOLDS = [0.75, 0.80, 0.85, 0.88, 0.90, 0.92, 0.95]
GUARDS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("off", lambda a, b: False),
    ("polarity/number", polarity_or_number_differs),
    ("word-level", meaning_differs),
]
ANSWER = GenerationResult(
    text="(cached answer)",
    prompt_tokens=1,
    completion_tokens=1,
    finish_reason="stop",
    time_to_first_token_s=0,
    tokens_per_second=0,
)
NAMESPACE = "bench-semantic"


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _rate(flags: list[bool], selected: list[bool]) -> str:
    n = sum(selected)
    k = sum(f for f, s in zip(flags, selected, strict=True) if s)
    return f"{k}/{n} ({100 * k / n:.1f}%)" if n else "n/a"


def _similarities(version: ModelVersion, pairs: list[dict[str, object]]) -> list[float]:
    """Each pair's cosine similarity, as the database computes it from the stored entries."""
    SemanticCacheEntry.objects.filter(namespace__startswith=NAMESPACE).delete()
    vectors = embed_texts([caches.prompt_normalize(str(p["cached"])) for p in pairs])
    for i, (pair, vector) in enumerate(zip(pairs, vectors, strict=True)):
        caches.semantic_cache_store(
            version_id=version.pk,
            namespace=f"{NAMESPACE}-{i}",
            prompt=str(pair["cached"]),
            vector=vector,
            result=ANSWER,
            ttl_seconds=3600,
        )
    queries = embed_texts([caches.prompt_normalize(str(p["query"])) for p in pairs])
    similarity = []
    for i, query in enumerate(queries):
        entry = (
            SemanticCacheEntry.objects.filter(namespace=f"{NAMESPACE}-{i}")
            .annotate(distance=CosineDistance("embedding", query))
            .get()
        )
        similarity.append(1 - entry.distance)  # type: ignore[attr-defined]
    return similarity


def _table(name: str, pairs: list[dict[str, object]], similarity: list[float]) -> None:
    kinds = sorted({str(p["kind"]) for p in pairs})
    counts = {k: sum(p["kind"] == k for p in pairs) for k in kinds}
    print(f"## {name}: {len(pairs)} labeled pairs: " + ", ".join(f"{counts[k]} {k}" for k in kinds))
    print()
    print("| threshold | guard | paraphrases hit | wrong hits (all) | opposite | near miss |")
    print("| --------: | ----- | --------------: | ---------------: | -------: | --------: |")
    same = [bool(p["same"]) for p in pairs]
    different = [not s for s in same]
    opposite = [p["kind"] == "opposite" for p in pairs]
    near_miss = [p["kind"] == "near_miss" for p in pairs]
    verdicts = {
        label: [guard(str(p["cached"]), str(p["query"])) for p in pairs] for label, guard in GUARDS
    }
    for threshold in THRESHOLDS:
        for label, _ in GUARDS:
            hit = [
                s >= threshold and not g for s, g in zip(similarity, verdicts[label], strict=True)
            ]
            print(
                f"| {threshold:.2f} | {label} | {_rate(hit, same)} | {_rate(hit, different)} | "
                f"{_rate(hit, opposite)} | {_rate(hit, near_miss)} |"
            )
    print()


def main() -> None:
    call_command("migrate", "--no-input", verbosity=0)
    version = model_import_default()
    print(f"# semantic cache on labeled pairs; machine: {machine_describe()}")
    print()
    for name, path in DATA:
        pairs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        _table(f"{name} ({path.name})", pairs, _similarities(version, pairs))

    # Latency of a lookup as the worker makes it (embedding, the indexed query, the guard), on
    # the entries of the last set.
    meaning_differs("warm up", "the word table")
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
    caches.exact_cache_put(key=key, result=ANSWER, ttl_seconds=60)
    exact = []
    for _ in range(200):
        t0 = time.perf_counter()
        caches.exact_cache_get(key=key)
        exact.append((time.perf_counter() - t0) * 1000)
    print()
    print("| lookup | p50 ms | p95 ms |")
    print("| ------ | -----: | -----: |")
    semantic_p50, semantic_p95 = statistics.median(lookups), _p(lookups, 0.95)
    label = "semantic (embedding + pgvector query + guard)"
    print(f"| {label} | {semantic_p50:.1f} | {semantic_p95:.1f} |")
    print(f"| exact (Redis GET) | {statistics.median(exact):.2f} | {_p(exact, 0.95):.2f} |")
    SemanticCacheEntry.objects.filter(namespace__startswith=NAMESPACE).delete()


if __name__ == "__main__":
    main()
