"""Output validation and behavioural evaluation as cached Prefect tasks."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from abliterate.check.evaluate import (
    Behaviour,
    EvaluationResult,
    evaluate_model,
    evaluation_settings,
    model_behaviour,
)
from abliterate.check.validate import ValidationReport, validate_output
from abliterate.config import Evaluation, Runtime, Template
from abliterate.inference.threads import apply_threads
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
    apply_threads()  # this process's choice (the command's), else the default setting
    return validate_output(original_dir, ablated_dir, progress=False)  # the console: one line per stage


def _settings(p) -> dict:
    """What decides the figures (`evaluation_settings`): not where they are computed."""
    return evaluation_settings(p["evaluation"], p["template"], p["runtime"], p["stream"])


def _behaviour_key(_context, p) -> str:
    return make_key(
        "behaviour",
        code_hash(),
        shard_stamp(p["model_dir"]),
        prompts_sha256(p["harmful"]),
        prompts_sha256(p["harmless"]),
        _settings(p),
        p.get("refusal_ids"),
    )


@task(name="baseline-behaviour", cache_key_fn=_behaviour_key, persist_result=True)
def baseline_behaviour_task(
    model_dir: str,
    harmful: list[str],
    harmless: list[str],
    evaluation: Evaluation,
    template: Template,
    runtime: Runtime,
    stream: bool,
    refusal_ids: list[int] | None = None,
) -> Behaviour:
    """The original model's behaviour: measured once per prompt set and settings."""
    apply_threads(runtime)
    return model_behaviour(
        model_dir, harmful, harmless, evaluation, template, runtime, stream, refusal_ids, progress=False
    )


def _evaluate_key(_context, p) -> str:
    return make_key(
        "evaluate",
        code_hash(),
        _output_identity(p["model_dir"]),
        prompts_sha256(p["harmful"]),
        prompts_sha256(p["harmless"]),
        _settings(p),
        shard_stamp(p["baseline_dir"]) if p.get("baseline_dir") else None,
        p["baseline"].refusal_token_ids if p.get("baseline") is not None else None,
    )


@task(name="behavioural-evaluation", cache_key_fn=_evaluate_key, persist_result=True)
def evaluate_task(
    model_dir: str,
    harmful: list[str],
    harmless: list[str],
    evaluation: Evaluation,
    template: Template,
    runtime: Runtime,
    stream: bool,
    baseline: Behaviour | None = None,
    baseline_dir: str | None = None,
) -> EvaluationResult:
    """The ablated model against the baseline behaviour (measured from `baseline_dir`)."""
    apply_threads(runtime)
    return evaluate_model(
        model_dir,
        harmful,
        harmless,
        evaluation,
        template,
        runtime,
        stream,
        baseline,
        baseline_dir,
        progress=False,
    )
