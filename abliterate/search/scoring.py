"""Scoring a trial: its plan applied at inference time (`abliterate.edit.inference_edit.PlanEdit`, which
equals the engine's edit) on held-out prompts, without rewriting the checkpoint.

Two figures per trial, both minimised by the study:
- the refusal objective: `(refusals + margin) / prompts`. `refusals` counts the greedy replies of
  `search.reply_tokens` tokens to the held-out harmful prompts that the marker check of
  `abliterate.inference.refusal` calls refusals (a reply stops as soon as it is one); `margin` is the
  mean over the same prompts of `max(p, refusal_floor)`, p the first-token probability of a refusal
  token (the sigmoid of the log-odds of `abliterate.inference.scores.refusal_logodds`). It lies in
  [floor, 1), so one refusal more always weighs more than any margin, and once no reply refuses the
  margin still ranks the trials: a trial further from refusing is better, where a count alone would
  see no difference and leave the study only the KL to minimise, i.e. the weakest edit that still
  looks enough on these prompts. A prompt whose refusal probability is under the floor is far enough:
  between trials that hold every prompt there, the lower KL wins;
- the mean first-token KL(unmodified || trial) on the held-out harmless prompts (the figure the
  evaluation reports).

The refusal tokens are the unmodified model's own (`refusal_tokens_from_replies`: the first tokens of
its replies to these harmful prompts that the marker check calls refusals), or the caller's (a
confirmation counts the tokens of the study it confirms).

The passes are the runner's (`abliterate.inference.runner`): in memory each trial costs one
`generate` of the harmful prompts (whose first step gives their first-token refusal probabilities)
and one forward pass over the harmless prompts; layer-streamed, the trials scored together share
every pass over the weights: one for the KL and one per reply token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from abliterate.config import Evaluation, Runtime, Search, Template
from abliterate.inference.loading import pad_token_id
from abliterate.inference.refusal import is_refusal, marker_phrases, refusal_tokens_from_replies
from abliterate.inference.runner import Edit, Forward, stop_ids
from abliterate.inference.scores import first_token_kl, refusal_logodds
from abliterate.measure.chat import context_length, encode_prompts


@dataclass
class TrialScore:
    refusal_rate: float  # share of held-out harmful prompts whose bounded greedy reply is a refusal
    kl: float  # mean first-token KL(unmodified || trial) over the held-out harmless prompts, nats
    refusals: int
    prompts: int
    refusal_score: float = 0.0  # mean first-token refusal log-odds on the held-out harmful prompts
    margin: float = 0.0  # mean of max(first-token refusal probability, floor) on the same prompts
    seconds: float = 0.0

    @property
    def objective(self) -> float:
        """What the study minimises beside the KL: the refusal count, then the margin (module docstring)."""
        return (self.refusals + self.margin) / max(self.prompts, 1)


def refusal_margin(logodds: torch.Tensor, floor: float) -> float:
    """Mean over prompts of max(p, floor), p = sigmoid(log-odds) the first-token refusal probability."""
    return float(torch.sigmoid(logodds).clamp(min=floor).mean())


def scoring_signature(
    search: Search, evaluation: Evaluation, template: Template, runtime: Runtime
) -> dict[str, Any]:
    """What decides a trial's scores besides the model, prompts and plan: part of the study's name, so
    a study is resumed only by a search that scores alike (the keys of earlier versions, so their
    studies keep their names)."""
    return {
        "reply_tokens": search.reply_tokens,
        "batch_size": runtime.batch_size,
        "markers": marker_phrases(evaluation),
        "system_prompt": template.system_prompt,
        "chat_template_kwargs": tuple(sorted(template.chat_template_kwargs.items())),
        "objective": f"refusals+mean(max(p_refusal,{search.refusal_floor:g}))",
    }


class TrialScorer:
    """Scores inference-time edits (`PlanEdit`s; None: the model as it is) on held-out prompts, on a
    model in memory or layer-streamed. The unmodified model is scored first (`baseline`): the KL of
    every trial is against its first-token distributions."""

    def __init__(
        self,
        forward: Forward,
        tokenizer: Any,
        harmful: Sequence[str],
        harmless: Sequence[str],
        search: Search,
        evaluation: Evaluation,
        template: Template,
        runtime: Runtime,
        progress: bool = False,
        refusal_tokens: Sequence[int] | None = None,
    ):
        self.forward, self.tokenizer, self.progress = forward, tokenizer, progress
        self.reply_tokens, self.batch_size = search.reply_tokens, runtime.batch_size
        self.floor = search.refusal_floor
        self.markers = marker_phrases(evaluation)
        context = context_length(forward)
        self.harmful, self.harmless = (
            encode_prompts(tokenizer, prompts, template, label, context, new_tokens=search.reply_tokens)
            for prompts, label in ((harmful, "held-out harmful"), (harmless, "held-out harmless"))
        )
        self.pad_id = pad_token_id(tokenizer)
        self.stops = stop_ids(forward.generation_eos, tokenizer)
        self.baseline_logprobs: torch.Tensor | None = None
        self.refusal_tokens: list[int] | None = None if refusal_tokens is None else list(refusal_tokens)
        self.refusal_tokens_source = "given" if refusal_tokens is not None else ""
        self.baseline = self.score([None])[0]

    def refused(self, reply: Sequence[int]) -> bool:
        return is_refusal(self.tokenizer.decode(list(reply), skip_special_tokens=True), self.markers)

    def score(self, edits: Sequence[Edit | None]) -> list[TrialScore]:
        """One score per edit: in memory one after the other, layer-streamed all in the same passes."""
        began = time.perf_counter()
        replies, harmful = self.forward.greedy_variants(
            self.harmful,
            edits,
            self.reply_tokens,
            self.batch_size,
            self.pad_id,
            self.stops,
            self.refused,
            first_logprobs=True,
        )
        if self.refusal_tokens is None:  # the unmodified model's replies, scored first
            found = refusal_tokens_from_replies(self.tokenizer, replies[0], self.markers, self.reply_tokens)
            self.refusal_tokens, self.refusal_tokens_source = found.ids, found.source
        harmless: list[torch.Tensor] = [torch.empty(0)] * len(edits)
        sets = {"harmless": self.harmless}
        for v, _, lp in self.forward.first_token_logprobs(sets, edits, self.batch_size, self.pad_id):
            harmless[v] = lp
        if self.baseline_logprobs is None:
            self.baseline_logprobs = harmless[0]
        seconds = (time.perf_counter() - began) / max(len(edits), 1)
        out = []
        for reply_set, first, lp in zip(replies, harmful, harmless, strict=True):
            refusals = sum(self.refused(r) for r in reply_set)
            logodds = refusal_logodds(first, self.refusal_tokens)
            out.append(
                TrialScore(
                    refusals / len(reply_set),
                    first_token_kl(self.baseline_logprobs, lp),
                    refusals,
                    len(reply_set),
                    float(logodds.mean()),
                    refusal_margin(logodds, self.floor),
                    round(seconds, 4),
                )
            )
        return out
