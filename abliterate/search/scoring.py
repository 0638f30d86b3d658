"""Scoring a trial: its plan applied at inference time (`abliterate.edit.inference_edit.PlanEdit`, which
equals the engine's edit) on held-out prompts, without rewriting the checkpoint.

Two figures per trial, both minimised by the study:
- the refusal rate of greedy replies of `search.reply_tokens` tokens to the held-out harmful prompts
  (the marker check of `abliterate.inference.refusal`; a reply stops as soon as it is a refusal);
- the mean first-token KL(unmodified || trial) on the held-out harmless prompts (the figure the
  evaluation reports).

The passes are the runner's (`abliterate.inference.runner`): in memory each trial costs one
`generate` and one forward pass; layer-streamed, the trials scored together share every pass over
the weights: one for the KL and one per reply token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from abliterate.config import Evaluation, Runtime, Search, Template
from abliterate.inference.loading import pad_token_id
from abliterate.inference.refusal import is_refusal, marker_phrases
from abliterate.inference.runner import Edit, Forward, stop_ids
from abliterate.inference.scores import first_token_kl
from abliterate.measure.chat import context_length, encode_prompts


@dataclass
class TrialScore:
    refusal_rate: float  # share of held-out harmful prompts whose bounded greedy reply is a refusal
    kl: float  # mean first-token KL(unmodified || trial) over the held-out harmless prompts, nats
    refusals: int
    prompts: int
    seconds: float = 0.0


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
    ):
        self.forward, self.tokenizer, self.progress = forward, tokenizer, progress
        self.reply_tokens, self.batch_size = search.reply_tokens, runtime.batch_size
        self.markers = marker_phrases(evaluation)
        context = context_length(forward)
        self.harmful, self.harmless = (
            encode_prompts(tokenizer, prompts, template, label, context, new_tokens=search.reply_tokens)
            for prompts, label in ((harmful, "held-out harmful"), (harmless, "held-out harmless"))
        )
        self.pad_id = pad_token_id(tokenizer)
        self.stops = stop_ids(forward.generation_eos, tokenizer)
        self.baseline_logprobs: torch.Tensor | None = None
        self.baseline = self.score([None])[0]

    def refused(self, reply: Sequence[int]) -> bool:
        return is_refusal(self.tokenizer.decode(list(reply), skip_special_tokens=True), self.markers)

    def score(self, edits: Sequence[Edit | None]) -> list[TrialScore]:
        """One score per edit: in memory one after the other, layer-streamed all in the same passes."""
        began = time.perf_counter()
        replies = self.forward.greedy_variants(
            self.harmful, edits, self.reply_tokens, self.batch_size, self.pad_id, self.stops, self.refused
        )
        logprobs = [
            lp
            for _, _, lp in self.forward.first_token_logprobs(
                {"harmless": self.harmless}, edits, self.batch_size, self.pad_id
            )
        ]
        if self.baseline_logprobs is None:
            self.baseline_logprobs = logprobs[0]
        seconds = (time.perf_counter() - began) / max(len(edits), 1)
        out = []
        for reply_set, lp in zip(replies, logprobs, strict=True):
            refusals = sum(self.refused(r) for r in reply_set)
            out.append(
                TrialScore(
                    refusals / len(reply_set),
                    first_token_kl(self.baseline_logprobs, lp),
                    refusals,
                    len(reply_set),
                    round(seconds, 4),
                )
            )
        return out
