from dataclasses import dataclass
from statistics import mean

from genai_site.config_cache import config_cached
from models_admin.models import ModelVersion, ShadowAnswer


@dataclass(frozen=True)
class ComparisonRow:
    shadow: ShadowAnswer
    question: str


@dataclass(frozen=True)
class ComparisonSummary:
    pairs: int
    primary_mean_chars: float | None
    shadow_mean_chars: float | None
    primary_mean_latency_ms: float | None
    shadow_mean_latency_ms: float | None
    shadow_failures: int


def _mean(values: list[float]) -> float | None:
    return round(mean(values), 1) if values else None


def deployment_comparison(
    *, deployment_id: int, limit: int = 50
) -> tuple[ComparisonSummary, list[ComparisonRow]]:
    """The latest primary/shadow pairs of a deployment on the same prompts, and their means."""
    shadows = list(
        ShadowAnswer.objects.filter(deployment_id=deployment_id)
        .select_related("version__model", "primary_version__model")
        .order_by("-created_at")[:limit]
    )
    done = [s for s in shadows if s.status == ShadowAnswer.Status.COMPLETE]
    summary = ComparisonSummary(
        pairs=len(done),
        primary_mean_chars=_mean([len(s.primary_answer) for s in done]),
        shadow_mean_chars=_mean([len(s.answer) for s in done]),
        primary_mean_latency_ms=_mean(
            [s.primary_latency_ms for s in done if s.primary_latency_ms is not None]
        ),
        shadow_mean_latency_ms=_mean([s.latency_ms for s in done if s.latency_ms is not None]),
        shadow_failures=sum(s.status == ShadowAnswer.Status.FAILED for s in shadows),
    )
    rows = [
        ComparisonRow(
            shadow=s,
            question=next(
                (m["content"] for m in reversed(s.messages) if m.get("role") == "user"), ""
            ),
        )
        for s in shadows
    ]
    return summary, rows


def model_version_get(*, pk: int) -> ModelVersion | None:
    """A version and its model, read once per settings generation in each process (workers ask
    for the version of every job they run)."""
    return config_cached(
        ("model_version", pk),
        lambda: ModelVersion.objects.select_related("model").filter(pk=pk).first(),
    )
