"""What the review queue can hold, and the event that tells the owner of a target the outcome.

Governance keeps items generic by (`target_type`, `target_id`). The app that owns a kind of
target (chat for "message") registers an adapter at start-up that renders the target for the
reviewer's screen, and connects a receiver to `review_decided` that applies the decision. The
queue itself never imports those apps.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from django.dispatch import Signal

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from governance.models import ReviewItem

# Sent inside the deciding transaction, so a receiver's failure rolls the decision back.
# Arguments: item (the decided ReviewItem, saved).
review_decided = Signal()


@dataclass(frozen=True)
class ReviewContext:
    """What the reviewer's screen shows of a target."""

    # (role, text) pairs before the held text, oldest first
    history: list[tuple[str, str]] = field(default_factory=list)
    # (label, text) pairs: the passages the answer was given
    passages: list[tuple[str, str]] = field(default_factory=list)
    text: str = ""
    # Whose conversation it is; the screen shows it only with the identity permission.
    owner: "User | None" = None
    extra: dict[str, Any] = field(default_factory=dict)


class ReviewTarget(Protocol):
    def render_context(self, item: "ReviewItem") -> ReviewContext: ...


_targets: dict[str, ReviewTarget] = {}


def review_target_register(target_type: str, target: ReviewTarget) -> None:
    _targets[target_type] = target


def review_target_get(target_type: str) -> ReviewTarget:
    try:
        return _targets[target_type]
    except KeyError:
        raise LookupError(f"No review target adapter for '{target_type}'") from None
