"""The batching engine on the real model: hash check, greedy determinism, batching, cancellation."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from models_admin.engine import (
    ArtifactHashMismatch,
    Engine,
    GenerationResult,
    InsufficientMemory,
    SamplingParams,
    _Finish,
    _Request,
)
from models_admin.store import artifact_dir

LONG = "Write a very long story about a dragon, at least 500 words."
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain what a hash function is.",
    "List three uses of copper.",
]


@pytest.fixture(scope="module")
def engine(model_artifact) -> Engine:  # type: ignore[no-untyped-def]
    # Two slots, so that tests can fill the batch and make a request wait.
    return Engine(
        artifact_dir(model_artifact.artifact_path),
        expected_sha256=model_artifact.sha256,
        max_batch=2,
        max_len=1024,
    )


def _prompt(engine: Engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


def test_weights_whose_hash_differs_from_the_registry_are_refused(model_artifact) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ArtifactHashMismatch):
        Engine(artifact_dir(model_artifact.artifact_path), expected_sha256="f" * 64)


def test_a_kv_cache_larger_than_memory_is_refused_at_load_with_the_figures(model_artifact) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InsufficientMemory, match="GiB KV cache for 100000 sequences"):
        Engine(
            artifact_dir(model_artifact.artifact_path),
            expected_sha256=model_artifact.sha256,
            max_batch=100_000,
            max_len=8192,
        )


def test_an_unknown_gpu_wait_is_refused_at_load_with_the_choices(
    model_artifact: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGINE_GPU_WAIT", "poll")
    with pytest.raises(ValueError, match=r"gpu_wait is one of \('sleep', 'spin'\), not 'poll'"):
        Engine(artifact_dir(model_artifact.artifact_path), expected_sha256=model_artifact.sha256)


def test_greedy_answers_are_repeatable_and_stream_the_same_text(engine: Engine) -> None:
    prompt = _prompt(engine, PROMPTS[0])
    pieces: list[str] = []
    first = engine.generate(prompt, SamplingParams(max_tokens=24), on_text=pieces.append)
    second = engine.generate(prompt, SamplingParams(max_tokens=24))
    assert first.text == second.text and "Paris" in first.text
    assert "".join(pieces) == first.text
    assert first.completion_tokens == len(first.token_logprobs)
    assert all(lp <= 0 for lp in first.token_logprobs)


def test_batched_answers_equal_unbatched_ones_under_greedy_decoding(engine: Engine) -> None:
    params = SamplingParams(max_tokens=40)
    alone = [engine.generate(_prompt(engine, p), params) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: engine.generate(_prompt(engine, p), params), PROMPTS))
    assert [r.text for r in together] == [r.text for r in alone]
    assert engine.stats.last_batch == 2 or max(r.queue_wait_s for r in together) > 0


def test_a_request_joining_mid_flight_is_served_beside_the_running_one(engine: Engine) -> None:
    params = SamplingParams(max_tokens=80)
    reference = engine.generate(_prompt(engine, PROMPTS[2]), SamplingParams(max_tokens=20))
    long_started = threading.Event()
    results: dict[str, GenerationResult] = {}

    def long_answer() -> None:
        results["long"] = engine.generate(
            _prompt(engine, LONG), params, on_text=lambda _: long_started.set()
        )

    runner = threading.Thread(target=long_answer)
    runner.start()
    assert long_started.wait(60)
    results["short"] = engine.generate(_prompt(engine, PROMPTS[2]), SamplingParams(max_tokens=20))
    long_still_running = runner.is_alive()
    runner.join(120)
    assert long_still_running, "the short answer should finish while the long one runs"
    assert results["short"].text == reference.text
    assert results["long"].completion_tokens > 20


def test_a_request_arriving_during_a_prefill_joins_that_admission_before_any_decode_step(
    engine: Engine,
) -> None:
    # The first prompt's prefill is held until the second request is waiting: the second must
    # be prefilled next, in the same admission, not after a decode step of the first.
    runner = engine.runner
    calls: list[tuple[int, int]] = []  # (decode steps so far, prompts) per prefill call
    references = [
        engine.generate(_prompt(engine, text), SamplingParams(max_tokens=6)).text
        for text in PROMPTS[:2]
    ]
    real_prefill, real_blocks = runner.prefill, runner.prefill_blocks

    def held(prompts: int) -> None:
        calls.append((engine.stats.steps, prompts))
        deadline = time.monotonic() + 30
        while len(calls) == 1 and not engine._waiting and time.monotonic() < deadline:
            time.sleep(0.005)

    def prefill(**kwargs):  # type: ignore[no-untyped-def]
        held(len(kwargs["prompts"]))
        return real_prefill(**kwargs)

    def prefill_blocks(**kwargs):  # type: ignore[no-untyped-def]
        held(1)
        return real_blocks(**kwargs)

    runner.prefill, runner.prefill_blocks = prefill, prefill_blocks  # type: ignore[method-assign]
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(
                engine.generate, _prompt(engine, PROMPTS[0]), SamplingParams(max_tokens=6)
            )
            deadline = time.monotonic() + 30
            while not calls and time.monotonic() < deadline:
                time.sleep(0.005)
            second = pool.submit(
                engine.generate, _prompt(engine, PROMPTS[1]), SamplingParams(max_tokens=6)
            )
            answers = [first.result(60).text, second.result(60).text]
    finally:
        del runner.prefill, runner.prefill_blocks
    steps = calls[0][0]
    assert calls == [(steps, 1), (steps, 1)]
    assert answers == references


def test_a_cancelled_sequence_frees_its_slot_for_a_waiting_request(engine: Engine) -> None:
    # Both slots busy with long answers; a third request waits until one is cancelled.
    stop_first, stop_second = threading.Event(), threading.Event()
    received = [0, 0]
    results: list[GenerationResult | None] = [None, None]

    def occupy(i: int) -> None:
        def count(_: str) -> None:
            received[i] += 1

        results[i] = engine.generate(
            _prompt(engine, LONG),
            SamplingParams(max_tokens=400),
            on_text=count,
            cancelled=stop_first.is_set if i == 0 else stop_second.is_set,
        )

    threads = [threading.Thread(target=occupy, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while min(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    waiting = threading.Thread(
        target=lambda: results.append(
            engine.generate(_prompt(engine, PROMPTS[0]), SamplingParams(max_tokens=8))
        )
    )
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive() and engine.stats.waiting == 1
    stop_first.set()
    waiting.join(60)
    assert not waiting.is_alive(), "the waiting request should take the freed slot"
    assert threads[1].is_alive(), "the other long answer is still running"
    stop_second.set()
    for t in threads:
        t.join(10)
    first = results[0]
    assert first is not None and first.finish_reason == "cancelled"
    third = results[2]
    assert third is not None and third.completion_tokens > 0 and third.queue_wait_s > 0.4


def test_sequences_that_end_together_leave_without_their_caches_being_moved(
    engine: Engine,
) -> None:
    # The engine is idle between tests: its batch is set up here by hand, on the real cache.
    moves: list[tuple[int, int]] = []
    runner = engine.runner
    real_move = runner.slot_move

    def counted(*, source: int, target: int, length: int) -> None:
        moves.append((source, target))
        real_move(source=source, target=target, length=length)

    def sequence(produced: int) -> _Request:
        request = _Request(prompt_ids=[1, 2], params=SamplingParams(), max_new=8, generator=None)
        request.produced, request.length = produced, 2
        return request

    runner.slot_move = counted  # type: ignore[method-assign]
    try:
        both_ended = [sequence(-1), sequence(-1)]
        engine._active = list(both_ended)
        engine._retire()
        assert (engine._active, moves) == ([], [])

        ended, live = sequence(-1), sequence(3)
        engine._active = [ended, live]
        engine._retire()
        assert (engine._active, moves) == ([live], [(1, 0)])

        moves.clear()
        cancelled = sequence(2)
        cancelled.cancel.set()
        engine._active = [live, cancelled]
        engine._retire()
        assert (engine._active, moves) == ([live], [])
        assert cancelled.events.get_nowait() == _Finish("cancelled")
    finally:
        del runner.slot_move
        engine._active = []


def test_cancellation_stops_at_the_next_step(engine: Engine) -> None:
    prompt = _prompt(engine, LONG)
    seen: list[str] = []
    result = engine.generate(
        prompt,
        SamplingParams(max_tokens=200),
        on_text=seen.append,
        cancelled=lambda: len("".join(seen)) >= 20,
    )
    assert result.finish_reason == "cancelled"
    assert result.text == "".join(seen)
    # Tokens that were already decoded when the stop was seen, and no more than a step or two.
    assert 3 <= result.completion_tokens <= 12


def test_incremental_text_equals_decoding_everything_at_once(engine: Engine) -> None:
    from models_admin.engine import _IncrementalText

    for sample in ["Héllo wörld ✓ — 你好, 🙂 emoji!", "  spaced   out\n\nlines\t"]:
        ids = engine.tokenizer.encode(sample, add_special_tokens=False)
        text = _IncrementalText(engine.tokenizer)
        for token in ids:
            text.add(token)
        assert text.text == text.final() == engine.tokenizer.decode(ids)


def test_stop_strings_end_the_answer(engine: Engine) -> None:
    prompt = _prompt(engine, PROMPTS[0])
    result = engine.generate(prompt, SamplingParams(max_tokens=24, stop=("Paris",)))
    assert result.finish_reason == "stop" and "Paris" not in result.text


def test_a_seed_makes_sampled_answers_repeatable(engine: Engine) -> None:
    prompt = _prompt(engine, PROMPTS[1])
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7)
    first = engine.generate(prompt, params)
    second = engine.generate(prompt, params)
    other = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=8))
    assert first.text == second.text
    assert other.text != first.text


def test_a_prompt_longer_than_the_window_is_refused_with_the_limit(engine: Engine) -> None:
    from models_admin.engine import EngineError

    with pytest.raises(EngineError, match="at most 1024"):
        engine.generate([1] * 2000, SamplingParams(max_tokens=4))


def test_the_q4_model_decodes_with_its_own_4bit_weights_which_random_weights_are_not(
    engine: Engine,
) -> None:
    import torch

    from models_admin.llama import _amx, _Int4Linear, _Linear, on_int4_grid

    assert engine.runner.decode_weights == "int4"
    layer = engine.runner.decode_layers[0]
    assert isinstance(layer.gate_up, _Int4Linear)
    # Prefill keeps 16-bit weights: bf16 where the CPU has AMX, fp16 packed otherwise. The
    # 4-bit ones hold the same values (the difference is the bf16 rounding of the activations
    # and outputs, well under 1%).
    prefill = engine.runner.layers[0].gate_up
    assert isinstance(prefill, _Linear)
    assert engine.runner.prefill_weights == ("bf16" if _amx() else "fp16")
    assert prefill.bf16 == _amx()
    x = torch.randn(3, engine.runner.embed.shape[1])
    sixteen = prefill(x)
    int4 = layer.gate_up(x)
    assert float((int4 - sixteen).norm() / sixteen.norm()) < 0.01
    assert not on_int4_grid(torch.randn(64, 64))


def test_a_prompt_that_begins_like_an_earlier_one_takes_its_first_block_from_the_cache(
    engine: Engine,
) -> None:
    from models_admin.llama import PrefixCache

    system = {"role": "system", "content": "You are a helpful assistant. Answer concisely."}
    prompts = [
        engine.encode_chat([system, {"role": "user", "content": text}]) for text in PROMPTS[:2]
    ]
    assert prompts[0][:16] == prompts[1][:16] and len(prompts[1]) > 16
    params = SamplingParams(max_tokens=24)
    saved = engine.prefixes
    try:
        engine.prefixes = PrefixCache(16 << 20)
        engine.generate(prompts[0], params)
        warm = engine.generate(prompts[1], params)
        assert engine.prefixes.hits == 1
        engine.prefixes = PrefixCache(16 << 20)
        cold = engine.generate(prompts[1], params)
        assert engine.prefixes.hits == 0
    finally:
        engine.prefixes = saved
    assert warm.text == cold.text and warm.text


def test_bf16_prefill_weights_give_the_product_in_fp32_with_the_bias() -> None:
    import torch
    import torch.nn.functional as F

    from models_admin.llama import _Linear

    torch.manual_seed(0)
    weight, bias, x = torch.randn(48, 64), torch.randn(48), torch.randn(5, 64)
    linear = _Linear(weight, bias, packed_fp16=True, bf16=True)
    assert linear.packed is None and linear.weight.dtype == torch.bfloat16
    y = linear(x)
    want = F.linear(x, weight, bias)
    assert y.dtype == torch.float32 and y.shape == want.shape
    # Inputs and weights rounded to bf16 (8 bits): about 1% of the outputs' scale, not more.
    assert float((y - want).norm() / want.norm()) < 0.02
