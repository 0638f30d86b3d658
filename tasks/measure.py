"""Activation measurement and direction computation + selection as cached Prefect tasks.

Both run the same stage functions as `abliterate measure` (abliterate/pipeline.py). Keys: the
code hash, the weights' shard stamp, the prompt hashes and the measurement settings (template,
token position, dtype); nothing about ablation (layers, scales, roles, ablation method) enters
them, so reruns with other ablation settings reuse the measurement and the directions.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from abliterate import config
from abliterate.config import Runtime, Template
from abliterate.inference.threads import apply_threads
from abliterate.measure.directions import write_directions
from abliterate.measure.means import Measurement, measured_with
from abliterate.measure.prompts import prompts_sha256
from abliterate.pipeline import direction_stage, measure_stage
from abliterate.select.selection import Selection, selection_record
from abliterate.weights.checkpoint import shard_stamp
from abliterate_tasks.caching import code_hash, make_key


def _measure_key(_context, p) -> str:
    return make_key(
        "measure",
        code_hash(),
        shard_stamp(p["model_dir"]),  # the fingerprint reads headers only; the stamp sees rewritten shards
        prompts_sha256(p["harmful"]),
        prompts_sha256(p["harmless"]),
        measured_with(p["measurement"], p["template"], p["runtime"]),
    )


@task(name="activation-measurement", cache_key_fn=_measure_key, persist_result=True)
def measure_task(
    model_dir: str,
    harmful: list[str],
    harmless: list[str],
    measurement: config.Measurement,
    template: Template,
    runtime: Runtime,
    stream: bool,
) -> Measurement:
    """In memory, or layer-streamed (`stream`): equal results, so neither `stream` nor the device is keyed.
    `runtime`: resolved for the model; its dtype and batch size are keyed (`measured_with`)."""
    apply_threads(runtime)
    return measure_stage(
        model_dir, harmful, harmless, measurement, template, runtime, stream, progress=False
    )  # the console shows one line per stage, no bars


def _directions_key(_context, p) -> str:
    """Also names the folder of the directions file, so a file is never shared by two results."""
    measurement: Measurement = p["measurement"]
    return make_key(
        "directions",
        code_hash(),
        p["fingerprint"],
        shard_stamp(p["model_dir"]),  # selection scores these very weights
        str(Path(p["work_dir"]).resolve()),  # the result is a file there
        measurement.harmful.sha256,
        measurement.harmless.sha256,
        measurement.record(),
        p["direction_method"],
        p["direction_position"],
        prompts_sha256(p["harmful_val"]),
        prompts_sha256(p["harmless_val"]),
        selection_record(p["selection"], p["evaluation"]),
        p["stream"],  # a streamed run records an unscored choice
    )


@task(name="direction-computation", cache_key_fn=_directions_key, persist_result=True)
def directions_task(
    model_dir: str,
    fingerprint: str,
    measurement: Measurement,
    direction_method: str,
    direction_position: str,
    harmful_val: list[str],
    harmless_val: list[str],
    selection: config.Selection,
    evaluation: config.Evaluation,
    work_dir: str,
    device: str,
    stream: bool,
) -> tuple[str, Selection | None]:
    """Per-position directions, the direction to ablate, and directions.safetensors.

    Returns the file's path (under `work_dir`, in a folder named by the content of its inputs)
    and the selection with every candidate's scores (None for `own`).
    """
    apply_threads(measurement.runtime)
    directions, chosen = direction_stage(
        model_dir,
        measurement,
        direction_method,
        direction_position,
        harmful_val,
        harmless_val,
        selection,
        evaluation,
        device,
        stream,
        progress=False,
    )
    folder = _directions_key(
        None,
        {
            "model_dir": model_dir,
            "fingerprint": fingerprint,
            "measurement": measurement,
            "work_dir": work_dir,
            "direction_method": direction_method,
            "direction_position": direction_position,
            "harmful_val": harmful_val,
            "harmless_val": harmless_val,
            "selection": selection,
            "evaluation": evaluation,
            "stream": stream,
        },
    )
    extra = {"selection": chosen.record()} if chosen else None
    path = write_directions(
        Path(work_dir) / "directions" / folder,
        directions,
        measurement,
        fingerprint,
        chosen.position if chosen else None,
        extra,
    )
    return str(path), chosen
