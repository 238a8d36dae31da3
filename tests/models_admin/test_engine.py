"""The engine on the real model: hash check at load, greedy determinism, stop at the next step."""

import pytest

from models_admin.engine import ArtifactHashMismatch, Engine, SamplingParams, engine_get
from models_admin.store import artifact_dir


@pytest.fixture(scope="module")
def engine(model_artifact) -> Engine:  # type: ignore[no-untyped-def]
    return engine_get(
        directory=artifact_dir(model_artifact.artifact_path), sha256=model_artifact.sha256
    )


def test_weights_whose_hash_differs_from_the_registry_are_refused(model_artifact) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ArtifactHashMismatch):
        Engine(artifact_dir(model_artifact.artifact_path), expected_sha256="f" * 64)


def test_greedy_answers_are_repeatable_and_stream_the_same_text(engine: Engine) -> None:
    prompt = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    pieces: list[str] = []
    first = engine.generate(prompt, SamplingParams(max_tokens=24), on_text=pieces.append)
    second = engine.generate(prompt, SamplingParams(max_tokens=24))
    assert first.text == second.text and "Paris" in first.text
    assert "".join(pieces) == first.text
    assert first.completion_tokens == len(first.token_logprobs)
    assert all(lp <= 0 for lp in first.token_logprobs)


def test_cancellation_stops_at_the_next_step(engine: Engine) -> None:
    prompt = engine.encode_chat([{"role": "user", "content": "Count from one to one hundred."}])
    steps = 0

    def cancelled() -> bool:
        nonlocal steps
        steps += 1
        return steps > 5

    result = engine.generate(prompt, SamplingParams(max_tokens=200), cancelled=cancelled)
    assert result.finish_reason == "cancelled" and result.completion_tokens == 5


def test_stop_strings_end_the_answer(engine: Engine) -> None:
    prompt = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    result = engine.generate(prompt, SamplingParams(max_tokens=24, stop=("Paris",)))
    assert result.finish_reason == "stop" and "Paris" not in result.text
