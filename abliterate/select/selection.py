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

Not every candidate is scored on every prompt (`shortlist`, default 3): successive halving ranks the
others out first. Round 0 scores every candidate on the first `shortlist_prompts` (8) prompts of each
validation set, and keeps the better half in the choice's own order (under the KL threshold by
refusal score, then the rest by KL); each next round scores the survivors on the next prompts, up to
twice as many, and halves them again, until the shortlist remains (never fewer) or the prompts cover
both sets; the last round scores the shortlist on the rest, so its scores are over every prompt, as
with `shortlist` all (one round: every candidate on every prompt, today's behaviour). The rounds
depend on the counts only (`halving_rounds`); the candidates ranked out are recorded with their scores
on the prompts they saw and the round. GLM-4.5-Air (36 candidates, 69 + 69 prompts): 1,502 candidate
prompts in 5 rounds instead of 4,968 (`benchmarks/bench_run_streamed.py` projects the hours).

The forward passes run on a model in memory or layer-streamed (`abliterate.inference.runner`): streamed,
the unmodified model and every candidate of a round go through each decoder layer while it is loaded,
so the scores cost one read of the weights per round (plus one per probe token to find the refusal
tokens).
"""

from __future__ import annotations

import math
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
from abliterate.inference.scores import first_token_kl_each, refusal_logodds, refusal_score
from abliterate.measure.chat import context_length, encode_prompts
from abliterate.measure.directions import DirectionSet


@dataclass
class CandidateScore:
    position: int
    refusal_score: float
    kl: float


@dataclass
class RankedOut:
    """A candidate left out by a ranking round: its scores on the prompts it was scored on."""

    position: int
    refusal_score: float  # mean over the first `harmful_prompts` harmful validation prompts
    kl: float  # mean over the answered ones of the first `harmless_prompts` harmless validation prompts
    round: int  # the round (0: the first) after which it was left out
    harmful_prompts: int
    harmless_prompts: int


@dataclass
class Round:
    """One scoring pass: `candidates` scored on the first prompts of each set; `keep` of them go on."""

    candidates: int
    harmful_prompts: int
    harmless_prompts: int
    keep: int  # the last round keeps every candidate: they are the ones scored on every prompt


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
    streamed: bool = False  # scored layer-streamed (one read of the weights per round, all its candidates)
    weight_reads: int = 0  # passes over the weights the scoring took (streamed; probe included)
    seconds_probe: float = 0.0  # finding the refusal tokens (greedy replies)
    seconds_scoring: float = 0.0  # the unmodified model and every candidate on the validation prompts
    shortlist: str = "all"  # the setting: how many candidates were to be scored on every prompt
    rounds: list[Round] = field(default_factory=list)  # the scoring passes, ranking rounds first
    ranked_out: list[RankedOut] = field(default_factory=list)  # candidates left out before the last round

    @property
    def scored(self) -> bool:
        return self.baseline_refusal_score is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """`as_dict` less the timings: what the directions file keeps, so identical runs write identical
        files (the timings go to MLflow and the console)."""
        return {k: v for k, v in self.as_dict().items() if k not in SELECTION_TIMINGS}


SELECTION_TIMINGS = ("seconds_probe", "seconds_scoring")


def selection_record(selection: config.Selection, evaluation: config.Evaluation) -> dict[str, Any]:
    """What decides the choice besides the measurement and the prompts, JSON-ready: for cache keys."""
    return {
        "kl_threshold": selection.kl_threshold,
        "skip_last_fraction": selection.skip_last_fraction,
        "max_candidates": selection.max_candidates,
        "shortlist": selection.shortlist,
        "shortlist_prompts": selection.shortlist_prompts,
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


def halving_rounds(
    num_candidates: int, num_harmful: int, num_harmless: int, selection: config.Selection
) -> list[Round]:
    """The scoring passes of `num_candidates` candidates: while more than `selection.shortlist` remain and
    the prompts do not yet cover both sets, a ranking round scores them on the first n prompts of each
    set (n = `shortlist_prompts`, doubled each round) and keeps the better half (never fewer than the
    shortlist); the last round scores the rest on every prompt. `shortlist` all: one round, every
    candidate on every prompt. The rounds depend on the counts only, not on the scores."""
    finalists = num_candidates if selection.shortlist == "all" else int(selection.shortlist)
    rounds: list[Round] = []
    left, n = num_candidates, selection.shortlist_prompts
    while left > finalists and (n < num_harmful or n < num_harmless):
        keep = max(finalists, math.ceil(left / 2))
        rounds.append(Round(left, min(n, num_harmful), min(n, num_harmless), keep))
        left, n = keep, 2 * n
    rounds.append(Round(left, num_harmful, num_harmless, left))
    return rounds


def _mean(parts: list[torch.Tensor]) -> float:
    return float(torch.cat(parts).mean())


def _rank_key(score: CandidateScore, kl_threshold: float) -> tuple[bool, float, int]:
    """The choice's order: under the KL threshold by refusal score, then the others by KL."""
    over = score.kl > kl_threshold
    return over, score.kl if over else score.refusal_score, score.position


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

    kept = list(candidates)
    edits = {p: DirectionEdit(directions.direction[p].float()) for p in candidates}
    rounds = halving_rounds(len(candidates), len(harmful), len(harmless), selection)
    refusal_each: dict[int, list[torch.Tensor]] = {p: [] for p in candidates}  # per prompt, in prompt order
    kl_each: dict[int, list[torch.Tensor]] = {p: [] for p in candidates}  # per answered harmless prompt
    answered = torch.ones(len(harmless), dtype=torch.bool)
    base_harmless = torch.zeros(0)
    baseline = 0.0
    ranked_out: list[RankedOut] = []
    done = {"harmful": 0, "harmless": 0}  # prompts of each set every remaining candidate is scored on
    for number, plan in enumerate(rounds):
        upto = {"harmful": plan.harmful_prompts, "harmless": plan.harmless_prompts}
        start = dict(done)
        new = {
            label: encoded[start[label] : upto[label]]
            for label, encoded in (("harmless", harmless), ("harmful", harmful))
            if upto[label] > start[label]
        }
        variants: list[DirectionEdit | None] = [edits[p] for p in kept]
        sets: list[dict[str, Any]] = [new] * len(kept)
        if number == 0:  # the unmodified model on every prompt, in the first pass
            variants, sets = [None, *variants], [{"harmless": harmless, "harmful": harmful}, *sets]
        offset = 1 if number == 0 else 0
        stream = forward.first_token_logprobs(sets, variants, runtime.batch_size, pad_id, progress)
        for variant, label, logprobs in stream:
            if number == 0 and variant == 0 and label == "harmless":
                answered = ~torch.isin(logprobs.argmax(dim=-1), token_ids)
                if not bool(answered.any()):
                    stream.close()
                    raise AbliterateError(
                        "the model refuses every harmless validation prompt (its first reply token is a refusal "
                        "token): check the chat template settings and the prompt files"
                    )
                base_harmless = logprobs
            elif number == 0 and variant == 0:
                baseline = refusal_score(logprobs, found.ids)
            elif label == "harmless":
                rows = answered[start["harmless"] : upto["harmless"]]
                reference = base_harmless[start["harmless"] : upto["harmless"]][rows]
                kl_each[kept[variant - offset]].append(first_token_kl_each(reference, logprobs[rows]))
            else:
                refusal_each[kept[variant - offset]].append(refusal_logodds(logprobs, found.ids))
        done = upto
        scores = [
            CandidateScore(p, _mean(refusal_each[p]), _mean(kl_each[p]) if kl_each[p] else 0.0) for p in kept
        ]
        order = sorted(scores, key=lambda c: _rank_key(c, selection.kl_threshold))
        ranked_out += [
            RankedOut(c.position, c.refusal_score, c.kl, number, done["harmful"], done["harmless"])
            for c in order[plan.keep :]
        ]
        kept = sorted(c.position for c in order[: plan.keep])
    ranked = [c for c in scores if c.position in kept]
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
        shortlist=selection.shortlist,
        rounds=rounds,
        ranked_out=sorted(ranked_out, key=lambda r: r.position),
        seconds_probe=round(probed - began, 3),
        seconds_scoring=round(scored - probed, 3),
    )
