from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from chat import privacy, selectors, services
from chat.rendering import MessageView
from governance.audit import request_client_ip
from governance.budgets import budget_meters
from models_admin.routing import deployment_tier_choices


class AuthenticatedHttpRequest(HttpRequest):
    user: User  # login_required guarantees it


@login_required
@require_GET
def index(request: AuthenticatedHttpRequest) -> HttpResponse:
    conversations = selectors.conversation_list(user=request.user)[:100]
    return render(
        request,
        "chat/index.html",
        {"conversations": conversations, "meters": budget_meters(user=request.user)},
    )


@login_required
@require_POST
def conversation_new(request: AuthenticatedHttpRequest) -> HttpResponse:
    conversation = services.conversation_create(user=request.user)
    return redirect("chat:conversation", conversation_id=conversation.pk)


@login_required
@require_GET
def conversation_detail(request: AuthenticatedHttpRequest, conversation_id: int) -> HttpResponse:
    conversation = selectors.conversation_get(user=request.user, conversation_id=conversation_id)
    services.conversation_reap_stale_turns(conversation_id=conversation.pk)
    messages = [
        MessageView.of(m) for m in selectors.conversation_messages(conversation=conversation)
    ]
    return render(
        request,
        "chat/conversation.html",
        {
            "conversation": conversation,
            "messages": messages,
            "knowledge_bases": selectors.knowledge_bases_for_user(user=request.user),
            "chosen_knowledge_bases": set(
                conversation.knowledge_bases.values_list("pk", flat=True)
            ),
            "tiers": deployment_tier_choices(alias=conversation.model_alias),
            "conversations": selectors.conversation_list(user=request.user)[:100],
            "meters": budget_meters(user=request.user),
        },
    )


@login_required
@require_GET
def citation_detail(request: AuthenticatedHttpRequest, citation_id: int) -> HttpResponse:
    """The passage an answer cited, inside its document when the user may still read it."""
    citation = selectors.citation_get_for_user(user=request.user, citation_id=citation_id)
    document = citation.document
    if (
        document is not None
        and not selectors.knowledge_bases_for_user(user=request.user)
        .filter(pk=document.knowledge_base_id)
        .exists()
    ):
        document = None
    before = after = ""
    chunk = citation.chunk
    if document is not None and chunk is not None:
        before = document.text[: chunk.start_char]
        after = document.text[chunk.end_char :]
    return render(
        request,
        "chat/citation.html",
        {"citation": citation, "document": document, "before": before, "after": after},
    )


@login_required
def settings_page(request: AuthenticatedHttpRequest) -> HttpResponse:
    return render(
        request,
        "chat/settings.html",
        {"conversation_count": selectors.conversation_list(user=request.user).count()},
    )


@login_required
@require_POST
def data_delete(request: AuthenticatedHttpRequest) -> HttpResponse:
    if request.POST.get("confirm") != "delete":
        return render(
            request,
            "chat/settings.html",
            {
                "conversation_count": selectors.conversation_list(user=request.user).count(),
                "error": "Type delete in the box to confirm. Nothing was deleted.",
            },
            status=400,
        )
    count = privacy.user_data_delete(user=request.user, ip=request_client_ip(request))
    messages.success(request, f"Deleted {count} conversation(s) and their messages.")
    return redirect("chat:settings")
