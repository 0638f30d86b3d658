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

Not every candidate reaches scoring (`prefilter`, default 4): only the candidates with the largest
measured separation, |mean harmful - mean harmless| / |mean harmless| at the position (`separation`,
known after measurement), do; the others are recorded with their rank by it (`prefiltered_out`).

Not every scored candidate is scored on every prompt (`shortlist`, default 1): successive halving ranks the
others out first. Round 0 scores every candidate on the first `shortlist_prompts` (8) prompts of each
validation set, and keeps the better half in the choice's own order (under the KL threshold by
refusal score, then the rest by KL); each next round scores the survivors on the next prompts, up to
twice as many, and halves them again, until the shortlist remains (never fewer) or the prompts cover
both sets; the last round scores the shortlist on the rest, so its scores are over every prompt, as
with `shortlist` all (one round: every candidate on every prompt, today's behaviour). The rounds
depend on the counts only (`halving_rounds`); the candidates ranked out are recorded with their scores
on the prompts they saw and the round. GLM-4.5-Air (36 candidates, 69 + 69 prompts): with shortlist 3
and no prefilter, 1,502 candidate prompts in 5 rounds instead of 4,968; with the defaults, 202 in 3
rounds (`benchmarks/bench_run_streamed.py` projects the hours).

A small shortlist or prefilter never loses a run that scoring every candidate completes: when no
candidate scored on every prompt is under the KL threshold, the next ones are scored on the prompts they
have not seen (`_fallback`: as many as the shortlist per pass, the ranked-out ones first, the last round's
first and each round's best first, then the prefiltered ones by separation), until one is under it or
none is left (then the choice fails as it does with every candidate scored); those passes are recorded as
rounds with `fallback` true.

At the chosen position, when the directions hold subspaces (`subspaces`: method -> [P, K, H] orthonormal
rows, row 0 the direction), the rank is a choice too (`score_ranks`, `choose_rank`): each method's ranks
2..min(`max_rank`, K). A rank above 1 is kept only where it earns its KL: its KL within `kl_threshold`, and
one direction's first-token refusal rate (harmful validation prompts whose most likely first reply token is
a refusal token) above the rank's Wilson upper bound at `rank_confidence`; else rank 1 (docs/DESIGN.md 2.3).
The ranks are scored only as far as they can still earn it (`rank_elimination`): where one direction's
rate is at or below the bound of a rank refusing none, none can, and nothing is scored (the demo model: 0
of 64); else the harmful prompts first, in growing whole batches (`rank_rounds`), each rank dropped as soon
as its refusals so far exceed the most a rank may leave and earn (`refusal_limit`), then the harmless
prompts for the ranks left. The choice is the one scoring every rank on every prompt gives, with the same
figures for the ranks left. Each direction of the chosen edit removed alone gives its share of the refusal
score (`direction_shares`: at rank 1 the one direction, known; at rank k one pass of rows 1..k-1).

The forward passes run on a model in memory or layer-streamed (`abliterate.inference.runner`): streamed,
the unmodified model and every candidate of a round go through each decoder layer while it is loaded,
so the scores cost one read of the weights per round (plus one per probe token to find the refusal
tokens, with the layers' keys and values cached between those reads). The unmodified model's harmful
first tokens come from the probe's first step; the first round runs it on the harmless prompts only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from abliterate import config
from abliterate.edit.inference_edit import DirectionEdit
from abliterate.errors import AbliterateError
from abliterate.figures import figure
from abliterate.inference.loading import length_sorted_batches, pad_token_id
from abliterate.inference.refusal import find_refusal_tokens, marker_phrases
from abliterate.inference.runner import as_forward
from abliterate.inference.scores import first_token_kl_each, refusal_logodds, refusal_score, wilson_bounds
from abliterate.measure.chat import context_length, encode_prompts
from abliterate.measure.directions import DirectionSet
from abliterate.vocabulary import SUBSPACE_METHODS


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
class Prefiltered:
    """A candidate the prefilter left out before any scoring: its measured separation and rank by it."""

    position: int
    separation: float  # |mean harmful - mean harmless| / |mean harmless| at the position
    rank: int  # 1: the largest separation among the candidates


@dataclass
class Round:
    """One scoring pass: `candidates` scored on the first prompts of each set; `keep` of them go on."""

    candidates: int
    harmful_prompts: int
    harmless_prompts: int
    keep: int  # the last round keeps every candidate: they are the ones scored on every prompt
    fallback: bool = False  # scored on the rest of the prompts because no finalist was under the KL threshold


@dataclass
class RankScore:
    """Removing the first `rank` directions of a subspace at the chosen position: its first-token figures on
    the harmful validation prompts it was scored on and, unless it was dropped before them, the harmless ones."""

    rank: int
    subspace: str | None  # how its directions were found (SUBSPACE_METHODS); None: the one direction
    refusal_score: float  # mean over the `prompts` harmful validation prompts it was scored on
    # None: dropped on the harmful prompts (`score_ranks`), never scored on the harmless ones
    kl: float | None
    refusals: int  # of those `prompts`, the ones whose most likely first reply token is a refusal token
    prompts: int  # harmful validation prompts it was scored on: all of them, unless dropped before
    # Wilson upper bound at `rank_confidence` of `refusals` of every harmful validation prompt (dropped: the
    # least its bound could have ended at, the rest of its prompts refusing none)
    upper_bound: float
    earns: bool  # fewer refusals than one direction beyond that bound, at a KL within the threshold

    @property
    def dropped(self) -> bool:
        """Left out on the harmful prompts: its refusals already rule out earning its KL."""
        return self.kl is None


@dataclass
class DirectionShare:
    """One direction of the chosen edit, removed alone: its share of the refusal score."""

    subspace: str | None  # the chosen subspace method; None: the one direction (rank 1)
    index: int  # its row in the subspace (0: the difference of means)
    refusal_score: float
    drop: float  # max(0, baseline refusal score - refusal_score)
    share: float  # drop / the sum of the drops of the chosen edit's directions (0 when that sum is 0)


@dataclass
class RankPass:
    """How the rank at the chosen position was reached (`score_ranks`)."""

    # none: nothing to score (no subspace held there, or max_rank 1); skipped: no rank can earn its KL, one
    # direction's refusal rate being at or below `floor`; scored: the ranks were scored
    state: str = "none"
    floor: float | None = None  # Wilson upper bound at rank_confidence of 0 refusals of the harmful prompts
    limit: int | None = None  # the most refusals a rank may leave and still earn (`refusal_limit`; -1: none)
    confidence: float | None = None  # the setting `rank_confidence`: the level of the bounds
    eliminated: bool = True  # the setting `rank_elimination` (false: every rank on every prompt, one pass)
    # the passes: on growing whole batches of the harmful prompts (harmless_prompts 0), then the harmless
    # prompts for the ranks left (`keep`: the ranks left after the pass)
    rounds: list[Round] = field(default_factory=list)
    dropped: int = 0  # ranks left out on the harmful prompts


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
    prefilter: str = "all"  # the setting: how many candidates the measured statistic lets reach scoring
    prefiltered_out: list[Prefiltered] = field(default_factory=list)  # left out by it, never scored
    rank: int = 1  # directions removed together at the chosen position (1: the difference of means alone)
    subspace: str | None = None  # the subspace method of the chosen rank (None at rank 1)
    # one direction at the chosen position first, then each subspace rank scored there (or dropped)
    ranks: list[RankScore] = field(default_factory=list)
    rank_pass: RankPass = field(default_factory=RankPass)  # how the rank was reached
    # each direction of the chosen edit removed alone: its share of the refusal score
    shares: list[DirectionShare] = field(default_factory=list)

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
        "prefilter": selection.prefilter,
        "max_rank": selection.max_rank,
        "rank_confidence": selection.rank_confidence,
        "rank_elimination": selection.rank_elimination,
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


def separation(directions: DirectionSet) -> torch.Tensor:
    """[P] the measured separation of the two sets at each position, |mean harmful - mean harmless| over
    |mean harmless|: the refusal difference as a share of the residual stream's size there (known after
    measurement, no pass over the model)."""
    size = directions.harmless_mean.norm(dim=-1)
    return torch.where(size > 0, directions.mean_diff_norm.double() / size.clamp(min=1e-30), 0.0)


def prefilter(
    directions: DirectionSet, candidates: Sequence[int], keep: str
) -> tuple[list[int], list[Prefiltered]]:
    """(the candidates that reach scoring, in position order; the ones left out): the `keep` largest by
    `separation` (`keep` all: every candidate)."""
    if keep == "all" or len(candidates) <= int(keep):
        return list(candidates), []
    values = separation(directions)
    order = sorted(candidates, key=lambda p: (-float(values[p]), p))
    out = [
        Prefiltered(p, float(values[p]), rank) for rank, p in enumerate(order, start=1) if rank > int(keep)
    ]
    return sorted(order[: int(keep)]), sorted(out, key=lambda r: r.position)


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
    subspaces: Mapping[str, torch.Tensor] | None = None,
) -> Selection:
    """Score candidate directions by inference-time ablation; `position` forces the choice.

    `model`: a loaded model, or a forward (`abliterate.inference.runner`: in memory or layer-streamed).
    `measurement` and `template` encode the prompts as they were measured; `evaluation` gives the
    marker phrases and the probe length that find the refusal tokens; `runtime` the batch size.
    `subspaces`: method -> [P, K, H] orthonormal rows (row 0 the direction), as the directions file
    holds them: at the chosen position, ranks 2 to `selection.max_rank` are scored (`choose_rank`)."""
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
    candidates, prefiltered_out = prefilter(directions, candidates, selection.prefilter)
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
    refused_each: dict[int, list[torch.Tensor]] = {p: [] for p in candidates}  # first token a refusal token
    answered = torch.ones(len(harmless), dtype=torch.bool)
    base_harmless = torch.zeros(0)
    # the unmodified model's harmful first tokens: the probe's first step, else the first round's pass
    baseline = 0.0 if found.first is None else refusal_score(found.first, found.ids)
    ranked_out: list[RankedOut] = []  # in the order they go back to scoring: by round, best first

    def take(p: int, label: str, logprobs: torch.Tensor, start: int, upto: int) -> None:
        """Candidate p's scores on the prompts start..upto of the set `label`."""
        if label == "harmless":
            rows = answered[start:upto]
            kl_each.setdefault(p, []).append(
                first_token_kl_each(base_harmless[start:upto][rows], logprobs[rows])
            )
        else:
            refusal_each.setdefault(p, []).append(refusal_logodds(logprobs, found.ids))
            refused_each.setdefault(p, []).append(torch.isin(logprobs.argmax(dim=-1), token_ids))

    def score_of(p: int) -> CandidateScore:
        """Candidate p's scores over the prompts it has been scored on."""
        return CandidateScore(p, _mean(refusal_each[p]), _mean(kl_each[p]) if kl_each.get(p) else 0.0)

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
        if (
            number == 0
        ):  # the unmodified model on every prompt (the probe's harmful ones aside), in the first pass
            base = (
                {"harmless": harmless}
                if found.first is not None
                else {"harmless": harmless, "harmful": harmful}
            )
            variants, sets = [None, *variants], [base, *sets]
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
            else:
                take(kept[variant - offset], label, logprobs, start[label], upto[label])
        done = upto
        scores = [score_of(p) for p in kept]
        order = sorted(scores, key=lambda c: _rank_key(c, selection.kl_threshold))
        ranked_out += [
            RankedOut(c.position, c.refusal_score, c.kl, number, done["harmful"], done["harmless"])
            for c in order[plan.keep :]
        ]
        kept = sorted(c.position for c in order[: plan.keep])
    ranked = [c for c in scores if c.position in kept]
    if position is None:  # no finalist under the threshold: the next candidates go on, never a lost run
        fallback = _fallback(
            forward,
            (harmful, harmless),
            edits,
            directions,
            ranked,
            ranked_out,
            prefiltered_out,
            (take, score_of),
            selection,
            runtime.batch_size,
            pad_id,
            progress,
        )
        for plan, scored_now in fallback:
            rounds = [*rounds, plan]
            ranked = sorted([*ranked, *scored_now], key=lambda c: c.position)
        back = {c.position for c in ranked}
        ranked_out = [r for r in ranked_out if r.position not in back]
        prefiltered_out = [r for r in prefiltered_out if r.position not in back]
        allowed = [s for s in ranked if s.kl <= selection.kl_threshold]
        if not allowed:
            least = min(ranked, key=lambda s: s.kl)
            raise AbliterateError(
                f"every candidate direction changes harmless replies too much: the smallest first-token KL is "
                f"{least.kl:.4g} (position {least.position}), above the threshold {selection.kl_threshold}; "
                "raise the KL threshold or pass an explicit position"
            )
        position = min(allowed, key=lambda s: s.refusal_score).position
    one = next(c for c in ranked if c.position == position)
    refused = int(torch.cat(refused_each[position]).sum())
    upper = wilson_bounds(refused, len(harmful), selection.rank_confidence)[1]
    single = RankScore(1, None, one.refusal_score, one.kl, refused, len(harmful), upper, False)
    batching = (runtime.batch_size, pad_id, progress)
    ranks, rank_pass = score_ranks(
        forward,
        subspaces or {},
        position,
        single,
        (harmful, harmless),
        (base_harmless, answered),
        found.ids,
        selection,
        batching,
    )
    chosen = choose_rank(ranks)
    shares = direction_shares(
        forward, subspaces or {}, position, (chosen, single), harmful, baseline, found.ids, batching
    )
    scored = time.perf_counter()
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
        prefilter=selection.prefilter,
        prefiltered_out=prefiltered_out,
        seconds_probe=round(probed - began, 3),
        seconds_scoring=round(scored - probed, 3),
        rank=chosen.rank,
        subspace=chosen.subspace,
        ranks=ranks,
        rank_pass=rank_pass,
        shares=shares,
    )


