"""Chat turns as people make them: submit, stop, retry. Consumers and views call only these."""

import logging
from dataclasses import dataclass
from functools import partial

from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from chat import live
from chat.models import Conversation, KnowledgeBase, Message
from chat.selectors import conversation_get, knowledge_bases_for_user, message_get_for_user
from chat.text import text_unstorable_reason
from genai_site.config_cache import config_snapshot
from governance.admission import Held, Refusal, turn_admit, turn_screen
from governance.audit import audit_record
from governance.budgets import budget_release
from models_admin.models import Deployment, ModelVersion
from models_admin.routing import (
    DeploymentUnavailable,
    Route,
    deployment_tier_choices,
    route_choose,
)

logger = logging.getLogger(__name__)

# The chat template and tokenizer live in the worker; at admission a turn's prompt is estimated
# from its characters (English runs about 4 per token; 3 keeps the estimate on the safe side).
_CHARS_PER_TOKEN_ESTIMATE = 3


class TurnRejected(Exception):
    """The request cannot be carried out; the message is for the user and says why."""


@dataclass(frozen=True)
class TurnOutcome:
    question: Message
    answer: Message | None
    refusal: str | None = None


def stop_key(message_id: int) -> str:
    return f"genai:chat:stop:{message_id}"


def lease_key(message_id: int) -> str:
    return f"genai:chat:lease:{message_id}"


@transaction.atomic
def conversation_create(*, user: User, title: str = "") -> Conversation:
    conversation = Conversation.objects.create(
        user=user, title=title[:200], model_alias=settings.CHAT_DEFAULT_ALIAS
    )
    audit_record(
        actor=user,
        action="conversation.created",
        target_type="conversation",
        target_id=conversation.pk,
    )
    return conversation


def _validated_text(text: object) -> str:
    if not isinstance(text, str) or not text.strip():
        raise TurnRejected("Type a message before sending.")
    text = text.strip()
    reason = text_unstorable_reason(text)
    if reason is not None:
        raise TurnRejected(f"Your message could not be sent: it {reason}.")
    limit = settings.CHAT_MAX_MESSAGE_CHARS
    if len(text) > limit:
        raise TurnRejected(
            f"Your message is {len(text):,} characters long; the limit is {limit:,}."
        )
    return text


def _estimate_reservation(
    *, conversation: Conversation, text: str, version: ModelVersion
) -> tuple[int, int]:
    """(prompt tokens, at most; answer tokens, at most) for the turn."""
    history_chars = sum(
        len(c)
        for c in conversation.messages.filter(status__in=["sent", "complete", "stopped"])
        .order_by("-id")
        .values_list("content", flat=True)[:20]
    )
    prompt = (len(text) + history_chars + len(version.system_prompt)) // _CHARS_PER_TOKEN_ESTIMATE
    return (
        min(prompt, version.context_window - version.max_output_tokens),
        version.max_output_tokens,
    )


def _enqueue(answer: Message, deployment: Deployment) -> None:
    from chat.tasks import generate_reply

    generate_reply.apply_async(
        args=(answer.pk, answer.attempt, deployment.pk), queue=deployment.queue
    )


def _route(conversation: Conversation, text: str) -> Route:
    """Where the turn goes (models_admin decides: tiers, canary, archived versions)."""
    try:
        return route_choose(
            alias=conversation.model_alias,
            sticky_key=conversation.pk,
            prompt_chars=len(text),
            uses_retrieval=conversation.knowledge_bases.exists(),
            user_choice=conversation.tier,
        )
    except DeploymentUnavailable as exc:
        raise TurnRejected(f"The model is not available: {exc}") from exc


def _on_commit_notify(conversation_id: int, *message_ids: int, created: bool = False) -> None:
    for message_id in message_ids:
        transaction.on_commit(
            partial(live.live_message_changed, conversation_id, message_id, created=created)
        )


