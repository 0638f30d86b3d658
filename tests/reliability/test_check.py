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
