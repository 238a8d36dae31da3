from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join

from models_admin.breaker import breaker_reset, breaker_state
from models_admin.comparison import version_outcomes
from models_admin.evaluation import evaluation_start
from models_admin.models import (
    Deployment,
    DeploymentFallback,
    EvaluationCase,
    Model,
    ModelVersion,
    TierRule,
)
from models_admin.registry import (
    RegistryError,
    deployment_promote_canary,
    deployment_rollback,
    version_stage_set,
)
from models_admin.selectors import deployment_comparison


def _actor(request: HttpRequest) -> User | None:
    return request.user if isinstance(request.user, User) else None


def _each(
    request: HttpRequest,
    queryset: QuerySet[Any],
    change: Callable[[Any], object],
    done: str,
) -> None:
    """Apply a registry service to each selected row, reporting refusals by row."""
    for obj in queryset:
        try:
            change(obj)
        except RegistryError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, done.format(obj=obj))


class ModelVersionInline(admin.TabularInline):
    model = ModelVersion
    fk_name = "model"
    extra = 0
    fields = ("version", "stage", "backend", "artifact_path", "sha256")
    readonly_fields = fields
    show_change_link = True
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = ("name", "created_at")
    search_fields = ("name",)
    inlines = [ModelVersionInline]


def _breaker(version: ModelVersion | None) -> str:
    if version is None:
        return "-"
    return breaker_state(version_id=version.pk).describe(version.breaker_cooldown_s)


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = (
        "__str__",
        "stage",
        "backend",
        "evaluation_status",
        "circuit_breaker",
        "context_window",
        "price_per_1k_input_tokens",
        "price_per_1k_output_tokens",
        "created_at",
    )
    list_filter = ("stage", "backend", "evaluation_status", "model")
    list_select_related = ("model",)
    readonly_fields = (
        "stage",
        "artifact_path",
        "sha256",
        "source",
        "registered_by",
        "created_at",
        "evaluation_status",
        "evaluation",
        "circuit_breaker",
    )
    raw_id_fields = ("parent",)
    formfield_overrides = {models.URLField: {"assume_scheme": "http"}}
    fieldsets = (
        (None, {"fields": ("model", "version", "stage", "backend", "system_prompt")}),
        ("Artifact", {"fields": ("artifact_path", "sha256", "source", "context_window")}),
        ("Remote server", {"fields": ("base_url", "remote_model", "api_key_env")}),
        (
            "Generation and prices",
            {
                "fields": (
                    "max_output_tokens",
                    "temperature",
                    "top_p",
                    "price_per_1k_input_tokens",
                    "price_per_1k_output_tokens",
                )
            },
        ),
        (
            "Lineage",
            {
                "fields": (
                    "base_model",
                    "parent",
                    "training_data",
                    "training_params",
                    "registered_by",
                    "created_at",
                )
            },
        ),
        (
            "Resilience",
            {
                "fields": (
                    "first_token_timeout_s",
                    "total_timeout_s",
                    "max_retries",
                    "retry_backoff_s",
                    "breaker_failures",
                    "breaker_cooldown_s",
                    "circuit_breaker",
                )
            },
        ),
        ("Evaluation gate", {"fields": ("evaluation_status", "evaluation")}),
    )
    actions = [
        "run_evaluation",
        "to_staging",
        "to_production",
        "to_production_overriding_evaluation",
        "archive",
        "reset_circuit_breaker",
    ]

    @admin.display(description="circuit breaker")
    def circuit_breaker(self, obj: ModelVersion) -> str:
        return _breaker(obj)

    @admin.display(description="evaluation report")
    def evaluation(self, obj: ModelVersion) -> str:
        report = obj.evaluation_report or {}
        if not report:
            return "-"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (r["case"], r["expect"], "pass" if r["passed"] else "FAIL", r["answer"][:300])
                for r in report.get("cases", [])
            ),
        )
        return format_html(
            "<p>{} of {} passed, {}{}</p><table><tr><th>case</th><th>expects</th>"
            "<th>result</th><th>answer</th></tr>{}</table>",
            report.get("passed", 0),
            report.get("total", 0),
            report.get("ran_at", ""),
            f"; error: {report['error']}" if report.get("error") else "",
            rows,
        )

    def save_model(self, request: HttpRequest, obj: ModelVersion, form: Any, change: bool) -> None:
        if not change:
            obj.registered_by = _actor(request)
            # New versions start as drafts; stages change through the audited actions.
            obj.stage = ModelVersion.Stage.DRAFT
        super().save_model(request, obj, form, change)

    def _stage(
        self, request: HttpRequest, queryset: QuerySet[ModelVersion], stage: str, **kw: Any
    ) -> None:
        _each(
            request,
            queryset,
            lambda v: version_stage_set(version_id=v.pk, stage=stage, actor=_actor(request), **kw),
            "{obj} is now " + stage + ".",
        )

    @admin.action(description="Run the evaluation gate")
    def run_evaluation(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        for version in queryset:
            evaluation_start(version_id=version.pk, actor=_actor(request))
        messages.success(request, f"Evaluation queued for {queryset.count()} version(s).")

    @admin.action(description="Move to staging")
    def to_staging(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        self._stage(request, queryset, ModelVersion.Stage.STAGING)

    @admin.action(description="Promote to production (needs a passed evaluation)")
    def to_production(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        self._stage(request, queryset, ModelVersion.Stage.PRODUCTION)

    @admin.action(description="Promote to production, overriding the evaluation (audited)")
    def to_production_overriding_evaluation(
        self, request: HttpRequest, queryset: QuerySet[ModelVersion]
    ) -> None:
        self._stage(request, queryset, ModelVersion.Stage.PRODUCTION, override_evaluation=True)

    @admin.action(description="Archive (cannot serve)")
    def archive(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        self._stage(request, queryset, ModelVersion.Stage.ARCHIVED)

    @admin.action(description="Reset the circuit breaker")
    def reset_circuit_breaker(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        for version in queryset:
            breaker_reset(version_id=version.pk)
            self.log_change(request, version, "Reset its circuit breaker.")
        messages.success(request, "Circuit breakers reset.")


class DeploymentForm(forms.ModelForm):
    class Meta:
        model = Deployment
        fields = (
            "alias",
            "primary_version",
            "canary_version",
            "canary_weight",
            "shadow_version",
            "queue",
            "is_active",
            "hedge_after_ms",
            "exact_cache_enabled",
            "cache_ttl_seconds",
            "semantic_cache_enabled",
            "semantic_threshold",
        )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        for role in ("primary_version", "canary_version", "shadow_version"):
            version = data.get(role)
            if version is not None and not version.can_serve:
                self.add_error(role, ValidationError(f"{version} is archived and cannot serve."))
        return data


class FallbackInline(admin.TabularInline):
    model = DeploymentFallback
    extra = 0
    fields = ("position", "version")


class TierRuleInline(admin.TabularInline):
    model = TierRule
    fk_name = "deployment"
    extra = 0
    fields = (
        "position",
        "min_prompt_chars",
        "max_prompt_chars",
        "uses_retrieval",
        "user_choice",
        "target",
    )


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    form = DeploymentForm
    list_display = (
        "alias",
        "primary_version",
        "canary",
        "shadow_version",
        "queue",
        "is_active",
        "primary_breaker",
        "compare",
        "updated_at",
    )
    list_select_related = (
        "primary_version__model",
        "canary_version__model",
        "shadow_version__model",
    )
    readonly_fields = ("previous_primary", "circuit_breakers")
    inlines = [FallbackInline, TierRuleInline]
    actions = ["promote_canary", "roll_back"]

    @admin.display(description="canary")
    def canary(self, obj: Deployment) -> str:
        if obj.canary_version is None:
            return "-"
        return f"{obj.canary_version} ({obj.canary_weight}%)"

    @admin.display(description="primary's breaker")
    def primary_breaker(self, obj: Deployment) -> str:
        return _breaker(obj.primary_version)

    @admin.display(description="circuit breakers")
    def circuit_breakers(self, obj: Deployment) -> str:
        if obj.pk is None:
            return "-"
        versions = [obj.primary_version, obj.canary_version, obj.shadow_version]
        versions += [f.version for f in obj.fallbacks.select_related("version__model")]
        return format_html_join(
            "", "<div>{}: {}</div>", ((str(v), _breaker(v)) for v in versions if v is not None)
        )

    @admin.display(description="comparison")
    def compare(self, obj: Deployment) -> str:
        url = reverse("admin:models_admin_deployment_compare", args=[obj.pk])
        return format_html('<a href="{}">side by side</a>', url)

    @admin.action(description="Promote the canary to primary")
    def promote_canary(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        _each(
            request,
            queryset,
            lambda d: deployment_promote_canary(deployment_id=d.pk, actor=_actor(request)),
            "{obj}: canary promoted.",
        )

    @admin.action(description="Roll back to the previous primary")
    def roll_back(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        _each(
            request,
            queryset,
            lambda d: deployment_rollback(deployment_id=d.pk, actor=_actor(request)),
            "{obj}: rolled back.",
        )

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<int:deployment_id>/compare/",
                self.admin_site.admin_view(self.compare_view),
                name="models_admin_deployment_compare",
            ),
            *super().get_urls(),
        ]

    def compare_view(self, request: HttpRequest, deployment_id: int) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        deployment = get_object_or_404(Deployment, pk=deployment_id)
        context = {
            **self.admin_site.each_context(request),
            "title": f"{deployment.alias}: primary and shadow side by side",
            "opts": self.model._meta,
            "deployment": deployment,
            "comparison": deployment_comparison(deployment_id=deployment.pk),
            "per_version": _per_version(deployment),
        }
        return TemplateResponse(request, "admin/models_admin/deployment/compare.html", context)


def _per_version(deployment: Deployment) -> dict[str, object]:
    """The deployment's versions (primary, canary, shadow) with their answers' outcomes."""
    roles = [
        ("primary", deployment.primary_version),
        ("canary", deployment.canary_version),
        ("shadow", deployment.shadow_version),
    ]
    present = [(role, v) for role, v in roles if v is not None]
    outcomes = version_outcomes([v.pk for _, v in present])
    labels: list[str] = []
    for figures in outcomes.values():
        labels.extend(label for label in figures if label not in labels)
    return {
        "columns": [f"{role}: {v}" for role, v in present],
        "rows": [(label, [outcomes[v.pk].get(label, "-") for _, v in present]) for label in labels],
    }


@admin.register(EvaluationCase)
class EvaluationCaseAdmin(admin.ModelAdmin):
    list_display = ("name", "expect", "expected_text", "is_active")
    list_filter = ("expect", "is_active")
