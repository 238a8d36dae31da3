import os

# Before anything loads torch (libgomp reads it once, as it loads): how long an idle OpenMP
# thread spins before it sleeps. libgomp's default (300,000 turns) keeps the engine's threads
# spinning for milliseconds after each forward pass, on the cores that the worker's own settle,
# PostgreSQL and Redis need just then: on 2 cores one /v1 call took 2-4 ms longer. 20,000 turns
# still bridge the gaps between the operations of one step (the engine's tokens/s stayed within
# their run-to-run spread).
# An operator's own GOMP_SPINCOUNT wins, and so does OMP_WAIT_POLICY (which sets the spinning
# only while GOMP_SPINCOUNT is unset).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

from genai_site.celery import app as celery_app

__all__ = ["celery_app"]
