"""Response caches: a repeated deterministic request is answered without the model.

Exact cache (Redis): the key is the model version (id and weight hash), the prompt as the
model would see it after normalisation (Unicode NFC, runs of whitespace collapsed) and every
sampling parameter. Only deterministic requests are cached: greedy decoding (temperature 0) or
a fixed seed; anything else would freeze one random draw into every later answer.
"""

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass

from django.core.cache import cache

from models_admin.engine import GenerationResult, SamplingParams

_WHITESPACE = re.compile(r"\s+")
_PREFIX = "answer:exact:"


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    completion_tokens: int
    finish_reason: str
    token_logprobs: list[float]


def prompt_normalize(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def exact_cache_key(
    *, version_id: int, sha256: str, prompt_text: str, params: SamplingParams
) -> str | None:
    """The key for a request, or None when the request is not deterministic."""
    if params.temperature > 0 and params.seed is None:
        return None
    material = json.dumps(
        {
            "version": version_id,
            "sha256": sha256,
            "prompt": prompt_normalize(prompt_text),
            "params": asdict(params),
        },
        sort_keys=True,
    )
    return _PREFIX + hashlib.sha256(material.encode()).hexdigest()


def exact_cache_get(*, key: str) -> CachedAnswer | None:
    stored = cache.get(key)
    if not isinstance(stored, dict):
        return None
    try:
        return CachedAnswer(**stored)
    except TypeError:  # written by an older layout
        return None


def exact_cache_put(*, key: str, result: GenerationResult, ttl_seconds: int) -> None:
    """Keep a finished answer; cancelled or empty answers are never cached."""
    if result.finish_reason not in ("stop", "length") or not result.text:
        return
    answer = CachedAnswer(
        text=result.text,
        completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
        token_logprobs=result.token_logprobs,
    )
    cache.set(key, asdict(answer), timeout=ttl_seconds)


# -- Semantic cache (pgvector) ---------------------------------------------------------------
# Embeddings put "How do I enable X?" and "How do I disable X?" very close together, so a hit
# also needs the two questions not to differ in a word that flips their meaning, nor in a
# number. Measured on bench/data/semantic_cache_pairs.jsonl by bench/semantic_cache.py.

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_POLAR = frozenset(
    """
    enable disable enabled disabled on off add remove added removed delete deleted create
    allow deny allowed denied block unblock blocked increase decrease raise lower more less
    start stop started stopped open close lock unlock install uninstall import export upload
    download encrypt decrypt subscribe unsubscribe include exclude with without before after
    max min maximum minimum first last most least up down out join leave show hide
    accept reject approve connect disconnect mute unmute buy sell give take send receive
    not no never cannot can't don't doesn't isn't aren't won't wasn't weren't shouldn't
    couldn't wouldn't didn't hasn't haven't nor none
    """.split()
)


def meaning_differs(a: str, b: str) -> bool:
    """Whether two similar questions differ in a polarity word or in a number."""
    words_a = set(_WORD.findall(a.lower()))
    words_b = set(_WORD.findall(b.lower()))
    changed = words_a ^ words_b
    return bool(changed & _POLAR) or any(any(ch.isdigit() for ch in w) for w in changed)


@dataclass(frozen=True)
class SemanticLookup:
    answer: CachedAnswer | None
    similarity: float | None
    vector: list[float]


def semantic_cache_lookup(
    *, version_id: int, namespace: str, prompt: str, threshold: float
) -> SemanticLookup:
    """The closest cached question of the same version and namespace, if near enough."""
    from django.utils import timezone
    from pgvector.django import CosineDistance

    from models_admin.embeddings import embed_texts
    from models_admin.models import SemanticCacheEntry

    text = prompt_normalize(prompt)
    vector = embed_texts([text])[0]
    candidates = (
        SemanticCacheEntry.objects.filter(
            version_id=version_id, namespace=namespace, expires_at__gt=timezone.now()
        )
        .annotate(distance=CosineDistance("embedding", vector))
        .filter(distance__lte=1 - threshold)
        .order_by("distance")[:5]
    )
    for entry in candidates:
        if meaning_differs(text, entry.prompt):
            continue
        answer = CachedAnswer(
            text=entry.answer,
            completion_tokens=entry.completion_tokens,
            finish_reason=entry.finish_reason,
            token_logprobs=[],
        )
        return SemanticLookup(answer, 1 - float(entry.distance), vector)  # type: ignore[attr-defined]
    return SemanticLookup(None, None, vector)


def semantic_cache_store(
    *,
    version_id: int,
    namespace: str,
    prompt: str,
    vector: list[float],
    result: GenerationResult,
    ttl_seconds: int,
) -> None:
    """Keep a finished answer to a single-turn question."""
    from datetime import timedelta

    from django.utils import timezone

    from models_admin.models import SemanticCacheEntry

    if result.finish_reason not in ("stop", "length") or not result.text:
        return
    SemanticCacheEntry.objects.create(
        version_id=version_id,
        namespace=namespace,
        prompt=prompt_normalize(prompt),
        embedding=vector,
        answer=result.text,
        completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
        expires_at=timezone.now() + timedelta(seconds=ttl_seconds),
    )
