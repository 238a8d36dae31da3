"""The model's view of a conversation: system prompt and the recent turns that fit."""

from django.db.models import Q

from chat.models import Message
from models_admin.engine import Engine
from models_admin.models import ModelVersion

# Per-message framing the chat template adds (<|im_start|>role\n ... <|im_end|>\n).
_TEMPLATE_OVERHEAD_TOKENS = 5

# Refused questions and failed answers are not part of what the model sees.
_USABLE = Q(role=Message.Role.USER, status=Message.Status.SENT) | Q(
    role=Message.Role.ASSISTANT, status__in=[Message.Status.COMPLETE, Message.Status.STOPPED]
)


def context_build(*, answer: Message, version: ModelVersion, engine: Engine) -> list[int]:
    """Token ids for `answer`'s prompt: system prompt, then as many recent turns as fit."""
    history = (
        Message.objects.filter(_USABLE, conversation_id=answer.conversation_id, id__lt=answer.id)
        .order_by("-created_at", "-id")
        .values_list("role", "content")
    )
    limit = version.context_window - version.max_output_tokens
    budget = limit - engine.count_tokens(version.system_prompt) - _TEMPLATE_OVERHEAD_TOKENS
    picked: list[dict[str, str]] = []
    for role, content in history:
        cost = engine.count_tokens(content) + _TEMPLATE_OVERHEAD_TOKENS
        if cost > budget and picked:
            break
        picked.append({"role": role, "content": content})
        budget -= cost
    messages = [{"role": "system", "content": version.system_prompt}, *reversed(picked)]
    ids = engine.encode_chat(messages)
    # A single message longer than the window: keep its end, where the question usually is.
    return ids[-limit:] if len(ids) > limit else ids