def _fallback(
    forward: Any,
    encoded: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]],
    edits: dict[int, DirectionEdit],
    directions: DirectionSet,
    finalists: list[CandidateScore],
    ranked_out: list[RankedOut],
    prefiltered_out: list[Prefiltered],
    scoring: tuple[Any, Any],
    selection: config.Selection,
    batch_size: int,
    pad_id: int,
    progress: bool,
) -> list[tuple[Round, list[CandidateScore]]]:
    """While no candidate scored on every prompt is under the KL threshold, the next ones are: as many as
    the shortlist (at least one) per pass, the ranked-out ones first (the last round's first, each round's
    best first), each on the prompts it has not seen, then the prefiltered ones by separation, on every
    prompt. So a small shortlist or prefilter loses no run that scoring every candidate would complete.
    Returns each pass's round (`fallback` True) and its candidates' scores over every prompt."""
    harmful, harmless = encoded
    take, score_of = scoring  # (p, label, logprobs, start, upto) -> None: keep; p -> CandidateScore
    size = {"harmful": len(harmful), "harmless": len(harmless)}
    last = max((r.round for r in ranked_out), default=0)
    waiting = [
        (r.position, r.harmful_prompts, r.harmless_prompts)
        for r in sorted(ranked_out, key=lambda r: last - r.round)
    ]  # sorted is stable: each round's best first
    waiting += [(r.position, 0, 0) for r in sorted(prefiltered_out, key=lambda r: r.rank)]
    step = max(1, len(finalists) if selection.shortlist == "all" else int(selection.shortlist))
    passes: list[tuple[Round, list[CandidateScore]]] = []
    under = any(c.kl <= selection.kl_threshold for c in finalists)
    while not under and waiting:
        batch, waiting = waiting[:step], waiting[step:]
        sets = []
        for p, seen_harmful, seen_harmless in batch:
            edits.setdefault(p, DirectionEdit(directions.direction[p].float()))
            seen = {"harmful": seen_harmful, "harmless": seen_harmless}
            sets.append(
                {
                    label: prompts[seen[label] :]
                    for label, prompts in (("harmless", harmless), ("harmful", harmful))
                    if size[label] > seen[label]
                }
            )
        variants = [edits[p] for p, _, _ in batch]
        for variant, label, logprobs in forward.first_token_logprobs(
            sets, variants, batch_size, pad_id, progress
        ):
            p, seen_harmful, seen_harmless = batch[variant]
            start = seen_harmful if label == "harmful" else seen_harmless
            take(p, label, logprobs, start, size[label])
        scored = [score_of(p) for p, _, _ in batch]
        passes.append(
            (Round(len(batch), size["harmful"], size["harmless"], len(batch), fallback=True), scored)
        )
        under = any(c.kl <= selection.kl_threshold for c in scored)
    return passes


