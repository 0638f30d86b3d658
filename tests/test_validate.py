"""Output validation: a clean ablation passes; every kind of tampering fails naming the tensor."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from abliterate.check.residuals import residual_tolerance
from abliterate.check.validate import validate_output
from abliterate.cli import main
from abliterate.config import Ablation
from abliterate.edit.ablate import ablate_checkpoint, load_inputs
from abliterate.edit.matching import configured_plan
from abliterate.edit.orthogonalize import project_out_
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import load_directions, save_directions
from abliterate.vocabulary import MANIFEST_FILE
from abliterate.weights.checkpoint import build_inventory
from abliterate.weights.dtypes import TORCH_DTYPES
from abliterate.weights.synthetic import GlmLayout, write_glm_layout

SMALL = GlmLayout(num_layers=12, n_routed_experts=4, num_experts_per_tok=2, hidden_size=16)


def write_directions(path: Path, hidden: int, positions: int, seed: int = 1) -> Path:
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(positions, hidden, generator=gen)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    return save_directions(path, direction, {"selected_position": positions // 2})


def ablate(src: Path, out: Path, directions_path: Path, **settings) -> Path:
    """Run the ablation engine with the plan of these ablation settings (as `abliterate ablate` takes them)."""
    inputs = load_inputs(src, directions_path)
    plan = configured_plan(inputs, Ablation(**settings), "auto")
    ablate_checkpoint(src, directions_path, out, plan=plan, progress=False, log=lambda _: None, inputs=inputs)
    return out


def project_in_output(src: Path, out: Path, name: str, r: torch.Tensor, scale: float = 1.0) -> None:
    """Overwrite one output tensor with the original projected along `r` (a rogue edit)."""
    t = tensor_at(src, name)
    dtype = TORCH_DTYPES[t.dtype]
    with open(src / t.shard, "rb") as handle:
        handle.seek(t.start)
        w = (
            torch.frombuffer(bytearray(handle.read(t.nbytes)), dtype=dtype)
            .reshape(t.shape)
            .float()
            .contiguous()
        )
    project_out_(w, r, scale, t.residual_axis)
    with open(out / t.shard, "r+b") as handle:
        handle.seek(t.start)
        handle.write(w.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(original, directions, ablated) of a 12-layer GLM-4.5-layout checkpoint; all read-only."""
    root = tmp_path_factory.mktemp("validate")
    src = write_glm_layout(root / "original", SMALL, num_shards=4)
    directions = write_directions(root / "directions.safetensors", SMALL.hidden_size, SMALL.num_layers + 1)
    out = ablate(src, root / "ablated", directions, targets="default,embed")
    return src, directions, out


@pytest.fixture
def tampered(small, tmp_path):
    """A writable copy of the clean ablated output."""
    _, _, out = small
    return Path(shutil.copytree(out, tmp_path / "tampered"))


def tensor_at(model_dir: Path, name: str):
    return build_inventory(model_dir).tensors[name]


