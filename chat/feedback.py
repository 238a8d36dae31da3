"""Users' thumbs up / down, comments and reports on answers."""

from django.contrib.auth.models import User
from django.db import transaction

from chat.models import Feedback, Message
from chat.reply_cache import answer_cache_promote, answer_cache_withdraw
from chat.review import answer_report_queue
from chat.selectors import message_get_for_user
from chat.services import TurnRejected
from governance.audit import audit_record

MAX_COMMENT_CHARS = 2000
# Answers a user can rate: the ones they were shown.
_RATEABLE = (Message.Status.COMPLETE, Message.Status.STOPPED)


def _rating(value: object) -> int:
    try:
        rating = int(str(value))
    except ValueError:
        raise TurnRejected("A rating is 1 (thumbs up) or -1 (thumbs down).") from None
    if rating not in (-1, 0, 1):
        raise TurnRejected("A rating is 1 (thumbs up) or -1 (thumbs down).")
    return rating


@transaction.atomic
def feedback_submit(
    *, user: User, message_id: int, rating: object, comment: object = "", report: object = False
) -> Feedback:
    """Save (or replace) the user's feedback on one of their answers; a report queues it for
    review. Raises TurnRejected with a readable reason, and Http404 for another's message."""
    answer = message_get_for_user(user=user, message_id=message_id)
    if answer.role != Message.Role.ASSISTANT or answer.status not in _RATEABLE:
        raise TurnRejected("Only a finished answer can be rated.")
    if comment is None:
        comment = ""
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS:
        raise TurnRejected(f"A comment is text of at most {MAX_COMMENT_CHARS} characters.")
    reported = report not in (False, None, "", "0", "false")
    value = -1 if reported else _rating(rating)
    feedback, _ = Feedback.objects.update_or_create(
        message=answer,
        user=user,
        defaults={
            "rating": value,
            "comment": comment.strip(),
            # A report, once made, stays made.
            **({"reported": True} if reported else {}),
        },
    )
    if value == Feedback.Rating.DOWN:
        answer_cache_withdraw(answer_id=answer.pk)
    elif value == Feedback.Rating.UP:
        answer_cache_promote(answer_id=answer.pk, reviewed=False)
    if reported:
        item = answer_report_queue(answer=answer, comment=feedback.comment)
        audit_record(
            actor=user,
            action="feedback.reported",
            target_type="message",
            target_id=answer.pk,
            details={"review_item": item.pk},
        )
    return feedback
