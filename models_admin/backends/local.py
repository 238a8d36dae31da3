"""The local transformers engine as a backend (weights verified against the registry at load)."""

import logging
from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection

from models_admin.backends.base import Prompt
from models_admin.engine import Engine, EngineError, GenerationResult, SamplingParams, engine_get
from models_admin.models import Deployment, ModelVersion
from models_admin.store import artifact_dir

logger = logging.getLogger(__name__)


class LocalBackend:
    remote = False

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer: Any = engine.tokenizer

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.engine.encode_chat(messages)

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        ids = prompt.ids or self.encode_chat(prompt.messages)
        return self.engine.generate(ids, params, on_text=on_text, cancelled=cancelled)


def local_backend_get(version: ModelVersion) -> LocalBackend:
    if not version.artifact_path or not version.sha256:
        raise EngineError(f"{version} has no artifact to load.")
    engine = engine_get(
        directory=artifact_dir(version.artifact_path),
        sha256=version.sha256,
        context_window=version.context_window,
    )
    return LocalBackend(engine)


def local_engines_preload(*, queues: Iterable[str]) -> list[str]:
    """Load the engines of the local versions that the active deployments on `queues` serve
    (primary, canary, shadow), as a worker starts: the first answer then does not wait for a
    model to load, and on the CPU the engine's decoding thread holds the cores' parallelism
    before any task thread has run torch (`engine._cpu_threads_confine`). Returns the versions
    loaded; one that fails is logged, and its first request reports the error as before."""
    loaded = []
    try:
        versions: dict[int, ModelVersion] = {}
        deployments = Deployment.objects.filter(queue__in=list(queues), is_active=True)
        for deployment in deployments.select_related(
            "primary_version__model", "canary_version__model", "shadow_version__model"
        ):
            for version in (
                deployment.primary_version,
                deployment.canary_version,
                deployment.shadow_version,
            ):
                if (
                    version is not None
                    and version.can_serve
                    and version.backend != ModelVersion.Backend.OPENAI_COMPATIBLE
                ):
                    versions[version.pk] = version
        for version in versions.values():
            try:
                local_backend_get(version)
            except Exception:
                logger.exception("Could not preload %s; its first request will load it", version)
            else:
                loaded.append(str(version))
    finally:
        connection.close()  # this thread ends here: its connection goes back to the pool
    logger.info("Preloaded %s for queue(s) %s", ", ".join(loaded) or "no model", ", ".join(queues))
    return loaded
