"""Chat's side of human review: which answers go to the queue, how a reviewer sees a message,
and applying a reviewer's decision to the message and the user's page.

The queue, the policies and the audit are governance's; this module gives them the facts of
an answer and receives `review_decided` for targets of type "message".
"""

from functools import partial
from typing import Any

from django.db import transaction
from django.db.models import Avg, Count
from django.db.models.functions import Length

from chat import live
from chat.knowledge.retrieval import Passage
from chat.models import Feedback, KnowledgeBase, Message
from chat.reply_cache import answer_cache_promote, answer_cache_withdraw
from governance.models import ReviewItem, ReviewPolicy, SafetyHold
from governance.review_policies import (
    AnswerFacts,
    PolicyMatch,
    review_policy_for_event,
    review_policy_match,
    review_policy_may_hold,
)
from governance.review_queue import review_item_create, review_item_queue_answer
from governance.review_targets import ReviewContext
from models_admin.models import Deployment

TARGET = "message"


def _facts(
    *,
    deployment_id: int | None,
    model_version_id: int | None,
    mean_logprob: float | None,
    passages: list[Passage],
    canary: bool | None,
) -> AnswerFacts:
    kb_ids = sorted({p.knowledge_base_id for p in passages})
    sensitive = (
        list(
            KnowledgeBase.objects.filter(pk__in=kb_ids, sensitive=True).values_list("pk", flat=True)
        )
        if kb_ids
        else []
    )
    return AnswerFacts(
        deployment_id=deployment_id,
        model_version_id=model_version_id,
        mean_logprob=mean_logprob,
        knowledge_base_ids=kb_ids,
        sensitive_knowledge_base_ids=sensitive,
        canary=canary,
    )


def answer_review_may_hold(
    *,
    deployment_id: int | None,
    model_version_id: int | None,
    passages: list[Passage],
    canary: bool | None = None,
) -> bool:
    """Before generation: could a policy hold this answer? Then it is not streamed."""
    facts = _facts(
        deployment_id=deployment_id,
        model_version_id=model_version_id,
        mean_logprob=None,
        passages=passages,
        canary=canary,
    )
    return review_policy_may_hold(facts=facts)


def answer_review_match(
    *,
    deployment_id: int | None,
    model_version_id: int | None,
    mean_logprob: float | None,
    passages: list[Passage],
    canary: bool | None = None,
) -> PolicyMatch | None:
    """After generation: does a review policy hold (or sample) this finished answer?"""
    facts = _facts(
        deployment_id=deployment_id,
        model_version_id=model_version_id,
        mean_logprob=mean_logprob,
        passages=passages,
        canary=canary,
    )
    return review_policy_match(facts=facts)


def answer_review_queue(
    *,
    answer: Message,
    text: str,
    deployment_id: int | None,
    match: PolicyMatch | None,
    safety_hold: SafetyHold | None,
    passages: list[Passage],
    mean_logprob: float | None,
) -> ReviewItem:
    """Queue a held (or sampled) answer; call inside the transaction that settles it."""
    return review_item_queue_answer(
        match=match,
        safety_hold=safety_hold,
        target_type=TARGET,
        target_id=answer.pk,
        text=text,
        user_id=answer.conversation.user_id,
        deployment_id=deployment_id,
        model_version_id=answer.model_version_id,
        knowledge_base_ids=sorted({p.knowledge_base_id for p in passages}),
        mean_logprob=mean_logprob,
    )


def answer_report_queue(*, answer: Message, comment: str) -> ReviewItem:
    """A user's report on a delivered answer goes to the queue (reviewed after delivery)."""
    deployment_id = (
        Deployment.objects.filter(alias=answer.conversation.model_alias)
        .values_list("pk", flat=True)
        .first()
    )
    policy = review_policy_for_event(
        kind=ReviewPolicy.Kind.USER_REPORT, deployment_id=deployment_id
    )
    return review_item_create(
        policy=policy,
        reason=f"reported by the user{': ' + comment[:200] if comment else ''}",
        target_type=TARGET,
        target_id=answer.pk,
        original_text=answer.content,
        user_id=answer.conversation.user_id,
        deployment_id=deployment_id,
        model_version_id=answer.model_version_id,
        knowledge_base_ids=sorted(
            {kb for kb in answer.citations.values_list("chunk__knowledge_base_id", flat=True) if kb}
        ),
        delivered=True,
    )


