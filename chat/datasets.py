"""Reviewed answers and feedback as training data: JSON lines in chat format, with lineage.

Each line is one exchange: `messages` (system prompt, the turns before, the question, the final
answer as the user finally saw it) and `lineage` (model version, review policy and action,
whether a reviewer edited it and the original if so, the user's rating). Rejected answers are
left out; user identities are never written.
"""

import datetime as dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import CharField, Exists, OuterRef, Q, QuerySet
from django.db.models.functions import Cast

from chat.models import Feedback, Message
from governance.audit import audit_record
from governance.models import ReviewItem

_USABLE = (Message.Status.SENT, Message.Status.COMPLETE)


class Writer(Protocol):
    def write(self, text: str, /) -> object: ...


@dataclass(frozen=True)
class DatasetFilters:
    since: dt.date | None = None
    until: dt.date | None = None
    model_name: str | None = None
    knowledge_base_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "model": self.model_name,
            "knowledge_base": self.knowledge_base_id,
        }


def dataset_answers(
    *, filters: DatasetFilters, message_ids: Iterable[int] | None = None
) -> QuerySet[Message]:
    """Answers with an approved or edited review, or with feedback, matching the filters."""
    reviewed = ReviewItem.objects.filter(
        target_type="message",
        target_id=OuterRef("pk__str"),
        status__in=[ReviewItem.Status.APPROVED, ReviewItem.Status.EDITED],
    )
    answers = (
        Message.objects.filter(role=Message.Role.ASSISTANT, status=Message.Status.COMPLETE)
        .annotate(pk__str=_text_pk())
        .filter(Exists(reviewed) | Exists(Feedback.objects.filter(message=OuterRef("pk"))))
        .select_related("model_version__model", "reply_to")
        .order_by("created_at", "id")
    )
    if message_ids is not None:
        answers = answers.filter(pk__in=list(message_ids))
    if filters.since:
        answers = answers.filter(created_at__date__gte=filters.since)
    if filters.until:
        answers = answers.filter(created_at__date__lte=filters.until)
    if filters.model_name:
        answers = answers.filter(model_version__model__name=filters.model_name)
    if filters.knowledge_base_id:
        kb = filters.knowledge_base_id
        answers = answers.filter(
            Q(citations__chunk__knowledge_base_id=kb) | Q(citations__document__knowledge_base_id=kb)
        ).distinct()
    return answers


def _text_pk() -> Cast:
    # Review items name their target by a text id.
    return Cast("pk", output_field=CharField())


def _exchange(answer: Message) -> dict[str, Any]:
    version = answer.model_version
    history = Message.objects.filter(
        conversation_id=answer.conversation_id, id__lt=answer.pk, status__in=_USABLE
    ).order_by("created_at", "id")
    messages = [{"role": "system", "content": version.system_prompt}] if version else []
    messages += [{"role": m.role, "content": m.content} for m in history]
    messages.append({"role": "assistant", "content": answer.content})
    review = (
        ReviewItem.objects.filter(
            target_type="message",
            target_id=str(answer.pk),
            status__in=[ReviewItem.Status.APPROVED, ReviewItem.Status.EDITED],
        )
        .select_related("policy")
        .order_by("-decided_at")
        .first()
    )
    feedback = [
        {"rating": f.rating, "comment": f.comment, "reported": f.reported}
        for f in Feedback.objects.filter(message=answer).order_by("id")
    ]
    edited = review is not None and review.status == ReviewItem.Status.EDITED
    return {
        "messages": messages,
        "lineage": {
            "message_id": answer.pk,
            "created_at": answer.created_at.isoformat(),
            "model_version": str(version) if version else None,
            "model_version_sha256": version.sha256 if version else None,
            "policy": review.policy.name if review else None,
            "policy_kind": review.kind if review else None,
            "review_action": review.status if review else None,
            "edited": edited,
            "original": review.original_text if review and edited else None,
            "knowledge_base_ids": sorted(
                {
                    kb
                    for pair in answer.citations.values_list(
                        "chunk__knowledge_base_id", "document__knowledge_base_id"
                    )
                    for kb in pair
                    if kb
                }
            ),
            "feedback": feedback,
        },
    }


def dataset_lines(answers: QuerySet[Message]) -> Iterator[str]:
    for answer in answers.iterator(chunk_size=200):
        yield json.dumps(_exchange(answer), ensure_ascii=False) + "\n"


def dataset_export(
    *,
    out: Writer,
    filters: DatasetFilters,
    actor: User | None,
    message_ids: Iterable[int] | None = None,
    ip: str | None = None,
) -> int:
    """Write the dataset to `out` and audit the export; returns how many exchanges."""
    count = 0
    with transaction.atomic():
        for line in dataset_lines(dataset_answers(filters=filters, message_ids=message_ids)):
            out.write(line)
            count += 1
        audit_record(
            actor=actor,
            action="dataset.exported",
            target_type="dataset",
            details={"filters": filters.as_dict(), "exchanges": count},
            ip=ip,
        )
    return count
