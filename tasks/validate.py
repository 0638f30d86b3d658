"""Output validation and behavioural evaluation as cached Prefect tasks."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from abliterate.checkpoint import shard_stamp
from abliterate.evaluate import Behaviour, EvalSettings, EvaluationResult, evaluate_loaded, measure_behaviour
from abliterate.measure import load_model
from abliterate.output import MANIFEST_FILE
from abliterate.prompts import prompts_sha256
from abliterate.validate import ValidationReport, validate_output
from tasks.caching import code_hash, make_key


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
    return make_key(
        "behaviour",
        code_hash(),
        shard_stamp(p["model_dir"]),
        prompts_sha256(p["harmful"]),
        prompts_sha256(p["harmless"]),
        p["settings"],
    )


@task(name="baseline-behaviour", cache_key_fn=_behaviour_key, persist_result=True)
def baseline_behaviour_task(
    model_dir: str, harmful: list[str], harmless: list[str], settings: EvalSettings
) -> Behaviour:
    """The original model's replies and first-token distributions: measured once per prompt set."""
    model, tokenizer = load_model(model_dir)
    return measure_behaviour(model, tokenizer, harmful, harmless, settings)


def _evaluate_key(_context, p) -> str:
    return make_key(
        "evaluate",
        code_hash(),
        _output_identity(p["model_dir"]),
        prompts_sha256(p["harmful"]),
        prompts_sha256(p["harmless"]),
        p["settings"],
        shard_stamp(p["baseline_dir"]) if p["baseline_dir"] else None,
    )


@task(name="behavioural-evaluation", cache_key_fn=_evaluate_key, persist_result=True)
def evaluate_task(
    model_dir: str,
    harmful: list[str],
    harmless: list[str],
    settings: EvalSettings,
    baseline: Behaviour | None = None,
    baseline_dir: str | None = None,
) -> EvaluationResult:
    """The ablated model against the baseline behaviour (measured from `baseline_dir`)."""
    model, tokenizer = load_model(model_dir)
    result = evaluate_loaded(model, tokenizer, harmful, harmless, baseline, settings)
    result.model, result.baseline = model_dir, baseline_dir
    return result
