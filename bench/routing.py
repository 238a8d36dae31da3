"""What routing and resilience add to each turn, before any model runs.

Measures, against the real PostgreSQL and Redis:
- `route_choose` for a deployment with a canary, a tier rule and a fallback (the submit side);
- `route_targets` (the worker's fallback chain lookup);
- the circuit breaker's calls on the worker path, once per served target: `breaker_allow` (one
  Lua script in Redis), and `breaker_record_success` only when the breaker had a failure
  counted (for the healthy model here, never), as `models_admin.resilience` calls them.

    python -m genai_site.launcher run -- \
        sh -c "python manage.py migrate -v0 && python bench/routing.py"
"""

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402

from bench.machine import machine_describe  # noqa: E402
from models_admin.breaker import (  # noqa: E402
    Pass,
    breaker_allow,
    breaker_record_success,
    breaker_reset,
)
from models_admin.models import (  # noqa: E402
    Deployment,
    DeploymentFallback,
    Model,
    ModelVersion,
    TierRule,
)
from models_admin.routing import route_choose, route_targets  # noqa: E402

CALLS = int(os.environ.get("BENCH_CALLS", "2000"))
RESULTS = BASE_DIR / "bench" / "results" / "routing-cpu-2core.md"


def _version(model: Model, name: str) -> ModelVersion:
    version, _ = ModelVersion.objects.get_or_create(
        model=model, version=name, defaults={"artifact_path": f"bench/{name}", "sha256": "f" * 64}
    )
    return version


def setup() -> Deployment:
    model, _ = Model.objects.get_or_create(name="bench-routing")
    primary, canary, fallback, large = (
        _version(model, n) for n in ("primary", "canary", "fallback", "large")
    )
    Deployment.objects.filter(alias__startswith="bench-routing").delete()
    big = Deployment.objects.create(alias="bench-routing-large", primary_version=large)
    deployment = Deployment.objects.create(
        alias="bench-routing",
        primary_version=primary,
        canary_version=canary,
        canary_weight=20,
    )
    DeploymentFallback.objects.create(deployment=deployment, version=fallback)
    TierRule.objects.create(deployment=deployment, target=big, min_prompt_chars=4000)
    return deployment


def timed(call: Callable[[int], object]) -> list[float]:
    for i in range(50):  # warm connections and caches
        call(i)
    samples = []
    for i in range(CALLS):
        started = time.perf_counter()
        call(i)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def main() -> None:
    settings.CIRCUIT_BREAKER_KEY_PREFIX = f"genai:breaker:bench-{os.getpid()}"
    deployment = setup()
    primary = deployment.primary_version
    breaker_reset(version_id=primary.pk)

    def breaker(i: int) -> None:
        if breaker_allow(version_id=primary.pk, cooldown_s=30) != Pass.CLEAN:
            breaker_record_success(version_id=primary.pk)

    rows = [
        ("route_choose (tier rule, canary 20%)", timed(
            lambda i: route_choose(alias="bench-routing", sticky_key=i, prompt_chars=200)
        )),
        ("route_targets (one fallback)", timed(
            lambda i: route_targets(deployment=deployment, version=primary)
        )),
        ("breaker allow (Redis; a success recorded only after a failure)", timed(breaker)),
    ]  # fmt: skip
    lines = [
        f"# Routing and resilience overhead per turn ({CALLS} calls each)",
        "",
        f"Machine: {machine_describe()}. Shared with other work while it ran.",
        "",
        "| step | median ms | p95 ms | p99 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, samples in rows:
        q = statistics.quantiles(samples, n=100)
        lines.append(f"| {name} | {statistics.median(samples):.3f} | {q[94]:.3f} | {q[98]:.3f} |")
    breaker_reset(version_id=primary.pk)
    Deployment.objects.filter(alias__startswith="bench-routing").delete()
    ModelVersion.objects.filter(model__name="bench-routing").delete()
    Model.objects.filter(name="bench-routing").delete()
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
