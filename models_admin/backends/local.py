"""The local transformers engine as a backend (weights verified against the registry at load)."""

from collections.abc import Callable
from typing import Any

from models_admin.backends.base import Prompt
from models_admin.engine import Engine, EngineError, GenerationResult, SamplingParams, engine_get
from models_admin.models import ModelVersion
from models_admin.store import artifact_dir


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
