"""A GLM-4.5-Air-layout FP8 checkpoint (transformers' fine-grained block FP8, real tensor names,
several blocks per matrix, scales partly in other shards than their weights) ablated and validated
through the CLI; the requantized edit against the exact one; loading with transformers."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_ablate import write_directions

from abliterate.check.validate import validate_output
from abliterate.cli import main
from abliterate.config import Ablation
from abliterate.edit import fp8_edit
from abliterate.edit.ablate import load_inputs
from abliterate.edit.matching import configured_plan, direction_for, plan_matches, vector_for
from abliterate.edit.output import shard_key
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import load_directions
from abliterate.vocabulary import MANIFEST_FILE
from abliterate.weights import fp8
from abliterate.weights.checkpoint import build_inventory
from abliterate.weights.synthetic import GlmLayout, convert_to_fp8, write_glm_layout

# hidden 32 and attention width 32 in blocks of 16: 2 x 2 blocks; moe_intermediate 24: a partial block
LAYOUT = GlmLayout(
    num_layers=3,
    n_routed_experts=4,
    num_experts_per_tok=2,
    hidden_size=32,
    moe_intermediate_size=24,
    intermediate_size=48,
    num_attention_heads=4,
    head_dim=8,
)
BLOCK = (16, 16)


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    bf16 = write_glm_layout(root / "bf16", LAYOUT, num_shards=4)
    src = convert_to_fp8(bf16, root / "fp8", BLOCK)
    directions = write_directions(src, root / "d.safetensors", selected=2)
    out = root / "out"
    assert main(["ablate", str(src), "--directions", str(directions), "--out", str(out), "--quiet"]) == 0
    return src, directions, out


def _tensor(folder: Path, name: str) -> torch.Tensor:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(folder / index[name]), "pt") as f:
        return f.get_tensor(name)


def test_inventory_pairs_every_fp8_weight_with_its_scale(fp8_run):
    src, _, _ = fp8_run
    inv = build_inventory(src)
    fp8_weights = {n for n, t in inv.tensors.items() if t.dtype == "F8_E4M3"}
    assert fp8_weights and set(inv.fp8) == fp8_weights
    apart = [w for w, (s, _) in inv.fp8.items() if inv.tensors[s].shard != inv.tensors[w].shard]
    assert apart  # the fixture has scales in other shards than their weights
    assert inv.fp8["model.layers.1.mlp.experts.0.down_proj.weight"] == (
        "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv",
        BLOCK,
    )
    assert inv.tensors["model.layers.1.mlp.gate.weight"].dtype == "F32"  # routers stay unquantized
    assert inv.tensors["model.embed_tokens.weight"].dtype == "BF16"


def test_cli_ablates_and_validates(fp8_run, capsys):
    src, directions, out = fp8_run
    assert not load_inputs(src, directions).warnings  # scales are no unclassified tensors
    capsys.readouterr()
    assert main(["validate", str(src), str(out), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"], report["failures"]
    assert report["worst_residual"]["expert_down"]["enforced"]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    quantized = [e for e in manifest["edited"] if "scale_tensor" in e]
    assert quantized and all(e["block"] == list(BLOCK) for e in quantized)
    # every FP8 weight keeps its dtype and shape, and so does its scale
    inv_in, inv_out = build_inventory(src), build_inventory(out)
    for name, t in inv_in.tensors.items():
        assert (inv_out.tensors[name].dtype, inv_out.tensors[name].shape) == (t.dtype, t.shape)


def test_requantized_edit_is_within_the_fp8_bound_of_the_exact_edit(fp8_run):
    """The reference: the exact edit of the dequantized input in float64, before any rounding. The
    output, dequantized, must lie within what requantizing that edit may move it (fp8.rounding_bound)
    plus the float32 edit's own error (H + 4) u |W| (tests/test_orthogonalize's bound)."""
    src, directions_path, out = fp8_run
    inputs = load_inputs(src, directions_path)
    plan = AblationPlan.from_dict(json.loads((out / MANIFEST_FILE).read_text())["plan"])
    directions = load_directions(directions_path, LAYOUT.hidden_size)
    checked = 0
    for entry in json.loads((out / MANIFEST_FILE).read_text())["edited"]:
        if "scale_tensor" not in entry:
            continue
        name, scale_name = entry["name"], entry["scale_tensor"]
        w = fp8.dequantize(_tensor(src, name), _tensor(src, scale_name), BLOCK).double()
        new_scale = _tensor(out, scale_name)
        new = fp8.dequantize(_tensor(out, name), new_scale, BLOCK).double()
        r = direction_for(plan, directions, entry["layer"]).double()
        exact = w - torch.outer(r, r @ w) if entry["residual_axis"] == 0 else w - torch.outer(w @ r, r)
        bound = fp8.rounding_bound(
            float(new.norm()), fp8.broadcast_scale_norm(new_scale, tuple(w.shape), BLOCK)
        )
        float32_edit = (LAYOUT.hidden_size + 4) * 2.0**-24 * float(w.norm())
        assert float((new - exact).norm()) <= bound + float32_edit, name
        checked += 1
    assert checked >= 10
    assert inputs.inventory.fp8


def test_unsupported_quantization_is_refused_with_what_to_do(fp8_run, tmp_path):
    src, directions, _ = fp8_run
    other = tmp_path / "mxfp4"
    other.mkdir()
    for p in src.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(AbliterateError, match="mxfp4 is not supported.*unquantized"):
        load_inputs(other, directions, force=True)


@pytest.mark.slow
def test_transformers_loads_the_ablated_fp8_checkpoint_on_cpu(fp8_run):
    """Without a GPU transformers dequantizes a pre-quantized FP8 checkpoint on load (its quantizer
    sets dequantize=True itself); the loaded weights are the dequantized output's."""
    from transformers import AutoModelForCausalLM

    _, _, out = fp8_run
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    name = "model.layers.1.self_attn.o_proj.weight"
    expected = fp8.dequantize(_tensor(out, name), _tensor(out, name + "_scale_inv"), BLOCK)
    loaded = model.get_parameter(name).detach().float()
    # transformers dequantizes in float32 then casts to the parameter's dtype: equal in float32
    assert torch.equal(loaded, expected)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_fp8_output_is_deterministic_and_resumes(fp8_run, tmp_path, capsys):
    """Another run gives the same bytes (each shard's requantization is deterministic, whichever
    shard computes it); a rerun into the finished output skips every shard."""
    src, directions, out = fp8_run
    again = tmp_path / "again"
    assert main(["ablate", str(src), "--directions", str(directions), "--out", str(again), "--quiet"]) == 0
    for p in sorted(out.glob("*.safetensors")):
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
    capsys.readouterr()
    assert main(["ablate", str(src), "--directions", str(directions), "--out", str(again), "--quiet"]) == 0
    assert "4 of 4 shards were already complete" in capsys.readouterr().err