def rank_edits(subspaces: Mapping[str, torch.Tensor], position: int, max_rank: int) -> list[tuple[int, str]]:
    """What `score_ranks` may score at `position`: each subspace's ranks 2..min(max_rank, K) as (rank,
    method), methods in the vocabulary's order, those with zero rows there (nothing measured) left out."""
    ranks: list[tuple[int, str]] = []
    for method in SUBSPACE_METHODS:
        basis = subspaces.get(method)
        if basis is None or not bool(basis[position].any()):
            continue
        ranks += [(k, method) for k in range(2, min(max_rank, int(basis.shape[1])) + 1)]
    return ranks


def beats_one_direction(refusals: int, single: RankScore, confidence: float) -> bool:
    """The refusal half of earning its KL: one direction's first-token refusal rate on the harmful validation
    prompts is above the Wilson upper bound (at `confidence`) of `refusals` of those same prompts."""
    return single.refusals / max(single.prompts, 1) > wilson_bounds(refusals, single.prompts, confidence)[1]


def refusal_limit(single: RankScore, confidence: float) -> int:
    """The most first-token refusals a rank may leave on the harmful validation prompts and still earn its KL
    (`beats_one_direction`); -1: none can, not even a rank leaving none (one direction's rate is at or below
    the Wilson upper bound of 0 refusals). A rank whose count on the prompts seen so far is above the limit
    can never earn it, whatever the rest of its prompts give: its count over all of them is no smaller."""
    counts = range(single.prompts + 1)
    return max((c for c in counts if beats_one_direction(c, single, confidence)), default=-1)


