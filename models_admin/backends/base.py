from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from models_admin.engine import GenerationResult, SamplingParams


@dataclass(frozen=True)
class Prompt:
    """One request: token ids for local engines, the same prompt as chat messages for servers."""

    ids: list[int]
    messages: list[dict[str, str]] = field(default_factory=list)


class Tokenizing(Protocol):
    """What building a prompt needs: the engine itself, or any backend."""

    # Whatever decodes `ids` back to text (`.decode(ids)`), for cache keys.
    tokenizer: Any

    def count_tokens(self, text: str) -> int: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...


class Backend(Tokenizing, Protocol):
    # Remote backends may be hedged: a second request costs the worker nothing but a socket.
    remote: bool

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult: ...
