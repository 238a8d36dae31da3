"""Changes to the registry that operators make: stages, promotion, rollback, weights.

Each change announces itself through `registry_changed` in its own transaction; governance
records it in the audit log.
"""

from typing import Any

from django.contrib.auth.models import User
from django.db import transaction

from models_admin.models import Deployment, EvaluationStatus, ModelVersion
from models_admin.signals import registry_changed


class RegistryError(Exception):
    """A change the registry refuses; the message says why, for the operator."""


# Which stage may follow which: production is reached through staging, anything may be archived,
# and an archived version only comes back as a draft.
_NEXT_STAGES: dict[str, set[str]] = {
    ModelVersion.Stage.DRAFT: {ModelVersion.Stage.STAGING, ModelVersion.Stage.ARCHIVED},
    ModelVersion.Stage.STAGING: {
        ModelVersion.Stage.PRODUCTION,
        ModelVersion.Stage.DRAFT,
        ModelVersion.Stage.ARCHIVED,
    },
    ModelVersion.Stage.PRODUCTION: {ModelVersion.Stage.STAGING, ModelVersion.Stage.ARCHIVED},
    ModelVersion.Stage.ARCHIVED: {ModelVersion.Stage.DRAFT},
}


def _announce(
    *, actor: User | None, action: str, target_type: str, target_id: object, details: dict[str, Any]
) -> None:
    registry_changed.send(
        sender=ModelVersion,
        actor=actor,
        action=action,
        target_type=target_type,
        target_id=target_id,
        details=details,
    )


def _versions_in_use(version: ModelVersion) -> list[str]:
    aliases = Deployment.objects.filter(primary_version=version).values_list("alias", flat=True)
    return list(aliases)


def version_stage_set(
    *, version_id: int, stage: str, actor: User | None, override_evaluation: bool = False
) -> ModelVersion:
    """Move a version to `stage`. Production needs a passed evaluation, unless overridden."""
    if stage not in ModelVersion.Stage.values:
        raise RegistryError(f"'{stage}' is not a stage.")
    with transaction.atomic():
        version = (
            ModelVersion.objects.select_for_update().select_related("model").get(pk=version_id)
        )
        old = version.stage
        if stage == old:
            return version
        if stage not in _NEXT_STAGES[old]:
            raise RegistryError(f"A {old} version cannot move to {stage}.")
        overridden = False
        if stage == ModelVersion.Stage.PRODUCTION and (
            version.evaluation_status != EvaluationStatus.PASSED
        ):
            if not override_evaluation:
                raise RegistryError(
                    f"{version} has not passed its evaluation "
                    f"({version.get_evaluation_status_display()}); run it, or override."
                )
            overridden = True
        if stage == ModelVersion.Stage.ARCHIVED and (aliases := _versions_in_use(version)):
            raise RegistryError(
                f"{version} is the primary of {', '.join(aliases)}; promote another first."
            )
        version.stage = stage
        version.save(update_fields=["stage"])
        _announce(
            actor=actor,
            action="model_version.stage_changed",
            target_type="model_version",
            target_id=version.pk,
            details={
                "version": str(version),
                "from": old,
                "to": stage,
                **({"evaluation_overridden": True} if overridden else {}),
            },
        )
    return version


def _servable(version: ModelVersion, role: str) -> None:
    if not version.can_serve:
        raise RegistryError(f"{version} is archived and cannot be the {role}.")


def deployment_canary_set(
    *, deployment_id: int, version_id: int | None, weight: int, actor: User | None
) -> Deployment:
    if not 0 <= weight <= 100:
        raise RegistryError("The canary weight is a percentage (0-100).")
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment_id)
        version = None
        if version_id is not None:
            version = ModelVersion.objects.get(pk=version_id)
            _servable(version, "canary")
        before = {"canary": deployment.canary_version_id, "weight": deployment.canary_weight}
        deployment.canary_version = version
        deployment.canary_weight = weight if version is not None else 0
        deployment.save(update_fields=["canary_version", "canary_weight", "updated_at"])
        _announce(
            actor=actor,
            action="deployment.canary_set",
            target_type="deployment",
            target_id=deployment.pk,
            details={
                "alias": deployment.alias,
                "before": before,
                "after": {"canary": version_id, "weight": deployment.canary_weight},
            },
        )
    return deployment


def deployment_promote_canary(*, deployment_id: int, actor: User | None) -> Deployment:
    """The canary becomes the primary; the old primary is kept for a rollback."""
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment_id)
        canary = deployment.canary_version
        if canary is None:
            raise RegistryError(f"'{deployment.alias}' has no canary to promote.")
        _servable(canary, "primary")
        old = deployment.primary_version_id
        deployment.previous_primary_id = old
        deployment.primary_version = canary
        deployment.canary_version = None
        deployment.canary_weight = 0
        deployment.save()
        _announce(
            actor=actor,
            action="deployment.canary_promoted",
            target_type="deployment",
            target_id=deployment.pk,
            details={"alias": deployment.alias, "from": old, "to": canary.pk},
        )
    return deployment


def deployment_rollback(*, deployment_id: int, actor: User | None) -> Deployment:
    """Back to the primary before the last promotion; the demoted one becomes the canary at 0%."""
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment_id)
        previous = deployment.previous_primary
        if previous is None:
            raise RegistryError(f"'{deployment.alias}' has nothing to roll back to.")
        _servable(previous, "primary")
        demoted = deployment.primary_version_id
        deployment.primary_version = previous
        deployment.previous_primary = None
        deployment.canary_version_id = demoted
        deployment.canary_weight = 0
        deployment.save()
        _announce(
            actor=actor,
            action="deployment.rolled_back",
            target_type="deployment",
            target_id=deployment.pk,
            details={"alias": deployment.alias, "from": demoted, "to": previous.pk},
        )
    return deployment
