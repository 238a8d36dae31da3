"""The interface every safety filter implements.

A filter reads a text and reports findings; it never decides what happens to the text. The
pipeline (`pipeline.py`) applies the deployment's policy: off, flag, redact, block or hold.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Action(StrEnum):
    """What a policy does when a filter trips, from weakest to strongest."""

    OFF = "off"
    FLAG = "flag"
    REDACT = "redact"
    BLOCK = "block"
    HOLD = "hold"

    @property
    def rank(self) -> int:
        return _RANK[self]


# Hold outranks block: a held text is kept for a person to decide, which says more than a refusal.
_RANK = {Action.OFF: 0, Action.FLAG: 1, Action.REDACT: 2, Action.BLOCK: 3, Action.HOLD: 4}


@dataclass(frozen=True)
class Finding:
    """One thing a filter found: its kind (`email`, `override`, `term`), where, and a score.

    `start`/`end` locate the span for redaction; a finding about the whole text (an injection
    score) spans it all. `placeholder` is what redaction puts in its place.
    """

    filter: str
    kind: str
    start: int
    end: int
    score: float = 1.0
    placeholder: str = ""


class SafetyFilter(Protocol):
    """One detector. `name` is the key policies use (`pii`, `injection`, `blocklist`)."""

    name: str
    # Whether `redact` means anything for this filter (an injection score has no span to mask).
    can_redact: bool

    def scan(self, text: str) -> Sequence[Finding]:
        """Findings in `text`; an empty list when it is clean. Must not raise on any input."""
        ...

    def describe(self, findings: Sequence[Finding]) -> str:
        """Why the filter tripped, in words a user may read (never the matched text)."""
        ...