def test_a_scale_in_another_shard_is_computed_once_in_a_process(fp8_run, tmp_path, monkeypatch):
    """With one worker the shards run in order: the task of a weight whose scale lies in a later
    shard hands its fresh scales to that shard's task; a scale in an earlier shard is computed there
    with its weight, whose bytes are kept for the weight's task. Every weight is requantized once,
    whole, and the bytes are those of the fixture's two-worker run (its tensors edited in a pool)."""
    src, directions, out = fp8_run
    calls = []
    real = fp8_edit._requantized_edit

    def counted(model_dir, m, r, buffers, scales_only):  # the real computation, recorded
        calls.append((m.tensor.name, scales_only))
        return real(model_dir, m, r, buffers, scales_only)

    monkeypatch.setattr(fp8_edit, "_requantized_edit", counted)
    again = tmp_path / "again"
    args = ["ablate", str(src), "--directions", str(directions), "--out", str(again), "--workers", "1"]
    assert main([*args, "--quiet"]) == 0
    inventory = build_inventory(src)
    edited = {
        e["name"] for e in json.loads((out / MANIFEST_FILE).read_text())["edited"] if "scale_tensor" in e
    }
    later = {w for w in edited if inventory.tensors[w].shard < inventory.tensors[inventory.fp8[w][0]].shard}
    earlier = {w for w in edited if inventory.tensors[w].shard > inventory.tensors[inventory.fp8[w][0]].shard}
    assert later and earlier  # convert_to_fp8 puts every second scale in the next shard (the last: the first)
    assert sorted(name for name, _ in calls) == sorted(edited)  # once each
    assert not any(only for _, only in calls)  # whole: the first task computes the other's part too
    for p in sorted(out.glob("*.safetensors")):
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


def test_a_weight_kept_for_a_later_task_is_dropped_above_the_budget(fp8_run, tmp_path, monkeypatch):
    """Bytes kept for weight tasks still to come stay under `BUDGET`: with no budget the weights whose
    scale lies in an earlier shard are requantized twice (for the scale, then for the weight), and the
    output's bytes are the same."""
    src, directions, out = fp8_run
    calls = []
    real = fp8_edit._requantized_edit

    def counted(model_dir, m, r, buffers, scales_only):
        calls.append(m.tensor.name)
        return real(model_dir, m, r, buffers, scales_only)

    monkeypatch.setattr(fp8_edit, "_requantized_edit", counted)
    monkeypatch.setattr(fp8_edit._SharedEdits, "BUDGET", 0)
    again = tmp_path / "again"
    args = ["ablate", str(src), "--directions", str(directions), "--out", str(again), "--workers", "1"]
    assert main([*args, "--quiet"]) == 0
    inventory = build_inventory(src)
    twice = {n for n in calls if calls.count(n) == 2}
    assert twice == {
        w for w in set(calls) if inventory.tensors[w].shard > inventory.tensors[inventory.fp8[w][0]].shard
    }
    assert all(calls.count(n) <= 2 for n in calls)
    for p in sorted(out.glob("*.safetensors")):
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