@config_snapshot()
def turn_submit(
    *, user: User, conversation_id: int, text: object, ip: str | None = None
) -> TurnOutcome:
    """Save the user's message, admit it, and enqueue the answer.

    Raises TurnRejected (nothing saved) for input that cannot be a turn. The input safety
    filters run first: what is stored and sent on is their verdict's text (personal data
    redacted where the policy says so). A safety or quota refusal saves the message as refused,
    with the reason, so the user keeps what they wrote; a held one is saved as held.
    """
    clean = _validated_text(text)
    with transaction.atomic():
        # Lock the conversation: one answer in flight per conversation, checked without races.
        conversation = conversation_get(user=user, conversation_id=conversation_id)
        conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
        if conversation.messages.filter(status__in=["pending", "streaming"]).exists():
            raise TurnRejected("Wait for the current answer to finish, or stop it first.")
        route = _route(conversation, clean)
        deployment = route.deployment
        verdict = turn_screen(text=clean, deployment_id=deployment.pk)
        question = Message.objects.create(
            conversation=conversation,
            role=Message.Role.USER,
            status=Message.Status.SENT,
            content=verdict.text,
        )
        input_tokens, output_tokens = _estimate_reservation(
            conversation=conversation, text=verdict.text, version=route.version
        )
        admission = turn_admit(
            user=user,
            input_tokens=input_tokens,
            max_output_tokens=output_tokens,
            model_version=route.version,
            target_type="message",
            target_id=question.pk,
            ip=ip,
            verdict=verdict,
            deployment_id=deployment.pk,
        )
        if not conversation.title:
            conversation.title = verdict.text[:80]
        conversation.save(update_fields=["title", "updated_at"])
        if isinstance(admission, Refusal | Held):
            question.status = Message.Status.REFUSED
            if isinstance(admission, Held):
                question.status = Message.Status.HELD
                question.safety_hold = admission.hold
            question.error = admission.reason
            question.save(update_fields=["status", "error", "safety_hold"])
            _on_commit_notify(conversation.pk, question.pk, created=True)
            return TurnOutcome(question=question, answer=None, refusal=admission.reason)
        answer = Message.objects.create(
            conversation=conversation,
            role=Message.Role.ASSISTANT,
            status=Message.Status.PENDING,
            reply_to=question,
            attempt=1,
            model_version=route.version,
            reservation=admission,
        )
        _on_commit_notify(conversation.pk, question.pk, answer.pk, created=True)
        transaction.on_commit(partial(_enqueue, answer, deployment))
    return TurnOutcome(question=question, answer=answer)


def turn_stop(*, user: User, message_id: int) -> None:
    """Ask the answer to stop. A running generation ends at its next decoding step and keeps
    its partial text; one that has not started yet is stopped here."""
    answer = message_get_for_user(user=user, message_id=message_id)
    if answer.role != Message.Role.ASSISTANT or not answer.is_active:
        raise TurnRejected("That answer is not running.")
    cache.set(stop_key(answer.pk), 1, timeout=3600)
    with transaction.atomic():
        won = Message.objects.filter(pk=answer.pk, status=Message.Status.PENDING).update(
            status=Message.Status.STOPPED, finished_at=timezone.now()
        )
        if won:
            if answer.reservation_id:
                budget_release(reservation_id=answer.reservation_id)
            _on_commit_notify(answer.conversation_id, answer.pk)
        audit_record(
            actor=user, action="turn.stop_requested", target_type="message", target_id=answer.pk
        )


def turn_retry(*, user: User, message_id: int, ip: str | None = None) -> TurnOutcome:
    """Generate a failed answer again, as a new attempt of the same message."""
    answer = message_get_for_user(user=user, message_id=message_id)
    if answer.role != Message.Role.ASSISTANT or answer.status != Message.Status.FAILED:
        raise TurnRejected("Only a failed answer can be retried.")
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().get(pk=answer.conversation_id)
        if conversation.messages.filter(status__in=["pending", "streaming"]).exists():
            raise TurnRejected("Wait for the current answer to finish, or stop it first.")
        assert answer.reply_to is not None
        route = _route(conversation, answer.reply_to.content)
        deployment = route.deployment
        input_tokens, output_tokens = _estimate_reservation(
            conversation=conversation, text=answer.reply_to.content, version=route.version
        )
        admission = turn_admit(
            user=user,
            input_tokens=input_tokens,
            max_output_tokens=output_tokens,
            model_version=route.version,
            target_type="message",
            target_id=answer.pk,
            ip=ip,
        )
        if isinstance(admission, Refusal | Held):
            raise TurnRejected(admission.reason)
        won = Message.objects.filter(pk=answer.pk, status=Message.Status.FAILED).update(
            status=Message.Status.PENDING,
            attempt=answer.attempt + 1,
            content="",
            error="",
            reservation=admission,
            model_version=route.version,
            finished_at=None,
            prompt_tokens=None,
            completion_tokens=None,
            time_to_first_token_ms=None,
            tokens_per_second=None,
        )
        if not won:
            raise TurnRejected("That answer is already being retried.")
        answer.refresh_from_db()
        cache.delete(stop_key(answer.pk))
        _on_commit_notify(conversation.pk, answer.pk)
        transaction.on_commit(partial(_enqueue, answer, deployment))
    return TurnOutcome(question=answer.reply_to, answer=answer)


