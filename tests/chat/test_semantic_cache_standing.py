"""Which cached answer the semantic cache serves: reviewed before rated up before unrated, and
never one rated down, reported or rejected. Real PostgreSQL + pgvector and the real embedder;
feedback and review decisions go through the services the product uses."""

import pytest

from chat.feedback import feedback_submit
from chat.models import Message
from chat.services import conversation_create
from governance.models import ReviewPolicy
from governance.review_queue import (
    Decision,
    review_item_claim_next,
    review_item_create,
    review_item_decide,
)
from models_admin.caches import semantic_cache_lookup, semantic_cache_store
from models_admin.engine import GenerationResult
from models_admin.models import ModelVersion, SemanticCacheEntry
from tests.factories import user_create
from tests.governance.review_helpers import reviewer_create, version_create

pytestmark = [pytest.mark.django_db(transaction=True)]

QUESTION = "Name two planets of the solar system."
PARAPHRASE = "Please name two planets of the solar system!"


def _cached_answer(owner, version: ModelVersion, question: str, text: str) -> Message:  # type: ignore[no-untyped-def]
    """A delivered answer to `question`, kept in the semantic cache as the worker keeps it."""
    conversation = conversation_create(user=owner)
    asked = Message.objects.create(
        conversation=conversation, role="user", status="sent", content=question
    )
    answer = Message.objects.create(
        conversation=conversation,
        role="assistant",
        status="complete",
        content=text,
        reply_to=asked,
        model_version=version,
    )
    vector = semantic_cache_lookup(
        version_id=version.pk, namespace="", prompt=question, threshold=0.99
    ).vector
    semantic_cache_store(
        version_id=version.pk,
        namespace="",
        prompt=question,
        vector=vector,
        result=GenerationResult(
            text=text,
            prompt_tokens=5,
            completion_tokens=3,
            finish_reason="stop",
            time_to_first_token_s=0.1,
            tokens_per_second=10,
        ),
        ttl_seconds=600,
        source_id=str(answer.pk),
    )
    return answer


def _served(version: ModelVersion) -> str | None:
    found = semantic_cache_lookup(
        version_id=version.pk, namespace="", prompt=QUESTION, threshold=0.9
    )
    return found.answer.text if found.answer is not None else None


def _decide(answer: Message, decision: Decision) -> None:
    policy, _ = ReviewPolicy.objects.get_or_create(name="reports", kind="user_report")
    review_item_create(
        policy=policy,
        reason="sampled",
        target_type="message",
        target_id=answer.pk,
        original_text=answer.content,
        user_id=answer.conversation.user_id,
        model_version_id=answer.model_version_id,
        delivered=True,
    )
    reviewer = reviewer_create("rita")
    item = review_item_claim_next(reviewer=reviewer)
    assert item is not None
    review_item_decide(item_id=item.pk, reviewer=reviewer, decision=decision)


@pytest.fixture
def two_answers() -> tuple[ModelVersion, object, Message, Message]:
    """The same question answered twice: `nearest` was asked in the very words of QUESTION."""
    version = version_create()
    owner = user_create()
    nearest = _cached_answer(owner, version, QUESTION, "Mars and Venus.")
    further = _cached_answer(owner, version, PARAPHRASE, "Earth and Jupiter.")
    assert _served(version) == "Mars and Venus."
    return version, owner, nearest, further


def test_a_thumbs_up_answer_is_served_before_a_nearer_unrated_one(two_answers) -> None:  # type: ignore[no-untyped-def]
    version, owner, _, further = two_answers
    feedback_submit(user=owner, message_id=further.pk, rating=1)
    assert _served(version) == "Earth and Jupiter."


def test_a_reviewers_edit_beats_a_thumbs_up_and_is_served_as_edited(two_answers) -> None:  # type: ignore[no-untyped-def]
    version, owner, nearest, further = two_answers
    feedback_submit(user=owner, message_id=nearest.pk, rating=1)
    _decide(further, Decision(action="edit", text="Earth and Saturn."))
    assert _served(version) == "Earth and Saturn."
    entry = SemanticCacheEntry.objects.get(source_id=str(further.pk))
    assert entry.standing == SemanticCacheEntry.Standing.REVIEWED


def test_an_approved_answer_is_served_before_a_nearer_unrated_one(two_answers) -> None:  # type: ignore[no-untyped-def]
    version, _, _, further = two_answers
    _decide(further, Decision(action="approve"))
    assert _served(version) == "Earth and Jupiter."


@pytest.mark.parametrize("verdict", ["thumbs down", "report", "rejection"])
def test_a_thumbs_down_a_report_or_a_rejection_removes_the_answer_from_the_cache(
    two_answers, verdict: str
) -> None:  # type: ignore[no-untyped-def]
    version, owner, nearest, further = two_answers
    # Even an answer rated up before is withdrawn by a later verdict against it.
    feedback_submit(user=owner, message_id=nearest.pk, rating=1)
    if verdict == "thumbs down":
        feedback_submit(user=owner, message_id=nearest.pk, rating=-1)
    elif verdict == "report":
        feedback_submit(user=owner, message_id=nearest.pk, rating=0, report=True)
    else:
        _decide(nearest, Decision(action="reject", reason="wrong", user_message="Withdrawn."))
    assert not SemanticCacheEntry.objects.filter(source_id=str(nearest.pk)).exists()
    assert _served(version) == "Earth and Jupiter."
    assert SemanticCacheEntry.objects.filter(source_id=str(further.pk)).exists()
