from django.contrib import admin

from models_admin.models import Deployment, Model, ModelVersion


class ModelVersionInline(admin.TabularInline):
    model = ModelVersion
    extra = 0
    fields = ("version", "stage", "backend", "artifact_path", "sha256")
    readonly_fields = ("artifact_path", "sha256")
    show_change_link = True


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = ("name", "created_at")
    search_fields = ("name",)
    inlines = [ModelVersionInline]


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = (
        "__str__",
        "stage",
        "backend",
        "context_window",
        "price_per_1k_input_tokens",
        "price_per_1k_output_tokens",
        "created_at",
    )
    list_filter = ("stage", "backend", "model")
    readonly_fields = ("artifact_path", "sha256", "source", "registered_by", "created_at")
    list_select_related = ("model",)


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = (
        "alias",
        "primary_version",
        "queue",
        "is_active",
        "exact_cache_enabled",
        "updated_at",
    )
    list_select_related = ("primary_version__model",)