def conversation_reap_stale_turns(*, conversation_id: int) -> int:
    """Mark answers whose worker vanished mid-generation (no lease heartbeat) as failed."""
    return _reap(Message.objects.filter(conversation_id=conversation_id))


def turns_reap_stale() -> int:
    """The same for every conversation (Celery beat): a page left open shows the failed turn
    and its Retry without being opened again."""
    return _reap(Message.objects.all())


def _reap(messages: QuerySet[Message]) -> int:
    streaming = dict(
        messages.filter(status=Message.Status.STREAMING).order_by().values_list("pk", "attempt")
    )
    live = cache.get_many([lease_key(pk) for pk in streaming])
    reaped = 0
    for message_id, attempt in streaming.items():
        if lease_key(message_id) not in live:
            reaped += answer_fail(
                message_id=message_id,
                attempt=attempt,
                reason="The worker stopped in the middle of this answer.",
                from_status=Message.Status.STREAMING,
            )
    return reaped


def answer_fail(*, message_id: int, attempt: int, reason: str, from_status: str) -> int:
    """Mark one attempt failed (once) and give back the quota it did not spend."""
    with transaction.atomic():
        answer = Message.objects.select_for_update().filter(pk=message_id).first()
        if answer is None or answer.attempt != attempt or answer.status != from_status:
            return 0
        answer.status = Message.Status.FAILED
        answer.error = reason
        answer.finished_at = timezone.now()
        answer.save(update_fields=["status", "error", "finished_at"])
        if answer.reservation_id:
            budget_release(reservation_id=answer.reservation_id)
        audit_record(
            actor=None,
            action="turn.failed",
            target_type="message",
            target_id=message_id,
            details={"attempt": attempt, "reason": reason},
        )
        _on_commit_notify(answer.conversation_id, answer.pk)
    return 1


def _ids(value: object) -> list[int]:
    """Knowledge base ids from a form: absent, one value, or a list of them."""
    if value is None or value == "":
        return []
    values: list[object] = value if isinstance(value, list) else [value]
    ids: set[int] = set()
    for v in values:
        try:
            if not isinstance(v, str | int):
                raise ValueError(v)
            ids.add(int(v))
        except ValueError as exc:
            raise TurnRejected("Those knowledge bases could not be read.") from exc
    return sorted(ids)


def conversation_knowledge_bases_set(
    *, user: User, conversation_id: int, knowledge_base_ids: object
) -> list[KnowledgeBase]:
    """Choose the knowledge bases a conversation searches; only those the user may use."""
    wanted = _ids(knowledge_base_ids)
    with transaction.atomic():
        conversation = conversation_get(user=user, conversation_id=conversation_id)
        allowed = list(knowledge_bases_for_user(user=user).filter(pk__in=wanted))
        if len(allowed) != len(wanted):
            raise TurnRejected("You may not use one of those knowledge bases.")
        conversation.knowledge_bases.set(allowed)
        audit_record(
            actor=user,
            action="conversation.knowledge_bases_set",
            target_type="conversation",
            target_id=conversation.pk,
            details={"knowledge_bases": [kb.pk for kb in allowed]},
        )
    return allowed


def conversation_tier_set(*, user: User, conversation_id: int, tier: object) -> str:
    """Choose the tier a conversation's turns ask for ("" for the deployment's default)."""
    chosen = tier.strip() if isinstance(tier, str) else None
    with transaction.atomic():
        conversation = conversation_get(user=user, conversation_id=conversation_id)
        if chosen is None or (
            chosen and chosen not in deployment_tier_choices(alias=conversation.model_alias)
        ):
            raise TurnRejected("That tier is not offered for the model of this conversation.")
        conversation.tier = chosen
        conversation.save(update_fields=["tier", "updated_at"])
        audit_record(
            actor=user,
            action="conversation.tier_set",
            target_type="conversation",
            target_id=conversation.pk,
            details={"tier": chosen},
        )
    return chosen
