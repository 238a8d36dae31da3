"""Choosing the next token for each sequence of a batch, each with its own parameters."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models_admin.engine import SamplingParams


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def sample_rows(
    logits: Any,
    params: "list[SamplingParams]",
    generators: list[Any],
    greedy: list[tuple[int, float]],
) -> list[tuple[int, float]]:
    """(token, log-probability under the model) for each row of `logits` [B, V].

    `greedy` holds each row's most likely token and its log-probability, as the forward pass
    already worked them out; rows with a temperature draw their own token instead.
    """
    import torch

    picks: list[tuple[int, float]] = []
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.temperature <= 0:
            picks.append(greedy[row])
            continue
        token = _sample(logits[row], p, generator)
        logprob = torch.log_softmax(logits[row], dim=-1)[token]
        picks.append((token, float(logprob)))
    return picks


def _sample(logits: Any, params: "SamplingParams", generator: Any) -> int:
    import torch

    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
