"""The compiled decode step (as on a GPU) over a tiny random model, run on the CPU."""

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModelForCausalLM, LlamaConfig

from models_admin.llama import LlamaRunner


def _runner(max_len: int) -> LlamaRunner:
    # Sizes that match none of the batch sizes or spans below: a compiled step treats sizes
    # equal at its first call as one symbol, which would tie them together.
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=max_len,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return LlamaRunner(
        model,
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_batch=4,
        max_len=max_len,
        cpu_fp16_weights=False,
    )


def test_engine_decode_step_at_the_longest_span_reuses_the_compiled_step() -> None:
    runner = _runner(max_len=256)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    step = torch.compile(runner._decode_body, dynamic=True, backend=counter)
    eager = []
    with torch.inference_mode():
        # The engine's span buckets run from 128 to the whole context window.
        for b, span in ((2, 128), (4, 128), (2, 256), (4, 256)):
            ids = torch.arange(1, b + 1)
            pos = torch.full((b,), span - 1)
            eager.append(runner._decode_body(ids, pos, span))
            assert torch.allclose(step(ids, pos, span), eager[-1], atol=1e-5)
    assert counter.frame_count == 1


def test_engine_layers_compiled_one_at_a_time_share_one_compilation() -> None:
    compiled, plain = _runner(max_len=256), _runner(max_len=256)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled.decode_layer = torch.compile(compiled._decode_layer, dynamic=True, backend=counter)
    compiled.prefill_layer = torch.compile(compiled._prefill_layer, dynamic=True, backend=counter)
    prompts, slots, last = (
        torch.arange(1, 41).view(2, 20),
        torch.tensor([0, 1]),
        torch.tensor([19, 39]),
    )
    ids, pos = torch.tensor([5, 6]), torch.tensor([20, 20])
    with torch.inference_mode():
        for runner in (compiled, plain):
            first = runner.prefill_body(prompts, slots, last)
            step = runner.decode_body(ids, pos, 128)
            if runner is compiled:
                expected_first, expected_step = first, step
    assert counter.frame_count == 2  # one per forward, not one per layer
    assert torch.allclose(first, expected_first, atol=1e-5)
    assert torch.allclose(step, expected_step, atol=1e-5)