class MessageReviewTarget:
    """Renders an answer for the reviewer: the conversation before it, its passages, its text."""

    def render_context(self, item: ReviewItem) -> ReviewContext:
        answer = (
            Message.objects.select_related("conversation__user")
            .prefetch_related("citations")
            .filter(pk=int(item.target_id))
            .first()
        )
        if answer is None:
            return ReviewContext(text=item.original_text)
        history = [
            (m.role, m.content)
            for m in Message.objects.filter(
                conversation_id=answer.conversation_id, id__lt=answer.pk
            ).exclude(status__in=[Message.Status.REFUSED, Message.Status.BLOCKED])
        ]
        passages = [(f"[{c.number}] {c.document_name}", c.text) for c in answer.citations.all()]
        return ReviewContext(
            history=history,
            passages=passages,
            text=item.original_text,
            owner=answer.conversation.user,
            extra={"conversation_id": answer.conversation_id},
        )


def review_decision_apply(sender: object, item: ReviewItem, **kwargs: Any) -> None:
    """Receiver of `review_decided`: the message shows the decision, and the page gets it live."""
    if item.target_type != TARGET:
        return
    message = (
        Message.objects.select_for_update()
        .filter(pk=int(item.target_id), role=Message.Role.ASSISTANT)
        .first()
    )
    if message is None:
        return
    Status = ReviewItem.Status
    if item.status == Status.REJECTED:
        answer_cache_withdraw(answer_id=message.pk)
    elif item.status in (Status.APPROVED, Status.EDITED):
        answer_cache_promote(
            answer_id=message.pk,
            reviewed=True,
            text=item.final_text if item.status == Status.EDITED else "",
        )
    if item.status == Status.REJECTED:
        message.status = Message.Status.BLOCKED
        message.content = ""
        message.error = item.user_message
    elif item.status == Status.EDITED:
        message.status = Message.Status.COMPLETE
        message.content = item.final_text
        message.error = "Edited by a reviewer."
    elif item.status == Status.RELEASED:
        message.status = Message.Status.COMPLETE
        message.error = item.user_message or "Released without review: the time limit passed."
    elif message.status == Message.Status.HELD:
        message.status = Message.Status.COMPLETE
        message.error = ""
    else:
        return  # an approved sample or report: the user already has this text
    message.save(update_fields=["status", "content", "error"])
    transaction.on_commit(partial(live.live_message_changed, message.conversation_id, message.pk))


def version_outcomes(version_ids: list[int]) -> dict[int, dict[str, object]]:
    """Per version: its delivered chat answers, their length and first-token time, thumbs, and
    review outcomes (for the deployment comparison page in models_admin)."""
    out: dict[int, dict[str, object]] = {
        pk: {
            "answers": 0,
            "mean answer length (characters)": "-",
            "mean time to first token (ms)": "-",
            "thumbs up": 0,
            "thumbs down": 0,
            "held for review": 0,
            "approved": 0,
            "edited": 0,
            "rejected": 0,
        }
        for pk in version_ids
    }
    answers = (
        Message.objects.filter(
            role=Message.Role.ASSISTANT,
            model_version_id__in=version_ids,
            status__in=[Message.Status.COMPLETE, Message.Status.HELD, Message.Status.BLOCKED],
        )
        .values("model_version_id")
        .annotate(n=Count("id"), chars=Avg(Length("content")), ttft=Avg("time_to_first_token_ms"))
    )
    for row in answers:
        figures = out[row["model_version_id"]]
        figures["answers"] = row["n"]
        figures["mean answer length (characters)"] = round(row["chars"] or 0)
        if row["ttft"] is not None:
            figures["mean time to first token (ms)"] = round(row["ttft"])
    ratings = (
        Feedback.objects.filter(message__model_version_id__in=version_ids, rating__in=[1, -1])
        .values("message__model_version_id", "rating")
        .annotate(n=Count("id"))
    )
    for row in ratings:
        label = "thumbs up" if row["rating"] == 1 else "thumbs down"
        out[row["message__model_version_id"]][label] = row["n"]
    items = (
        ReviewItem.objects.filter(target_type=TARGET, model_version_id__in=version_ids)
        .values("model_version_id", "status", "delivered")
        .annotate(n=Count("id"))
    )
    labels = {
        ReviewItem.Status.APPROVED: "approved",
        ReviewItem.Status.EDITED: "edited",
        ReviewItem.Status.REJECTED: "rejected",
    }
    counts: dict[tuple[int, str], int] = {}
    for row in items:
        keys = [labels[row["status"]]] if row["status"] in labels else []
        if not row["delivered"]:
            keys.append("held for review")
        for key in keys:
            slot = (row["model_version_id"], key)
            counts[slot] = counts.get(slot, 0) + row["n"]
    for (pk, key), n in counts.items():
        out[pk][key] = n
    return out
