"""A job whose worker dies mid-answer is delivered again (acks_late) and completes once; one
whose worker stopped after answering its waiting caller is settled as that answer."""

import os
import signal
import subprocess
import time
import uuid

import pytest
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from chat.api.events import (
    job_answer_sent,
    job_end_event,
    job_event_publish,
    job_event_publish_leased,
)
from chat.api.generation import jobs_requeue_stale
from chat.api.services import job_lease_key, job_submit
from chat.leases import HeartbeatLease
from chat.models import Job
from governance.models import AuditEvent, QuotaReservation
from models_admin.models import Deployment
from tests.chat.api_helpers import api_key_for, job_once_settled
from tests.conftest import (
    ARTIFACTS,
    TEST_QUEUE,
    _start_worker,
    _stop,
    _wait,
    served_past_a_lock_timeout,
)

pytestmark = [pytest.mark.django_db(transaction=True)]


def _worker(env: dict[str, str], name: str, queue: str) -> subprocess.Popen:  # type: ignore[type-arg]
    log = ARTIFACTS / f"{name}-worker.log"
    proc = _start_worker(env, name, log, queue)
    _wait(lambda: "ready." in log.read_text(errors="replace"), 90, f"{name} worker", proc)
    return proc


def _job_killed_mid_answer(worker: subprocess.Popen) -> Job:  # type: ignore[type-arg]
    """A long job that `worker` starts, then is killed (SIGKILL) in the middle of."""
    job = job_submit(
        api_key=api_key_for("prog")[0],
        body={
            "model": "chat-default",
            "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
            "max_tokens": 400,
        },
    )
    deadline = time.monotonic() + 60
    while Job.objects.get(pk=job.pk).status != "running":
        assert time.monotonic() < deadline, "the worker never started the job"
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    return job


def _long_answers_on_queue(chat_model, name: str) -> str:  # type: ignore[no-untyped-def]
    """Deployments served from a queue of this test's own, with answers long enough to die in."""
    queue = f"{TEST_QUEUE}-{name}"
    Deployment.objects.update(queue=queue)
    chat_model.max_output_tokens = 400
    chat_model.save()
    return queue