def rewrite_header(path: Path, edit) -> None:
    """Apply `edit` to a shard's parsed header and write it back in front of the same data."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


def failures_naming(report, name: str) -> list[str]:
    return [f for f in report.failures if name in f]


# ---------------------------------------------------------------- clean outputs


def test_clean_ablation_passes_with_counts_and_residuals(small):
    src, _, out = small
    report = validate_output(src, out, progress=False)
    assert report.ok, report.failures
    assert report.complete and report.index["identical"]
    # 12 decoder layers + the MTP layer 12; layer 0 dense; 4 experts per MoE layer.
    expected = {
        "attn_out": 13,
        "embed": 1,
        "expert_down": 48,
        "mlp_down": 1,
        "router": 12,
        "shared_expert_down": 12,
    }
    assert report.changed_by_role == expected == report.expected_by_role
    assert report.changed == sum(expected.values())
    assert report.changed_by_layer["0"] == {"attn_out": 1, "mlp_down": 1}
    assert report.changed_by_layer["12"] == {
        "attn_out": 1,
        "expert_down": 4,
        "router": 1,
        "shared_expert_down": 1,
    }
    assert report.changed_by_layer["unlayered"] == {"embed": 1}
    assert set(report.worst_residual) == set(expected)
    for role, worst in report.worst_residual.items():
        assert worst.enforced and worst.residual < worst.tolerance, role
    assert report.worst_residual["router"].tolerance == residual_tolerance("F32", SMALL.hidden_size)
    assert report.nan_inf == [] and report.files == {
        "missing": [],
        "changed": [],
        "extra": [],
        "weights_not_copied": [],
    }
    json.dumps(report.to_json())  # JSON-able as it is


def test_missing_manifest_means_incomplete(small, tampered):
    src, _, _ = small
    (tampered / MANIFEST_FILE).unlink()
    report = validate_output(src, tampered, progress=False)
    assert not report.ok and not report.complete
    assert any("incomplete" in f and MANIFEST_FILE in f for f in report.failures)


# ---------------------------------------------------------------- tampering


def test_one_byte_in_an_unplanned_tensor(small, tampered):
    src, _, _ = small
    name = "model.layers.3.self_attn.q_proj.weight"
    t = tensor_at(tampered, name)
    with open(tampered / t.shard, "r+b") as handle:
        handle.seek(t.start + 5)
        byte = handle.read(1)
        handle.seek(t.start + 5)
        handle.write(bytes([byte[0] ^ 0x01]))
    report = validate_output(src, tampered, progress=False)
    assert not report.ok
    assert failures_naming(report, name) == [
        f"tensor {name} (attn_in, layer 3) changed but the plan does not edit it"
    ]
    assert len(report.failures) == 1


def test_planned_tensor_left_unedited(small, tampered):
    src, _, _ = small
    name = "model.layers.10.mlp.experts.2.down_proj.weight"
    t = tensor_at(src, name)
    with open(src / t.shard, "rb") as handle:
        handle.seek(t.start)
        original = handle.read(t.nbytes)
    with open(tampered / t.shard, "r+b") as handle:
        handle.seek(t.start)
        handle.write(original)
    report = validate_output(src, tampered, progress=False)
    assert not report.ok
    (line,) = report.failures  # found by recomputing the edit from the input
    assert line.startswith(
        f"tensor {name} (expert_down, layer 10, expert 2) is planned for editing but its bytes are unchanged: "
        "the edit recomputed from the input changes "
    )
    assert report.changed_by_role["expert_down"] == 47


def test_renamed_tensor(small, tampered):
    src, _, _ = small
    name, new = "model.layers.5.self_attn.k_proj.bias", "model.layers.5.self_attn.k_proj.beta"
    shard = tensor_at(tampered, name).shard
    rewrite_header(tampered / shard, lambda h: h.__setitem__(new, h.pop(name)))
    report = validate_output(src, tampered, progress=False)
    assert not report.ok
    assert f"tensor {name} (attn_in_bias, layer 5) is renamed to {new} in the output" in report.failures


def test_changed_dtype(small, tampered):
    src, _, _ = small
    name = "model.layers.7.mlp.shared_experts.down_proj.weight"
    shard = tensor_at(tampered, name).shard
    rewrite_header(tampered / shard, lambda h: h[name].__setitem__("dtype", "F16"))
    report = validate_output(src, tampered, progress=False)
    assert not report.ok
    assert report.failures[0] == (
        f"tensor {name} (shared_expert_down, layer 7): dtype BF16 in the original, F16 in the output"
    )
    # It could not be compared, so it is not also reported as a planned tensor left unchanged.
    assert len(failures_naming(report, name)) == 1


def test_missing_shard(small, tampered):
    src, _, _ = small
    inventory = build_inventory(src)
    shard = inventory.shards[2]
    first = inventory.by_shard(shard)[0].name
    (tampered / shard).unlink()
    report = validate_output(src, tampered, progress=False)
    assert not report.ok
    (line,) = failures_naming(report, shard)
    assert line.startswith(f"shard {shard} is missing from the output: its ") and first in line


def test_nan_in_an_edited_tensor(small, tampered):
    src, _, _ = small
    name = "model.layers.4.self_attn.o_proj.weight"
    t = tensor_at(tampered, name)
    with open(tampered / t.shard, "r+b") as handle:
        handle.seek(t.start + 2 * 3)  # element 3
        handle.write(torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
    report = validate_output(src, tampered, progress=False)
    assert report.nan_inf == [f"{name} (attn_out, layer 4)"]
    nan, recomputed = report.failures
    assert nan == f"tensor {name} (attn_out, layer 4) holds 1 NaN/Inf values after ablation"
    assert recomputed.startswith(
        f"tensor {name} (attn_out, layer 4) differs from the edit recomputed from the input: 1 of "
    )


def test_edit_with_the_wrong_direction_fails_its_residual(small, tampered):
    src, directions_path, _ = small
    name = "model.layers.6.mlp.gate.weight"
    project_in_output(src, tampered, name, load_directions(directions_path).vector(0))  # the plan uses 6
    report = validate_output(src, tampered, progress=False)
    line, recomputed = report.failures
    assert line.startswith(f"tensor {name} (router, layer 6): projection residual ")
    assert "exceeds the tolerance" in line
    assert recomputed.startswith(
        f"tensor {name} (router, layer 6) differs from the edit recomputed from the input"
    )
    assert report.worst_residual["router"].tensor == name


def test_changed_config_file(small, tampered):
    src, _, _ = small
    config = json.loads((tampered / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (tampered / "config.json").write_text(json.dumps(config))
    report = validate_output(src, tampered, progress=False)
    assert report.files["changed"] == ["config.json"]
    assert report.failures == [
        "file config.json differs from the original's: non-weight files must be copied verbatim"
    ]


def test_layer_prefix_defect_is_caught(small, tmp_path):
    """An engine that matched layer 1 by the prefix `layers.1` would also edit layers 10 and 11."""
    src, directions_path, _ = small
    out = ablate(src, tmp_path / "layer1", directions_path, layers="1")
    leaked = "model.layers.10.self_attn.o_proj.weight"
    project_in_output(src, out, leaked, load_directions(directions_path).vector(6))
    report = validate_output(src, out, progress=False)
    assert report.failures == [f"tensor {leaked} (attn_out, layer 10) changed but the plan does not edit it"]
    assert report.changed_by_layer["10"] == {"attn_out": 1}


def test_partial_scale_is_reported_not_failed(small, tmp_path):
    src, directions_path, _ = small
    out = ablate(src, tmp_path / "half", directions_path, scale="0.5", layers="2-4")
    report = validate_output(src, out, progress=False)
    assert report.ok, report.failures
    worst = report.worst_residual["attn_out"]
    assert not worst.enforced and worst.residual > 10 * worst.tolerance


def test_bad_input_raises(small, tmp_path):
    src, _, out = small
    with pytest.raises(AbliterateError, match="does not exist"):
        validate_output(src, tmp_path / "nowhere", progress=False)
    with pytest.raises(AbliterateError, match="original itself"):
        validate_output(src, src, progress=False)
    with pytest.raises(AbliterateError, match="neither"):
        validate_output(tmp_path, out, progress=False)


def test_cli_exit_codes(small, tampered, capsys):
    src, _, out = small
    assert main(["validate", str(src), str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    (tampered / "generation_config.json").unlink()
    assert main(["validate", str(src), str(tampered), "--json", "--quiet"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["files"]["missing"] == ["generation_config.json"]
    assert main(["validate", str(src), str(tampered / "nowhere"), "--quiet"]) == 2


# ---------------------------------------------------------------- the full GLM-4.5-Air layout


@pytest.mark.slow
def test_full_glm_air_layout(glm_air_layout, tmp_path):
    """18,329 tensors: every role's count, and residuals well inside the tolerance."""
    directions = write_directions(tmp_path / "d.safetensors", 8, 47)
    out = ablate(Path(glm_air_layout), tmp_path / "ablated", directions)
    report = validate_output(glm_air_layout, out, progress=False)
    assert report.ok, report.failures[:5]
    assert report.tensors == 18329 and report.compared == 18329
    # 46 decoder layers + the MTP layer 46 (layer 0 dense, 128 experts per MoE layer).
    assert report.changed_by_role == {
        "attn_out": 47,
        "expert_down": 46 * 128,
        "mlp_down": 1,
        "router": 46,
        "shared_expert_down": 46,
    }
    assert report.changed_by_role == report.expected_by_role
    # Well inside: the derived bound (test_ablate) is the storage rounding (bfloat16 2^-8; the fp32
    # routers none) plus the float32 edit, (H + 4) 2^-24, and r's rounding, 2 * 2^-24 (the validator
    # sums in float64); the tolerance adds headroom on top.
    hidden = GlmLayout().hidden_size
    for role, worst in report.worst_residual.items():
        storage = 0.0 if role == "router" else 2.0**-8
        assert worst.enforced and worst.residual <= storage + (hidden + 6) * 2.0**-24 < worst.tolerance, role