def rank_rounds(num_harmful: int, first: int, batch_size: int) -> list[int]:
    """The harmful prompts seen after each harmful round of the rank pass: `first` rounded up to whole
    batches, doubled each round, the last round every prompt (a round that would leave fewer than the first
    round's prompts to the last is left out: a read of the weights for a few prompts). Whole batches of the
    length-sorted order (`length_sorted_batches`), so each prompt is scored in the batch it shares when every
    prompt is scored at once: the same figures, bit for bit."""
    step = batch_size * max(1, math.ceil(first / batch_size))
    seen, n = [], step
    while n + step <= num_harmful:
        seen.append(n)
        n *= 2
    return [*seen, num_harmful]


def score_ranks(
    forward: Any,
    subspaces: Mapping[str, torch.Tensor],
    position: int,
    single: RankScore,
    encoded: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]],
    reference: tuple[torch.Tensor, torch.Tensor],
    token_ids: list[int],
    selection: config.Selection,
    batching: tuple[int, int, bool],
) -> tuple[list[RankScore], RankPass]:
    """Every rank above 1 of every subspace at `position` (`rank_edits`), scored only as far as it can still
    earn its KL (`single`: one direction there, scored already; `reference`: the unmodified model's harmless
    log-probabilities and which harmless prompts it answers; `batching`: batch size, pad id, progress).

    No rank can earn (`refusal_limit` -1: one direction's rate is at or below the Wilson upper bound of a
    rank refusing none): nothing is scored. Otherwise the ranks go through the harmful validation prompts in
    growing whole batches (`rank_rounds`, one pass each), and a rank whose refusals so far exceed the limit
    is dropped (it keeps its figures on the prompts it saw, `kl` None); the ranks left after every harmful
    prompt are scored on the harmless ones, one more pass. `choose_rank` over these gives what it gives over
    every rank scored on every prompt: a dropped rank could not have earned, and the others' figures are
    those of one pass, bit for bit (the same batches). `selection.rank_elimination` false: every rank on
    every prompt of both sets in one pass. Returns the rank scores (`single` first) and the pass's record."""
    harmful, harmless = encoded
    base_harmless, answered = reference
    batch_size, pad_id, progress = batching
    pairs = rank_edits(subspaces, position, selection.max_rank)
    confidence, eliminate = selection.rank_confidence, selection.rank_elimination
    if not pairs:
        return [single], RankPass(eliminated=eliminate)
    n = len(harmful)
    floor, limit = wilson_bounds(0, n, confidence)[1], refusal_limit(single, confidence)
    record = RankPass("scored", floor, limit, confidence, eliminate)
    if eliminate and limit < 0:
        record.state = "skipped"
        return [single], record
    edits = {pair: DirectionEdit(subspaces[pair[1]][position, : pair[0]]) for pair in pairs}
    order = [i for batch in length_sorted_batches(harmful, batch_size, pad_id) for i in batch.indices]
    token = torch.tensor(token_ids)
    logodds = {pair: torch.zeros(n, dtype=torch.float64) for pair in pairs}  # per prompt, in prompt order
    refused = {pair: torch.zeros(n, dtype=torch.bool) for pair in pairs}
    kl: dict[tuple[int, str], float] = {}
    seen: dict[tuple[int, str], int] = {}  # harmful prompts each rank was scored on
    alive, done = list(pairs), 0
    steps = rank_rounds(n, selection.shortlist_prompts, batch_size) if eliminate else [n]
    for upto in steps:
        if not alive:
            break
        indices = order[done:upto]
        sets: dict[str, Any] = {"harmful": [harmful[i] for i in indices]}
        if not eliminate:
            sets["harmless"] = harmless
        rows = torch.tensor(indices, dtype=torch.long)
        for variant, label, logprobs in forward.first_token_logprobs(
            sets, [edits[p] for p in alive], batch_size, pad_id, progress
        ):
            pair = alive[variant]
            if label == "harmless":
                kl[pair] = float(first_token_kl_each(base_harmless[answered], logprobs[answered]).mean())
            else:
                logodds[pair][rows] = refusal_logodds(logprobs, token_ids)
                refused[pair][rows] = torch.isin(logprobs.argmax(dim=-1), token)
        done, before = upto, len(alive)
        for pair in alive:
            seen[pair] = done
        if eliminate:
            alive = [p for p in alive if int(refused[p].sum()) <= limit]
        record.rounds.append(Round(before, done, 0 if eliminate else len(harmless), len(alive)))
    if eliminate and alive:  # the ranks left: the harmless prompts, one more pass
        for variant, _, logprobs in forward.first_token_logprobs(
            {"harmless": harmless}, [edits[p] for p in alive], batch_size, pad_id, progress
        ):
            kl[alive[variant]] = float(
                first_token_kl_each(base_harmless[answered], logprobs[answered]).mean()
            )
        record.rounds.append(Round(len(alive), n, len(harmless), len(alive)))
    record.dropped = len(pairs) - len(kl)
    ranks = [single]
    for pair in pairs:
        count, scored = int(refused[pair].sum()), sorted(order[: seen[pair]])
        divergence = kl.get(pair)
        earns = (
            divergence is not None
            and divergence <= selection.kl_threshold
            and beats_one_direction(count, single, confidence)
        )
        score = float(logodds[pair][scored].mean())
        upper = wilson_bounds(count, n, confidence)[1]
        ranks.append(RankScore(*pair, score, divergence, count, len(scored), upper, earns))
    return ranks, record


