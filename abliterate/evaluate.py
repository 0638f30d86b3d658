"""Behavioural evaluation: does the model still refuse, and how far did it move on harmless prompts?

For one model (and optionally its baseline, the original before ablation):
- greedy replies (at most `max_new_tokens` new tokens) to harmful and harmless test prompts,
  rendered with the model's chat template; a reply that contains a refusal marker
  (`abliterate.refusal`, case- and apostrophe-insensitive) counts as a refusal;
- the refusal rate on each set;
- with a baseline: the mean over harmless prompts of KL(baseline || model) of the first reply
  token's distribution, in nats: how much information the ablated model loses about what the
  original would say first (the direction used by most abliteration reports, and the one
  direction selection uses, so the figures compare);
- a table of example prompts with the replies before (baseline) and after (model).

`measure_behaviour` runs one in-memory model; `compare` turns two behaviours into the result;
`evaluate_loaded` and `evaluate_model` chain them for loaded models and model folders.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate.errors import AbliterateError
from abliterate.prompts import describe_prompt
from abliterate.refusal import DEFAULT_REFUSAL_MARKERS, is_refusal

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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise AbliterateError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise AbliterateError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.markers or not all(isinstance(m, str) and m.strip() for m in self.markers):
            raise AbliterateError("the refusal marker list is empty or holds blank markers: give at least one phrase")
        if self.n_examples is not None and self.n_examples < 0:
            raise AbliterateError(f"the number of examples must be >= 0, got {self.n_examples}")


@dataclass
class Behaviour:
    """One model's replies to the test prompts, and its first-token log-probabilities on harmless ones."""

    harmful_replies: list[str]
    harmless_replies: list[str]
    harmful_refused: list[bool]
    harmless_refused: list[bool]
    harmless_logprobs: torch.Tensor  # [N_harmless, V] float64

    @property
    def refusal_rate_harmful(self) -> float:
        return _rate(self.harmful_refused)

    @property
    def refusal_rate_harmless(self) -> float:
        return _rate(self.harmless_refused)


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
    refusal_rate_harmful: float
    refusal_rate_harmless: float
    kl_harmless: float | None  # mean KL(baseline || model) of the first reply token, nats
    baseline_refusal_rate_harmful: float | None
    baseline_refusal_rate_harmless: float | None
    examples: list[ExampleRow]
    settings: dict[str, Any]
    model: str | None = None
    baseline: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Every field but the wall time, so that identical inputs give an identical report file."""
        data = asdict(self)
        del data["seconds"]
        return data

    def metrics(self) -> dict[str, float]:
        """The numeric figures, for mlflow.log_metrics (absent baseline figures are left out)."""
        names = (
            "refusal_rate_harmful", "refusal_rate_harmless", "kl_harmless",
            "baseline_refusal_rate_harmful", "baseline_refusal_rate_harmless", "n_harmful", "n_harmless",
        )  # fmt: skip
        return {n: float(getattr(self, n)) for n in names if getattr(self, n) is not None}

    def summary(self, width: int = 60) -> str:
        lines = [f"{'':<22} {'harmful':>8} {'harmless':>9}"]
        if self.baseline_refusal_rate_harmful is not None:
            lines.append(
                f"{'refusal rate before':<22} {self.baseline_refusal_rate_harmful:>8.3f} "
                f"{self.baseline_refusal_rate_harmless:>9.3f}"
            )
        lines.append(f"{'refusal rate':<22} {self.refusal_rate_harmful:>8.3f} {self.refusal_rate_harmless:>9.3f}")
        lines.append(f"{'prompts':<22} {self.n_harmful:>8} {self.n_harmless:>9}")
        if self.kl_harmless is not None:
            lines.append(f"first-token KL(baseline || model) on harmless prompts: {self.kl_harmless:.4f} nats")
        for row in self.examples:
            lines.append(f"\n[{row.kind}] {_clip(row.prompt, width)}")
            if row.response_before is not None:
                lines.append(f"  before{' (refused)' if row.refused_before else ''}: {_clip(row.response_before, width)}")
            lines.append(f"  after{' (refused)' if row.refused_after else ''}:  {_clip(row.response_after, width)}")
        return "\n".join(lines)


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
    from abliterate.chat import render_chat

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


def generate_replies(
    model: Any, tokenizer: Any, encoded: Sequence[Sequence[int]], settings: EvalSettings, label: str, progress: bool
) -> list[str]:
    """Greedy replies in prompt order; batches of similar length, left padded."""
    from transformers import GenerationConfig

    from abliterate.measure import length_sorted_batches, pad_token_id

    pad = pad_token_id(tokenizer)
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    stops = set(eos if isinstance(eos, list) else [eos]) - {None}
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos
    )
    device = next(model.parameters()).device
    replies: list[str | None] = [None] * len(encoded)
    bar = tqdm(total=len(encoded), desc=f"evaluate: {label}", unit="prompt", disable=not progress)
    with torch.inference_mode():
        for batch in length_sorted_batches(encoded, settings.batch_size, pad):
            out = model.generate(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                generation_config=config,
            )
            new = out[:, batch.input_ids.shape[1] :].cpu()
            for row, index in enumerate(batch.indices):
                tokens = new[row].tolist()
                # Cut at the first end token: what follows is padding, whatever the pad token is.
                end = next((k for k, tok in enumerate(tokens) if tok in stops), len(tokens))
                replies[index] = tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
            bar.update(len(batch.indices))
    bar.close()
    return replies  # type: ignore[return-value]


def measure_behaviour(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    settings: EvalSettings | None = None,
    progress: bool = True,
) -> Behaviour:
    """Replies, refusals and harmless first-token log-probabilities of one in-memory model."""
    from abliterate.measure import pad_token_id
    from abliterate.selection import first_token_logprobs

    settings = settings or EvalSettings()
    context = getattr(model.config, "max_position_embeddings", None)
    context = context if isinstance(context, int) and 0 < context < 10_000_000 else None
    harmful_ids = encode(tokenizer, harmful, settings, "harmful", context)
    harmless_ids = encode(tokenizer, harmless, settings, "harmless", context)
    harmful_replies = generate_replies(model, tokenizer, harmful_ids, settings, "harmful", progress)
    harmless_replies = generate_replies(model, tokenizer, harmless_ids, settings, "harmless", progress)
    logprobs = first_token_logprobs(model, harmless_ids, settings.batch_size, pad_token_id(tokenizer))
    return Behaviour(
        harmful_replies=harmful_replies,
        harmless_replies=harmless_replies,
        harmful_refused=[is_refusal(r, settings.markers) for r in harmful_replies],
        harmless_refused=[is_refusal(r, settings.markers) for r in harmless_replies],
        harmless_logprobs=logprobs,
    )


def compare(
    harmful: Sequence[str],
    harmless: Sequence[str],
    after: Behaviour,
    before: Behaviour | None = None,
    settings: EvalSettings | None = None,
) -> EvaluationResult:
    """The figures and example rows of `after`, against the baseline behaviour `before` if given."""
    from abliterate.selection import first_token_kl

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
    """Evaluate an in-memory model, against a baseline behaviour measured earlier (e.g. before an edit)."""
    began = time.perf_counter()
    settings = settings or EvalSettings()
    after = measure_behaviour(model, tokenizer, harmful, harmless, settings, progress)
    result = compare(harmful, harmless, after, baseline, settings)
    result.seconds = round(time.perf_counter() - began, 3)
    return result


def evaluate_model(
    model_dir: str | Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    baseline_dir: str | Path | None = None,
    settings: EvalSettings | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate the model in `model_dir`; with `baseline_dir`, compare it with that model.

    The two models are loaded one after the other (the baseline first, then freed), so memory
    holds one model at a time.
    """
    from abliterate.measure import load_model

    began = time.perf_counter()
    settings = settings or EvalSettings()
    before = None
    if baseline_dir is not None:
        base_model, base_tokenizer = load_model(baseline_dir, dtype, device)
        before = measure_behaviour(base_model, base_tokenizer, harmful, harmless, settings, progress)
        del base_model, base_tokenizer
    model, tokenizer = load_model(model_dir, dtype, device)
    result = evaluate_loaded(model, tokenizer, harmful, harmless, before, settings, progress)
    result.model = str(model_dir)
    result.baseline = str(baseline_dir) if baseline_dir is not None else None
    result.seconds = round(time.perf_counter() - began, 3)
    return result
