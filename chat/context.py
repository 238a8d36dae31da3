"""The model's view of a conversation: system prompt, retrieved passages and the recent turns
that fit."""

from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Q

from chat.knowledge.retrieval import Passage, passages_search
from chat.models import KnowledgeBase, Message
from chat.selectors import knowledge_bases_for_user
from models_admin.backends import Tokenizing
from models_admin.models import ModelVersion

# Per-message framing the chat template adds (<|im_start|>role\n ... <|im_end|>\n).
_TEMPLATE_OVERHEAD_TOKENS = 5
# Passages may take at most this share of the prompt; the rest is for the conversation.
_PASSAGE_SHARE = 0.6

# Refused questions and failed answers are not part of what the model sees.
_USABLE = Q(role=Message.Role.USER, status=Message.Status.SENT) | Q(
    role=Message.Role.ASSISTANT, status__in=[Message.Status.COMPLETE, Message.Status.STOPPED]
)

GROUNDING_INSTRUCTIONS = (
    "Answer using only the numbered passages below. After each statement, cite the passage "
    "it comes from as [1], [2] and so on. If the passages do not contain the answer, say so."
)
NO_MATCH_ANSWER = (
    "I found nothing relevant to this question in the knowledge bases this conversation uses "
    "({names}), so I cannot answer it from them."
)


@dataclass(frozen=True)
class BuiltContext:
    prompt_ids: list[int]
    # The passages in the prompt, in citation order: passages[0] is [1].
    passages: list[Passage] = field(default_factory=list)
    # Set when the conversation uses knowledge bases and none holds anything relevant: this is
    # the answer, and the model is not asked (it would have nothing to cite).
    no_match_answer: str | None = None
    # The same prompt as chat messages, for servers that take messages rather than token ids.
    messages: list[dict[str, str]] = field(default_factory=list)


def context_build(*, answer: Message, version: ModelVersion, engine: Tokenizing) -> list[int]:
    """Token ids for `answer`'s prompt: system prompt, then as many recent turns as fit."""
    return _prompt(answer=answer, version=version, engine=engine, system=version.system_prompt)[0]


def context_build_grounded(
    *, answer: Message, version: ModelVersion, engine: Tokenizing
) -> BuiltContext:
    """The prompt with passages from the conversation's knowledge bases (those its owner may
    still use), numbered for citation, fitted next to the conversation history."""
    bases = list(
        knowledge_bases_for_user(user=answer.conversation.user).filter(
            conversations=answer.conversation_id
        )
    )
    if not bases or answer.reply_to is None:
        ids, messages = _prompt(
            answer=answer, version=version, engine=engine, system=version.system_prompt
        )
        return BuiltContext(ids, messages=messages)
    found = passages_search(
        query=answer.reply_to.content,
        knowledge_base_ids=[kb.pk for kb in bases],
        limit=settings.KNOWLEDGE_PASSAGES_PER_ANSWER,
        min_similarity=settings.KNOWLEDGE_MIN_SIMILARITY,
    )
    if not found:
        return BuiltContext([], [], NO_MATCH_ANSWER.format(names=_names(bases)))
    limit = version.context_window - version.max_output_tokens
    budget = int(limit * _PASSAGE_SHARE)
    budget -= engine.count_tokens(version.system_prompt + GROUNDING_INSTRUCTIONS)
    budget -= engine.count_tokens(answer.reply_to.content) + 2 * _TEMPLATE_OVERHEAD_TOKENS
    picked: list[Passage] = []
    blocks: list[str] = []
    for passage in found:
        block = f"[{len(picked) + 1}] (from {passage.document_name}) {passage.text}"
        cost = engine.count_tokens(block) + 2
        if cost > budget:
            continue
        picked.append(passage)
        blocks.append(block)
        budget -= cost
    if not picked:
        return BuiltContext([], [], NO_MATCH_ANSWER.format(names=_names(bases)))
    system = "\n\n".join(
        part for part in (version.system_prompt, GROUNDING_INSTRUCTIONS, *blocks) if part
    )
    ids, messages = _prompt(answer=answer, version=version, engine=engine, system=system)
    return BuiltContext(ids, picked, messages=messages)


def _names(bases: list[KnowledgeBase]) -> str:
    return ", ".join(kb.name for kb in bases)


def _prompt(
    *, answer: Message, version: ModelVersion, engine: Tokenizing, system: str
) -> tuple[list[int], list[dict[str, str]]]:
    history = (
        Message.objects.filter(_USABLE, conversation_id=answer.conversation_id, id__lt=answer.id)
        .order_by("-created_at", "-id")
        .values_list("role", "content")
    )
    limit = version.context_window - version.max_output_tokens
    budget = limit - engine.count_tokens(system) - _TEMPLATE_OVERHEAD_TOKENS
    picked: list[dict[str, str]] = []
    for role, content in history:
        cost = engine.count_tokens(content) + _TEMPLATE_OVERHEAD_TOKENS
        if cost > budget and picked:
            break
        picked.append({"role": role, "content": content})
        budget -= cost
    messages = [{"role": "system", "content": system}, *reversed(picked)]
    ids = engine.encode_chat(messages)
    # A single message longer than the window: keep its end, where the question usually is.
    return (ids[-limit:] if len(ids) > limit else ids), messages
