"""The search's stages as Prefect tasks: the MoE expert profile (cached by content) and the study's
trials (never cached: the study in SQLite is its own record, and a rerun resumes or continues it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from abliterate.errors import AbliterateError
from abliterate.measure.means import MeasureSettings, encode_prompts, load_tokenizer
from abliterate.measure.prompts import prompts_sha256
from abliterate.pipeline import model_forward
from abliterate.search.experts import ExpertProfile, profile_experts
from abliterate.search.study import ScoreSettings, StudySettings, TrialResult, run_study
from abliterate.weights.checkpoint import choose_profile, shard_stamp
from abliterate_tasks.caching import code_hash, make_key


def _profile_key(_context, p) -> str:
    return make_key(
        "expert-profile",
        code_hash(),
        shard_stamp(p["model_dir"]),
        prompts_sha256(p["harmful"]),
        prompts_sha256(p["harmless"]),
        p["settings"].as_dict(),
    )


@task(name="expert-profile", cache_key_fn=_profile_key, persist_result=True)
def expert_profile_task(
    model_dir: str,
    harmful: list[str],
    harmless: list[str],
    settings: MeasureSettings,
    device: str,
    stream: bool,
) -> ExpertProfile:
    """How often each routed expert is chosen on the harmful and harmless measurement prompts, rendered
    as the measurement renders them (in memory, or layer-streamed: one read of the weights)."""
    profile = choose_profile(model_dir)
    if profile is None:
        raise AbliterateError(f"{model_dir} is of no known family: cannot find its routers")
    tokenizer = load_tokenizer(model_dir)
    harmful_ids = encode_prompts(tokenizer, harmful, settings, None, "harmful")
    harmless_ids = encode_prompts(tokenizer, harmless, settings, None, "harmless")
    forward, _ = model_forward(model_dir, settings.dtype, device, stream, progress=False)
    return profile_experts(
        forward, tokenizer, harmful_ids, harmless_ids, profile, settings.batch_size, progress=False
    )


@task(name="search-trials", cache_policy=NO_CACHE)
def search_task(
    model_dir: str,
    directions_path: str,
    harmful: list[str],
    harmless: list[str],
    settings: StudySettings,
    scoring: ScoreSettings,
    root: str,
    dtype: str,
    device: str,
    stream: bool,
    experts: list[tuple[int, int]],
    on_trial: Callable[[TrialResult], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume, or continue) the study until it holds `settings.trials` complete trials."""
    return run_study(
        model_dir,
        directions_path,
        harmful,
        harmless,
        settings,
        scoring,
        root,
        dtype,
        device,
        stream,
        experts,
        on_trial,
        on_start,
    )
