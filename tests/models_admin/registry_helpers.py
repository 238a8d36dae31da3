"""Versions and deployments for routing tests, made through the registry's own services."""

from decimal import Decimal
from typing import Any

from models_admin.importing import ImportedArtifact, model_version_register
from models_admin.models import Deployment, ModelVersion


def version_create(
    artifact: ImportedArtifact | None = None, *, name: str = "m", version: str = "v1", **fields: Any
) -> ModelVersion:
    """A version registered as the import does. Without an artifact it names one that does not
    exist: enough for routing, which never loads it."""
    artifact = artifact or ImportedArtifact(
        artifact_path=f"{name}/{version}", sha256="f" * 64, context_window=2048
    )
    registered = model_version_register(
        model_name=name, version=version, artifact=artifact, source="tests", alias=None
    )
    fields.setdefault("price_per_1k_input_tokens", Decimal(0))
    ModelVersion.objects.filter(pk=registered.pk).update(**fields)
    registered.refresh_from_db()
    return registered


def remote_version_create(*, base_url: str, version: str, **fields: Any) -> ModelVersion:
    from models_admin.models import Model

    model, _ = Model.objects.get_or_create(name="remote")
    return ModelVersion.objects.create(
        model=model,
        version=version,
        backend=ModelVersion.Backend.OPENAI_COMPATIBLE,
        base_url=base_url,
        **fields,
    )


def deployment_create(*, alias: str, primary: ModelVersion, **fields: Any) -> Deployment:
    return Deployment.objects.create(alias=alias, primary_version=primary, **fields)
