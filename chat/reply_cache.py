"""The worker's use of the response caches: looked up before the engine, filled after it.

Exact cache first (deterministic requests, whole prompt, retrieved passages included), then the
semantic cache (single-turn questions without knowledge bases: with history, the same words can
ask something else). A hit is streamed to the
page at once and settles like any answer; `GenerationResult.cache` says which cache answered.
"""

import time
from dataclasses import dataclass

from chat.models import Message
from models_admin import metrics
from models_admin.backends import Tokenizing
from models_admin.caches import (
    CachedAnswer,
    exact_cache_get,
    exact_cache_key,
    exact_cache_put,
    exact_cache_served,
    exact_cache_withdraw,
    semantic_cache_entry_promote,
    semantic_cache_entry_withdraw,
    semantic_cache_lookup,
    semantic_cache_store,
)
from models_admin.engine import GenerationResult, SamplingParams
from models_admin.models import Deployment, ModelVersion, SemanticCacheEntry


@dataclass
class ReplyCache:
    deployment: Deployment | None
    version: ModelVersion
    exact_key: str | None
    question: str | None  # set when the turn may use the semantic cache
    namespace: str
    vector: list[float] | None = None
    # The answer being generated, named on its cache entries (see `answer_cache_*`).
    source_id: str = ""

    @classmethod
    def for_turn(
        cls,
        *,
        answer: Message,
        version: ModelVersion,
        deployment: Deployment | None,
        engine: Tokenizing,
        prompt_ids: list[int],
        params: SamplingParams,
    ) -> "ReplyCache":
        exact_key = None
        question = None
        namespace = ""
        if deployment is not None and deployment.exact_cache_enabled:
            exact_key = exact_cache_key(
                version_id=version.pk,
                sha256=version.sha256,
                prompt_text=str(engine.tokenizer.decode(prompt_ids)),
                params=params,
            )
        if deployment is not None and deployment.semantic_cache_enabled and answer.reply_to:
            single_turn = not Message.objects.filter(
                conversation_id=answer.conversation_id, id__lt=answer.reply_to_id
            ).exists()
            # Grounded answers cite the passages retrieved for their own turn; a reused answer
            # could cite passages this turn did not retrieve, so they are not reused by meaning.
            grounded = answer.conversation.knowledge_bases.exists()
            if single_turn and not grounded:
                question = answer.reply_to.content
        return cls(deployment, version, exact_key, question, namespace, source_id=str(answer.pk))

    @classmethod
    def for_request(
        cls,
        *,
        version: ModelVersion,
        deployment: Deployment | None,
        engine: Tokenizing,
        prompt_ids: list[int],
        params: SamplingParams,
        source_id: str = "",
    ) -> "ReplyCache":
        """For an API request: the exact cache only. Its messages are the program's own, with
        no single question whose meaning could stand for the whole request."""
        exact_key = None
        if deployment is not None and deployment.exact_cache_enabled:
            exact_key = exact_cache_key(
                version_id=version.pk,
                sha256=version.sha256,
                prompt_text=str(engine.tokenizer.decode(prompt_ids)),
                params=params,
            )
        return cls(deployment, version, exact_key, None, "", source_id=source_id)

    def _observe(self, cache: str, hit: bool) -> None:
        metrics.cache_observe(
            deployment=self.deployment.alias if self.deployment else "",
            version=str(self.version),
            cache=cache,
            hit=hit,
        )

    def lookup(self, prompt_ids: list[int]) -> tuple[GenerationResult, str] | None:
        """The cached answer and the name of the cache that had it, or None."""
        started = time.perf_counter()
        if self.exact_key is not None:
            hit = exact_cache_get(key=self.exact_key)
            self._observe("exact", hit is not None)
            if hit is not None:
                if self.deployment is not None:
                    exact_cache_served(
                        key=self.exact_key,
                        source_id=self.source_id,
                        ttl_seconds=self.deployment.cache_ttl_seconds,
                    )
                return _result(hit, "exact", prompt_ids, started), hit.text
        if self.question is not None and self.deployment is not None:
            found = semantic_cache_lookup(
                version_id=self.version.pk,
                namespace=self.namespace,
                prompt=self.question,
                threshold=self.deployment.semantic_threshold,
            )
            self.vector = found.vector
            self._observe("semantic", found.answer is not None)
            if found.answer is not None:
                return _result(found.answer, "semantic", prompt_ids, started), found.answer.text
        return None

    def store(self, result: GenerationResult) -> None:
        if self.deployment is None or result.cache:
            return
        ttl = self.deployment.cache_ttl_seconds
        if self.exact_key is not None:
            exact_cache_put(
                key=self.exact_key, result=result, ttl_seconds=ttl, source_id=self.source_id
            )
        if self.question is not None and self.vector is not None:
            semantic_cache_store(
                version_id=self.version.pk,
                namespace=self.namespace,
                prompt=self.question,
                vector=self.vector,
                result=result,
                ttl_seconds=ttl,
                source_id=self.source_id,
            )


def _result(
    hit: CachedAnswer, cache: str, prompt_ids: list[int], started: float
) -> GenerationResult:
    return GenerationResult(
        text=hit.text,
        prompt_tokens=len(prompt_ids),
        completion_tokens=hit.completion_tokens,
        finish_reason=hit.finish_reason,
        time_to_first_token_s=time.perf_counter() - started,
        tokens_per_second=0.0,
        token_logprobs=hit.token_logprobs,
        cache=cache,
    )


def answer_cache_promote(*, answer_id: int, reviewed: bool, text: str = "") -> None:
    """An answer rated up, or approved (edited: `text`) by a reviewer, is preferred over other
    cached answers to the same question."""
    semantic_cache_entry_promote(
        source_id=str(answer_id),
        standing=(
            SemanticCacheEntry.Standing.REVIEWED
            if reviewed
            else SemanticCacheEntry.Standing.RATED_UP
        ),
        answer=text,
    )


def answer_cache_withdraw(*, answer_id: int) -> None:
    """An answer rated down, reported, rejected or held is never served from the cache: the
    entries made from it go, and so does the exact entry it was itself served from."""
    semantic_cache_entry_withdraw(source_id=str(answer_id))
    exact_cache_withdraw(source_id=str(answer_id))


def job_cache_source(public_id: str) -> str:
    return f"job:{public_id}"


def job_cache_withdraw(*, public_id: str) -> None:
    """A job's answer that was held, blocked or rejected is not served from the cache."""
    exact_cache_withdraw(source_id=job_cache_source(public_id))
