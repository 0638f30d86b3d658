"""Activation measurement and direction computation + selection as cached Prefect tasks.

Keys: the model fingerprint, the prompt hashes and the measurement settings (template, token
position, dtype). Nothing about ablation (layers, scales, roles, method) enters them, so
reruns with other ablation settings reuse the measurement and the directions.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from abliterate.checkpoint import shard_stamp
from abliterate.directions import compute_directions, write_directions
from abliterate.measure import Measurement, MeasureSettings, load_model, measure_checkpoint
from abliterate.prompts import prompts_sha256
from abliterate.selection import Selection, SelectionSettings, select_direction
from abliterate.streaming import measure_streamed
from tasks.caching import code_hash, make_key


def _measure_key(_context, p) -> str:
    return make_key(
        "measure",
        code_hash(),
        shard_stamp(p["model_dir"]),  # the fingerprint reads headers only; the stamp sees rewritten shards
        prompts_sha256(p["harmful"]),
        prompts_sha256(p["harmless"]),
        p["settings"].as_dict(),
    )


@task(name="activation-measurement", cache_key_fn=_measure_key, persist_result=True)
def measure_task(
    model_dir: str,
    harmful: list[str],
    harmless: list[str],
    settings: MeasureSettings,
    stream: bool = False,
) -> Measurement:
    """In memory, or layer-streamed (`stream`): equal results, so `stream` is not part of the key."""
    if stream:
        return measure_streamed(model_dir, harmful, harmless, settings)
    return measure_checkpoint(model_dir, harmful, harmless, settings)


def _directions_id(
    fingerprint: str,
    measurement: Measurement,
    method: str,
    harmful_val: list[str],
    harmless_val: list[str],
    selection: SelectionSettings,
    fixed_position: int | None = None,
    model_dir: str | None = None,
    work_dir: str | None = None,
) -> str:
    return make_key(
        "directions",
        code_hash(),
        fingerprint,
        shard_stamp(model_dir) if model_dir else None,  # selection scores these very weights
        str(Path(work_dir).resolve()) if work_dir else None,  # the result is a file there
        measurement.harmful.sha256,
        measurement.harmless.sha256,
        measurement.settings.as_dict(),
        method,
        prompts_sha256(harmful_val),
        prompts_sha256(harmless_val),
        selection.as_dict(),
        fixed_position,
    )


def _directions_key(_context, p) -> str:
    return _directions_id(
        p["fingerprint"], p["measurement"], p["method"], p["harmful_val"], p["harmless_val"], p["selection"],
        p.get("fixed_position"), p["model_dir"], p["work_dir"],
    )  # fmt: skip


@task(name="direction-computation", cache_key_fn=_directions_key, persist_result=True)
def directions_task(
    model_dir: str,
    fingerprint: str,
    measurement: Measurement,
    method: str,
    harmful_val: list[str],
    harmless_val: list[str],
    selection: SelectionSettings,
    work_dir: str,
    fixed_position: int | None = None,
) -> tuple[str, Selection]:
    """Per-position directions, the automatic choice among them, and directions.safetensors.

    Returns the file's path (under `work_dir`, keyed like the task) and the selection with
    every candidate's scores. `fixed_position` skips the scoring (which needs the whole model
    in memory): for models measured layer-streamed.
    """
    directions = compute_directions(measurement, method)
    if fixed_position is None:
        model, tokenizer = load_model(model_dir, measurement.settings.dtype)
        chosen = select_direction(
            model, tokenizer, directions, harmful_val, harmless_val, measurement.settings, selection
        )
    else:
        chosen = Selection(
            position=fixed_position, explicit=True, baseline_refusal_score=float("nan"), candidates=[],
            kl_threshold=selection.kl_threshold, refusal_token_ids=[], kl_prompts=0,
        )  # fmt: skip
    key = _directions_id(
        fingerprint, measurement, method, harmful_val, harmless_val, selection, fixed_position, model_dir, work_dir
    )
    path = write_directions(
        Path(work_dir) / "directions" / key,
        directions,
        measurement,
        fingerprint,
        chosen.position,
        extra={"selection": chosen.as_dict()},
    )
    return str(path), chosen
