"""Small random Llama runners on the CPU, and two decode steps from empty caches, for the
kernel tests (which run them in Triton's interpreter, in a process of their own) and the
compilation tests."""

from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from models_admin.llama import LlamaRunner

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]


def random_runner(sizes: dict[str, Any], *, biases: bool = False, **options: Any) -> LlamaRunner:
    """A two-layer Llama of these `sizes` (LlamaConfig's arguments), random weights (seed 0),
    fp32 on the CPU; `options` go to the runner (max_batch and max_len at least)."""
    config = LlamaConfig(**sizes, num_hidden_layers=2, attention_bias=biases, mlp_bias=biases)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases start at zero: give them values
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    return LlamaRunner(
        model, device=torch.device("cpu"), dtype=torch.float32, cpu_weights="fp32", **options
    )


def small_runner(*, biases: bool = False) -> LlamaRunner:
    """Grouped-query attention (4 query heads a KV head), 4 slots of 128 positions."""
    sizes = dict(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    return random_runner(sizes, biases=biases, max_batch=4, max_len=128)


def two_steps(runner: LlamaRunner, prompts: list[list[int]] = PROMPTS) -> torch.Tensor:
    """The logits of two decode steps after `prompts` are prefilled into slots 0.., from empty
    caches: the second step reads what the first one wrote."""
    for cache in runner.k_cache + runner.v_cache:
        cache.zero_()
    slots = list(range(len(prompts)))
    runner.prefill(slots=slots, prompts=prompts)
    positions = [len(p) for p in prompts]
    first = runner.decode(token_ids=[5 + i for i in slots], positions=positions).logits.clone()
    later = [p + 1 for p in positions]
    second = runner.decode(token_ids=[8 + i for i in slots], positions=later).logits
    return torch.cat([first, second])
