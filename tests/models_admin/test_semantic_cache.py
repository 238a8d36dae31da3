"""The semantic cache's store and lookup on real PostgreSQL + pgvector and the real embedder."""

from datetime import timedelta

import pytest
from django.utils import timezone

from models_admin.caches import meaning_differs, semantic_cache_lookup, semantic_cache_store
from models_admin.engine import GenerationResult
from models_admin.models import SemanticCacheEntry

pytestmark = [pytest.mark.django_db(transaction=True)]

ANSWER = GenerationResult(
    text="Mars and Venus.",
    prompt_tokens=10,
    completion_tokens=4,
    finish_reason="stop",
    time_to_first_token_s=0.1,
    tokens_per_second=10,
)


def _store(version_id: int, namespace: str = "", question: str = "Name two planets.") -> None:
    found = semantic_cache_lookup(
        version_id=version_id, namespace=namespace, prompt=question, threshold=0.9
    )
    semantic_cache_store(
        version_id=version_id,
        namespace=namespace,
        prompt=question,
        vector=found.vector,
        result=ANSWER,
        ttl_seconds=60,
    )


def test_a_paraphrase_hits_within_its_version_and_namespace_only(model_artifact) -> None:  # type: ignore[no-untyped-def]
    from models_admin.importing import model_version_register

    one = model_version_register(
        model_name="m", version="1", artifact=model_artifact, source="t", alias="a1"
    )
    two = model_version_register(
        model_name="m", version="2", artifact=model_artifact, source="t", alias="a2"
    )
    _store(one.pk)
    question = "Could you name two planets, please?"
    hit = semantic_cache_lookup(version_id=one.pk, namespace="", prompt=question, threshold=0.8)
    assert hit.answer is not None and hit.answer.text == "Mars and Venus."
    assert hit.similarity is not None and hit.similarity >= 0.8
    for version_id, namespace in [(two.pk, ""), (one.pk, "kb:7")]:
        miss = semantic_cache_lookup(
            version_id=version_id, namespace=namespace, prompt=question, threshold=0.8
        )
        assert miss.answer is None


def test_expired_entries_and_distant_questions_are_not_served(model_artifact) -> None:  # type: ignore[no-untyped-def]
    from models_admin.importing import model_version_register

    version = model_version_register(
        model_name="m", version="1", artifact=model_artifact, source="t", alias="a1"
    )
    _store(version.pk)
    far = semantic_cache_lookup(
        version_id=version.pk, namespace="", prompt="Bake a lemon cake.", threshold=0.8
    )
    assert far.answer is None
    SemanticCacheEntry.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    expired = semantic_cache_lookup(
        version_id=version.pk, namespace="", prompt="Name two planets.", threshold=0.8
    )
    assert expired.answer is None


@pytest.mark.parametrize(
    ("a", "b", "differs"),
    [
        ("How do I enable dark mode?", "How do I disable dark mode?", True),
        ("Convert 5 miles to km", "Convert 50 miles to km", True),
        ("Can I share files?", "Can't I share files?", True),
        ("Name two planets.", "Please name two planets", False),
        ("What is the capital of France?", "What is the capital of Spain?", True),
        ("How do I convert a PDF to Word?", "How do I convert Word to a PDF?", True),
        ("How do I pin a message?", "How do I unpin a message?", True),
        (
            "What programming languages should I learn?",
            "Which programming languages to learn for data science?",
            True,
        ),
        (
            "How long does rice keep in the fridge?",
            "How long does rice keep in the refrigerator?",
            False,
        ),
        (
            "How do I get reimbursed for travel?",
            "What's the process for travel reimbursement?",
            False,
        ),
        ("What does APR mean?", "Can you explain what APR means?", False),
    ],
)
def test_the_guard_tells_opposite_meanings_numbers_and_swapped_words_apart(
    a: str, b: str, differs: bool
) -> None:
    assert meaning_differs(a, b) is differs
