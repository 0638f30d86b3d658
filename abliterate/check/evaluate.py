"""Behavioural evaluation: does the model still refuse, and how far did it move on harmless prompts?

For one model (and optionally its baseline, the original before ablation), on harmful and harmless
test prompts rendered with the model's chat template:

- first-token figures, from one forward pass per prompt (one read of the weights when the model
  is layer-streamed, `abliterate.inference.runner`):
  - `refusal_score_harmful`: the mean log-odds that the reply to a harmful prompt starts with a
    refusal token (the tokens the baseline's own refusals start with, `abliterate.select.selection`);
  - `first_token_refusal_rate_*`: the share of prompts whose greedy first reply token is a
    refusal token;
  - with a baseline: `kl_harmless`, the mean over harmless prompts of KL(baseline || model) of the
    first reply token's distribution, in nats: how much the ablated model loses about what the
    original would say first (the figure selection uses, so they compare);
- with full replies (`EvalSettings.full_replies`; greedy, at most `max_new_tokens` new tokens):
  `refusal_rate_*`, the share of replies that contain a refusal marker (`abliterate.inference.refusal`,
  case- and apostrophe-insensitive), and a table of example prompts with the replies before
  (baseline) and after (model). A model over the memory budget makes them only when asked, run
  offloaded by accelerate, which reads the offloaded weights once per new token and batch
  (`replies_cost` states it).

`measure_behaviour` runs one model; `compare` turns two behaviours into the result;
`evaluate_loaded` and `evaluate_model` chain them for loaded models and model folders.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from abliterate.errors import AbliterateError
from abliterate.inference.refusal import is_refusal
from abliterate.measure.prompts import describe_prompt
from abliterate.vocabulary import DEFAULT_REFUSAL_MARKERS

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_BATCH_SIZE = 16
DEFAULT_EXAMPLES = 5  # example rows per prompt kind


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    markers: tuple[str, ...] = DEFAULT_REFUSAL_MARKERS
    system_prompt: str | None = None
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs
    n_examples: int | None = DEFAULT_EXAMPLES  # per kind; None: every prompt
    full_replies: bool = True  # greedy replies of max_new_tokens tokens (refusal rates, examples)
    refusal_probe_tokens: int = 6  # reply tokens that find the refusal tokens when none are given
    dtype: str = "float32"  # the compute dtype

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise AbliterateError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise AbliterateError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.markers or not all(isinstance(m, str) and m.strip() for m in self.markers):
            raise AbliterateError(
                "the refusal marker list is empty or holds blank markers: give at least one phrase"
            )
        if self.n_examples is not None and self.n_examples < 0:
            raise AbliterateError(f"the number of examples must be >= 0, got {self.n_examples}")
        if self.refusal_probe_tokens < 0:
            raise AbliterateError(f"refusal probe tokens must be >= 0, got {self.refusal_probe_tokens}")


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
    replies_cost: str | None = None  # what the full replies of an offloaded model cost

    def to_json(self) -> dict[str, Any]:
        """Every field but the wall time, so that identical inputs give an identical report file."""
        data = asdict(self)
        del data["seconds"]
        return data

    def metrics(self) -> dict[str, float]:
        """The numeric figures, for mlflow.log_metrics (absent figures are left out)."""
        return {n: float(getattr(self, n)) for n in METRICS if getattr(self, n) is not None}

    def summary(self, width: int = 60) -> str:
        lines = [f"{'':<34} {'harmful':>8} {'harmless':>9}"]
        rows = [
            ("first-token refusal rate before", "baseline_first_token_refusal_rate"),
            ("first-token refusal rate", "first_token_refusal_rate"),
            ("refusal rate before (replies)", "baseline_refusal_rate"),
            ("refusal rate (replies)", "refusal_rate"),
        ]
        for title, name in rows:
            harmful, harmless = getattr(self, f"{name}_harmful"), getattr(self, f"{name}_harmless")
            if harmful is not None:
                lines.append(f"{title:<34} {harmful:>8.3f} {harmless:>9.3f}")
        lines.append(f"{'prompts':<34} {self.n_harmful:>8} {self.n_harmless:>9}")
        if self.refusal_score_harmful is not None:
            before = self.baseline_refusal_score_harmful
            shown = f"{before:.3f} before, " if before is not None else ""
            lines.append(
                f"first-token refusal score (log-odds) on harmful prompts: {shown}{self.refusal_score_harmful:.3f}"
            )
        if self.refusal_tokens:
            lines.append(f"refusal tokens ({self.refusal_tokens_source}): {self.refusal_tokens}")
        if self.kl_harmless is not None:
            lines.append(
                f"first-token KL(baseline || model) on harmless prompts: {self.kl_harmless:.4f} nats"
            )
        if not self.full_replies:
            lines.append(
                "full replies: not made (layer-streamed model; --full-replies always makes them offloaded)"
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


def encode(
    tokenizer: Any, prompts: Sequence[str], settings: EvalSettings, label: str, context: int | None = None
) -> list[list[int]]:
    """Chat-rendered token ids; each prompt plus the reply budget must fit in `context` tokens."""
    from abliterate.measure.chat import render_chat

    if not prompts:
        raise AbliterateError(f"the {label} test prompt set is empty: give at least one prompt")
    texts = render_chat(
        tokenizer, list(prompts), system_prompt=settings.system_prompt, **dict(settings.chat_template_kwargs)
    )
    # The rendered text already holds the template's special tokens.
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    for index, ids in enumerate(encoded):
        if context is not None and len(ids) + settings.max_new_tokens > context:
            raise AbliterateError(
                f"{label} prompt {describe_prompt(prompts[index], f'#{index}')} is {len(ids)} tokens after chat "
                f"rendering; with {settings.max_new_tokens} "
                f"new tokens it exceeds the model's context of {context}: shorten it or lower --max-new-tokens"
            )
    return encoded


def _reply_ids(
    forward: Any, tokenizer: Any, encoded: Any, settings: EvalSettings, label: str, progress: bool
):
    from abliterate.inference.runner import stop_ids
    from abliterate.measure.means import pad_token_id

    stops = stop_ids(forward.generation_eos, tokenizer)
    return forward.greedy(
        encoded,
        settings.max_new_tokens,
        settings.batch_size,
        pad_token_id(tokenizer),
        stops,
        progress,
        f"evaluate: {label}",
    )


def _texts(tokenizer: Any, replies: list[list[int]]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in replies]


def _context(forward: Any) -> int | None:
    context = getattr(forward.config, "max_position_embeddings", None)
    return context if isinstance(context, int) and 0 < context < 10_000_000 else None


def measure_behaviour(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    settings: EvalSettings | None = None,
    progress: bool = True,
    refusal_ids: Sequence[int] | None = None,
    replier: Any = None,
) -> Behaviour:
    """One model's first-token figures (one forward pass per prompt: one read of the weights when
    layer-streamed), and its full greedy replies when `settings.full_replies`.

    `model`: a loaded model or a forward (`abliterate.inference.runner`). `replier`: what generates the full
    replies (default: `model`); for a layer-streamed model, a function that loads the offloaded model
    (`load_model` with a budget), called here and dropped before the streamed pass, so host memory
    never holds both.
    `refusal_ids`: the refusal tokens (the baseline's, so before and after count the same tokens);
    None: this model's own, from its replies (`abliterate.select.selection.refusal_tokens_from_replies`)."""
    from abliterate.inference.runner import as_forward
    from abliterate.measure.means import pad_token_id
    from abliterate.select.selection import find_refusal_tokens, refusal_logodds, refusal_tokens_from_replies

    settings = settings or EvalSettings()
    forward = as_forward(model)
    context = _context(forward)
    harmful_ids = encode(tokenizer, harmful, settings, "harmful", context)
    harmless_ids = encode(tokenizer, harmless, settings, "harmless", context)
    harmful_replies = harmless_replies = None
    reply_ids = None
    if settings.full_replies:
        generator = forward if replier is None else as_forward(replier() if callable(replier) else replier)
        reply_ids = _reply_ids(generator, tokenizer, harmful_ids, settings, "harmful", progress)
        harmful_replies = _texts(tokenizer, reply_ids)
        harmless_replies = _texts(
            tokenizer, _reply_ids(generator, tokenizer, harmless_ids, settings, "harmless", progress)
        )
        del generator, replier
        gc.collect()  # an offloaded model's modules and offload folder go before the streamed pass
    if refusal_ids is not None:
        ids, source = sorted(int(i) for i in refusal_ids), "given"
    else:
        probe = settings.refusal_probe_tokens
        try:
            if reply_ids is not None and probe > 0:
                found = refusal_tokens_from_replies(tokenizer, reply_ids, settings.markers, probe)
            else:
                found = find_refusal_tokens(
                    forward, tokenizer, harmful_ids, settings.markers, probe, settings.batch_size, progress
                )
            ids, source = found.ids, found.source
        except AbliterateError:  # no refusal token to be found: the first-token refusal figures are left out
            ids, source = [], "none"
    first = dict(
        (
            (label, logprobs)
            for _, label, logprobs in forward.first_token_logprobs(
                {"harmful": harmful_ids, "harmless": harmless_ids},
                [None],
                settings.batch_size,
                pad_token_id(tokenizer),
                progress,
            )
        )
    )
    return Behaviour(
        harmful_replies=harmful_replies,
        harmless_replies=harmless_replies,
        harmful_refused=None
        if harmful_replies is None
        else [is_refusal(r, settings.markers) for r in harmful_replies],
        harmless_refused=None
        if harmless_replies is None
        else [is_refusal(r, settings.markers) for r in harmless_replies],
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
    before: Behaviour | None = None,
    settings: EvalSettings | None = None,
) -> EvaluationResult:
    """The figures and example rows of `after`, against the baseline behaviour `before` if given."""
    from abliterate.select.selection import first_token_kl

    settings = settings or EvalSettings()
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
        limit = len(prompts) if settings.n_examples is None else min(settings.n_examples, len(prompts))
        old_replies = getattr(before, f"{kind}_replies", None)
        old_refused = getattr(before, f"{kind}_refused", None)
        for i in range(limit):
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
        settings=_settings_dict(settings),
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


def _settings_dict(settings: EvalSettings) -> dict[str, Any]:
    data = asdict(settings)
    data["markers"] = list(settings.markers)
    data["chat_template_kwargs"] = dict(settings.chat_template_kwargs)
    return data


def evaluate_loaded(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    baseline: Behaviour | None = None,
    settings: EvalSettings | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate a model (loaded, or a forward), against a baseline behaviour measured earlier (e.g.
    before an edit), counting the baseline's refusal tokens."""
    began = time.perf_counter()
    settings = settings or EvalSettings()
    ids = baseline.refusal_token_ids if baseline is not None and baseline.refusal_token_ids else None
    after = measure_behaviour(model, tokenizer, harmful, harmless, settings, progress, ids)
    result = compare(harmful, harmless, after, baseline, settings)
    result.seconds = round(time.perf_counter() - began, 3)
    return result


def replies_cost(
    model_dir: str | Path, dtype: str, budget: int, n_prompts: int, settings: EvalSettings
) -> str:
    """What full greedy replies cost on a model offloaded beyond `budget` bytes: accelerate reads every
    offloaded weight from disk once per new token of every batch (and first writes the weights it
    must convert, such as per-expert tensors fused in memory, to its offload folder)."""
    from abliterate.inference.streaming import weight_bytes

    total = weight_bytes(model_dir, dtype).total
    offloaded = max(0, total - budget)
    batches = math.ceil(n_prompts / settings.batch_size)
    reads = batches * settings.max_new_tokens
    gib = 1 << 30
    return (
        f"full replies on an offloaded model: {offloaded / gib:.3g} GiB of its {total / gib:.3g} GiB of weights "
        f"({dtype}) lie beyond the {budget / gib:.3g} GiB budget and are read from disk for each of "
        f"{settings.max_new_tokens} new tokens of each of {batches} batches: {reads} reads, about "
        f"{reads * offloaded / gib:.3g} GiB per model"
    )


def load_behaviour_model(
    model_dir: str | Path,
    settings: EvalSettings,
    device: str = "cpu",
    stream: bool = False,
    budget: int | None = None,
) -> tuple[Any, Any, Any]:
    """(forward, replier, tokenizer) of one model: loaded, or layer-streamed with (when full replies are
    asked for) `replier`, a function loading an offloaded copy that holds at most `budget` bytes of
    host memory for the replies."""
    from abliterate.inference.devices import available_memory
    from abliterate.measure.means import load_model
    from abliterate.pipeline import model_forward

    forward, tokenizer = model_forward(model_dir, settings.dtype, device, stream)
    replier = None
    if stream and settings.full_replies:
        budget = available_memory("cpu") if budget is None else budget

        def replier() -> Any:
            return load_model(model_dir, settings.dtype, device, budget=budget)[0]

    return forward, replier, tokenizer


def evaluate_model(
    model_dir: str | Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    baseline_dir: str | Path | None = None,
    settings: EvalSettings | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    stream: bool = False,
    budget: int | None = None,
) -> EvaluationResult:
    """Evaluate the model in `model_dir`; with `baseline_dir`, compare it with that model, counting the
    refusal tokens the baseline's own refusals start with for both.

    The two models are loaded one after the other (the baseline first, then freed), so memory
    holds one model at a time; `stream`: each is read one decoder layer at a time instead.
    """
    began = time.perf_counter()
    settings = settings or EvalSettings()
    if dtype is not None and dtype != settings.dtype:
        settings = replace(settings, dtype=dtype)
    before = None
    if baseline_dir is not None:
        forward, replier, tokenizer = load_behaviour_model(baseline_dir, settings, device, stream, budget)
        before = measure_behaviour(forward, tokenizer, harmful, harmless, settings, progress, replier=replier)
        del forward, replier, tokenizer
    forward, replier, tokenizer = load_behaviour_model(model_dir, settings, device, stream, budget)
    ids = before.refusal_token_ids if before is not None else None
    after = measure_behaviour(forward, tokenizer, harmful, harmless, settings, progress, ids, replier)
    result = compare(harmful, harmless, after, before, settings)
    result.model = str(model_dir)
    result.baseline = str(baseline_dir) if baseline_dir is not None else None
    result.seconds = round(time.perf_counter() - began, 3)
    return result
