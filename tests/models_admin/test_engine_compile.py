"""The compiled forwards (as on a GPU) over a tiny random model, run on the CPU.

The backend traces and counts compilations without generating kernels: what is checked is when
the engine compiles again, which is the same whatever the backend.
"""

import itertools

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from models_admin.llama import LlamaRunner
from tests.models_admin.runner_steps import random_runner


def _sizes(*, hidden: int = 48, kv_heads: int = 3) -> dict[str, int]:
    # Sizes that match none of the batch sizes or spans below unless a test means them to.
    return dict(
        vocab_size=101,
        hidden_size=hidden,
        intermediate_size=hidden + 32,
        num_attention_heads=6,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
    )


def _runner(
    *, kv_heads: int = 3, counter: CompileCounterWithBackend | None = None, scope: str = "model"
) -> LlamaRunner:
    if counter is not None:
        torch._dynamo.reset()
    return random_runner(
        _sizes(kv_heads=kv_heads),
        max_batch=8,
        max_len=256,
        compile_steps=counter is not None,
        compile_scope=scope,
        compile_backend=counter,
    )


def _decode_steps(runner: LlamaRunner, steps: list[tuple[int, int]]) -> list[torch.Tensor]:
    outputs = []
    with torch.inference_mode():
        for b, span in steps:
            outputs.append(runner.decode_body(torch.arange(1, b + 1), torch.full((b,), 50), span))
    return outputs


def test_engine_decode_step_at_the_longest_span_reuses_the_compiled_step() -> None:
    counter = CompileCounterWithBackend("aot_eager")
    # The engine's span buckets run from 128 to the whole context window.
    steps = [(2, 128), (4, 128), (2, 256), (4, 256)]
    compiled = _decode_steps(_runner(counter=counter), steps)
    plain = _decode_steps(_runner(), steps)
    assert counter.frame_count == 1
    assert all(torch.allclose(c, p, atol=1e-5) for c, p in zip(compiled, plain, strict=True))


def test_engine_decode_step_of_a_model_with_two_kv_heads_serves_every_batch_size() -> None:
    counter = CompileCounterWithBackend("aot_eager")
    # Warmed up with 2 rows, as `warm_up` does; 2 is also the number of KV heads.
    _decode_steps(_runner(kv_heads=2, counter=counter), [(2, 128), (4, 128), (8, 128)])
    assert counter.frame_count == 1


def test_engine_layers_compiled_one_at_a_time_share_one_compilation() -> None:
    counter = CompileCounterWithBackend("aot_eager")
    compiled, plain = _runner(counter=counter, scope="layer"), _runner()
    prompts = torch.arange(1, 41).view(2, 20)
    slots, last = torch.tensor([0, 1]), torch.tensor([19, 39])
    outputs = []
    with torch.inference_mode():
        for runner in (compiled, plain):
            outputs.append(runner.prefill_body(prompts, slots, last))
            outputs += _decode_steps(runner, [(2, 128)])
    # One compilation for a prefill layer, one for a decode layer, one for the logits.
    assert counter.frame_count == 3
    assert torch.allclose(outputs[0], outputs[2], atol=1e-5)
    assert torch.allclose(outputs[1], outputs[3], atol=1e-5)


def test_engine_compiled_layers_hold_the_model_sizes_constant() -> None:
    # With every size symbolic, inductor's kernels index by sizes given at run time (on the
    # GPU a 4 x 512 prefill took a quarter longer). Only the tokens and the caches' slots and
    # length may vary.
    counter = CompileCounterWithBackend("aot_eager")
    runner = _runner(counter=counter, scope="layer")
    prompts = torch.arange(1, 41).view(2, 20)
    with torch.inference_mode():
        runner.prefill_body(prompts, torch.tensor([0, 1]), torch.tensor([19, 39]))
    inputs = {
        node.name: node.meta["example_value"]
        for node in counter.graphs[0].graph.nodes
        if node.op == "placeholder"
    }

    def fixed(name: str) -> list[bool]:
        return [is_concrete_int(size) for size in inputs[name].shape]

    weights = [name for name in inputs if name.startswith("l_layer_")]
    assert len(weights) == 6  # two norms, four products
    assert all(all(fixed(name)) for name in weights)
    assert fixed("l_h_") == [False, True]
    assert fixed("l_cos_") == [False, True, True]
    assert fixed("l_k_cache_") == [False, True, False, True]
    # The heads and the head size are constants, not inputs.
    assert [name for name in inputs if name.startswith("l_self_")] == ["l_self_eps"]


def test_engine_models_of_other_sizes_in_one_process_are_each_compiled() -> None:
    # Each model's sizes are constants of its own compilations, so a worker serving several
    # models compiles a prefill layer per model and prompt count (1, or more); past dynamo's
    # default limit of 8 per function, later models would run their forwards uncompiled.
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    frames = []
    for hidden in (48, 60, 72, 84, 96, 108):
        runner = random_runner(
            _sizes(hidden=hidden),
            max_batch=4,
            max_len=64,
            compile_steps=True,
            compile_backend=counter,
        )
        with torch.inference_mode():
            for n in (1, 2):
                prompts = torch.arange(1, 10 * n + 1).view(n, 10)
                runner.prefill_body(prompts, torch.arange(n), torch.arange(n) * 10 + 9)
        frames.append(counter.frame_count)
    # Every model compiled as much as the first: its prefill layer (for 1 prompt and for 2)
    # and its logits.
    added = [later - earlier for earlier, later in itertools.pairwise([0, *frames])]
    assert added[0] >= 3
    assert added == [added[0]] * len(added)
