"""The web server and the worker leave their start-up objects out of full garbage collections
(`genai_site.process.long_lived_freeze`) once they have loaded what they keep."""

import re
import subprocess

from tests.conftest import ARTIFACTS, _wait

_FROZEN = re.compile(r"(\d+) long-lived objects left out of garbage collection")


def _frozen(log: str) -> int:
    found = _FROZEN.search(log)
    return int(found.group(1)) if found else 0


def test_the_web_server_and_the_worker_freeze_their_start_up_objects(
    live_asgi_server: str,
    celery_worker_process: subprocess.Popen,  # type: ignore[type-arg]
) -> None:
    web_log, worker_log = ARTIFACTS / "web.log", ARTIFACTS / "worker.log"
    # The worker freezes once its preload thread has loaded the models (or found none).
    _wait(lambda: _frozen(worker_log.read_text(errors="replace")) > 0, 120, "the worker's freeze")
    # Django, Channels, django-ninja and Celery alone are well over 50,000 objects.
    assert _frozen(web_log.read_text(errors="replace")) > 50_000
    assert _frozen(worker_log.read_text(errors="replace")) > 50_000
