"""Choosing the next token for each sequence of a batch, each with its own parameters."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models_admin.engine import SamplingParams


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def sample_rows(
    logits: Any, params: "list[SamplingParams]", generators: list[Any]
) -> list[tuple[int, float]]:
    """(token, log-probability under the model) for each row of `logits` [B, V]."""
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    greedy = torch.argmax(logp, dim=-1)
    if all(p.temperature <= 0 for p in params):
        # One device-to-host transfer for the whole batch (each one is a sync on a GPU).
        chosen = logp.gather(1, greedy[:, None])[:, 0]
        tokens, values = torch.stack([greedy.to(chosen.dtype), chosen]).tolist()
        return [(int(t), float(v)) for t, v in zip(tokens, values, strict=True)]
    picks: list[int] = []
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        picks.append(int(greedy[row]) if p.temperature <= 0 else _sample(logits[row], p, generator))
    picked = torch.tensor(picks, device=logp.device)
    chosen_list = logp.gather(1, picked[:, None])[:, 0].tolist()
    return [(t, float(v)) for t, v in zip(picks, chosen_list, strict=True)]


def _sample(logits: Any, params: "SamplingParams", generator: Any) -> int:
    import torch

    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
