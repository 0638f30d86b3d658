"""Output validation and behavioural evaluation as cached Prefect tasks."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from abliterate.check.evaluate import (
    Behaviour,
    EvalSettings,
    EvaluationResult,
    compare,
    load_behaviour_model,
    measure_behaviour,
    replies_cost,
)
from abliterate.check.validate import ValidationReport, validate_output
from abliterate.measure.prompts import prompts_sha256
from abliterate.vocabulary import MANIFEST_FILE
from abliterate.weights.checkpoint import shard_stamp
from abliterate_tasks.caching import code_hash, make_key


def _output_identity(out_dir: str) -> list:
    """The output's shards as written and the run that wrote them (plan, directions, input)."""
    manifest = Path(out_dir) / MANIFEST_FILE
    run_key = json.loads(manifest.read_text()).get("run_key") if manifest.is_file() else None
    return [shard_stamp(out_dir), run_key]


def _validate_key(_context, p) -> str:
    return make_key(
        "validate", code_hash(), shard_stamp(p["original_dir"]), _output_identity(p["ablated_dir"])
    )


@task(name="output-validation", cache_key_fn=_validate_key, persist_result=True)
def validate_task(original_dir: str, ablated_dir: str) -> ValidationReport:
    return validate_output(original_dir, ablated_dir)


def _behaviour_key(_context, p) -> str:
    """Not keyed: where it runs (device, in memory or layer-streamed), which changes only rounding."""
    return make_key(
        "behaviour",
        code_hash(),
        shard_stamp(p["model_dir"]),
        prompts_sha256(p["harmful"]),
        prompts_sha256(p["harmless"]),
        p["settings"],
        p.get("refusal_ids"),
    )


@task(name="baseline-behaviour", cache_key_fn=_behaviour_key, persist_result=True)
def baseline_behaviour_task(
    model_dir: str,
    harmful: list[str],
    harmless: list[str],
    settings: EvalSettings,
    device: str = "cpu",
    stream: bool = False,
    budget: int | None = None,
    refusal_ids: list[int] | None = None,
) -> Behaviour:
    """The original model's first-token figures (and full replies): measured once per prompt set.
    `refusal_ids`: the refusal tokens selection found; None: the model's own, from its replies."""
    forward, replier, tokenizer = load_behaviour_model(model_dir, settings, device, stream, budget)
    return measure_behaviour(
        forward, tokenizer, harmful, harmless, settings, refusal_ids=refusal_ids, replier=replier
    )


def _evaluate_key(_context, p) -> str:
    return make_key(
        "evaluate",
        code_hash(),
        _output_identity(p["model_dir"]),
        prompts_sha256(p["harmful"]),
        prompts_sha256(p["harmless"]),
        p["settings"],
        shard_stamp(p["baseline_dir"]) if p["baseline_dir"] else None,
        p["baseline"].refusal_token_ids if p.get("baseline") is not None else None,
    )


@task(name="behavioural-evaluation", cache_key_fn=_evaluate_key, persist_result=True)
def evaluate_task(
    model_dir: str,
    harmful: list[str],
    harmless: list[str],
    settings: EvalSettings,
    baseline: Behaviour | None = None,
    baseline_dir: str | None = None,
    device: str = "cpu",
    stream: bool = False,
    budget: int | None = None,
) -> EvaluationResult:
    """The ablated model against the baseline behaviour (measured from `baseline_dir`), in memory or
    layer-streamed like the measurement."""
    forward, replier, tokenizer = load_behaviour_model(model_dir, settings, device, stream, budget)
    ids = baseline.refusal_token_ids if baseline is not None and baseline.refusal_token_ids else None
    after = measure_behaviour(
        forward, tokenizer, harmful, harmless, settings, refusal_ids=ids, replier=replier
    )
    result = compare(harmful, harmless, after, baseline, settings)
    result.model, result.baseline = model_dir, baseline_dir
    if stream and settings.full_replies:
        result.replies_cost = replies_cost(
            model_dir, settings.dtype, budget_or_free(budget), len(harmful) + len(harmless), settings
        )
    return result


def budget_or_free(budget: int | None) -> int:
    from abliterate.inference.devices import available_memory

    return available_memory("cpu") if budget is None else budget
