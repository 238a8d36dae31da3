from django.apps import AppConfig


class ModelsAdminConfig(AppConfig):
    name = "models_admin"
    verbose_name = "Model registry"

    def ready(self) -> None:
        from genai_site.config_cache import config_models_watch
        from models_admin.models import (
            Deployment,
            DeploymentFallback,
            Model,
            ModelVersion,
            TierRule,
        )

        # Routing reads these on every request, from each process's cache.
        config_models_watch(Model, ModelVersion, Deployment, DeploymentFallback, TierRule)
