"""Where a request goes: alias -> deployment (tier rules) -> version (canary by weight, sticky
per conversation) -> the ordered targets to try (that version, then the fallback chain)."""

import hashlib
from dataclasses import dataclass

from genai_site.config_cache import config_cached
from models_admin.models import Deployment, ModelVersion, TierRule


class DeploymentUnavailable(Exception):
    """No servable version behind an alias; the message says what an operator must fix."""


@dataclass(frozen=True)
class Route:
    deployment: Deployment
    version: ModelVersion
    canary: bool = False


def _deployment_get(alias: str) -> Deployment:
    deployment = config_cached(
        ("deployment", alias),
        lambda: (
            Deployment.objects.select_related(
                "primary_version__model", "canary_version__model", "shadow_version__model"
            )
            .filter(alias=alias)
            .first()
        ),
    )
    if deployment is None:
        raise DeploymentUnavailable(f"No deployment named '{alias}' exists.")
    if not deployment.is_active:
        raise DeploymentUnavailable(f"The deployment '{alias}' is switched off.")
    return deployment


def deployment_resolve(*, alias: str) -> Deployment:
    deployment = _deployment_get(alias)
    if not deployment.primary_version.can_serve and not any(
        v.can_serve for v in deployment_fallback_versions(deployment=deployment)
    ):
        raise DeploymentUnavailable(f"The version behind '{alias}' is archived.")
    return deployment


def canary_bucket(*, deployment_id: int, sticky_key: int | str) -> int:
    """0-99, fixed for a sticky key (a conversation's id; for the API, the key and its end
    user): the same conversation always lands on the same side."""
    digest = hashlib.sha256(f"{deployment_id}:{sticky_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def _tier_target(
    deployment: Deployment, *, prompt_chars: int, uses_retrieval: bool, user_choice: str
) -> Deployment:
    rules = config_cached(
        ("tier_rules", deployment.pk),
        lambda: list(TierRule.objects.filter(deployment=deployment).select_related("target")),
    )
    for rule in rules:
        if rule.min_prompt_chars is not None and prompt_chars < rule.min_prompt_chars:
            continue
        if rule.max_prompt_chars is not None and prompt_chars > rule.max_prompt_chars:
            continue
        if rule.uses_retrieval is not None and rule.uses_retrieval != uses_retrieval:
            continue
        if rule.user_choice and rule.user_choice != user_choice:
            continue
        if rule.target.is_active:
            return _deployment_get(rule.target.alias)
    return deployment


def deployment_tier_choices(*, alias: str) -> list[str]:
    """The tiers users of this deployment may choose: its rules' `user_choice` values."""
    return sorted(
        set(
            TierRule.objects.filter(deployment__alias=alias)
            .exclude(user_choice="")
            .values_list("user_choice", flat=True)
        )
    )


def route_choose(
    *,
    alias: str,
    sticky_key: int | str,
    prompt_chars: int = 0,
    uses_retrieval: bool = False,
    user_choice: str = "",
) -> Route:
    """The deployment and version that answer a request: a conversation's turn (`sticky_key`
    its id) or an API call."""
    deployment = _tier_target(
        deployment_resolve(alias=alias),
        prompt_chars=prompt_chars,
        uses_retrieval=uses_retrieval,
        user_choice=user_choice,
    )
    canary = deployment.canary_version
    if (
        canary is not None
        and canary.can_serve
        and canary_bucket(deployment_id=deployment.pk, sticky_key=sticky_key)
        < deployment.canary_weight
    ):
        return Route(deployment=deployment, version=canary, canary=True)
    primary = deployment.primary_version
    if not primary.can_serve:
        fallback = next(
            (v for v in deployment_fallback_versions(deployment=deployment) if v.can_serve), None
        )
        if fallback is None:
            raise DeploymentUnavailable(f"The version behind '{deployment.alias}' is archived.")
        return Route(deployment=deployment, version=fallback)
    return Route(deployment=deployment, version=primary)


def deployment_fallback_versions(*, deployment: Deployment) -> list[ModelVersion]:
    return config_cached(
        ("fallback_versions", deployment.pk),
        lambda: [
            f.version
            for f in deployment.fallbacks.select_related("version__model").order_by(
                "position", "id"
            )
        ],
    )


def route_targets(*, deployment: Deployment, version: ModelVersion) -> list[ModelVersion]:
    """What to try for a turn routed to `version`: it, then the fallback chain (each once).

    Archived versions stay in the list so that the resilience layer reports them as skipped.
    """
    targets = [version]
    for fallback in deployment_fallback_versions(deployment=deployment):
        if fallback.pk not in {t.pk for t in targets}:
            targets.append(fallback)
    return targets
