"""Pipelines for a deployment, built from its `SafetyPolicy` or from the default policy."""

from dataclasses import dataclass

from genai_site.config_cache import config_cached
from governance.models import BlockedTerm, SafetyPolicy
from governance.safety.base import Action
from governance.safety.blocklist import BlocklistFilter
from governance.safety.injection import InjectionFilter
from governance.safety.pii import PiiFilter
from governance.safety.pipeline import FilterStep, Pipeline


@dataclass(frozen=True)
class PolicySettings:
    input_pii: Action = Action.REDACT
    input_injection: Action = Action.FLAG
    input_blocklist: Action = Action.BLOCK
    output_pii: Action = Action.FLAG
    output_blocklist: Action = Action.BLOCK
    injection_threshold: float = 0.5
    phone_region: str = "US"


DEFAULT_POLICY = PolicySettings()


def safety_policy_get(*, deployment_id: int | None) -> PolicySettings:
    """The deployment's policy, or the default when it has none."""
    return config_cached(("safety_policy", deployment_id), lambda: _policy_read(deployment_id))


def _policy_read(deployment_id: int | None) -> PolicySettings:
    row = (
        SafetyPolicy.objects.filter(deployment_id=deployment_id).first()
        if deployment_id is not None
        else None
    )
    if row is None:
        return DEFAULT_POLICY
    return PolicySettings(
        input_pii=Action(row.input_pii),
        input_injection=Action(row.input_injection),
        input_blocklist=Action(row.input_blocklist),
        output_pii=Action(row.output_pii),
        output_blocklist=Action(row.output_blocklist),
        injection_threshold=row.injection_threshold,
        phone_region=row.phone_region,
    )


def _blocked_terms() -> list[str]:
    return config_cached(
        ("blocked_terms",), lambda: list(BlockedTerm.objects.values_list("term", flat=True))
    )


def input_pipeline(policy: PolicySettings, *, terms: list[str]) -> Pipeline:
    return Pipeline(
        [
            FilterStep(PiiFilter(phone_region=policy.phone_region), policy.input_pii),
            FilterStep(
                InjectionFilter(threshold=policy.injection_threshold), policy.input_injection
            ),
            FilterStep(BlocklistFilter(terms=terms), policy.input_blocklist),
        ]
    )


def output_pipeline(policy: PolicySettings, *, terms: list[str]) -> Pipeline:
    return Pipeline(
        [
            FilterStep(PiiFilter(phone_region=policy.phone_region), policy.output_pii),
            FilterStep(BlocklistFilter(terms=terms), policy.output_blocklist),
        ]
    )


def safety_input_pipeline(*, deployment_id: int | None) -> Pipeline:
    return input_pipeline(safety_policy_get(deployment_id=deployment_id), terms=_blocked_terms())


def safety_output_pipeline(*, deployment_id: int | None) -> Pipeline:
    return output_pipeline(safety_policy_get(deployment_id=deployment_id), terms=_blocked_terms())
