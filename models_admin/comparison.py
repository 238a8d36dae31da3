"""Outcomes of each version's live answers, for the deployment comparison page.

What users and reviewers made of an answer (feedback, review decisions) is recorded by other
apps, which models_admin does not import. Such an app registers a provider at start-up; the
comparison page asks every provider about the versions it compares.
"""

from collections.abc import Callable

# version ids -> {version id: {label: value}}; labels are shown as row names, in order.
OutcomeProvider = Callable[[list[int]], dict[int, dict[str, object]]]

_providers: dict[str, OutcomeProvider] = {}


def version_outcomes_register(name: str, provider: OutcomeProvider) -> None:
    _providers[name] = provider


def version_outcomes(version_ids: list[int]) -> dict[int, dict[str, object]]:
    """Every registered provider's figures per version, merged."""
    merged: dict[int, dict[str, object]] = {pk: {} for pk in version_ids}
    for provider in _providers.values():
        for pk, figures in provider(version_ids).items():
            merged.setdefault(pk, {}).update(figures)
    return merged