def direction_shares(
    forward: Any,
    subspaces: Mapping[str, torch.Tensor],
    position: int,
    edit: tuple[RankScore, RankScore],
    harmful: Sequence[Sequence[int]],
    baseline: float,
    token_ids: list[int],
    batching: tuple[int, int, bool],
) -> list[DirectionShare]:
    """Each direction of the chosen edit (`edit`: the chosen rank, one direction's score) removed alone: its
    share of the refusal score, drop_i = max(0, baseline - refusal score with direction i alone removed),
    share_i = drop_i over the sum of the drops of the edit's directions 0..k-1. Rank 1: the one direction,
    whose score is known (share 1, or 0 when removing it does not lower the score); rank k: rows 1..k-1 of
    the chosen subspace alone on the harmful validation prompts, one pass."""
    chosen, single = edit
    batch_size, pad_id, progress = batching
    scored = [(0, single.refusal_score)]
    if chosen.subspace is not None:
        rows = list(range(1, chosen.rank))
        basis = subspaces[chosen.subspace][position]
        for variant, _, logprobs in forward.first_token_logprobs(
            {"harmful": harmful}, [DirectionEdit(basis[i]) for i in rows], batch_size, pad_id, progress
        ):
            scored.append((rows[variant], float(refusal_logodds(logprobs, token_ids).mean())))
    drops = [max(0.0, baseline - score) for _, score in scored]
    total = sum(drops)
    return [
        DirectionShare(chosen.subspace, i, score, drop, drop / total if total > 0 else 0.0)
        for (i, score), drop in zip(scored, drops, strict=True)
    ]


