from celery import shared_task

from models_admin.evaluation import evaluation_run
from models_admin.shadow import shadow_answer


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def answer_shadow(shadow_id: int) -> None:
    shadow_answer(shadow_id=shadow_id)


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def evaluate_version(version_id: int) -> None:
    evaluation_run(version_id=version_id)