def test_the_edit_slice_by_slice_gives_the_whole_tensors_bytes(fp8_run, monkeypatch):
    """Slices of one block of whole vectors (columns of writers; rows of a reader: the square
    attention output [32, 32] read along its rows): the weight's bytes and the scales of the edit of
    the whole tensor in float32 at once, and the scales alone the same."""
    src, directions, _ = fp8_run
    inputs = load_inputs(src, directions)
    plan = configured_plan(inputs, Ablation(), 2)
    monkeypatch.setattr(fp8_edit, "SLICE", 1)  # one block of vectors a slice: several per tensor
    matches = [m for m in plan_matches(plan, inputs.inventory, inputs.structure) if m.scales is not None]
    readers = [
        replace(m, tensor=replace(m.tensor, residual_axis=1), side="reader")
        for m in matches
        if m.tensor.shape[0] == m.tensor.shape[1] and len(m.tensor.shape) == 2
    ]
    assert matches and readers
    for m in matches + readers:
        r = vector_for(plan, inputs.directions, m)
        q, scale = fp8_edit.requantized_edit(src, m, r)
        raw = fp8.read_tensor(src / m.tensor.shard, m.tensor)
        stored_scale = fp8.read_tensor(src / m.scales[0].shard, m.scales[0])
        q_whole, scale_whole = fp8_edit._whole_tensor_edit(src, m, r, raw, stored_scale, None, False)
        assert torch.equal(q.view(torch.uint8), q_whole.view(torch.uint8)), m.tensor.name
        assert torch.equal(scale.view(torch.int32), scale_whole.view(torch.int32)), m.tensor.name
        _, scale_only = fp8_edit.requantized_edit(src, m, r, scales_only=True)
        assert torch.equal(scale_only.view(torch.int32), scale.view(torch.int32)), m.tensor.name


def test_shard_key_follows_the_shards_of_its_fp8_partners(fp8_run, tmp_path):
    """A shard holding the scale of a weight stored elsewhere is rewritten from both: its key sees
    the other shard change too."""
    src, directions, _ = fp8_run
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    inputs = load_inputs(copy, directions, force=True)
    plan = configured_plan(inputs, Ablation(), "auto")
    inv = inputs.inventory
    weight, scale = next(
        (w, s) for w, (s, _) in inv.fp8.items() if inv.tensors[s].shard != inv.tensors[w].shard
    )
    weight_shard, scale_shard = inv.tensors[weight].shard, inv.tensors[scale].shard
    before = shard_key(plan, inputs.directions, inv, scale_shard)
    stat = (copy / weight_shard).stat()
    os.utime(copy / weight_shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert shard_key(plan, inputs.directions, inv, scale_shard) != before


def test_validation_recomputes_fp8_edits_and_catches_rescaled_scales(fp8_run, tmp_path):
    """Doubling an edited weight's scales keeps it orthogonal to the direction (the residual passes);
    the recomputation of the requantized edit from the input catches it."""
    src, _, out = fp8_run
    report = validate_output(src, out, progress=False)
    assert report.ok and report.recomputed["differs"] == 0 and report.recomputed["within_rounding"] == 0
    fp8_edited = sum("scale_tensor" in e for e in json.loads((out / MANIFEST_FILE).read_text())["edited"])
    assert report.recomputed["identical"] >= fp8_edited
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    name = "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"
    t = build_inventory(damaged).tensors[name]
    scale = fp8.read_tensor(damaged / t.shard, t) * 2
    with open(damaged / t.shard, "r+b") as f:
        f.seek(t.start)
        f.write(scale.numpy().tobytes())
    report = validate_output(src, damaged, progress=False)
    assert not report.ok and report.recomputed["differs"] == 1
    assert any("experts.2.down_proj.weight" in f and "recomputed" in f for f in report.failures), (
        report.failures
    )


@pytest.mark.parametrize("block", [None, (16, 16)], ids=["channel", "block"])
def test_compressed_tensors_float8_ablates_and_validates(tmp_path, block):
    """llm-compressor's float8 layout (`weight_scale`, per-channel [out, 1] or block scales) through
    the CLI. (Loading it with transformers needs the compressed-tensors package, not installed here.)"""
    bf16 = write_glm_layout(tmp_path / "bf16", LAYOUT, num_shards=3)
    src = convert_to_fp8(bf16, tmp_path / "ct", block, method="compressed-tensors")
    inv = build_inventory(src)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert inv.fp8[name] == (name + "_scale", block or (1, LAYOUT.num_attention_heads * LAYOUT.head_dim))
    if block is None:
        assert inv.tensors[name + "_scale"].shape == (LAYOUT.hidden_size, 1)
    directions = write_directions(src, tmp_path / "d.safetensors", selected=2)
    out = tmp_path / "out"
    assert main(["ablate", str(src), "--directions", str(directions), "--out", str(out), "--quiet"]) == 0
    report = validate_output(src, out, progress=False)
    assert report.ok, report.failures
    assert report.recomputed["identical"] >= len(inv.fp8) // 3


def test_inventory_cli_reports_fp8_weights_as_editable(fp8_run, capsys):
    src, _, _ = fp8_run
    capsys.readouterr()
    assert main(["inventory", str(src)]) == 0
    text = capsys.readouterr().out
    assert "FP8 weights" in text and "FP8 in, FP8 out" in text and "not supported" not in text
