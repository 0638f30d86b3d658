"""What `abliterate search` writes: plans with per-role layer kernels, a fractional direction position
and router correction-bias shifts, through the shard engine, known to the validator; and the same
plan applied at inference time (abliterate.edit.inference_edit) equal to the edited checkpoint."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from numerics import accumulation_length, logits_rtol
from safetensors import safe_open

from abliterate.check.validate import validate_output
from abliterate.config import Ablation
from abliterate.edit.ablate import ablate_checkpoint, load_inputs
from abliterate.edit.matching import direction_for, plan_matches, resolve_plan
from abliterate.edit.plan import AblationPlan, build_plan
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import load_directions, save_directions
from abliterate.weights.checkpoint import build_inventory
from abliterate.weights.synthetic import GlmLayout, write_glm_layout

KERNELS = {
    "attn_out": "gauss:center=1,width=1,peak=1.2,floor=0",
    "expert_down": "gauss:center=2,width=0.7,peak=0.9,floor=0.3",
    "shared_expert_down": "0.5",
    "router": "1,0,0.7",
    "mlp_down": "1",
}


def directions_for(model_dir: Path, path: Path, seed: int = 3) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    positions, hidden = config["num_hidden_layers"] + 1, config["hidden_size"]
    gen = torch.Generator().manual_seed(seed)
    return save_directions(
        path,
        torch.randn(positions, hidden, generator=gen),
        {"fingerprint": build_inventory(model_dir).fingerprint, "selected_position": 1},
        harmful_mean=torch.randn(positions, hidden, generator=gen),
        harmless_mean=torch.randn(positions, hidden, generator=gen) + 2,
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-plan")
    layout = GlmLayout(
        num_layers=3, n_routed_experts=4, num_experts_per_tok=2, hidden_size=16, num_nextn_predict_layers=1
    )
    src = write_glm_layout(root / "src", layout, num_shards=2)
    return src, directions_for(src, root / "d.safetensors")


def search_like_plan(
    src: Path, directions: Path, method: str = "projected", direction_position: str = "1.25", **overrides
) -> AblationPlan:
    extras = dict(
        role_scales=KERNELS,
        router_bias={1: {0: -0.75, 3: -1.0}, 2: {2: -0.5}},
        origin={"search": {"study": "s", "trial": 7}},
    )
    extras.update(overrides)
    inputs = load_inputs(src, directions)
    ablation = Ablation(layers="all", scale="1.2", targets=list(KERNELS), ablation_method=method)
    s = inputs.structure
    return resolve_plan(
        build_plan(s.num_layers, s.mtp_layers, ablation, direction_position, **extras), inputs
    )


def test_plan_records_role_scales_fractions_and_router_bias_and_round_trips(small):
    src, directions = small
    plan = search_like_plan(src, directions)
    data = plan.to_dict()
    assert data["direction_position"] == 1.25
    assert data["role_scales"]["router"] == {
        "0": 1.0,
        "1": 0.0,
        "2": 0.7,
        "3": 0.7,
    }  # MTP layer 3 follows layer 2
    assert data["router_bias"] == {"1": {"0": -0.75, "3": -1.0}, "2": {"2": -0.5}}
    assert data["origin"] == {"search": {"study": "s", "trial": 7}}
    again = AblationPlan.from_yaml(plan.to_yaml())
    assert again == plan and again.to_dict() == data
    # the record is not part of what the plan does; the edits are
    assert plan.sha256() == AblationPlan.from_dict({**data, "origin": {"other": 1}}).sha256()
    assert plan.sha256() != AblationPlan.from_dict({**data, "router_bias": {"1": {"0": -0.5}}}).sha256()
    # a plan without the new keys keeps its old dictionary (and so its identity)
    assert set(build_plan(3, [], Ablation(), "auto").to_dict()) == {
        "format",
        "layers",
        "scale",
        "embed_scale",
        "num_layers",
        "targets",
        "direction_position",
        "selected_position",
        "method",
        "mtp",
        "biases",
        "layer_spec",
        "scale_spec",
    }


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"role_scales": {"embed": {"0": 1.0}}}, "does not target it"),
        ({"role_scales": {"attn_out": {"0": 3.0}}}, r"outside \[0, 2"),
        ({"role_scales": {"attn_out": {"1": 1.0}}}, "a scale for each of the plan's layers"),
        ({"router_bias": {"1": {"x": -1}}}, "expert number"),
        ({"router_bias": {"1": {"0": "low"}}}, "expert number"),
        ({"direction_position": -0.5}, "direction position"),
        ({"origin": "trial 3"}, "origin"),
    ],
)
def test_bad_new_plan_keys_fail(change, fragment):
    base = build_plan(3, [], Ablation(layers="0", targets=["attn_out"]), "auto").to_dict()
    with pytest.raises(AbliterateError, match=fragment):
        AblationPlan.from_dict({**base, **change})


def test_fractional_position_interpolates_neighbours(small):
    src, path = small
    directions = load_directions(path)
    r1, r2 = directions.vector(1).double(), directions.vector(2).double()
    mixed = 0.75 * r1 + 0.25 * r2
    torch.testing.assert_close(
        directions.vector(1.25).double(), mixed / mixed.norm(), rtol=0, atol=4 * 2**-24
    )
    plan = search_like_plan(src, path, method="plain")
    assert torch.equal(direction_for(plan, directions, 0), directions.vector(1.25))


def test_matches_follow_role_scales_and_shift_router_biases(small):
    src, directions = small
    plan = search_like_plan(src, directions)
    matches = plan_matches(plan, build_inventory(src))
    by_name = {m.tensor.name: m for m in matches}
    # a role's own scale of 0 leaves its tensor out: the router of layer 1
    assert "model.layers.1.mlp.gate.weight" not in by_name
    assert by_name["model.layers.2.mlp.gate.weight"].scale == 0.7
    assert by_name["model.layers.1.mlp.shared_experts.down_proj.weight"].scale == 0.5
    assert by_name["model.layers.0.mlp.down_proj.weight"].scale == 1.0
    shift = by_name["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert (shift.side, shift.method, shift.shift) == ("shift", "shift", ((0, -0.75), (3, -1.0)))
    assert (
        "model.layers.3.mlp.gate.e_score_correction_bias" not in by_name
    )  # the plan shifts layers 1 and 2 only
    with pytest.raises(AbliterateError, match="no such expert"):
        plan_matches(search_like_plan(src, directions, router_bias={1: {4: -1.0}}), build_inventory(src))
    with pytest.raises(AbliterateError, match="no e_score_correction_bias"):
        plan_matches(search_like_plan(src, directions, router_bias={0: {0: -1.0}}), build_inventory(src))


def read(folder: Path, name: str) -> torch.Tensor:
    inventory = build_inventory(folder)
    with safe_open(str(folder / inventory.tensors[name].shard), framework="pt") as handle:
        return handle.get_tensor(name)


def test_engine_writes_the_plan_and_validation_knows_every_edit(small, tmp_path):
    src, directions = small
    plan = search_like_plan(src, directions)
    manifest = ablate_checkpoint(src, directions, tmp_path / "out", plan, progress=False, log=lambda _: None)
    assert manifest["plan"]["origin"] == {"search": {"study": "s", "trial": 7}}
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    entry = next(e for e in manifest["edited"] if e["name"] == name)
    assert entry["side"] == "shift" and entry["shift"] == {"0": -0.75, "3": -1.0}
    before, after = read(src, name), read(tmp_path / "out", name)
    assert torch.equal(after, before + torch.tensor([-0.75, 0.0, 0.0, -1.0]))  # float32: one exact rounding
    assert torch.equal(
        read(src, "model.layers.1.mlp.gate.weight"), read(tmp_path / "out", "model.layers.1.mlp.gate.weight")
    )
    report = validate_output(src, tmp_path / "out", progress=False)
    assert report.ok, report.failures
    assert report.changed_by_role["router_bias"] == 2
    # an exact edit (projected, scale 1) is held to the tolerance: layer 0's attention output has scale 1.2
    # here, so only the scale-1 dense MLP is enforced; every residual is reported
    assert report.worst_residual["mlp_down"].enforced

    # a bias not shifted as planned is caught, and so is a shifted bias the plan does not list
    out = tmp_path / "out"
    tensor = build_inventory(out).tensors[name]
    data = bytearray((out / tensor.shard).read_bytes())
    value = torch.frombuffer(data[tensor.start : tensor.start + 4], dtype=torch.float32).clone() + 0.5
    data[tensor.start : tensor.start + 4] = value.numpy().tobytes()
    (out / tensor.shard).write_bytes(bytes(data))
    report = validate_output(src, out, progress=False)
    assert not report.ok and any("planned shift" in f for f in report.failures), report.failures


@pytest.mark.parametrize(
    ("method", "fp8"),
    [
        ("plain", False),
        ("projected", False),
        ("norm_preserving", False),
        ("plain", True),
        ("projected", True),
        ("norm_preserving", True),
    ],
)
def test_plan_applied_at_inference_time_equals_the_edited_checkpoint(method, fp8, tmp_path):
    """A search trial is scored with its plan applied to the loaded model (hooks on the writers and
    routers, the router bias shifted, norm-preserved and FP8 weights replaced): the checkpoint the engine
    edits with the same plan computes the same logits, within the float32 bound of tests/numerics.py
    (a float32 checkpoint, so no storage rounding between them; FP8: its writers in blocks of 16, loaded
    dequantized in float32, the engine's requantized edit computed alike). Every component the search
    searches is in the plan (attention outputs, dense MLP, routed and shared experts, routers, router
    bias shifts) and each matters: the unedited model, the plan without its router bias shifts, without
    its router edits and, for FP8, the edit without its requantization are far outside the bound."""
    from tiny_chat_model import build_tiny_chat_model, chat_batch, plan_edit

    from abliterate.edit.inference_edit import PlanEdit, fp8_blocks
    from abliterate.inference.loading import load_model
    from abliterate.weights.synthetic import convert_to_fp8

    src = build_tiny_chat_model(tmp_path / "tiny")
    if fp8:
        src = convert_to_fp8(src, tmp_path / "fp8", (16, 16))
        assert {build_inventory(src).tensors[n].role for n in build_inventory(src).fp8} >= {
            "attn_out",
            "mlp_down",
            "expert_down",
            "shared_expert_down",
        }
    path = directions_for(src, tmp_path / "d.safetensors")
    router_bias = {1: {0: -0.3}, 2: {1: -0.2, 3: -0.4}}
    plan = search_like_plan(
        src, path, direction_position="1.5", method=method, router_bias=router_bias, origin=None
    )
    ablate_checkpoint(src, path, tmp_path / "out", plan, progress=False, log=lambda _: None)
    original, tokenizer = load_model(src)
    ablated, _ = load_model(tmp_path / "out")
    batch = chat_batch(tokenizer)
    assert (
        bool(fp8_blocks(build_inventory(src))) == fp8 and bool(build_inventory(tmp_path / "out").fp8) == fp8
    )

    def run(model, edit: PlanEdit | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits, and every MoE router's logits (what its edit changes directly)."""
        routers: list[torch.Tensor] = []
        handles = [
            layer.mlp.gate.register_forward_hook(lambda _m, _i, out: routers.append(out[0]))
            for layer in model.model.layers
            if hasattr(layer.mlp, "gate")
        ]
        try:
            with edit.applied(model) if edit else nullcontext(), torch.inference_mode():
                return model(**batch).logits, routers
        finally:
            for handle in handles:
                handle.remove()

    hooked, hooked_routers = run(original, plan_edit(src, path, plan))
    edited, edited_routers = run(ablated)
    # Both evaluate the same float32 model math in two orders (the plan replaces weights exactly as the
    # engine rounds them, or projects three writes and one router input per layer): the bound of
    # tests/numerics.py for 3 layers and 4 projections per layer, per token's logits (and the routers'
    # logits, which pass fewer stages).
    config = json.loads((src / "config.json").read_text())
    rtol = logits_rtol(
        config["num_hidden_layers"], accumulation_length(config, batch["input_ids"].shape[1]), 4
    )
    atol = rtol * float(edited.norm(dim=-1).max())
    torch.testing.assert_close(hooked, edited, rtol=0, atol=atol)
    for got, want in zip(hooked_routers, edited_routers, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=rtol * float(want.norm(dim=-1).max()))
    assert (run(original)[0] - edited).abs().max() > 100 * atol
    # the router bias shift changes the logits, the router edit (scale 0.7 in layer 2) its logits
    data = plan.to_dict()
    no_bias_shift = AblationPlan.from_dict({k: v for k, v in data.items() if k != "router_bias"})
    assert (run(original, plan_edit(src, path, no_bias_shift))[0] - edited).abs().max() > 10 * atol
    no_router = AblationPlan.from_dict(
        {**data, "role_scales": {**data["role_scales"], "router": dict.fromkeys(data["scale"], 0.0)}}
    )
    unedited_router = run(original, plan_edit(src, path, no_router))[1][-1]
    assert (unedited_router - edited_routers[-1]).abs().max() > 100 * rtol * float(
        edited_routers[-1].norm(dim=-1).max()
    )
    if fp8:  # the exact edit, not requantized, is not what the engine wrote
        unrounded = run(original, plan_edit(src, path, plan, fp8_rounded=False))[0]
        assert (unrounded - edited).abs().max() > 10 * atol
    assert torch.equal(run(original)[0], original(**batch).logits)  # every hook and replaced tensor is gone
