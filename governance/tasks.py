from celery import shared_task

from governance.review_queue import review_overdue_apply


@shared_task(ignore_result=True)
def review_overdue_sweep() -> dict[str, int]:
    """Review items past their policy's time limit (Celery beat)."""
    return review_overdue_apply()
