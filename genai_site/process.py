"""A long-running process's start-up objects, kept out of Python's full garbage collections.

Python's collector walks every tracked object in a full (generation 2) collection. A web
process holds about 150,000 of them once Django, Channels, django-ninja and Celery are
imported, and a worker about 520,000 with PyTorch, transformers and a model loaded. On 2 cores
one full collection took 90 ms in the first and 170 ms in the second when idle, up to 150 and
340 ms under load, during which the process runs nothing else. A full collection comes every
so many thousand allocations that live on, so under load each process stopped about once a
minute, and every request it held waited: the slowest percent of requests. Almost all of
those objects (modules, classes, functions, settings, the model's modules) live as long as the
process.
"""

import gc
import logging

logger = logging.getLogger(__name__)


def long_lived_freeze() -> None:
    """Collect what is already garbage, then move every object left into the collector's
    permanent generation (`gc.freeze`), which no later collection walks: full collections then
    cost what the process has made since. Call it once the process has loaded what it keeps
    (the application, the model)."""
    gc.collect()
    gc.freeze()
    logger.info("%d long-lived objects left out of garbage collection", gc.get_freeze_count())
