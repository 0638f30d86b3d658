"""The measurement stages as plain functions: `abliterate measure` runs them alone, the flow's
cached tasks run the very same functions, so both give the same results and records.

- `decide_streaming`: the one place that decides between in-memory and layer-streamed work.
- `measure_stage`: mean residuals of both prompt sets at every residual position.
- `direction_stage`: the directions and the direction to ablate, scored in memory or layer-streamed
  (every candidate in one pass over the weights).
- `model_forward`: the model as selection and evaluation run it, in memory or layer-streamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from abliterate.config import Runtime
from abliterate.errors import AbliterateError
from abliterate.inference.streaming import choose_streaming, measure_streamed, parse_size
from abliterate.measure.directions import DirectionSet, compute_directions
from abliterate.measure.means import Measurement, MeasureSettings, load_model, measure_checkpoint
from abliterate.select.selection import Selection, SelectionSettings, select_direction


def decide_streaming(model_dir: str | Path, runtime: Runtime) -> bool:
    """Layer-streamed when the runtime says so, or (auto) when the weights exceed the memory budget."""
    return choose_streaming(
        model_dir, parse_size(runtime.memory_budget), runtime.dtype, runtime.device, runtime.streaming
    )


def scores_directions(model_dir: str | Path, direction_position: str, stream: bool = False) -> bool:
    """Whether the direction stage scores candidates (and so needs validation prompts): in memory or
    layer-streamed alike, every position but `own` and `none`."""
    return direction_position not in ("own", "none")


def model_forward(model_dir: str | Path, dtype: str, device: str, stream: bool, progress: bool = True):
    """(forward, tokenizer): the model loaded (`device` cpu, cuda:N, or auto's device map) or read one
    decoder layer at a time (`stream`), for `abliterate.select.selection` and `abliterate.check.evaluate`."""
    from abliterate.inference.runner import InMemoryForward, StreamedForward
    from abliterate.measure.means import load_tokenizer

    if stream:
        return StreamedForward(model_dir, dtype, device), load_tokenizer(model_dir)
    model, tokenizer = load_model(model_dir, dtype, device)
    return InMemoryForward(model), tokenizer


def measure_stage(
    model_dir: str,
    harmful: Sequence[str],
    harmless: Sequence[str],
    settings: MeasureSettings,
    device: str = "cpu",
    stream: bool = False,
    progress: bool = True,
) -> Measurement:
    """In memory, or one decoder layer at a time (`stream`, on `abliterate.inference.devices.stream_device`):
    equal results either way."""
    if stream:
        return measure_streamed(model_dir, harmful, harmless, settings, device, progress)
    return measure_checkpoint(model_dir, harmful, harmless, settings, device, progress)


def direction_stage(
    model_dir: str,
    measurement: Measurement,
    direction_method: str,
    direction_position: str,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    selection: SelectionSettings,
    device: str = "cpu",
    stream: bool = False,
    progress: bool = True,
) -> tuple[DirectionSet, Selection | None]:
    """Directions at every residual position, and the one to ablate.

    `direction_position`: `auto` scores every candidate by inference-time ablation and picks the
    best; a number N is scored alone (for the record) and kept whatever its scores; `own` and
    `none` choose nothing (each layer uses its own position's direction, or measurement only).
    A streamed model (`stream`) is scored layer-streamed: the unmodified model and every candidate
    in one pass over the weights, after one pass per probe token to find its refusal tokens.
    """
    directions = compute_directions(measurement, direction_method)
    if direction_position in ("own", "none"):
        return directions, None
    fixed = int(direction_position) if direction_position.isdigit() else None
    if fixed is not None and (fixed >= directions.num_positions or fixed not in directions.defined):
        raise AbliterateError(
            f"direction position {fixed}: residual positions with a non-zero direction are {directions.defined}"
        )
    forward, tokenizer = model_forward(model_dir, measurement.settings.dtype, device, stream, progress)
    chosen = select_direction(
        forward,
        tokenizer,
        directions,
        harmful_val,
        harmless_val,
        measurement.settings,
        selection,
        fixed,
        progress,
    )
    return directions, chosen
