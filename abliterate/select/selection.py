"""Automatic choice of the direction to ablate, by trying each candidate at inference time.

For each candidate residual position p, the model runs with r_p removed from the residual
stream at every layer (`abliterate.inference.intervention.directional_ablation`, equivalent to
orthogonalising every writer) on held-out validation prompts, and gets two scores:

- `refusal_score` on harmful prompts: the mean log-odds that the reply starts with a refusal
  token, log(p / (1 - p)) with p the first reply token's probability mass on the tokens that
  refusals open with. No generation needed; lower means fewer refusals.
- `kl` on harmless prompts: the mean KL(unmodified || ablated) of the first reply token's
  distribution; how much the ablation changes the model where it should change nothing.
  Harmless prompts that the unmodified model refuses (its most likely first token is a
  refusal token) are left out: those replies are meant to change, and on the demo model a
  few such false refusals turned into answers dominate the mean (KL 3-8 each, against a
  median of 0.001). `kl_prompts` records how many prompts the KL averages over.

The refusal tokens are the model's own (`find_refusal_tokens`): the first tokens of its greedy
replies to the harmful validation prompts that the marker check calls refusals (and that no
reply the check lets through starts with), so the score works for any tokenizer, casing and
language. Only when the model refuses none of them (or `refusal_probe_tokens` is 0) are they the
first tokens of the marker phrases that open a reply ("I cannot", "As an AI": `refusal_token_ids`).

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

from abliterate.errors import AbliterateError
from abliterate.inference.devices import input_device
from abliterate.measure.directions import DirectionSet
from abliterate.measure.means import (
    MeasureSettings,
    context_length,
    encode_prompts,
    length_sorted_batches,
    pad_token_id,
)
from abliterate.vocabulary import DEFAULT_REFUSAL_MARKERS


@dataclass(frozen=True)
class SelectionSettings:
    kl_threshold: float = 0.1
    skip_last_fraction: float = 0.2
    max_candidates: int | None = None  # evenly subsample the candidates of big models
    batch_size: int = 16
    markers: tuple[str, ...] = DEFAULT_REFUSAL_MARKERS  # what the marker check calls a refusal
    refusal_probe_tokens: int = (
        6  # greedy reply tokens per harmful prompt to find refusal tokens; 0: markers only
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.skip_last_fraction < 1.0:
            raise AbliterateError(f"skip-last fraction must lie in [0, 1), got {self.skip_last_fraction}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise AbliterateError(f"max candidates must be at least 1, got {self.max_candidates}")
        if self.refusal_probe_tokens < 0:
            raise AbliterateError(f"refusal probe tokens must be >= 0, got {self.refusal_probe_tokens}")

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


def refusal_token_ids(tokenizer: Any, markers: Sequence[str] | None = None) -> list[int]:
    """Token ids a refusing reply starts with, from the marker phrases (the fallback of
    `find_refusal_tokens`).

    From the refusal markers that open a reply ("i cannot", "i'm sorry", "as an ai", ...; not
    mid-sentence ones such as "cannot provide"), capitalised as a reply starts: the first token
    of each, encoded alone and after a space. For most tokenizers this is "I" and "As".
    """
    if markers is None:
        markers = DEFAULT_REFUSAL_MARKERS
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
            "tokenizer, and the model's own replies showed no refusal to learn them from: give marker phrases "
            "in the model's language and casing with --marker (repeatable) or --markers FILE"
        )
    return sorted(ids)


@dataclass
class RefusalTokens:
    """The token ids refusals start with, and where they came from."""

    ids: list[int]
    source: str  # replies | markers
    refusals: int  # probed replies the marker check called refusals
    probed: int  # replies probed

    def texts(self, tokenizer: Any) -> list[str]:
        return [tokenizer.decode([i]) for i in self.ids]


def refusal_tokens_from_replies(
    tokenizer: Any, replies: Sequence[Sequence[int]], markers: Sequence[str], probe_tokens: int
) -> RefusalTokens:
    """The first tokens of the replies whose first `probe_tokens` tokens the marker check calls a
    refusal, less any token that also opens a reply it does not; the markers' openers when none remain."""
    from abliterate.inference.refusal import is_refusal

    opens_refusal: set[int] = set()
    opens_other: set[int] = set()
    refusals = 0
    for reply in replies:
        head = list(reply[:probe_tokens])
        if not head:
            continue
        if is_refusal(tokenizer.decode(head, skip_special_tokens=True), tuple(markers)):
            refusals += 1
            opens_refusal.add(int(head[0]))
        else:
            opens_other.add(int(head[0]))
    ids = sorted(opens_refusal - opens_other)
    if ids:
        return RefusalTokens(ids, "replies", refusals, len(replies))
    return RefusalTokens(refusal_token_ids(tokenizer, markers), "markers", refusals, len(replies))


