"""A worker loads the models of its queues' deployments as it starts, before any request."""

import pytest

from models_admin.models import Deployment
from tests.conftest import ARTIFACTS, TEST_QUEUE, _start_worker, _stop, _wait

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_starting_worker_loads_the_model_its_queue_serves_before_any_request(
    chat_model: object, subprocess_env: dict[str, str]
) -> None:
    queue = f"{TEST_QUEUE}-preload"
    Deployment.objects.filter(alias="chat-default").update(queue=queue)
    log = ARTIFACTS / "preload-worker.log"
    proc = _start_worker(subprocess_env, "preload", log, queue)
    try:
        _wait(lambda: "Preloaded" in log.read_text(errors="replace"), 90, "preload", proc)
    finally:
        _stop(proc)
    text = log.read_text(errors="replace")
    preloaded = next(line for line in text.splitlines() if "Preloaded" in line)
    assert str(chat_model) in preloaded and queue in preloaded
    # Nothing was asked of this queue: the engine's own load line comes from the preload.
    assert text.index("models_admin.engine Loaded") < text.index("Preloaded")
