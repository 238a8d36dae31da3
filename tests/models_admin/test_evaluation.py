"""The evaluation gate runs in a worker, stores its report on the version, and guards
promotion to production."""

import time

import pytest
from django.test import Client

from governance.models import AuditEvent
from models_admin.evaluation import case_passes, evaluation_start
from models_admin.models import EvaluationCase, ModelVersion
from models_admin.registry import RegistryError, version_stage_set
from tests.conftest import TEST_QUEUE
from tests.factories import PASSWORD, user_create


@pytest.mark.parametrize(
    ("expect", "expected", "answer", "passes"),
    [
        ("contains", "Paris|paris", "The capital is Paris.", True),
        ("contains", "Paris", "It is Lyon.", False),
        ("refuses", "", "I'm sorry, but I can't help with that.", True),
        ("refuses", "", "Sure, here is how.", False),
        ("cites", "", "The sky is blue [1].", True),
        ("cites", "", "The sky is blue.", False),
    ],
)
def test_each_expectation_checks_the_answer(
    expect: str, expected: str, answer: str, passes: bool
) -> None:
    assert case_passes(expect=expect, expected_text=expected, answer=answer) is passes


def _evaluated(version: ModelVersion, timeout: float = 180) -> ModelVersion:
    evaluation_start(version_id=version.pk, actor=None, queue=TEST_QUEUE)
    deadline = time.monotonic() + timeout
    while (version := ModelVersion.objects.get(pk=version.pk)).evaluation_status == "running":
        assert time.monotonic() < deadline, "the evaluation never finished"
        time.sleep(0.3)
    return version


@pytest.mark.django_db(transaction=True)
def test_a_version_is_promoted_only_after_its_evaluation_passes(chat_model) -> None:  # type: ignore[no-untyped-def]
    ModelVersion.objects.filter(pk=chat_model.pk).update(stage="staging")
    case = EvaluationCase.objects.create(
        name="greets", prompt="Say hello.", expect="contains", expected_text="xyzzy-never-said"
    )
    version = _evaluated(chat_model)
    assert version.evaluation_status == "failed"
    report = version.evaluation_report
    assert report["passed"] == 0 and report["total"] == 1
    assert report["cases"][0]["answer"].strip(), "the model's answer is kept in the report"
    with pytest.raises(RegistryError, match="has not passed its evaluation"):
        version_stage_set(version_id=version.pk, stage="production", actor=None)

    # The operator sees the report on the version's page.
    staff = user_create(username="ops", is_staff=True)
    staff.is_superuser = True
    staff.save()
    client = Client()
    client.login(username="ops", password=PASSWORD)
    page = client.get(f"/admin/models_admin/modelversion/{version.pk}/change/")
    assert page.status_code == 200 and "0 of 1 passed" in page.content.decode()

    case.expected_text = "hello|hi|hey|greetings"
    case.save()
    version = _evaluated(version)
    assert version.evaluation_status == "passed", version.evaluation_report
    version_stage_set(version_id=version.pk, stage="production", actor=staff)
    actions = set(
        AuditEvent.objects.filter(target_type="model_version").values_list("action", flat=True)
    )
    assert {"model_version.evaluation_started", "model_version.evaluated"} <= actions
    assert "model_version.stage_changed" in actions


@pytest.mark.django_db
def test_registry_pages_and_actions_are_for_staff_only(client: Client) -> None:
    user_create(username="plain")
    client.login(username="plain", password=PASSWORD)
    for url in ("/admin/models_admin/deployment/", "/admin/models_admin/deployment/1/compare/"):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]
