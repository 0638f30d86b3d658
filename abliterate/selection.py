"""Automatic choice of the direction to ablate, by trying each candidate at inference time.

For each candidate residual position p, the model runs with r_p removed from the residual
stream at every layer (`abliterate.intervention.directional_ablation`, equivalent to
orthogonalising every writer) on held-out validation prompts, and gets two scores:

- `refusal_score` on harmful prompts: the mean log-odds that the reply starts with a refusal
  token, log(p / (1 - p)) with p the first reply token's probability mass on the tokens that
  refusals open with (see `refusal_token_ids`). No generation needed; lower means fewer refusals.
- `kl` on harmless prompts: the mean KL(unmodified || ablated) of the first reply token's
  distribution; how much the ablation changes the model where it should change nothing.
  Harmless prompts that the unmodified model refuses (its most likely first token is a
  refusal token) are left out: those replies are meant to change, and on the demo model a
  few such false refusals turned into answers dominate the mean (KL 3-8 each, against a
  median of 0.001). `kl_prompts` records how many prompts the KL averages over.

The chosen position is the lowest refusal score among candidates with `kl` <= `kl_threshold`
(default 0.1 nats: the first reply token of a harmless prompt keeps nearly all of its
distribution). The last `skip_last_fraction` of positions (default 20%) are not candidates:
directions there are about output tokens more than about the request, and ablating them
mostly damages the model. An explicit position overrides the choice (it is still scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate.directions import DirectionSet
from abliterate.errors import AbliterateError
from abliterate.intervention import directional_ablation
from abliterate.measure import (
    MeasureSettings,
    context_length,
    encode_prompts,
    length_sorted_batches,
    pad_token_id,
)


@dataclass(frozen=True)
class SelectionSettings:
    kl_threshold: float = 0.1
    skip_last_fraction: float = 0.2
    max_candidates: int | None = None  # evenly subsample the candidates of big models
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not 0.0 <= self.skip_last_fraction < 1.0:
            raise AbliterateError(f"skip-last fraction must lie in [0, 1), got {self.skip_last_fraction}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise AbliterateError(f"max candidates must be at least 1, got {self.max_candidates}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    @classmethod
    def unscored(cls, position: int, kl_threshold: float) -> Selection:
        """A position chosen by the user without inference-time scores (the model was streamed)."""
        return cls(position, True, None, [], kl_threshold, [], 0)

    @property
    def scored(self) -> bool:
        return self.baseline_refusal_score is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def refusal_token_ids(tokenizer: Any, markers: Sequence[str] | None = None) -> list[int]:
    """Token ids a refusing reply starts with.

    From the refusal markers that open a reply ("i cannot", "i'm sorry", "as an ai", ...; not
    mid-sentence ones such as "cannot provide"), capitalised as a reply starts: the first token
    of each, encoded alone and after a space. For most tokenizers this is "I" and "As".
    """
    if markers is None:
        from abliterate.refusal import DEFAULT_REFUSAL_MARKERS as markers
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids: set[int] = set()
    for marker in markers:
        text = marker.strip()
        if not text.lower().startswith(("i ", "i'", "as ")):
            continue
        text = text[0].upper() + text[1:]
        for variant in (text, " " + text):
            encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if encoded and encoded[0] != unknown:
                ids.add(int(encoded[0]))
    if not ids:
        raise AbliterateError(
            'no refusal marker that opens a reply ("I ...", "As ...") encodes to a known token with this '
            "tokenizer: give markers in the model's language"
        )
    return sorted(ids)


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


def first_token_logprobs(
    model: Any, encoded: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> torch.Tensor:
    """[N, V] float64 log-probabilities of the first reply token, in prompt order."""
    device = next(model.parameters()).device
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


def refusal_score(logprobs: torch.Tensor, token_ids: Sequence[int]) -> float:
    """Mean log-odds of starting the reply with a refusal token."""
    log_p = torch.logsumexp(logprobs[:, list(token_ids)], dim=-1).clamp(max=-1e-12)
    log_not_p = torch.log(-torch.expm1(log_p))
    return float((log_p - log_not_p).mean())


def first_token_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference || other) over prompts, in nats."""
    return float((reference.exp() * (reference - other)).sum(dim=-1).clamp(min=0).mean())


def select_direction(
    model: Any,
    tokenizer: Any,
    directions: DirectionSet,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    measure_settings: MeasureSettings,
    settings: SelectionSettings | None = None,
    position: int | None = None,
    progress: bool = True,
) -> Selection:
    """Score candidate directions by inference-time ablation; `position` forces the choice."""
    settings = settings or SelectionSettings()
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
        else candidate_positions(directions, settings.skip_last_fraction, settings.max_candidates)
    )
    if not candidates:
        raise AbliterateError(
            "no candidate position has a non-zero direction: the two prompt sets look identical"
        )
    limit = context_length(model, tokenizer, measure_settings)
    harmful = encode_prompts(tokenizer, harmful_val, measure_settings, limit, "harmful validation")
    harmless = encode_prompts(tokenizer, harmless_val, measure_settings, limit, "harmless validation")
    pad_id = pad_token_id(tokenizer)
    token_ids = refusal_token_ids(tokenizer)

    base_harmless = first_token_logprobs(model, harmless, settings.batch_size, pad_id)
    answered = ~torch.isin(base_harmless.argmax(dim=-1), torch.tensor(token_ids))
    if not bool(answered.any()):
        raise AbliterateError(
            "the model refuses every harmless validation prompt (its first reply token is a refusal "
            "token): check the chat template settings and the prompt files"
        )
    base_harmless = base_harmless[answered]
    harmless = [ids for ids, keep in zip(harmless, answered.tolist(), strict=True) if keep]
    baseline = refusal_score(first_token_logprobs(model, harmful, settings.batch_size, pad_id), token_ids)
    scores = []
    for p in tqdm(candidates, desc="score directions", unit="position", disable=not progress):
        with directional_ablation(model, directions.direction[p].float()):
            ablated_harmless = first_token_logprobs(model, harmless, settings.batch_size, pad_id)
            ablated_harmful = first_token_logprobs(model, harmful, settings.batch_size, pad_id)
        scores.append(
            CandidateScore(
                p,
                refusal_score(ablated_harmful, token_ids),
                first_token_kl(base_harmless, ablated_harmless),
            )
        )
    if position is None:
        allowed = [s for s in scores if s.kl <= settings.kl_threshold]
        if not allowed:
            least = min(scores, key=lambda s: s.kl)
            raise AbliterateError(
                f"every candidate direction changes harmless replies too much: the smallest first-token KL is "
                f"{least.kl:.4g} (position {least.position}), above the threshold {settings.kl_threshold}; "
                "raise the KL threshold or pass an explicit position"
            )
        position = min(allowed, key=lambda s: s.refusal_score).position
    return Selection(
        position=position,
        explicit=explicit,
        baseline_refusal_score=baseline,
        candidates=scores,
        kl_threshold=settings.kl_threshold,
        refusal_token_ids=token_ids,
        kl_prompts=int(answered.sum()),
    )
