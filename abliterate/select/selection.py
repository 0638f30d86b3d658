"""Automatic choice of the direction to ablate, by trying each candidate at inference time.

For each candidate residual position p, the model runs with r_p removed from the residual
stream at every layer (`abliterate.edit.inference_edit.DirectionEdit`: the ablation plan of every
writer at scale 1, applied at inference time) on held-out validation prompts, and gets two scores:

- `refusal_score` on harmful prompts: the mean log-odds that the reply starts with a refusal
  token, log(p / (1 - p)) with p the first reply token's probability mass on the tokens that
  refusals open with. No generation needed; lower means fewer refusals.
- `kl` on harmless prompts: the mean KL(unmodified || ablated) of the first reply token's
  distribution; how much the ablation changes the model where it should change nothing.
  Harmless prompts that the unmodified model refuses (its most likely first token is a
  refusal token) are left out: those replies are meant to change, and on the demo model a
  few such false refusals turned into answers dominate the mean (KL 3-8 each, against a
  median of 0.001). `kl_prompts` records how many prompts the KL averages over.

The refusal tokens are the model's own (`abliterate.inference.refusal.find_refusal_tokens`): the
first tokens of its greedy replies to the harmful validation prompts that the marker check calls
refusals, else (the model refuses none of them, or `refusal_probe_tokens` is 0) the first tokens
of the marker phrases that open a reply.

The chosen position is the lowest refusal score among candidates with `kl` <= `kl_threshold`
(default 0.1 nats: the first reply token of a harmless prompt keeps nearly all of its
distribution). The last `skip_last_fraction` of positions (default 20%) are not candidates:
directions there are about output tokens more than about the request, and ablating them
mostly damages the model. An explicit position overrides the choice (it is still scored).

The forward passes run on a model in memory or layer-streamed (`abliterate.inference.runner`): streamed,
the unmodified model and every candidate go through each decoder layer while it is loaded, so the
scores cost one read of the weights (plus one per probe token to find the refusal tokens).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from abliterate import config
from abliterate.edit.inference_edit import DirectionEdit
from abliterate.errors import AbliterateError
from abliterate.inference.loading import pad_token_id
from abliterate.inference.refusal import find_refusal_tokens, marker_phrases
from abliterate.inference.runner import as_forward
from abliterate.inference.scores import first_token_kl, refusal_score
from abliterate.measure.chat import context_length, encode_prompts
from abliterate.measure.directions import DirectionSet


@dataclass
class CandidateScore:
    position: int
    refusal_score: float
    kl: float


@dataclass
class Selection:
    position: int
    explicit: bool  # the user chose the position; the scores are for information only
    baseline_refusal_score: float | None  # unmodified model on the harmful validation prompts; None: unscored
    candidates: list[CandidateScore]
    kl_threshold: float
    refusal_token_ids: list[int]
    kl_prompts: int  # harmless validation prompts the unmodified model does not refuse
    refusal_tokens: list[str] = field(default_factory=list)  # the ids decoded, for people
    refusal_tokens_source: str = "markers"  # replies (the model's own refusals) | markers (the fixed openers)
    refusals_found: int = 0  # harmful validation replies the marker check called refusals
    streamed: bool = False  # scored layer-streamed (one read of the weights for every candidate)
    weight_reads: int = 0  # passes over the weights the scoring took (streamed; probe included)
    seconds_probe: float = 0.0  # finding the refusal tokens (greedy replies)
    seconds_scoring: float = 0.0  # the unmodified model and every candidate on the validation prompts

    @property
    def scored(self) -> bool:
        return self.baseline_refusal_score is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def selection_record(selection: config.Selection, evaluation: config.Evaluation) -> dict[str, Any]:
    """What decides the choice besides the measurement and the prompts, JSON-ready: for cache keys."""
    return {
        "kl_threshold": selection.kl_threshold,
        "skip_last_fraction": selection.skip_last_fraction,
        "max_candidates": selection.max_candidates,
        "markers": list(marker_phrases(evaluation)),
        "refusal_probe_tokens": evaluation.refusal_probe_tokens,
    }


def candidate_positions(
    directions: DirectionSet, skip_last_fraction: float, max_candidates: int | None
) -> list[int]:
    num_layers = directions.num_positions - 1
    last = int(num_layers * (1.0 - skip_last_fraction))
    candidates = [p for p in directions.defined if p <= last]
    if max_candidates is not None and len(candidates) > max_candidates:
        step = (len(candidates) - 1) / max(max_candidates - 1, 1)
        candidates = sorted({candidates[round(k * step)] for k in range(max_candidates)})
    return candidates


def select_direction(
    model: Any,
    tokenizer: Any,
    directions: DirectionSet,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    measurement: config.Measurement,
    template: config.Template,
    selection: config.Selection,
    evaluation: config.Evaluation,
    runtime: config.Runtime,
    position: int | None = None,
    progress: bool = True,
) -> Selection:
    """Score candidate directions by inference-time ablation; `position` forces the choice.

    `model`: a loaded model, or a forward (`abliterate.inference.runner`: in memory or layer-streamed).
    `measurement` and `template` encode the prompts as they were measured; `evaluation` gives the
    marker phrases and the probe length that find the refusal tokens; `runtime` the batch size."""
    forward = as_forward(model)
    explicit = position is not None
    if position is not None and not 0 <= position < directions.num_positions:
        raise AbliterateError(
            f"direction position {position} is out of range: the model has positions 0..{directions.num_positions - 1}"
        )
    if position is not None and position not in directions.defined:
        raise AbliterateError(
            f"the direction at position {position} is zero (harmful and harmless means coincide there): "
            "choose another position"
        )
    candidates = (
        [position]
        if position is not None
        else candidate_positions(directions, selection.skip_last_fraction, selection.max_candidates)
    )
    if not candidates:
        raise AbliterateError(
            "no candidate position has a non-zero direction: the two prompt sets look identical"
        )
    limit = context_length(forward, tokenizer)
    harmful = encode_prompts(
        tokenizer, harmful_val, template, "harmful validation", limit, measurement=measurement
    )
    harmless = encode_prompts(
        tokenizer, harmless_val, template, "harmless validation", limit, measurement=measurement
    )
    pad_id = pad_token_id(tokenizer)
    reads, began = forward.weight_reads, time.perf_counter()
    found = find_refusal_tokens(
        forward,
        tokenizer,
        harmful,
        marker_phrases(evaluation),
        evaluation.refusal_probe_tokens,
        runtime.batch_size,
        progress,
    )
    probed = time.perf_counter()
    token_ids = torch.tensor(found.ids)

    variants = [None] + [DirectionEdit(directions.direction[p].float()) for p in candidates]
    sets = {"harmless": harmless, "harmful": harmful}
    base_harmless: torch.Tensor | None = None
    answered = torch.ones(len(harmless), dtype=torch.bool)
    baseline = 0.0
    scores: dict[int, CandidateScore] = {}
    stream = forward.first_token_logprobs(sets, variants, runtime.batch_size, pad_id, progress)
    for variant, label, logprobs in stream:
        if variant == 0 and label == "harmless":
            answered = ~torch.isin(logprobs.argmax(dim=-1), token_ids)
            if not bool(answered.any()):
                stream.close()
                raise AbliterateError(
                    "the model refuses every harmless validation prompt (its first reply token is a refusal "
                    "token): check the chat template settings and the prompt files"
                )
            base_harmless = logprobs[answered]
        elif variant == 0:
            baseline = refusal_score(logprobs, found.ids)
        else:
            score = scores.setdefault(variant, CandidateScore(candidates[variant - 1], 0.0, 0.0))
            if label == "harmless":
                score.kl = first_token_kl(base_harmless, logprobs[answered])
            else:
                score.refusal_score = refusal_score(logprobs, found.ids)
    ranked = [scores[v] for v in sorted(scores)]
    scored = time.perf_counter()
    if position is None:
        allowed = [s for s in ranked if s.kl <= selection.kl_threshold]
        if not allowed:
            least = min(ranked, key=lambda s: s.kl)
            raise AbliterateError(
                f"every candidate direction changes harmless replies too much: the smallest first-token KL is "
                f"{least.kl:.4g} (position {least.position}), above the threshold {selection.kl_threshold}; "
                "raise the KL threshold or pass an explicit position"
            )
        position = min(allowed, key=lambda s: s.refusal_score).position
    return Selection(
        position=position,
        explicit=explicit,
        baseline_refusal_score=baseline,
        candidates=ranked,
        kl_threshold=selection.kl_threshold,
        refusal_token_ids=found.ids,
        kl_prompts=int(answered.sum()),
        refusal_tokens=found.texts(tokenizer),
        refusal_tokens_source=found.source,
        refusals_found=found.refusals,
        streamed=forward.streamed,
        weight_reads=forward.weight_reads - reads,
        seconds_probe=round(probed - began, 3),
        seconds_scoring=round(scored - probed, 3),
    )
