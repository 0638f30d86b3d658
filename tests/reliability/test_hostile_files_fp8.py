"""Third pass, A (files and values): the values of an INPUT checkpoint's tensors (docs/RELIABILITY.md,
section `Third pass, A: files and values`, classes A1-A3). Every case builds its checkpoint fresh (a copy
of the package's small GLM-4.5-layout checkpoint, bf16 or FP8 with blocks of 16) and runs the CLI.

A NaN or Inf in an input's FP8 scale, a NaN byte of an FP8 weight, a scale so large that the dequantized
weight overflows, or a NaN in an edited bf16 tensor is the input's damage: it is refused where it is read,
naming the tensor and its shard (scales before any work; weight values as the edit reads them), never
written and then blamed on the ablation by `abliterate validate`.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from checkpoint_guard import unchanged
from fixtures import assert_error, cli
from hypothesis import event, given
from hypothesis import strategies as st

from abliterate.vocabulary import MANIFEST_FILE
from abliterate.weights.checkpoint import build_inventory
from abliterate.weights.dtypes import TORCH_DTYPES

from .common import ablate_args
from .test_properties import PROPERTY, _one_line_or_a_correct_run

WEIGHT = "model.layers.1.mlp.experts.1.down_proj.weight"  # FP8 [64, 32], edited by the default plan
SCALE = WEIGHT + "_scale_inv"  # F32 [4, 2]
ROUTER = "model.layers.1.mlp.gate.weight"  # bf16 (FP8 checkpoints keep routers unquantized), edited
O_PROJ = "model.layers.1.self_attn.o_proj.weight"  # bf16 in the bf16 checkpoint, edited
NORM = "model.layers.1.input_layernorm.weight"  # never edited


def _copy(model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    return copy


def _set_bytes(folder: Path, name: str, change) -> None:
    """Replace one tensor's stored bytes in place by `change(bytearray)` (or `change(bytearray, dtype)`
    for a change of values); its header untouched."""
    t = build_inventory(folder).tensors[name]
    path = folder / t.shard
    raw = bytearray(path.read_bytes())
    part = bytearray(raw[t.start : t.end])
    raw[t.start : t.end] = (
        change(part, TORCH_DTYPES[t.dtype]) if change.__code__.co_argcount == 2 else change(part)
    )
    path.write_bytes(bytes(raw))


def _f32(value: float, count: int = 1):
    """The first `count` float32 values of a tensor's bytes set to `value`."""

    def change(raw: bytearray) -> bytearray:
        raw[: 4 * count] = struct.pack(f"<{count}f", *[value] * count)
        return raw

    return change


def _value(value: float):
    """The first value of a float tensor set to `value`, in the tensor's own dtype."""

    def change(raw: bytearray, dtype: torch.dtype) -> bytearray:
        stored = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
        raw[: len(stored)] = stored
        return raw

    return change


def _byte(value: int):
    def change(raw: bytearray) -> bytearray:
        raw[5] = value
        return raw

    return change


