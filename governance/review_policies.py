"""Which review policy, if any, holds an answer: asked once per answer, after generation."""

import random
from dataclasses import dataclass, field

from genai_site.config_cache import config_cached
from governance.models import ReviewPolicy, SafetyHold

Kind = ReviewPolicy.Kind

# Kinds that a finished answer is checked against, in this order within equal priority.
# Safety holds and user reports do not come from this check: a filter or a user raises them.
_HOLDING_KINDS = (
    Kind.DEPLOYMENT_APPROVAL,
    Kind.CANARY_CHECK,
    Kind.LOW_CONFIDENCE,
    Kind.SENSITIVE_KNOWLEDGE,
)

# Used when an event needs a policy and the operator has made none of that kind.
_DEFAULT_NAMES: dict[str, str] = {
    Kind.SAFETY_HOLD: "Safety filter hold",
    Kind.USER_REPORT: "User report",
}


@dataclass(frozen=True)
class AnswerFacts:
    deployment_id: int | None
    model_version_id: int | None
    mean_logprob: float | None = None
    knowledge_base_ids: list[int] = field(default_factory=list)
    sensitive_knowledge_base_ids: list[int] = field(default_factory=list)
    # None when routing does not say whether the version was served as a canary.
    canary: bool | None = None


@dataclass(frozen=True)
class PolicyMatch:
    policy: ReviewPolicy
    reason: str
    # True for a sample: the answer goes to the user now and is reviewed after.
    deliver_now: bool = False


def _applies(policy: ReviewPolicy, facts: AnswerFacts) -> bool:
    return policy.deployment_id is None or policy.deployment_id == facts.deployment_id


def _holds(policy: ReviewPolicy, facts: AnswerFacts) -> str | None:
    """Why `policy` holds this answer, or None when it does not."""
    if policy.kind == Kind.DEPLOYMENT_APPROVAL:
        return "this deployment's answers need approval"
    if policy.kind == Kind.CANARY_CHECK:
        if facts.model_version_id != policy.model_version_id or facts.canary is False:
            return None
        return "answers of this model version are being checked"
    if policy.kind == Kind.LOW_CONFIDENCE:
        threshold = policy.logprob_threshold
        if facts.mean_logprob is None or threshold is None or facts.mean_logprob >= threshold:
            return None
        return f"low confidence (mean log-probability {facts.mean_logprob:.2f} < {threshold:g})"
    if policy.kind == Kind.SENSITIVE_KNOWLEDGE:
        if not facts.sensitive_knowledge_base_ids:
            return None
        return "the answer drew on a sensitive knowledge base"
    return None


def _active_policies() -> list[ReviewPolicy]:
    """The active policies that a finished answer is checked against."""
    return config_cached(
        ("review_policies",),
        lambda: list(
            ReviewPolicy.objects.filter(
                is_active=True, kind__in=[*_HOLDING_KINDS, Kind.RANDOM_SAMPLE]
            )
        ),
    )


def review_policy_match(
    *, facts: AnswerFacts, rng: random.Random | None = None
) -> PolicyMatch | None:
    """The first active policy that holds the answer, else a sample that picks it, else None."""
    policies = _active_policies()
    for policy in policies:
        if policy.kind == Kind.RANDOM_SAMPLE or not _applies(policy, facts):
            continue
        reason = _holds(policy, facts)
        if reason is not None:
            return PolicyMatch(policy=policy, reason=reason)
    draw = (rng or random).random() * 100
    for policy in policies:
        if policy.kind != Kind.RANDOM_SAMPLE or not _applies(policy, facts):
            continue
        if draw < (policy.sample_percent or 0):
            return PolicyMatch(
                policy=policy,
                reason=f"quality sample ({policy.sample_percent:g}%)",
                deliver_now=True,
            )
    return None


def review_policy_may_hold(*, facts: AnswerFacts) -> bool:
    """Whether some active policy could hold this answer once it is finished (its confidence is
    not known yet). The worker then streams nothing, so a held answer is never seen early."""
    for policy in _active_policies():
        if policy.kind == Kind.RANDOM_SAMPLE or not _applies(policy, facts):
            continue
        if policy.kind == Kind.LOW_CONFIDENCE or _holds(policy, facts) is not None:
            return True
    return False


def review_policy_for_event(*, kind: str, deployment_id: int | None) -> ReviewPolicy:
    """The policy for a hold that an event raised (a filter, a report): the operator's, if any,
    else a default one made on first use so that every item names its policy."""
    policy = (
        ReviewPolicy.objects.filter(is_active=True, kind=kind)
        .filter(deployment_id__in=[deployment_id] if deployment_id else [])
        .first()
        or ReviewPolicy.objects.filter(is_active=True, kind=kind, deployment=None).first()
    )
    if policy is None:
        policy, _ = ReviewPolicy.objects.get_or_create(
            kind=kind, deployment=None, defaults={"name": _DEFAULT_NAMES.get(kind, kind)}
        )
    return policy


def review_match_or_safety_hold(
    *, match: PolicyMatch | None, safety_hold: SafetyHold | None, deployment_id: int | None
) -> PolicyMatch:
    """What queues an answer: the review policy that matched it or, for an answer a safety
    filter held, the safety-hold policy with the filter's reason."""
    if match is not None:
        return match
    assert safety_hold is not None, "an answer is queued by a policy or by a safety hold"
    return PolicyMatch(
        policy=review_policy_for_event(kind=Kind.SAFETY_HOLD, deployment_id=deployment_id),
        reason=f"safety filter '{safety_hold.filter}': {safety_hold.reason}",
    )