def test_a_job_whose_worker_is_killed_is_redelivered_and_completes_once(
    chat_model, subprocess_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    queue = _long_answers_on_queue(chat_model, "redelivery")
    # Short leases and a short visibility timeout, so that the death shows within seconds.
    env = {
        **subprocess_env,
        "CHAT_GENERATION_LEASE_SECONDS": "3",
        "CELERY_VISIBILITY_TIMEOUT": "8",
        "CELERY_UNACKED_RESTORE_INTERVAL": "1",
        # A restore pass that a killed worker was in the middle of blocks others this long.
        "CELERY_UNACKED_MUTEX_EXPIRE": "5",
    }
    first = _worker(env, "doomed", queue)
    second = None
    try:
        job = _job_killed_mid_answer(first)
        assert Job.objects.get(pk=job.pk).status == "running"

        second = _worker(env, "rescuer", queue)
        deadline = time.monotonic() + 240
        while (job := Job.objects.get(pk=job.pk)).status in ("queued", "running"):
            assert time.monotonic() < deadline, (
                f"the redelivered job never finished (run {job.run}); the rescuer's log ends:\n"
                + (ARTIFACTS / "rescuer-worker.log").read_text(errors="replace")[-3000:]
            )
            time.sleep(0.2)
    finally:
        if second is not None:
            _stop(second)
        if first.poll() is None:
            _stop(first)

    assert job.status == "completed" and job.finish_reason in ("stop", "length")
    assert job.run == 2 and job.content
    generated = AuditEvent.objects.filter(action="job.generated", target_id=job.public_id)
    assert generated.count() == 1 and generated.get().details["run"] == 2
    reservation = QuotaReservation.objects.get(pk=job.reservation_id or 0)
    assert reservation.status == "settled"


def test_a_redelivery_that_comes_before_the_dead_workers_lease_lapses_takes_the_job_over(
    chat_model,
) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        job = job_submit(
            api_key=api_key_for("prog")[0],
            body={"model": "chat-default", "messages": [{"role": "user", "content": "Hello"}]},
        )
        # As a worker killed a moment ago leaves it: its lease lives on for a few seconds.
        # The task is sent at commit, after this.
        cache.set(job_lease_key(job.public_id), 1, timeout=3)
    deadline = time.monotonic() + 120
    while (job := Job.objects.get(pk=job.pk)).status in ("queued", "running"):
        assert time.monotonic() < deadline, f"the job was dropped (status {job.status})"
        time.sleep(0.2)
    assert job.status == "completed" and job.run == 1 and job.content


def test_a_job_whose_worker_died_is_queued_again_by_the_sweep_and_completes_once(
    chat_model, subprocess_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    queue = _long_answers_on_queue(chat_model, "sweep")
    # The broker's visibility timeout stays at its default (900 s): only the sweep can bring
    # this job back within the test.
    first = _worker({**subprocess_env, "CHAT_GENERATION_LEASE_SECONDS": "3"}, "swept", queue)
    try:
        job = _job_killed_mid_answer(first)
    finally:
        if first.poll() is None:
            _stop(first)

    # Its lease outlives the worker by up to 3 s: until then the job is left alone.
    assert jobs_requeue_stale() == 0
    assert Job.objects.get(pk=job.pk).status == "running"

    # Queued again on its deployment's queue, now served by the suite's worker.
    Deployment.objects.update(queue=TEST_QUEUE)
    deadline = time.monotonic() + 30
    while not jobs_requeue_stale():
        assert time.monotonic() < deadline, "the sweep never took the job"
        time.sleep(0.5)
    deadline = time.monotonic() + 240
    while (job := Job.objects.get(pk=job.pk)).status in ("queued", "running"):
        assert time.monotonic() < deadline, f"the job queued again never finished (run {job.run})"
        time.sleep(0.2)

    assert job.status == "completed" and job.run == 2 and job.content
    assert AuditEvent.objects.filter(action="job.requeued", target_id=job.public_id).count() == 1
    generated = AuditEvent.objects.filter(action="job.generated", target_id=job.public_id)
    assert generated.count() == 1 and generated.get().details["run"] == 2
    assert QuotaReservation.objects.get(pk=job.reservation_id or 0).status == "settled"
    assert jobs_requeue_stale() == 0


def test_a_waiting_caller_has_the_answer_before_the_books_are_written(chat_model) -> None:  # type: ignore[no-untyped-def]
    job = job_submit(
        api_key=api_key_for("prog")[0],
        body={"model": "chat-default", "messages": [{"role": "user", "content": "Hello"}]},
        progress=False,
    )
    # The settle charges the answer to its reservation: held here, the settle cannot commit.
    with transaction.atomic():
        QuotaReservation.objects.select_for_update().get(pk=job.reservation_id or 0)
        deadline = time.monotonic() + 120
        while (sent := job_answer_sent(job.public_id)) is None:
            assert time.monotonic() < deadline, "the caller got no answer while the books waited"
            time.sleep(0.05)
        assert Job.objects.get(pk=job.pk).status == "running"
    assert sent["answered"]["run"] == 1 and sent["settled"]["content"]

    job = job_once_settled(job.public_id, 60)
    assert job.status == "completed" and job.run == 1
    assert job.content == sent["settled"]["content"]
    assert job.completion_tokens == sent["settled"]["completion_tokens"]
    generated = AuditEvent.objects.get(action="job.generated", target_id=job.public_id)
    assert generated.details["run"] == 1 and "answered_by_run" not in generated.details
    assert QuotaReservation.objects.get(pk=job.reservation_id or 0).status == "settled"


def test_a_job_whose_worker_stopped_after_answering_is_settled_as_that_answer(
    chat_model,
) -> None:  # type: ignore[no-untyped-def]
    # Nobody serves this queue: the first delivery waits there, and this test plays its run.
    Deployment.objects.update(queue=f"{TEST_QUEUE}-answered")
    job = job_submit(
        api_key=api_key_for("prog")[0],
        body={"model": "chat-default", "messages": [{"role": "user", "content": "Hello"}]},
        progress=False,
    )
    # Run 1 took the job and sent its caller the answer, and its worker stopped before the
    # settle committed: the row is still running, and no lease is left.
    Job.objects.filter(pk=job.pk).update(status="running", run=1, started_at=timezone.now())
    settled = {
        "status": Job.Status.COMPLETED,
        "content": "The answer the caller received.",
        "error": "",
        "finish_reason": "stop",
        "prompt_tokens": 31,
        "completion_tokens": 7,
        "finished_at": timezone.now(),
    }
    answered = {"run": 1, "model_version_id": chat_model.pk, "cache": ""}
    job_event_publish(job.public_id, job_end_event(settled, answered=answered))

    # The sweep queues it again, now on the suite's worker, which settles it without a model.
    Deployment.objects.update(queue=TEST_QUEUE)
    assert jobs_requeue_stale() == 1
    job = job_once_settled(job.public_id, 60)

    assert job.status == "completed" and job.run == 2
    assert (job.content, job.finish_reason) == ("The answer the caller received.", "stop")
    assert (job.prompt_tokens, job.completion_tokens) == (31, 7)
    generated = AuditEvent.objects.get(action="job.generated", target_id=job.public_id)
    assert generated.details["run"] == 2 and generated.details["answered_by_run"] == 1
    assert generated.details["completion_tokens"] == 7
    reservation = QuotaReservation.objects.get(pk=job.reservation_id or 0)
    assert reservation.status == "settled" and reservation.settled_tokens == 38


def test_an_answer_goes_out_before_its_settle_only_while_its_run_holds_the_lease() -> None:
    public_id = f"job_{uuid.uuid4().hex[:24]}"

    def answer(run: int) -> dict:  # type: ignore[type-arg]
        settled = {
            "status": "completed",
            "content": f"the answer of run {run}",
            "error": "",
            "finish_reason": "stop",
            "prompt_tokens": 5,
            "completion_tokens": 4,
            "finished_at": timezone.now(),
        }
        return job_end_event(settled, answered={"run": run, "model_version_id": 1, "cache": ""})

    with HeartbeatLease(key=job_lease_key(public_id), ttl_seconds=5) as lease:
        assert job_event_publish_leased(public_id, answer(1), lease=lease)
        # The lease lapsed and another delivery took it: this run may not answer any more.
        cache.set(job_lease_key(public_id), lease.token + 1, timeout=5)
        assert not job_event_publish_leased(public_id, answer(2), lease=lease)
    sent = job_answer_sent(public_id)
    assert sent is not None and sent["answered"]["run"] == 1


def test_a_job_whose_claim_meets_a_database_error_is_sent_again_and_completes(
    chat_model, subprocess_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    queue = f"{TEST_QUEUE}-dberror"
    Deployment.objects.update(queue=queue)
    job = job_submit(
        api_key=api_key_for("prog")[0],
        body={"model": "chat-default", "messages": [{"role": "user", "content": "Hello"}]},
    )
    job, log = served_past_a_lock_timeout(
        subprocess_env,
        "dberror",
        queue,
        "chat_job",
        job.pk,
        read=lambda: Job.objects.get(pk=job.pk),
        waiting=("queued", "running"),
    )
    assert job.status == "completed" and job.run == 1 and job.content
    assert "due to lock timeout" in log
