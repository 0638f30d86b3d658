"""The search's stages as Prefect tasks: the MoE expert profile (cached by content) and the study's
trials (never cached: the study in SQLite is its own record, and a rerun resumes or continues it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from abliterate.config import Evaluation, Measurement, Runtime, Search, Selection, Template
from abliterate.inference.threads import apply_threads
from abliterate.measure.means import measured_with
from abliterate.measure.prompts import prompts_sha256
from abliterate.search.experts import ExpertProfile, profile_checkpoint
from abliterate.search.study import TrialResult, run_study
from abliterate.weights.checkpoint import shard_stamp
from abliterate_tasks.caching import code_hash, make_key


def _profile_key(_context, p) -> str:
    return make_key(
        "expert-profile",
        code_hash(),
        shard_stamp(p["model_dir"]),
        prompts_sha256(p["harmful"]),
        prompts_sha256(p["harmless"]),
        measured_with(p["measurement"], p["template"], p["runtime"]),
    )


@task(name="expert-profile", cache_key_fn=_profile_key, persist_result=True)
def expert_profile_task(
    model_dir: str,
    harmful: list[str],
    harmless: list[str],
    measurement: Measurement,
    template: Template,
    runtime: Runtime,
    stream: bool,
) -> ExpertProfile:
    """How often each routed expert is chosen on the harmful and harmless measurement prompts."""
    apply_threads(runtime)
    return profile_checkpoint(model_dir, harmful, harmless, measurement, template, runtime, stream)


@task(name="search-trials", cache_policy=NO_CACHE)
def search_task(
    model_dir: str,
    directions_path: str,
    harmful: list[str],
    harmless: list[str],
    search: Search,
    selection: Selection,
    template: Template,
    evaluation: Evaluation,
    runtime: Runtime,
    root: str,
    stream: bool,
    experts: list[tuple[int, int]],
    on_trial: Callable[[TrialResult], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    confirm: tuple[list[str], list[str]] | None = None,
) -> dict[str, Any]:
    """Run (or resume, or continue) the study until it holds `search.trials` complete trials, then
    confirm its choice on `confirm`'s prompts (harmful, harmless), which the study never scores."""
    apply_threads(runtime)
    return run_study(
        model_dir,
        directions_path,
        harmful,
        harmless,
        search,
        selection,
        template,
        evaluation,
        runtime,
        root,
        stream,
        experts,
        on_trial,
        on_start,
        confirm=confirm,
    )
