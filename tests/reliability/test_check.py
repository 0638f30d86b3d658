"""Reliability of the check stage (catalogue V): validation recomputes every edited tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_guard import unchanged
from fixtures import cli

from abliterate.weights.checkpoint import build_inventory

from .common import H, edit_tensor_bytes, rewrite_header, second_tensor, shift


def _orthogonal_noise(directions: Path):
    from abliterate.measure.direction_file import load_directions

    r = load_directions(directions).vector(2).double()
    n = torch.randn(H, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    n = (n - (n @ r) * r).float()  # orthogonal to the direction: the projection residual stays zero

    def add(w: torch.Tensor) -> torch.Tensor:
        return w + 0.05 * n[:, None]  # every column (residual axis 0) moves along n

    return add


CORRUPTIONS = {
    "zeroed": (lambda d: lambda w: torch.zeros_like(w), ["differs from the edit recomputed from the input"]),
    "rescaled": (lambda d: lambda w: w * 0.5, ["differs from the edit recomputed from the input"]),
    "orthogonal noise": (_orthogonal_noise, ["differs from the edit recomputed from the input"]),
    "one value": (
        lambda d: lambda w: w.index_put_((torch.tensor([0]), torch.tensor([0])), -w[0, 0] - 1),
        ["differs from the edit recomputed from the input", "1 of 512 values"],
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS) + ["bytes appended", "overlapping offsets"])
def test_validation_recomputes_every_edited_tensor(base, tmp_path, capsys, case):
    """V1-V3: damage to an edited tensor that keeps it orthogonal to the direction (zeroed, rescaled,
    moved along another direction, one value changed) passed the projection-residual check; every
    edited tensor is now recomputed from the input and compared. A shard with bytes after its last
    tensor, or with overlapping offsets, is unreadable to safetensors and fails too."""
    model, directions, reference = base
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    victim = "model.layers.1.self_attn.o_proj.weight"
    shard = out / build_inventory(model).tensors[victim].shard
    if case == "bytes appended":
        shard.write_bytes(shard.read_bytes() + b"\0" * 16)
        fragments = ["is unreadable", "16 bytes after its last tensor"]
    elif case == "overlapping offsets":
        rewrite_header(shard, shift(second_tensor(shard), -2))
        fragments = ["is unreadable", "overlaps"]
    else:
        make, fragments = CORRUPTIONS[case]
        edit_tensor_bytes(out, victim, make(directions))
    with unchanged(model):
        code, _ = cli(capsys, "validate", model, out, "--quiet", "--out", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 1 and not report["ok"]
    failures = [f for f in report["failures"] if all(x in f for x in fragments)]
    assert failures, report["failures"]
    if case in CORRUPTIONS:
        assert victim in failures[0]


def test_validation_accepts_another_machines_rounding(base, tmp_path, capsys):
    """V4: an output whose edits were computed another way (here: exactly, in float64, then rounded once,
    as a machine whose float32 kernels sum in another order would come close to) differs from the
    recomputation only within the derived float32 rounding bound: validation passes, with a warning per
    such tensor, while the damage of V1 stays far outside the bound."""
    from abliterate.config import Ablation
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import configured_plan, direction_for, plan_matches

    model, directions, reference = base
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    inputs = load_inputs(model, directions)
    plan = configured_plan(inputs, Ablation(), "auto")
    for m in plan_matches(plan, inputs.inventory, inputs.structure):
        r = direction_for(plan, inputs.directions, m.tensor.layer).double()
        axis = m.tensor.residual_axis

        def exact(w: torch.Tensor, r=r, axis=axis) -> torch.Tensor:
            w = w.double()
            along = [1] * w.dim()
            along[axis] = r.numel()
            projection = torch.tensordot(w, r, dims=([axis], [0])).unsqueeze(axis)
            return w - r.view(along) * projection

        edit_tensor_bytes(out, m.tensor.name, exact, source=model)
    with unchanged(model):
        code, _ = cli(capsys, "validate", model, out, "--quiet", "--out", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, report["failures"]
    assert report["recomputed"]["within_rounding"] > 0 and report["recomputed"]["differs"] == 0
    assert any("only within float32 rounding" in w for w in report["warnings"])


def _edit_raw(folder: Path, name: str, change) -> None:
    """Replace the stored bytes of one tensor by `change(tensor in its stored dtype)`, in place."""
    from abliterate.weights import fp8

    t = build_inventory(folder).tensors[name]
    path = folder / t.shard
    raw = bytearray(path.read_bytes())
    new = change(fp8.read_tensor(path, t).clone())
    raw[t.start : t.end] = new.contiguous().view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(raw))


def _one_step_up(q: torch.Tensor) -> torch.Tensor:
    """Every e4m3 value one step further from zero (448 and zero stay): what another machine's float32
    sums may cause at worst, on every value at once."""
    bits = q.view(torch.uint8).clone()
    movable = ((bits & 0x7F) != 0) & ((bits & 0x7F) < 0x7E)
    bits[movable] += 1
    return bits.view(torch.float8_e4m3fn)


EXPERT = "model.layers.1.mlp.experts.1.down_proj.weight"
FP8_DAMAGE = {
    # the case: the expert zeroed and its scales x 2^20 validated OK (the bound came from the
    # output's own scale, which the damage widened)
    "zeroed, scales x 2^20": (lambda q: torch.zeros_like(q), lambda s: s * 2.0**20),
    "scales doubled": (None, lambda s: s * 2),
    "scales x 2^20 alone": (None, lambda s: s * 2.0**20),
    "weight one step up everywhere, scales x 1.5": (_one_step_up, lambda s: s * 1.5),
}


@pytest.mark.parametrize("case", sorted(FP8_DAMAGE))
def test_fp8_validation_is_bounded_by_the_input_not_the_output(fp8_base, tmp_path, capsys, case):
    """V6: validation of an FP8 output derives every bound from the input's scales and the edit's
    arithmetic, never from the output's scales: a damaged scale (with or without its weight) fails."""
    model, _, reference = fp8_base
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    change_q, change_s = FP8_DAMAGE[case]
    if change_q is not None:
        _edit_raw(out, EXPERT, change_q)
    _edit_raw(out, EXPERT + "_scale_inv", change_s)
    with unchanged(model):
        code, _ = cli(capsys, "validate", model, out, "--quiet", "--out", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 1 and not report["ok"]
    assert any(EXPERT in f and "differ from the edit recomputed" in f for f in report["failures"]), report[
        "failures"
    ]


def test_fp8_validation_accepts_one_step_of_another_machine(fp8_base, tmp_path, capsys):
    """V7: the other side of V6's bound: every value of an FP8 weight one e4m3 step away from the
    recomputation (the scales as recomputed) is what another machine's rounding may give: a warning."""
    model, _, reference = fp8_base
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    _edit_raw(out, EXPERT, _one_step_up)
    with unchanged(model):
        code, _ = cli(capsys, "validate", model, out, "--quiet", "--out", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, report["failures"]
    assert report["recomputed"]["within_rounding"] == 1
    assert any(EXPERT in w and "one e4m3 step" in w for w in report["warnings"])