def find_refusal_tokens(
    forward: Any,
    tokenizer: Any,
    harmful: Sequence[Sequence[int]],
    markers: Sequence[str],
    probe_tokens: int,
    batch_size: int,
    progress: bool = False,
) -> RefusalTokens:
    """The model's own refusal openers: its greedy replies (`probe_tokens` tokens) to the encoded
    harmful prompts, marker-checked (`refusal_tokens_from_replies`). A layer-streamed model reads its
    weights once per probe token, less when every reply has ended or already holds a marker (a reply
    that refuses stays a refusal however it goes on). With `probe_tokens` 0, the markers' openers
    without probing."""
    from abliterate.inference.refusal import is_refusal
    from abliterate.inference.runner import stop_ids

    if probe_tokens == 0:
        return RefusalTokens(refusal_token_ids(tokenizer, markers), "markers", 0, 0)
    stops = stop_ids(forward.generation_eos, tokenizer)

    def refused(reply: list[int]) -> bool:
        return is_refusal(tokenizer.decode(reply, skip_special_tokens=True), tuple(markers))

    replies = forward.greedy(
        harmful,
        probe_tokens,
        batch_size,
        pad_token_id(tokenizer),
        stops,
        progress,
        "find refusal tokens",
        refused,
    )
    return refusal_tokens_from_replies(tokenizer, replies, markers, probe_tokens)


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
    """Score candidate directions by inference-time ablation; `position` forces the choice.

    `model`: a loaded model, or a forward (`abliterate.inference.runner`: in memory or layer-streamed)."""
    from abliterate.inference.runner import as_forward

    forward = as_forward(model)
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
    limit = context_length(forward, tokenizer, measure_settings)
    harmful = encode_prompts(tokenizer, harmful_val, measure_settings, limit, "harmful validation")
    harmless = encode_prompts(tokenizer, harmless_val, measure_settings, limit, "harmless validation")
    pad_id = pad_token_id(tokenizer)
    reads, began = forward.weight_reads, time.perf_counter()
    found = find_refusal_tokens(
        forward,
        tokenizer,
        harmful,
        settings.markers,
        settings.refusal_probe_tokens,
        settings.batch_size,
        progress,
    )
    probed = time.perf_counter()
    token_ids = torch.tensor(found.ids)

    variants = [None] + [directions.direction[p].float() for p in candidates]
    sets = {"harmless": harmless, "harmful": harmful}
    base_harmless: torch.Tensor | None = None
    answered = torch.ones(len(harmless), dtype=torch.bool)
    baseline = 0.0
    scores: dict[int, CandidateScore] = {}
    stream = forward.first_token_logprobs(sets, variants, settings.batch_size, pad_id, progress)
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
        allowed = [s for s in ranked if s.kl <= settings.kl_threshold]
        if not allowed:
            least = min(ranked, key=lambda s: s.kl)
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
        candidates=ranked,
        kl_threshold=settings.kl_threshold,
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
