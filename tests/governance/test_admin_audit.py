"""Every change an operator makes in the admin is in the audit log, in the same transaction."""

from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from django.test import Client

from governance.admission import Held, Refusal, turn_admit
from governance.audit import audit_verify
from governance.models import ApiKey, AuditEvent, QuotaReservation, UsageLimit
from models_admin.models import Model, ModelVersion
from tests.factories import user_create

pytestmark = pytest.mark.django_db(transaction=True)

LIMITS = "/admin/governance/usagelimit/"


@pytest.fixture
def operator_client() -> Client:
    operator = User.objects.create_superuser("operator", password="x")
    client = Client(REMOTE_ADDR="203.0.113.7")
    client.force_login(operator)
    return client


def _limit_form(**values: object) -> dict[str, object]:
    form: dict[str, object] = {
        "user": "",
        "group": "",
        "api_key": "",
        "requests_per_minute": "",
        "tokens_per_minute": "",
        "tokens_per_day": "",
        "tokens_per_month": "",
        "cost_per_day": "",
        "cost_per_month": "",
    }
    form.update(values)
    return form


def _admit(user: User) -> QuotaReservation | Refusal | Held:
    return turn_admit(
        user=user, input_tokens=100, max_output_tokens=50, target_type="test", target_id="x"
    )


def test_an_operators_limit_edits_are_audited_and_apply_to_the_next_request(
    operator_client: Client,
) -> None:
    user = user_create()
    response = operator_client.post(f"{LIMITS}add/", _limit_form(user=user.pk, tokens_per_day=1000))
    assert response.status_code == 302
    limit = UsageLimit.objects.get(user=user)
    added = AuditEvent.objects.get(action="admin.added")
    assert added.actor_label == "operator" and added.ip == "203.0.113.7"
    assert added.target_type == "governance.usagelimit" and added.target_id == str(limit.pk)
    assert added.details["values"]["tokens_per_day"] == 1000
    assert isinstance(_admit(user), QuotaReservation)

    response = operator_client.post(
        f"{LIMITS}{limit.pk}/change/", _limit_form(user=user.pk, tokens_per_day=200)
    )
    assert response.status_code == 302
    changed = AuditEvent.objects.get(action="admin.changed")
    assert changed.details["values"] == {"tokens_per_day": 200}
    refusal = _admit(user)
    assert isinstance(refusal, Refusal) and refusal.limit == "user.tokens_per_day"

    response = operator_client.post(f"{LIMITS}{limit.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert AuditEvent.objects.filter(action="admin.deleted", target_id=str(limit.pk)).exists()
    assert audit_verify().intact


def test_a_malformed_limit_is_refused_with_its_reason_and_nothing_is_saved_or_audited(
    operator_client: Client,
) -> None:
    user = user_create()
    cases = [
        (
            _limit_form(user=user.pk, tokens_per_day=10, tokens_per_month=5),
            "more tokens than its month",
        ),
        (_limit_form(user=user.pk, requests_per_minute=-1), "greater than or equal to 0"),
        (_limit_form(user=user.pk, cost_per_day="lots"), "Enter a number"),
    ]
    for form, reason in cases:
        response = operator_client.post(f"{LIMITS}add/", form)
        assert response.status_code == 200
        assert reason in response.content.decode()
    assert not UsageLimit.objects.filter(user=user).exists()
    assert not AuditEvent.objects.filter(action__startswith="admin.").exists()


def test_bulk_deletion_and_other_apps_models_are_audited_too(operator_client: Client) -> None:
    users = [user_create() for _ in range(3)]
    limits = [UsageLimit.objects.create(user=u, requests_per_minute=5) for u in users]
    response = operator_client.post(
        LIMITS,
        {
            "action": "delete_selected",
            "_selected_action": [lim.pk for lim in limits],
            "post": "yes",
        },
    )
    assert response.status_code == 302
    assert not UsageLimit.objects.filter(user__in=users).exists()
    assert AuditEvent.objects.filter(action="admin.deleted").count() == 3

    version = ModelVersion.objects.create(
        model=Model.objects.create(name="m"), version="1", artifact_path="x", sha256="0" * 64
    )
    page = operator_client.get(f"/admin/models_admin/modelversion/{version.pk}/change/")
    form = page.context["adminform"].form
    data = {k: ("" if v is None else v) for k, v in form.initial.items() if k in form.fields}
    data.update(
        price_per_1k_input_tokens="0.25", price_per_1k_output_tokens="1.00", model=version.model_id
    )
    response = operator_client.post(f"/admin/models_admin/modelversion/{version.pk}/change/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    event = AuditEvent.objects.get(action="admin.changed", target_type="models_admin.modelversion")
    assert Decimal(event.details["values"]["price_per_1k_input_tokens"]) == Decimal("0.25")
    version.refresh_from_db()
    assert version.price_per_1k_input_tokens == Decimal("0.25")


def test_an_api_key_added_in_the_admin_shows_its_secret_once_and_stores_no_secret(
    operator_client: Client,
) -> None:
    owner = user_create()
    response = operator_client.post(
        "/admin/governance/apikey/add/",
        {
            "user": owner.pk,
            "name": "batch",
            "scopes": "chat",
            "expires_at_0": "",
            "expires_at_1": "",
        },
        follow=True,
    )
    assert response.status_code == 200
    api_key = ApiKey.objects.get(user=owner)
    body = response.content.decode()
    assert f"gsk_{api_key.prefix}_" in body and "will not be shown again" in body
    added = AuditEvent.objects.get(action="admin.added", target_type="governance.apikey")
    assert "secret_hash" not in added.details["values"]
    assert AuditEvent.objects.filter(action="api_key.created").exists()


def test_people_without_staff_rights_cannot_edit_limits() -> None:
    client = Client()
    client.force_login(user_create())
    response = client.post(f"{LIMITS}add/", _limit_form(tokens_per_day=1))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    staff = user_create(is_staff=True)  # staff, but no permission on limits
    client.force_login(staff)
    assert client.post(f"{LIMITS}add/", _limit_form(tokens_per_day=1)).status_code == 403
    assert not AuditEvent.objects.filter(action__startswith="admin.").exists()
