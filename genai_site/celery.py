import os
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "genai_site.settings")

app = Celery("genai_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def _engines_preload(sender: Any, **kwargs: Any) -> None:
    """Load the models of this worker's queues in the background as it starts (`ENGINE_PRELOAD=0`
    leaves each to its first request). Tasks that arrive meanwhile wait for the load, as they
    would for a first load anyway."""
    from genai_site.process import long_lived_freeze

    if os.environ.get("ENGINE_PRELOAD", "1") == "0":
        long_lived_freeze()
        return
    from models_admin.backends.local import local_engines_preload

    def preload(queues: list[str]) -> None:
        try:
            local_engines_preload(queues=queues)
        finally:
            # The models, PyTorch and transformers are loaded: the worker's long-lived objects.
            long_lived_freeze()

    queues = sorted(sender.app.amqp.queues.consume_from)
    threading.Thread(target=preload, args=(queues,), name="engine-preload", daemon=True).start()
