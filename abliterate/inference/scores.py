"""First-token scores: what one forward pass over the prompts says about the reply to come.

- `first_token_logprobs`: float64 log-probabilities [N, V] of the first reply token of each prompt
  (a model in memory; `abliterate.inference.runner` runs it for several variants, or layer-streamed);
- `first_token_kl`: mean KL(reference || other) of two such distributions, in nats: how much a
  change moves the model where it should move nothing;
- `refusal_logodds`, `refusal_score`: the log-odds that the reply opens with a refusal token
  (`abliterate.inference.refusal`): lower means fewer refusals, no generation needed;
- `wilson_bounds`: what a refusal rate counted on some prompts may be on prompts like them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import torch

from abliterate.inference.devices import input_device
from abliterate.inference.loading import length_sorted_batches


def first_token_logprobs(
    model: Any, encoded: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> torch.Tensor:
    """[N, V] float64 log-probabilities of the first reply token, in prompt order."""
    device = input_device(model)
    out: list[torch.Tensor | None] = [None] * len(encoded)
    with torch.inference_mode():
        for batch in length_sorted_batches(encoded, batch_size, pad_id):
            logits = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device),
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1, :]
            logprobs = torch.log_softmax(logits.double(), dim=-1).cpu()
            for row, index in enumerate(batch.indices):
                out[index] = logprobs[row]
    return torch.stack(out)  # type: ignore[arg-type]


def refusal_logodds(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """[N] log(p / (1 - p)), p the first reply token's probability mass on the refusal tokens."""
    log_p = torch.logsumexp(logprobs[:, list(token_ids)], dim=-1).clamp(max=-1e-12)
    return log_p - torch.log(-torch.expm1(log_p))


def refusal_score(logprobs: torch.Tensor, token_ids: Sequence[int]) -> float:
    """Mean log-odds of starting the reply with a refusal token."""
    return float(refusal_logodds(logprobs, token_ids).mean())


def first_token_kl_each(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[N] KL(reference || other) of each prompt, in nats."""
    return (reference.exp() * (reference - other)).sum(dim=-1).clamp(min=0)


def first_token_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference || other) over prompts, in nats."""
    return float(first_token_kl_each(reference, other).mean())


def wilson_bounds(refusals: int, prompts: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a refusal rate seen as `refusals` of `prompts` at two-sided
    `confidence`: what the rate may be on prompts like these that were not scored."""
    if prompts <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = refusals / prompts, z * z
    center = (p + z2 / (2 * prompts)) / (1 + z2 / prompts)
    half = z / (1 + z2 / prompts) * math.sqrt(p * (1 - p) / prompts + z2 / (4 * prompts * prompts))
    return max(0.0, center - half), min(1.0, center + half)
