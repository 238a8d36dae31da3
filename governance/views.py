"""A user's own API keys: list, create (the secret is shown once), revoke."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from governance.api_keys import api_key_create, api_key_revoke
from governance.audit import request_client_ip
from governance.forms import ApiKeyCreateForm
from governance.models import ApiKey


class AuthenticatedHttpRequest(HttpRequest):
    user: User


def _page(request: AuthenticatedHttpRequest, form: ApiKeyCreateForm, raw: str = "") -> HttpResponse:
    keys = ApiKey.objects.filter(user=request.user).select_related("usage_limit")
    return render(
        request,
        "governance/api_keys.html",
        {"keys": keys, "form": form, "raw": raw, "now": timezone.now()},
    )


@login_required
@require_http_methods(["GET", "POST"])
def api_keys(request: AuthenticatedHttpRequest) -> HttpResponse:
    if request.method == "GET":
        return _page(request, ApiKeyCreateForm())
    form = ApiKeyCreateForm(request.POST)
    if not form.is_valid():
        return _page(request, form)
    try:
        _, raw = api_key_create(
            user=request.user,
            name=form.cleaned_data["name"],
            scopes=form.cleaned_data["scopes"],
            expires_at=form.expiry(timezone.now()),
            requests_per_minute=form.cleaned_data["requests_per_minute"],
            tokens_per_day=form.cleaned_data["tokens_per_day"],
            actor=request.user,
            ip=request_client_ip(request),
        )
    except ValidationError as exc:
        form.add_error(None, exc)
        return _page(request, form)
    # Rendered, not redirected: the secret exists only in this response.
    return _page(request, ApiKeyCreateForm(), raw=raw)


@login_required
@require_POST
def api_key_revoke_view(request: AuthenticatedHttpRequest, api_key_id: int) -> HttpResponse:
    # Only the owner, here: operators revoke other people's keys in the admin.
    if not ApiKey.objects.filter(pk=api_key_id, user=request.user).exists():
        raise Http404("No such API key.")
    api_key = api_key_revoke(
        api_key_id=api_key_id, actor=request.user, ip=request_client_ip(request)
    )
    messages.success(request, f"Revoked {api_key}.")
    return redirect("governance:api_keys")
