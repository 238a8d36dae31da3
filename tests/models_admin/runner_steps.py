"""A small Llama runner and two decode steps from empty caches, for the kernel tests (which run
them in Triton's interpreter, in a process of their own)."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from models_admin.llama import LlamaRunner

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]


def small_runner(*, biases: bool = False) -> LlamaRunner:
    """Two layers, grouped-query attention (4 query heads a KV head), fp32 on the CPU."""
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        attention_bias=biases,
        mlp_bias=biases,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases start at zero: give them values
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    return LlamaRunner(
        model,
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_batch=4,
        max_len=128,
        cpu_weights="fp32",
    )


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
