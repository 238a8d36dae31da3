"""Safety policies and the blocklist in the admin: who may edit them, validation, audit."""

from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from governance.models import AuditEvent, BlockedTerm, SafetyPolicy
from governance.safety.base import Action
from governance.safety.policy import DEFAULT_POLICY, safety_policy_get
from models_admin.models import Deployment
from tests.factories import user_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("chat_model")]

ADD = "/admin/governance/safetypolicy/add/"


def _form(**overrides: Any) -> dict[str, Any]:
    deployment = Deployment.objects.get(alias="chat-default")
    return {
        "deployment": deployment.pk,
        "input_pii": "redact",
        "input_injection": "block",
        "input_blocklist": "block",
        "output_pii": "off",
        "output_blocklist": "hold",
        "injection_threshold": "0.6",
        "phone_region": "gb",
        **overrides,
    }


def _client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_without_a_policy_the_default_applies() -> None:
    deployment = Deployment.objects.get(alias="chat-default")
    assert safety_policy_get(deployment_id=deployment.pk) == DEFAULT_POLICY
    assert DEFAULT_POLICY.input_pii == Action.REDACT
    assert DEFAULT_POLICY.input_injection == Action.FLAG
    assert DEFAULT_POLICY.input_blocklist == Action.BLOCK


def test_staff_with_permission_creates_a_policy_and_it_is_audited() -> None:
    admin = user_create(username="root", is_staff=True)
    admin.is_superuser = True
    admin.save()
    response = _client_for(admin).post(ADD, _form())
    assert response.status_code == 302, response.content.decode()[:2000]

    policy = SafetyPolicy.objects.get()
    assert policy.phone_region == "GB" and policy.injection_threshold == 0.6
    settings = safety_policy_get(deployment_id=policy.deployment_id)
    assert settings.input_injection == Action.BLOCK and settings.output_blocklist == Action.HOLD
    event = AuditEvent.objects.get(action="admin.added", target_type="governance.safetypolicy")
    assert event.actor_id == admin.pk and event.target_id == str(policy.pk)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"input_injection": "redact"}, "Prompt injection cannot be redacted"),
        ({"injection_threshold": "1.5"}, "must be above 0 and at most 1"),
        ({"phone_region": "XX"}, "is not a region code"),
    ],
)
def test_the_admin_rejects_an_invalid_policy_with_a_clear_error(
    overrides: dict[str, str], error: str
) -> None:
    admin = user_create(username="root", is_staff=True)
    admin.is_superuser = True
    admin.save()
    response = _client_for(admin).post(ADD, _form(**overrides))
    assert response.status_code == 200
    assert error in response.content.decode()
    assert not SafetyPolicy.objects.exists()


def test_a_user_who_is_not_staff_cannot_open_or_edit_policies() -> None:
    user = user_create(username="mallory")
    client = _client_for(user)
    assert client.get(ADD).status_code == 302  # to the admin login
    response = client.post(ADD, _form())
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert not SafetyPolicy.objects.exists()


def test_staff_without_the_permission_cannot_edit_policies_or_terms() -> None:
    staff = user_create(username="intern", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_safetypolicy"))
    client = _client_for(staff)
    assert client.get("/admin/governance/safetypolicy/").status_code == 200
    assert client.post(ADD, _form()).status_code == 403
    assert client.post("/admin/governance/blockedterm/add/", {"term": "x"}).status_code == 403
    assert not SafetyPolicy.objects.exists() and not BlockedTerm.objects.exists()


def test_staff_with_permission_adds_and_deletes_blocked_terms_with_audit() -> None:
    staff = user_create(username="operator", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["add_blockedterm", "delete_blockedterm"])
    )
    client = _client_for(staff)
    response = client.post("/admin/governance/blockedterm/add/", {"term": "zorblax", "note": ""})
    assert response.status_code == 302
    term = BlockedTerm.objects.get()
    response = client.post(f"/admin/governance/blockedterm/{term.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not BlockedTerm.objects.exists()
    actions = list(AuditEvent.objects.order_by("id").values_list("action", flat=True))
    targets = list(AuditEvent.objects.order_by("id").values_list("target_type", flat=True))
    assert actions[-2:] == ["admin.added", "admin.deleted"]
    assert targets[-2:] == ["governance.blockedterm", "governance.blockedterm"]


def test_holds_cannot_be_added_or_changed_in_the_admin() -> None:
    admin = user_create(username="root", is_staff=True)
    admin.is_superuser = True
    admin.save()
    assert _client_for(admin).get("/admin/governance/safetyhold/add/").status_code == 403
