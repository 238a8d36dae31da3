"""The openai-compatible backend against a real server speaking the protocol (llama.cpp's),
and hedging between two remote targets."""

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from genai_site.embedded import free_port
from models_admin.backends import Backend, Prompt, backend_for
from models_admin.engine import EngineError, GenerationResult, SamplingParams
from models_admin.models import ModelVersion
from models_admin.resilience import AllTargetsFailed, serve_resilient
from tests.conftest import RemoteServer
from tests.models_admin.registry_helpers import remote_version_create

pytestmark = pytest.mark.django_db

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer concisely."},
    {"role": "user", "content": "Name three colours."},
]
PARAMS = SamplingParams(max_tokens=24, temperature=0.0)


def _ask(version: ModelVersion, **kwargs: object) -> GenerationResult:
    backend = backend_for(version)
    prompt = Prompt(ids=backend.encode_chat(MESSAGES), messages=MESSAGES)
    return backend.generate(prompt, PARAMS, **kwargs)  # type: ignore[arg-type]


def test_an_answer_streams_from_a_real_openai_compatible_server(
    openai_server: RemoteServer, remote_key_env: str, model_artifact
) -> None:  # type: ignore[no-untyped-def]
    version = remote_version_create(
        base_url=openai_server.url,
        version="r1",
        api_key_env=remote_key_env,
        artifact_path=model_artifact.artifact_path,  # its tokenizer counts tokens for budgets
    )
    deltas: list[str] = []
    result = _ask(version, on_text=deltas.append)

    assert result.text.strip(), "the server answered"
    assert len(deltas) > 1, "the answer arrived as a stream, not in one piece"
    assert "".join(deltas) == result.text
    assert 0 < result.completion_tokens <= PARAMS.max_tokens
    assert result.prompt_tokens > 10 and result.time_to_first_token_s > 0


def test_a_stop_request_ends_a_remote_answer_early(
    openai_server: RemoteServer, remote_key_env: str
) -> None:
    version = remote_version_create(
        base_url=openai_server.url, version="r2", api_key_env=remote_key_env
    )
    deltas: list[str] = []
    result = _ask(version, on_text=deltas.append, cancelled=lambda: len(deltas) >= 2)
    assert result.finish_reason == "cancelled" and len(deltas) == 2


def test_a_missing_or_wrong_api_secret_is_a_clear_error_that_is_not_retried(
    openai_server: RemoteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = remote_version_create(
        base_url=openai_server.url, version="r3", api_key_env="GENAI_TEST_UNSET_KEY"
    )
    monkeypatch.delenv("GENAI_TEST_UNSET_KEY", raising=False)
    with pytest.raises(EngineError, match="GENAI_TEST_UNSET_KEY") as unset:
        _ask(version)
    assert not unset.value.retryable

    monkeypatch.setenv("GENAI_TEST_UNSET_KEY", "not-the-key")
    with pytest.raises(EngineError, match="HTTP 401") as wrong:
        _ask(version)
    assert not wrong.value.retryable


def test_an_unreachable_server_is_a_retryable_error(db: None) -> None:
    version = remote_version_create(base_url=f"http://127.0.0.1:{free_port()}/v1", version="down")
    with pytest.raises(EngineError, match="could not be reached") as down:
        _ask(version)
    assert down.value.retryable


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers: a hung backend."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def _run(
    version: ModelVersion,
    backend: Backend,
    on_text: Callable[[str], None],
    cancelled: Callable[[], bool],
) -> GenerationResult:
    prompt = Prompt(ids=backend.encode_chat(MESSAGES), messages=MESSAGES)
    return backend.generate(prompt, PARAMS, on_text=on_text, cancelled=cancelled)


def test_a_late_first_token_sends_a_hedged_request_whose_answer_wins(
    openai_server: RemoteServer, remote_key_env: str, silent_server: str
) -> None:
    hung = remote_version_create(
        base_url=silent_server, version="hung", first_token_timeout_s=30, max_retries=0
    )
    healthy = remote_version_create(
        base_url=openai_server.url, version="healthy", api_key_env=remote_key_env
    )
    texts: list[str] = []
    started = time.monotonic()
    served = serve_resilient(
        targets=[hung, healthy],
        run=_run,
        on_text=texts.append,
        cancelled=lambda: False,
        hedge_after_ms=300,
    )
    assert served.version == healthy and served.result.text == "".join(texts)
    assert time.monotonic() - started < 20, "the hung server's 30 s timeout was not waited for"
    assert served.attempts == [
        {"version": hung.pk, "outcome": "cancelled (hedge lost)"},
        {"version": healthy.pk, "outcome": "served"},
    ]


def test_timeouts_and_retries_end_in_a_clear_message_when_every_target_fails(
    silent_server: str,
) -> None:
    hung = remote_version_create(
        base_url=silent_server,
        version="hung2",
        first_token_timeout_s=0.3,
        max_retries=2,
        retry_backoff_s=0.05,
    )
    started = time.monotonic()
    with pytest.raises(AllTargetsFailed, match="Your message is saved") as failed:
        serve_resilient(targets=[hung], run=_run, on_text=lambda _: None, cancelled=lambda: False)
    assert "timed out" in str(failed.value)
    # Three tries of 0.3 s each, with short backoff between them.
    assert 0.9 <= time.monotonic() - started < 10
