"""Sign-ins and sign-outs in the audit log. Django's auth views announce them only through
signals, so this is where they meet governance."""

from typing import Any

from django.contrib.auth.models import AnonymousUser, User
from django.http import HttpRequest

from governance.audit import audit_record, request_client_ip


def audit_user_logged_in(
    sender: object, request: HttpRequest | None, user: User, **kwargs: Any
) -> None:
    audit_record(
        actor=user,
        action="auth.login",
        target_type="user",
        target_id=user.pk,
        ip=request_client_ip(request),
    )


def audit_user_logged_out(
    sender: object,
    request: HttpRequest | None,
    user: User | AnonymousUser | None,
    **kwargs: Any,
) -> None:
    if user is None or not user.is_authenticated:
        return  # logging out without a session changes nothing
    audit_record(
        actor=user,
        action="auth.logout",
        target_type="user",
        target_id=user.pk,
        ip=request_client_ip(request),
    )


def audit_user_login_failed(
    sender: object,
    credentials: dict[str, Any],
    request: HttpRequest | None = None,
    **kwargs: Any,
) -> None:
    # Django has already masked the password in `credentials`; keep only the name tried.
    username = str(credentials.get("username", ""))[:150]
    audit_record(
        actor=None,
        actor_label="anonymous",
        action="auth.login_failed",
        target_type="user",
        details={"username": username},
        ip=request_client_ip(request),
    )


def audit_registry_changed(
    sender: object,
    actor: User | None,
    action: str,
    target_type: str,
    target_id: object,
    details: dict[str, Any],
    **kwargs: Any,
) -> None:
    """Stage changes, promotions, rollbacks, weights and evaluations in the model registry."""
    audit_record(
        actor=actor, action=action, target_type=target_type, target_id=target_id, details=details
    )
