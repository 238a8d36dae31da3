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
from models_admin.question_match import meaning_differs

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


def _exact_source_key(source_id: str) -> str:
    return f"{_PREFIX}source:{source_id}"


def exact_cache_put(
    *, key: str, result: GenerationResult, ttl_seconds: int, source_id: str = ""
) -> None:
    """Keep a finished answer; cancelled or empty answers are never cached. `source_id` names
    the answer it came from, so that `exact_cache_withdraw` can find the entry again."""
    if result.finish_reason not in ("stop", "length") or not result.text:
        return
    answer = CachedAnswer(
        text=result.text,
        completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
        token_logprobs=result.token_logprobs,
    )
    entries: dict[str, object] = {key: asdict(answer)}
    if source_id:
        entries[_exact_source_key(source_id)] = key
    cache.set_many(entries, timeout=ttl_seconds)


def exact_cache_served(*, key: str, source_id: str, ttl_seconds: int) -> None:
    """Note that the answer `source_id` was served from the entry `key`: judging that answer
    (rated down, rejected) judges the entry too."""
    if source_id:
        cache.set(_exact_source_key(source_id), key, timeout=ttl_seconds)


def exact_cache_withdraw(*, source_id: str) -> bool:
    """Remove the entry that the answer `source_id` came from or was served from. Returns
    whether there was one."""
    if not source_id:
        return False
    index = _exact_source_key(source_id)
    key = cache.get(index)
    cache.delete_many([index, *([key] if isinstance(key, str) else [])])
    return isinstance(key, str)


# -- Semantic cache (pgvector) ---------------------------------------------------------------
# Embeddings put "How do I enable X?" and "How do I disable X?" very close together, so a hit
# also has to pass the word-level check of `question_match.meaning_differs`.

# Entries within the threshold that are weighed against each other (by the guard, then by
# standing); more than a handful of near-identical questions is rare.
SEMANTIC_CANDIDATES = 10


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
        .order_by("distance")[:SEMANTIC_CANDIDATES]
    )
    # Of the entries near enough that ask the same thing, a reviewed answer beats a rated one,
    # which beats an unrated one; the nearest wins among equals (candidates come nearest first).
    best = None
    for entry in candidates:
        if meaning_differs(text, entry.prompt):
            continue
        if best is None or entry.standing > best.standing:
            best = entry
    if best is None:
        return SemanticLookup(None, None, vector)
    answer = CachedAnswer(
        text=best.answer,
        completion_tokens=best.completion_tokens,
        finish_reason=best.finish_reason,
        token_logprobs=[],
    )
    return SemanticLookup(answer, 1 - float(best.distance), vector)  # type: ignore[attr-defined]


def semantic_cache_store(
    *,
    version_id: int,
    namespace: str,
    prompt: str,
    vector: list[float],
    result: GenerationResult,
    ttl_seconds: int,
    source_id: str = "",
) -> None:
    """Keep a finished answer to a single-turn question; `source_id` names the answer in the
    app that stored it, for `semantic_cache_entry_promote` / `_withdraw`."""
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
        source_id=source_id,
        expires_at=timezone.now() + timedelta(seconds=ttl_seconds),
    )


def semantic_cache_entry_promote(*, source_id: str, standing: int, answer: str = "") -> int:
    """Raise the standing of the entries made from an answer (never lowers it); `answer`
    replaces their text (a reviewer's edit). Returns how many entries changed."""
    from models_admin.models import SemanticCacheEntry

    if not source_id:
        return 0
    entries = SemanticCacheEntry.objects.filter(source_id=source_id)
    changed = entries.filter(standing__lt=standing).update(standing=standing)
    if answer:
        changed = max(changed, entries.update(answer=answer))
    return changed


def semantic_cache_entry_withdraw(*, source_id: str) -> int:
    """Remove the entries made from an answer that must not be served again (rated down,
    reported, rejected by a reviewer, or held for review). Returns how many were removed."""
    from models_admin.models import SemanticCacheEntry

    if not source_id:
        return 0
    removed, _ = SemanticCacheEntry.objects.filter(source_id=source_id).delete()
    return removed