def choose_rank(ranks: Sequence[RankScore]) -> RankScore:
    """One direction (`ranks[0]`), unless a subspace earns its KL (`RankScore.earns`): then the earning one
    with the fewest first-token refusals, ties to the lower rank, then the lower KL."""
    earning = [r for r in ranks[1:] if r.earns]
    if not earning:
        return ranks[0]
    return min(earning, key=lambda r: (r.refusals, r.rank, r.kl, SUBSPACE_METHODS.index(str(r.subspace))))


def describe_rank(chosen: Selection) -> str | None:
    """The rank choice in one line (None when there was nothing to score): what was kept, and why."""
    rank_pass, one = chosen.rank_pass, chosen.ranks[0] if chosen.ranks else None
    if rank_pass.state == "none" or one is None:
        return None
    opening = f"{one.refusals} of {one.prompts} harmful validation prompts open with a refusal token"
    if rank_pass.state == "skipped":
        return (
            f"rank 1 kept (one direction: {opening}, KL {figure(one.kl)}): no subspace can earn its KL, none "
            f"scored (one direction's rate {one.refusals / max(one.prompts, 1):.3f} is at or below "
            f"{rank_pass.floor:.3f}, the Wilson upper bound at {rank_pass.confidence:.0%} of a subspace leaving none)"
        )
    dropped = [r for r in chosen.ranks[1:] if r.dropped]
    left = (
        f"; {len(dropped)} of {len(chosen.ranks) - 1} ranks dropped on the harmful prompts (more than "
        f"{rank_pass.limit} refusals: Wilson upper bound at or above one direction's rate)"
        if dropped
        else ""
    )
    if chosen.rank == 1:
        full = [r for r in chosen.ranks[1:] if not r.dropped]
        if not full:
            return (
                f"rank 1 kept (one direction: {opening}, KL {figure(one.kl)}); no subspace earns its KL{left}"
            )
        best = min(full, key=lambda r: (r.refusals, r.rank, r.kl))
        return (
            f"rank 1 kept (one direction: {opening}, KL {figure(one.kl)}); no subspace earns its KL, the best: "
            f"{best.subspace} rank {best.rank}, {best.refusals} of {best.prompts} (upper bound "
            f"{best.upper_bound:.3f}), KL {figure(best.kl)}{left}"
        )
    kept = next(r for r in chosen.ranks if r.rank == chosen.rank and r.subspace == chosen.subspace)
    return (
        f"rank {kept.rank} ({kept.subspace}): {kept.refusals} of {kept.prompts} harmful validation prompts open "
        f"with a refusal token (upper bound {kept.upper_bound:.3f}) against {one.refusals} with one direction, "
        f"KL {figure(kept.kl)} (one direction: {figure(one.kl)}){left}"
    )