# case -> (checkpoint, tensor, change, before any work?, fragments of the one line)
DAMAGE = {
    "FP8 scale NaN": (
        "fp8",
        SCALE,
        _f32(float("nan")),
        True,
        [f"FP8 scale {SCALE} in the input shard", "NaN or Inf"],
    ),
    "FP8 scale Inf": (
        "fp8",
        SCALE,
        _f32(float("inf"), 8),
        True,
        [f"FP8 scale {SCALE}", "NaN or Inf (8 value(s)"],
    ),
    "FP8 scale 3e38 (448 x it overflows)": (
        "fp8",
        SCALE,
        _f32(3e38),
        True,
        [SCALE, "above 7.6e+35", "overflow float32"],
    ),
    "FP8 weight byte 0x7f (NaN)": (
        "fp8",
        WEIGHT,
        _byte(0x7F),
        False,
        [f"FP8 weight {WEIGHT}", "element [0, 5]"],
    ),
    "FP8 weight byte 0xff (NaN)": (
        "fp8",
        WEIGHT,
        _byte(0xFF),
        False,
        [f"FP8 weight {WEIGHT}", "NaN or Inf (1 value(s)"],
    ),
    "router of an FP8 checkpoint NaN": (
        "fp8",
        ROUTER,
        _value(float("nan")),
        False,
        [f"tensor {ROUTER} in the input"],
    ),
    "bf16 o_proj Inf": (
        "bf16",
        O_PROJ,
        _value(float("inf")),
        False,
        [f"tensor {O_PROJ} in the input", "element [0, 0]"],
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_input_values_are_refused_where_read_naming_the_tensor(
    base, fp8_base, tmp_path, capsys, case
):
    """A1: NaN/Inf FP8 scales, NaN bytes of an FP8 weight, a scale whose product with 448 overflows, a NaN in
    an edited bf16 tensor: `ablate` wrote the output and `validate` then blamed the ablation (`... holds N
    NaN/Inf values after ablation`). Now exit 2, one line naming the tensor, its shard, and re-download; the
    input unchanged; a damaged scale is refused before anything is written, a damaged weight value where the
    edit reads it (the output stays visibly unfinished: no manifest)."""
    kind, name, change, early, fragments = DAMAGE[case]
    model, directions, _ = fp8_base if kind == "fp8" else base
    copy = _copy(model, tmp_path)
    _set_bytes(copy, name, change)
    out = tmp_path / "out"
    with unchanged(copy):
        line = assert_error(
            cli(capsys, *ablate_args(copy, directions, out)), "ablate", *fragments, "re-download"
        )
    assert "the input checkpoint is damaged" in line
    assert not out.exists() if early else not (out / MANIFEST_FILE).exists()
    if not early:  # validating what was left names it unfinished: no traceback (float8 had no isfinite)
        code, err = cli(capsys, "validate", copy, out, "--quiet")
        assert code == 1, err


def test_damage_outside_the_edited_tensors_is_copied_and_validates(fp8_base, tmp_path, capsys):
    """A1, the other side: a NaN byte in an FP8 weight and a NaN scale... only where the plan edits nothing
    of them is the input's damage left as it is: a NaN byte in an unedited FP8 weight (q_proj) is copied
    byte for byte and the output validates (the scales of every FP8 weight are checked, edited or not)."""
    model, directions, _ = fp8_base
    copy = _copy(model, tmp_path)
    _set_bytes(copy, "model.layers.1.self_attn.q_proj.weight", _byte(0x7F))
    out = tmp_path / "out"
    with unchanged(copy):
        assert cli(capsys, *ablate_args(copy, directions, out))[0] == 0
        assert cli(capsys, "validate", copy, out, "--quiet")[0] == 0
    copy_q = _copy(model, tmp_path / "q")
    _set_bytes(copy_q, "model.layers.1.self_attn.q_proj.weight_scale_inv", _f32(float("nan")))
    assert_error(
        cli(capsys, *ablate_args(copy_q, directions, tmp_path / "out-q")),
        "ablate",
        "FP8 scale model.layers.1.self_attn.q_proj.weight_scale_inv",
    )


def test_validation_names_the_inputs_own_damage(base, tmp_path, capsys):
    """A2: an output written from a damaged input (an older version of the tool, or by hand) was reported as
    `holds N NaN/Inf values after ablation`: validation now says the input holds them already."""
    model, directions, _ = base
    copy = _copy(model, tmp_path)
    out = tmp_path / "out"
    assert cli(capsys, *ablate_args(copy, directions, out))[0] == 0
    for folder in (copy, out):  # the input's NaN, and the output that carries it
        _set_bytes(folder, O_PROJ, _value(float("nan")))
    with unchanged(copy):
        assert_error(
            cli(capsys, "validate", copy, out, "--quiet"),
            "validate",
            f"tensor {O_PROJ} in the input shard",
            "the input checkpoint is damaged",
        )


@PROPERTY
@given(values=st.lists(st.floats(width=32), min_size=8, max_size=8))
def test_any_fp8_scale_values_are_one_line_or_a_correct_run(fp8_base, values):
    """A3 (property): the scale of one edited FP8 weight given any float32 values (NaN, Inf, huge, subnormal,
    zero, negative): exit 2 with one line, or a run whose output validates; never an output that
    validation blames on the ablation."""
    model, directions, _ = fp8_base
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy = _copy(model, work)
        _set_bytes(copy, SCALE, lambda raw: bytearray(struct.pack("<8f", *values)))
        with unchanged(copy):
            event(_one_line_or_a_correct_run(copy, directions, work))


def test_the_ablate_flow_refuses_damaged_input_values(prefect_env, fp8_base, tmp_path):
    """A1 through the `ablate` flow (the per-shard subflow every run uses): a NaN scale fails the flow run
    before any shard task, a NaN byte of an edited FP8 weight fails it with the same line; no manifest,
    the input unchanged."""
    from abliterate.config import Ablation
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import configured_plan
    from abliterate_flows.ablate import ablate_flow

    model, directions, _ = fp8_base
    plan = configured_plan(load_inputs(model, directions), Ablation(), "auto")
    for case, (name, change, fragment) in {
        "scale": (SCALE, _f32(float("nan")), f"FP8 scale {SCALE} in the input shard"),
        "weight": (WEIGHT, _byte(0xFF), f"FP8 weight {WEIGHT} in the input shard"),
    }.items():
        copy = _copy(model, tmp_path / case)
        _set_bytes(copy, name, change)
        out = tmp_path / case / "out"
        with unchanged(copy):
            state = ablate_flow(str(copy), str(directions), str(out), plan, return_state=True)
        assert state.is_failed() and fragment in state.message and "re-download" in state.message, (
            state.message
        )
        assert not (out / MANIFEST_FILE).exists()
