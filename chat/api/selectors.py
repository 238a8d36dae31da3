"""What a key may see of the models: the active deployments (chat scope) and the embedding
model (embeddings scope), narrowed to the key's allowed models when it names any."""

from typing import Any

from django.conf import settings

from chat.api.errors import not_found
from governance.models import ApiKey
from models_admin.models import Deployment, ModelVersion


def models_for_key(*, api_key: ApiKey) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if ApiKey.Scope.CHAT in api_key.scopes:
        deployments = (
            Deployment.objects.filter(is_active=True)
            .exclude(primary_version__stage=ModelVersion.Stage.ARCHIVED)
            .order_by("alias")
        )
        found.extend(
            {
                "id": d.alias,
                "object": "model",
                "created": int(d.created_at.timestamp()),
                "owned_by": "genai-site",
            }
            for d in deployments
            if api_key.may_use(d.alias)
        )
    if ApiKey.Scope.EMBEDDINGS in api_key.scopes and api_key.may_use(settings.EMBEDDING_MODEL_ID):
        found.append(
            {
                "id": settings.EMBEDDING_MODEL_ID,
                "object": "model",
                "created": 0,
                "owned_by": "genai-site",
            }
        )
    return found


def model_get(*, api_key: ApiKey, model_id: str) -> dict[str, Any]:
    for model in models_for_key(api_key=api_key):
        if model["id"] == model_id:
            return model
    raise not_found(f"The model '{model_id}' does not exist.", code="model_not_found")