def test_fused_expert_layout_checks_each_expert(glm_air_layout_fused, tmp_path):
    directions_path = write_directions(tmp_path / "d.safetensors", 8, 47)
    out = ablate(
        Path(glm_air_layout_fused), tmp_path / "ablated", directions_path, layers="40-45", mtp="skip"
    )
    report = validate_output(glm_air_layout_fused, out, progress=False)
    assert report.ok, report.failures[:5]
    assert report.changed_by_role == {
        "attn_out": 6,
        "expert_down": 6 * 128,
        "router": 6,
        "shared_expert_down": 6,
    }
    # One expert of a fused [E, H, I] tensor edited with the wrong direction is found and named.
    name = "model.layers.41.mlp.experts.down_proj"
    t = tensor_at(out, name)
    wrong = load_directions(directions_path).vector(3)
    w = torch.randn(t.shape[1:], generator=torch.Generator().manual_seed(0)) * 0.05  # [H, I]
    project_out_(w, wrong, 1.0, 0)
    with open(out / t.shard, "r+b") as handle:
        handle.seek(t.start + 77 * (t.nbytes // t.shape[0]))
        handle.write(w.bfloat16().view(torch.uint8).numpy().tobytes())
    line, recomputed = validate_output(glm_air_layout_fused, out, progress=False).failures
    assert line.startswith(f"tensor {name} (expert_down, layer 41, expert 77): projection residual ")
    assert recomputed.startswith(f"tensor {name} (expert_down, layer 41) differs from the edit recomputed")


def test_scale_zero_layers_stay_unchanged(small, tmp_path):
    src, directions_path, _ = small
    out = ablate(src, tmp_path / "zero", directions_path, layers="2-3", scale="1,0")
    report = validate_output(src, out, progress=False)
    assert report.ok, report.failures
    assert set(report.changed_by_layer) == {"2"}


def test_manifest_must_list_every_planned_tensor(small, tampered):
    src, _, _ = small
    manifest = json.loads((tampered / MANIFEST_FILE).read_text())
    name = "model.layers.8.self_attn.o_proj.weight"
    manifest["edited"] = [e for e in manifest["edited"] if e["name"] != name]
    manifest["counts"]["attn_out"] -= 1
    (tampered / MANIFEST_FILE).write_text(json.dumps(manifest))
    report = validate_output(src, tampered, progress=False)
    assert report.failures == [
        f"tensor {name} (attn_out, layer 8) changed but the plan does not edit it",
        f"tensor {name} (attn_out, layer 8) matches the plan but the manifest does not list it as edited",
    ]


def test_other_weight_files_must_not_be_copied(small, tmp_path):
    src, directions_path, _ = small
    original = Path(shutil.copytree(src, tmp_path / "original"))
    (original / "pytorch_model.bin").write_bytes(b"unablated weights")
    out = ablate(original, tmp_path / "out", directions_path)
    report = validate_output(original, out, progress=False)
    assert report.ok and report.files["weights_not_copied"] == ["pytorch_model.bin"]
    shutil.copy(original / "pytorch_model.bin", out / "pytorch_model.bin")
    report = validate_output(original, out, progress=False)
    assert report.failures == [
        "file pytorch_model.bin holds weights the ablation does not edit, copied unablated: delete it from the output"
    ]


def test_what_the_engine_leaves_out_is_not_a_failure(small, tmp_path):
    """Input subfolders (e.g. Llama's original/) are not copied, and an ablated model can be ablated
    again: validation follows the engine's rules for both instead of failing the output."""
    src, directions, _ = small
    model = Path(shutil.copytree(src, tmp_path / "with-subfolder"))
    (model / "original").mkdir()
    (model / "original" / "params.json").write_text("{}\n")
    once = ablate(model, tmp_path / "once", directions)
    report = validate_output(model, once, directions, progress=False)
    assert report.ok, report.failures
    assert any("original/" in w for w in report.warnings)
    twice = ablate(once, tmp_path / "twice", directions)
    report = validate_output(once, twice, directions, progress=False)
    assert report.ok, report.failures
