"""Runs a text through filters, each with the action a policy gives it, and says what to do."""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from governance.safety.base import Action, Finding, SafetyFilter


@dataclass(frozen=True)
class FilterStep:
    filter: SafetyFilter
    action: Action


@dataclass(frozen=True)
class Trip:
    """One filter that found something, and what its policy does about it."""

    filter: str
    action: Action
    findings: tuple[Finding, ...]
    reason: str


@dataclass(frozen=True)
class Verdict:
    """The outcome for one text. `text` is what may go on: redacted where the policy says so."""

    action: Action  # the strongest action among the trips; OFF when nothing tripped
    text: str
    trips: tuple[Trip, ...] = field(default_factory=tuple)

    @property
    def stops(self) -> bool:
        return self.action in (Action.BLOCK, Action.HOLD)

    @property
    def deciding(self) -> Trip | None:
        """The trip that set the action (the first of the strongest)."""
        return next((t for t in self.trips if t.action == self.action), None)

    @property
    def reason(self) -> str:
        trip = self.deciding
        return trip.reason if trip else ""

    def summary(self) -> dict[str, Any]:
        """For audit details and hold records: kinds, counts and scores, never matched text."""
        filters: dict[str, Any] = {}
        for trip in self.trips:
            entry: dict[str, Any] = {
                "action": str(trip.action),
                "kinds": dict(Counter(f.kind for f in trip.findings)),
            }
            scores = [f.score for f in trip.findings if f.score != 1.0]
            if scores:
                entry["score"] = max(scores)
            filters[trip.filter] = entry
        return {"action": str(self.action), "filters": filters}


def _redact(text: str, findings: Sequence[Finding]) -> str:
    spans = sorted((f.start, f.end, f.placeholder) for f in findings)
    out: list[str] = []
    pos = 0
    for start, end, placeholder in spans:
        if start < pos:  # overlaps a span already replaced
            continue
        out.append(text[pos:start])
        out.append(placeholder)
        pos = end
    out.append(text[pos:])
    return "".join(out)


class Pipeline:
    """Filters in order. A filter set to `off` is not run at all.

    Redaction applies the spans of every filter whose action is `redact` or `block` (a refused
    text is kept, but without what it was refused for); `hold` keeps the full text for the
    reviewer, `flag` only reports.
    """

    def __init__(self, steps: Sequence[FilterStep]):
        self.steps = [s for s in steps if s.action != Action.OFF]

    def run(self, text: str) -> Verdict:
        trips: list[Trip] = []
        to_redact: list[Finding] = []
        for step in self.steps:
            findings = tuple(step.filter.scan(text))
            if not findings:
                continue
            trips.append(
                Trip(
                    filter=step.filter.name,
                    action=step.action,
                    findings=findings,
                    reason=step.filter.describe(findings),
                )
            )
            if step.filter.can_redact and step.action in (Action.REDACT, Action.BLOCK):
                to_redact.extend(findings)
        action = max((t.action for t in trips), key=lambda a: a.rank, default=Action.OFF)
        return Verdict(
            action=action,
            text=_redact(text, to_redact) if to_redact else text,
            trips=tuple(trips),
        )
