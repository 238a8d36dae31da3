"""The reviewer's screens at /review/: the queue, claim next, one item, decisions.

Only members of the Reviewers group (or superusers) get in; everyone else gets 403. Whose
conversation it is shows only with `governance.view_review_identity`.
"""

import datetime as dt
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from governance.models import ReviewItem, ReviewPolicy
from governance.review_queue import (
    Decision,
    ReviewError,
    review_item_claim_next,
    review_item_decide,
    review_item_release,
    review_item_renew,
    review_queue_counts,
    review_queue_items,
    reviewer_check,
)
from governance.review_targets import review_target_get
from models_admin.models import ModelVersion

IDENTITY_PERMISSION = "governance.view_review_identity"


class ReviewerRequest(HttpRequest):
    user: User


def reviewer_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @login_required
    @wraps(view)
    def wrapped(request: ReviewerRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not reviewer_check(request.user):
            raise PermissionDenied("Only reviewers may open the review queue.")
        return view(request, *args, **kwargs)

    return wrapped


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _kinds_with_counts() -> list[tuple[str, str, int]]:
    counts = review_queue_counts()
    return [(kind, label, counts.get(kind, 0)) for kind, label in ReviewPolicy.Kind.choices]


def _neighbour_url(item: ReviewItem, *, after: bool) -> str:
    """The next (or previous) pending item in queue order, for j / k."""
    pending = ReviewItem.objects.filter(status=ReviewItem.Status.PENDING)
    if after:
        found = pending.filter(
            Q(created_at__gt=item.created_at) | Q(created_at=item.created_at, id__gt=item.pk)
        ).order_by("created_at", "id")
    else:
        found = pending.filter(
            Q(created_at__lt=item.created_at) | Q(created_at=item.created_at, id__lt=item.pk)
        ).order_by("-created_at", "-id")
    pk = found.values_list("pk", flat=True).first()
    return reverse("review:item", args=[pk]) if pk else ""


def _age_class(item: ReviewItem, now: dt.datetime) -> str:
    limit = (item.due_at - item.created_at).total_seconds() or 1
    share = (now - item.created_at).total_seconds() / limit
    return "age-overdue" if share >= 1 else "age-late" if share >= 0.5 else "age-ok"


@reviewer_required
@require_GET
def queue(request: ReviewerRequest) -> HttpResponse:
    now = timezone.now()
    kind = request.GET.get("kind") or None
    model_version_id = _int(request.GET.get("model"))
    knowledge_base_id = _int(request.GET.get("kb"))
    older_than_minutes = _int(request.GET.get("age"))
    items = list(
        review_queue_items(
            kind=kind,
            model_version_id=model_version_id,
            knowledge_base_id=knowledge_base_id,
            older_than_minutes=older_than_minutes,
        )[:200]
    )
    filters = {
        "kind": kind,
        "model_version_id": model_version_id,
        "knowledge_base_id": knowledge_base_id,
        "older_than_minutes": older_than_minutes,
    }
    rows = [
        {
            "item": item,
            "age_minutes": int((now - item.created_at).total_seconds() // 60),
            "age_class": _age_class(item, now),
            "claimed": item.claimed_by_id is not None
            and item.lease_expires_at is not None
            and item.lease_expires_at > now,
        }
        for item in items
    ]
    return render(
        request,
        "chat/review/queue.html",
        {
            "rows": rows,
            "kinds": _kinds_with_counts(),
            "versions": ModelVersion.objects.select_related("model").order_by("-created_at")[:50],
            "filters": filters,
        },
    )


@reviewer_required
@require_POST
def claim_next(request: ReviewerRequest) -> HttpResponse:
    item = review_item_claim_next(reviewer=request.user, kind=request.POST.get("kind") or None)
    if item is None:
        return render(
            request,
            "chat/review/queue.html",
            {
                "rows": [],
                "kinds": _kinds_with_counts(),
                "message": "Nothing is waiting for review.",
                "filters": {},
            },
        )
    return redirect("review:item", item_id=item.pk)


def _item_page(
    request: ReviewerRequest, item: ReviewItem, *, error: str = "", status: int = 200
) -> HttpResponse:
    context = review_target_get(item.target_type).render_context(item)
    now = timezone.now()
    mine = (
        item.status == ReviewItem.Status.PENDING
        and item.claimed_by_id == request.user.pk
        and item.lease_expires_at is not None
        and item.lease_expires_at > now
    )
    return render(
        request,
        "chat/review/item.html",
        {
            "item": item,
            "ctx": context,
            "mine": mine,
            "show_identity": request.user.has_perm(IDENTITY_PERMISSION),
            "error": error,
            "age_class": _age_class(item, now),
            "next_url": _neighbour_url(item, after=True),
            "previous_url": _neighbour_url(item, after=False),
        },
        status=status,
    )


def _item_get(item_id: int) -> ReviewItem:
    item = ReviewItem.objects.select_related("policy", "model_version", "claimed_by").filter(
        pk=item_id
    )
    found = item.first()
    if found is None:
        raise Http404("No such review item.")
    return found


@reviewer_required
@require_GET
def item_detail(request: ReviewerRequest, item_id: int) -> HttpResponse:
    return _item_page(request, _item_get(item_id))


@reviewer_required
@require_POST
def item_decide(request: ReviewerRequest, item_id: int) -> HttpResponse:
    decision = Decision(
        action=request.POST.get("action", ""),
        text=request.POST.get("text", ""),
        reason=request.POST.get("reason", ""),
        user_message=request.POST.get("user_message", ""),
    )
    try:
        review_item_decide(item_id=item_id, reviewer=request.user, decision=decision)
    except ReviewError as exc:
        return _item_page(request, _item_get(item_id), error=str(exc), status=400)
    following = review_item_claim_next(reviewer=request.user)
    if following is None:
        return redirect("review:queue")
    return redirect("review:item", item_id=following.pk)


@reviewer_required
@require_POST
def item_renew(request: ReviewerRequest, item_id: int) -> HttpResponse:
    try:
        review_item_renew(item_id=item_id, reviewer=request.user)
    except ReviewError as exc:
        return _item_page(request, _item_get(item_id), error=str(exc), status=400)
    return redirect("review:item", item_id=item_id)


@reviewer_required
@require_POST
def item_release(request: ReviewerRequest, item_id: int) -> HttpResponse:
    try:
        review_item_release(item_id=item_id, reviewer=request.user)
    except ReviewError as exc:
        return _item_page(request, _item_get(item_id), error=str(exc), status=400)
    return redirect("review:queue")
