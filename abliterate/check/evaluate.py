"""Behavioural evaluation: does the model still refuse, and how far did it move on harmless prompts?

For one model (and optionally its baseline, the original before ablation), on harmful and harmless
test prompts rendered with the model's chat template:

- first-token figures, from one forward pass per prompt (one read of the weights when the model
  is layer-streamed, `abliterate.inference.runner`):
  - `refusal_score_harmful`: the mean log-odds that the reply to a harmful prompt starts with a
    refusal token (the tokens the baseline's own refusals start with, `abliterate.inference.refusal`);
  - `first_token_refusal_rate_*`: the share of prompts whose greedy first reply token is a
    refusal token;
  - with a baseline: `kl_harmless`, the mean over harmless prompts of KL(baseline || model) of the
    first reply token's distribution, in nats: how much the ablated model loses about what the
    original would say first (the figure selection uses, so they compare);
- with full replies (`Evaluation.replies`: a model in memory, or any model with `full_replies`
  always; greedy, at most `max_new_tokens` new tokens):
  `refusal_rate_*`, the share of replies that contain a refusal marker (`abliterate.inference.refusal`,
  case- and apostrophe-insensitive), and a table of example prompts with the replies before
  (baseline) and after (model). A model over the memory budget makes them only when asked,
  layer-streamed by the runner's cached greedy (`StreamedForward.greedy`: one read of the weights per
  new token for every prompt together, each layer's keys and values kept between the reads; the same
  tokens as `generate` in memory), `replies_cost` states what that reads.

The settings are the configuration's sections: Evaluation, Template and Runtime (resolved for the
model: a concrete device and dtype). `measure_behaviour` runs one model, `compare` turns two
behaviours into the result; `evaluate_loaded` chains them for a loaded model. For model folders,
`model_behaviour` measures one model (the baseline) and `evaluate_model` evaluates a model against
a baseline behaviour (measuring it from `baseline_dir` when not given): the CLI and the cached tasks
of the flows run these same two functions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from abliterate.config import Evaluation, Runtime, Template
from abliterate.errors import AbliterateError
from abliterate.figures import evaluation_lines
from abliterate.inference.loading import pad_token_id
from abliterate.inference.refusal import (
    find_refusal_tokens,
    is_refusal,
    marker_phrases,
    refusal_tokens_from_replies,
)
from abliterate.inference.runner import as_forward, model_forward, stop_ids
from abliterate.inference.scores import first_token_kl, refusal_logodds
from abliterate.inference.streaming import weight_bytes
from abliterate.measure.chat import context_length, encode_prompts


@dataclass
class Behaviour:
    """One model on the test prompts: first-token figures, and its full replies when made."""

    harmful_replies: list[str] | None  # None: no full replies (an over-budget model, not asked for)
    harmless_replies: list[str] | None
    harmful_refused: list[bool] | None
    harmless_refused: list[bool] | None
    harmless_logprobs: torch.Tensor  # [N_harmless, V] float64, first reply token
    harmful_refusal_logodds: list[float] = field(default_factory=list)  # per prompt, first reply token
    harmful_first_tokens: list[int] = field(default_factory=list)  # greedy first reply token per prompt
    harmless_first_tokens: list[int] = field(default_factory=list)
    refusal_token_ids: list[int] = field(default_factory=list)
    refusal_tokens: list[str] = field(default_factory=list)
    refusal_tokens_source: str = "markers"  # given | replies | markers | none (no refusal token found)
    streamed: bool = False

    @property
    def refusal_rate_harmful(self) -> float | None:
        return None if self.harmful_refused is None else _rate(self.harmful_refused)

    @property
    def refusal_rate_harmless(self) -> float | None:
        return None if self.harmless_refused is None else _rate(self.harmless_refused)

    @property
    def refusal_score_harmful(self) -> float | None:
        """Mean log-odds of a refusal token as the first reply token, on harmful prompts (None without
        refusal tokens)."""
        values = self.harmful_refusal_logodds
        return float(torch.tensor(values, dtype=torch.float64).mean()) if values else None

    @property
    def first_token_refusal_rate_harmful(self) -> float | None:
        if not self.refusal_token_ids:
            return None
        return _rate([t in self.refusal_token_ids for t in self.harmful_first_tokens])

    @property
    def first_token_refusal_rate_harmless(self) -> float | None:
        if not self.refusal_token_ids:
            return None
        return _rate([t in self.refusal_token_ids for t in self.harmless_first_tokens])


@dataclass
class ExampleRow:
    prompt: str
    kind: str  # harmful | harmless
    response_before: str | None  # the baseline's reply (None without a baseline)
    response_after: str
    refused_before: bool | None
    refused_after: bool


# Keys every `EvaluationResult.to_json` holds: an existing --report file is replaced only when it has them
# (a report written earlier, never an input or a file of the user's: `paths.output_file`).
REPORT_KEYS = ("n_harmful", "n_harmless", "examples", "settings")


@dataclass
class EvaluationResult:
    n_harmful: int
    n_harmless: int
    refusal_rate_harmful: float | None  # full replies, marker check; None without full replies
    refusal_rate_harmless: float | None
    kl_harmless: float | None  # mean KL(baseline || model) of the first reply token, nats
    baseline_refusal_rate_harmful: float | None
    baseline_refusal_rate_harmless: float | None
    examples: list[ExampleRow]
    settings: dict[str, Any]
    model: str | None = None
    baseline: str | None = None
    seconds: float = 0.0
    refusal_score_harmful: float | None = None  # first-token figures (see the module docstring)
    first_token_refusal_rate_harmful: float | None = None
    first_token_refusal_rate_harmless: float | None = None
    baseline_refusal_score_harmful: float | None = None
    baseline_first_token_refusal_rate_harmful: float | None = None
    baseline_first_token_refusal_rate_harmless: float | None = None
    refusal_token_ids: list[int] = field(default_factory=list)
    refusal_tokens: list[str] = field(default_factory=list)
    refusal_tokens_source: str = "markers"
    full_replies: bool = True
    streamed: bool = False
    replies_cost: str | None = None  # what the full replies of a layer-streamed model read

    def to_json(self) -> dict[str, Any]:
        """Every field but the wall time, so that identical inputs give an identical report file."""
        data = asdict(self)
        del data["seconds"]
        return data

    def metrics(self) -> dict[str, float]:
        """The numeric figures, for mlflow.log_metrics (absent figures are left out)."""
        return {n: float(getattr(self, n)) for n in METRICS if getattr(self, n) is not None}

    def summary(self, width: int = 60) -> str:
        lines = [f"prompts: {self.n_harmful} harmful, {self.n_harmless} harmless"]
        lines += evaluation_lines(self.metrics())  # the same lines as `abliterate run` prints
        if self.refusal_tokens:
            lines.append(f"refusal tokens ({self.refusal_tokens_source}): {self.refusal_tokens}")
        if not self.full_replies:
            lines.append(
                "full replies: not made (layer-streamed model; --full-replies always makes them, one read of the "
                "weights per new token)"
            )
        if self.replies_cost:
            lines.append(self.replies_cost)
        for row in self.examples:
            lines.append(f"\n[{row.kind}] {_clip(row.prompt, width)}")
            if row.response_before is not None:
                lines.append(
                    f"  before{' (refused)' if row.refused_before else ''}: {_clip(row.response_before, width)}"
                )
            lines.append(
                f"  after{' (refused)' if row.refused_after else ''}:  {_clip(row.response_after, width)}"
            )
        return "\n".join(lines)


METRICS = (
    "refusal_rate_harmful",
    "refusal_rate_harmless",
    "kl_harmless",
    "baseline_refusal_rate_harmful",
    "baseline_refusal_rate_harmless",
    "n_harmful",
    "n_harmless",
    "refusal_score_harmful",
    "first_token_refusal_rate_harmful",
    "first_token_refusal_rate_harmless",
    "baseline_refusal_score_harmful",
    "baseline_first_token_refusal_rate_harmful",
    "baseline_first_token_refusal_rate_harmless",
)


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _clip(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


# ---------------------------------------------------------------- one model


def _reply_ids(
    forward: Any,
    tokenizer: Any,
    encoded: Any,
    evaluation: Evaluation,
    runtime: Runtime,
    label: str,
    progress: bool,
) -> list[list[int]]:
    return forward.greedy(
        encoded,
        evaluation.max_new_tokens,
        runtime.batch_size,
        pad_token_id(tokenizer),
        stop_ids(forward.generation_eos, tokenizer),
        progress,
        f"evaluate: {label}",
    )


def _texts(tokenizer: Any, replies: list[list[int]]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in replies]


def measure_behaviour(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    evaluation: Evaluation,
    template: Template,
    runtime: Runtime,
    progress: bool = True,
    refusal_ids: Sequence[int] | None = None,
) -> Behaviour:
    """One model's first-token figures (one forward pass per prompt: one read of the weights when
    layer-streamed), and its full greedy replies when `evaluation.replies` says so for this model.

    `model`: a loaded model or a forward (`abliterate.inference.runner`); layer-streamed, its full replies
    come from the runner's cached greedy (one read of the weights per new token, every prompt together).
    `refusal_ids`: the refusal tokens (the baseline's, so before and after count the same tokens);
    None: this model's own, from its replies (`abliterate.inference.refusal.refusal_tokens_from_replies`)."""
    forward = as_forward(model)
    markers = marker_phrases(evaluation)
    context = context_length(forward)  # the model's own: prompt plus reply must fit in it
    reply_tokens = evaluation.max_new_tokens
    harmful_ids = encode_prompts(tokenizer, harmful, template, "harmful test", context, reply_tokens)
    harmless_ids = encode_prompts(tokenizer, harmless, template, "harmless test", context, reply_tokens)
    harmful_replies = harmless_replies = None
    reply_ids = None
    if evaluation.replies(forward.streamed):
        # both sets in one generation: layer-streamed, one read of the weights per new token for all of them
        every = _reply_ids(
            forward, tokenizer, [*harmful_ids, *harmless_ids], evaluation, runtime, "test prompts", progress
        )
        reply_ids = every[: len(harmful_ids)]
        harmful_replies = _texts(tokenizer, reply_ids)
        harmless_replies = _texts(tokenizer, every[len(harmful_ids) :])
    if refusal_ids is not None:
        ids, source = sorted(int(i) for i in refusal_ids), "given"
    else:
        probe = evaluation.refusal_probe_tokens
        try:
            if reply_ids is not None and probe > 0:
                found = refusal_tokens_from_replies(tokenizer, reply_ids, markers, probe)
            else:
                found = find_refusal_tokens(
                    forward, tokenizer, harmful_ids, markers, probe, runtime.batch_size, progress
                )
            ids, source = found.ids, found.source
        except AbliterateError:  # no refusal token to be found: the first-token refusal figures are left out
            ids, source = [], "none"
    first = {
        label: logprobs
        for _, label, logprobs in forward.first_token_logprobs(
            {"harmful": harmful_ids, "harmless": harmless_ids},
            [None],
            runtime.batch_size,
            pad_token_id(tokenizer),
            progress,
        )
    }
    return Behaviour(
        harmful_replies=harmful_replies,
        harmless_replies=harmless_replies,
        harmful_refused=None
        if harmful_replies is None
        else [is_refusal(r, markers) for r in harmful_replies],
        harmless_refused=None
        if harmless_replies is None
        else [is_refusal(r, markers) for r in harmless_replies],
        harmless_logprobs=first["harmless"],
        harmful_refusal_logodds=refusal_logodds(first["harmful"], ids).tolist() if ids else [],
        harmful_first_tokens=first["harmful"].argmax(dim=-1).tolist(),
        harmless_first_tokens=first["harmless"].argmax(dim=-1).tolist(),
        refusal_token_ids=list(ids),
        refusal_tokens=[tokenizer.decode([i]) for i in ids],
        refusal_tokens_source=source,
        streamed=forward.streamed,
    )


def compare(
    harmful: Sequence[str],
    harmless: Sequence[str],
    after: Behaviour,
    before: Behaviour | None,
    evaluation: Evaluation,
    template: Template,
    runtime: Runtime,
) -> EvaluationResult:
    """The figures and example rows of `after`, against the baseline behaviour `before` if given."""
    kl = None
    if before is not None:
        if before.harmless_logprobs.shape != after.harmless_logprobs.shape:
            raise AbliterateError(
                f"the baseline's first-token distributions have shape {list(before.harmless_logprobs.shape)}, "
                f"the model's {list(after.harmless_logprobs.shape)}: they do not share a vocabulary, so no KL"
            )
        kl = first_token_kl(before.harmless_logprobs, after.harmless_logprobs)
    rows: list[ExampleRow] = []
    for kind, prompts, replies, refused in (
        ("harmful", harmful, after.harmful_replies, after.harmful_refused),
        ("harmless", harmless, after.harmless_replies, after.harmless_refused),
    ):
        if replies is None or refused is None:
            continue
        old_replies = getattr(before, f"{kind}_replies", None)
        old_refused = getattr(before, f"{kind}_refused", None)
        for i in range(min(evaluation.examples, len(prompts))):
            rows.append(
                ExampleRow(
                    prompt=prompts[i],
                    kind=kind,
                    response_before=old_replies[i] if old_replies is not None else None,
                    response_after=replies[i],
                    refused_before=old_refused[i] if old_refused is not None else None,
                    refused_after=refused[i],
                )
            )
    return EvaluationResult(
        n_harmful=len(harmful),
        n_harmless=len(harmless),
        refusal_rate_harmful=after.refusal_rate_harmful,
        refusal_rate_harmless=after.refusal_rate_harmless,
        kl_harmless=kl,
        baseline_refusal_rate_harmful=before.refusal_rate_harmful if before else None,
        baseline_refusal_rate_harmless=before.refusal_rate_harmless if before else None,
        examples=rows,
        settings=evaluation_settings(evaluation, template, runtime, after.streamed),
        refusal_score_harmful=after.refusal_score_harmful,
        first_token_refusal_rate_harmful=after.first_token_refusal_rate_harmful,
        first_token_refusal_rate_harmless=after.first_token_refusal_rate_harmless,
        baseline_refusal_score_harmful=before.refusal_score_harmful if before else None,
        baseline_first_token_refusal_rate_harmful=before.first_token_refusal_rate_harmful if before else None,
        baseline_first_token_refusal_rate_harmless=before.first_token_refusal_rate_harmless
        if before
        else None,
        refusal_token_ids=list(after.refusal_token_ids),
        refusal_tokens=list(after.refusal_tokens),
        refusal_tokens_source=(before or after).refusal_tokens_source,
        full_replies=after.harmful_replies is not None,
        streamed=after.streamed,
    )


def evaluation_settings(
    evaluation: Evaluation, template: Template, runtime: Runtime, stream: bool
) -> dict[str, Any]:
    """The settings that decide an evaluation's figures, as recorded in its result (and keyed by the
    cached tasks): not where it runs (device, in memory or layer-streamed), which changes only rounding,
    but whether it makes full replies."""
    return {
        "max_new_tokens": evaluation.max_new_tokens,
        "batch_size": runtime.batch_size,
        "markers": list(marker_phrases(evaluation)),
        "system_prompt": template.system_prompt,
        "chat_template_kwargs": dict(sorted(template.chat_template_kwargs.items())),
        "examples": evaluation.examples,
        "full_replies": evaluation.replies(stream),
        "refusal_probe_tokens": evaluation.refusal_probe_tokens,
        "dtype": runtime.dtype,
    }


def evaluate_loaded(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    evaluation: Evaluation,
    template: Template,
    runtime: Runtime,
    baseline: Behaviour | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate a model (loaded, or a forward), against a baseline behaviour measured earlier (e.g.
    before an edit), counting the baseline's refusal tokens."""
    began = time.perf_counter()
    ids = baseline.refusal_token_ids if baseline is not None else None
    after = measure_behaviour(
        model, tokenizer, harmful, harmless, evaluation, template, runtime, progress, ids
    )
    result = compare(harmful, harmless, after, baseline, evaluation, template, runtime)
    result.seconds = round(time.perf_counter() - began, 3)
    return result


def replies_cost(
    model_dir: str | Path, n_prompts: int, evaluation: Evaluation, runtime: Runtime, stream: bool
) -> str | None:
    """What full greedy replies read on a layer-streamed model (`StreamedForward.greedy`): at most one pass
    over the weights per new token, every test prompt together (the prompts in the first pass, then
    one token per reply against the layers' cached keys and values), and what those caches hold per token.
    None: no streamed replies (a model in memory, or no full replies)."""
    if not (stream and evaluation.replies(stream)):
        return None
    from transformers import AutoConfig  # heavy: only when a model is read

    total = weight_bytes(model_dir, runtime.dtype).total
    config = AutoConfig.from_pretrained(str(model_dir))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    width = getattr(config, "num_key_value_heads", None) or heads
    per_token = (
        config.num_hidden_layers * 2 * width * head_dim * torch.finfo(getattr(torch, runtime.dtype)).bits // 8
    )
    gib = 1 << 30
    return (
        f"full replies layer-streamed (cached greedy): at most {evaluation.max_new_tokens} passes over the "
        f"{total / gib:.3g} GiB of weights ({runtime.dtype}), one per new token for every prompt together, "
        f"about {evaluation.max_new_tokens * total / gib:.3g} GiB read per model; the keys and values cached for "
        f"{n_prompts} prompts hold {per_token / (1 << 20):.3g} MiB per token of prompt and reply"
    )


def _open_model(model_dir: str | Path, runtime: Runtime, stream: bool):
    """(forward, tokenizer) of one model: loaded, or layer-streamed."""
    if runtime.dtype == "auto":
        raise AbliterateError("the compute dtype is still `auto`: resolve the runtime for the model first")
    return model_forward(model_dir, runtime.dtype, runtime.device, stream)


def model_behaviour(
    model_dir: str | Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    evaluation: Evaluation,
    template: Template,
    runtime: Runtime,
    stream: bool,
    refusal_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> Behaviour:
    """The behaviour of the model in `model_dir` (e.g. the original, as the baseline), in memory or
    layer-streamed (`stream`), with `runtime` resolved for the model. `refusal_ids`: the refusal tokens
    to count (e.g. those selection found); None: the model's own, from its replies."""
    forward, tokenizer = _open_model(model_dir, runtime, stream)
    return measure_behaviour(
        forward, tokenizer, harmful, harmless, evaluation, template, runtime, progress, refusal_ids
    )


def evaluate_model(
    model_dir: str | Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    evaluation: Evaluation,
    template: Template,
    runtime: Runtime,
    stream: bool,
    baseline: Behaviour | None = None,
    baseline_dir: str | Path | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate the model in `model_dir` against the baseline behaviour (measured here from
    `baseline_dir` when not given), counting the refusal tokens the baseline's own refusals start with
    for both; without either, the model alone.

    The two models are loaded one after the other (the baseline first, then freed), so memory
    holds one model at a time; `stream`: each is read one decoder layer at a time instead.
    """
    began = time.perf_counter()
    if baseline is None and baseline_dir is not None:
        baseline = model_behaviour(
            baseline_dir, harmful, harmless, evaluation, template, runtime, stream, None, progress
        )
    ids = baseline.refusal_token_ids if baseline is not None else None
    after = model_behaviour(
        model_dir, harmful, harmless, evaluation, template, runtime, stream, ids, progress
    )
    result = compare(harmful, harmless, after, baseline, evaluation, template, runtime)
    result.model = str(model_dir)
    result.baseline = str(baseline_dir) if baseline_dir is not None else None
    result.replies_cost = replies_cost(model_dir, len(harmful) + len(harmless), evaluation, runtime, stream)
    result.seconds = round(time.perf_counter() - began, 3)
    return result
