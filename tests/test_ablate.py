"""The per-shard ablation engine on GLM-4.5-Air's full layout: exactly the planned bytes change."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import accumulation_length, logits_rtol
from safetensors import safe_open

from abliterate.cli import main
from abliterate.config import Ablation
from abliterate.edit.ablate import ablate_checkpoint, ablate_shard, load_inputs
from abliterate.edit.matching import configured_plan, direction_for, plan_matches
from abliterate.edit.output import STATE_DIR, prepare_output
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import save_directions
from abliterate.vocabulary import INDEX_FILE, MANIFEST_FILE, MODEL_CARD_FILE
from abliterate.weights.checkpoint import build_inventory, fingerprint
from abliterate.weights.synthetic import GlmLayout, write_checkpoint, write_glm_layout, write_llama_layout

MAIN_COUNTS = {"attn_out": 46, "mlp_down": 1, "expert_down": 5760, "shared_expert_down": 45, "router": 45}
# The MTP layer 46 is ablated like the last decoder layer (the plan's documented default).
DEFAULT_COUNTS = {"attn_out": 47, "expert_down": 5888, "mlp_down": 1, "router": 46, "shared_expert_down": 46}
U32, U_BF16 = 2.0**-24, 2.0**-8  # unit roundoffs: float32, bfloat16 (8 significant bits)
# Residual of a scale-1 edit, |r^T W'| / |W| (writers) or |W' r| / |W| (readers), bounded as in
# test_orthogonalize: the float32 edit errs by (H + 4) u per vector, r (rounded once to float32) has
# |r|^2 = 1 +- 2 u, this file's float32 check adds H u: (2 H + 6) u, H = 16 the widest hidden size here.
H_MAX = 16
FP32_LEVEL = (2 * H_MAX + 6) * U32
# Stored in bfloat16, every element rounds once more, by at most 2^-8 of itself: |r^T dW| <= 2^-8 |W|.
BF16_LEVEL = U_BF16 + FP32_LEVEL
# Column norms of a norm-preserving edit: |v| and |fl(v')| (H u each), their ratio and product (2 u);
# then the bfloat16 rounding (2^-8); the check's norms run in float64.
NORM_LEVEL = U_BF16 + (2 * H_MAX + 2) * U32


def write_directions(
    model_dir: Path,
    path: Path,
    selected: int | None = 20,
    means: bool = True,
    recorded: bool = True,
    seed: int = 3,
) -> Path:
    inventory = build_inventory(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    positions, hidden = config["num_hidden_layers"] + 1, config["hidden_size"]
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(positions, hidden, generator=gen)
    metadata = {"fingerprint": inventory.fingerprint, "selected_position": selected} if recorded else {}
    extra = {}
    if means:
        extra = {
            "harmful_mean": torch.randn(positions, hidden, generator=gen),
            "harmless_mean": torch.randn(positions, hidden, generator=gen) + 2,
        }
    return save_directions(path, direction, metadata, **extra)


def run(src: Path, directions: Path, out: Path, direction_position: str = "auto", **settings) -> dict:
    """Ablate with the plan of these ablation settings (abliterate/config.py's `Ablation`)."""
    inputs = load_inputs(src, directions)
    plan = configured_plan(inputs, Ablation(**settings), direction_position)
    return ablate_checkpoint(src, directions, out, plan, progress=False, log=lambda _: None, inputs=inputs)


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    """Raw bytes of every tensor, by name, read from the input's offsets."""
    out = {}
    inventory = build_inventory(folder)
    for shard in inventory.shards:
        data = (Path(folder) / shard).read_bytes()
        for t in inventory.by_shard(shard):
            out[t.name] = data[t.start : t.end]
    return out


def load(folder: Path, name: str, shard: str) -> torch.Tensor:
    with safe_open(str(Path(folder) / shard), framework="pt") as handle:
        return handle.get_tensor(name).float()


def residual(entry: dict, src: Path, out: Path, r: torch.Tensor) -> float:
    """|r^T W'| / |W| for writers (worst expert of a fused tensor), |W' r| / |W| for routers and embeddings."""
    w, w2 = load(src, entry["name"], entry["shard"]), load(out, entry["name"], entry["shard"])
    return residual_of(entry, w, w2, r)


def residual_of(entry: dict, w: torch.Tensor, w2: torch.Tensor, r: torch.Tensor) -> float:
    if entry["side"] != "writer":
        return float((w2 @ r).norm() / w.norm())
    if entry["fused_experts"]:
        return max(float((r @ w2[e]).norm() / w[e].norm()) for e in range(w.shape[0]))
    return float((r @ w2.reshape(w2.shape[0], -1)).norm() / w.norm())


# The tests on it are slow: ablating all 18,329 tensors of the layout takes about 4 s, each check 1-4 s.
@pytest.fixture(scope="module")
def default_run(glm_air_layout, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    src = Path(glm_air_layout)
    before = file_hashes(src)
    directions = write_directions(src, root / "directions.safetensors")
    out = root / "out"
    manifest = run(src, directions, out)
    return src, directions, out, manifest, before


@pytest.mark.slow
def test_default_plan_edits_exactly_the_expected_tensors(default_run):
    src, _, out, manifest, before = default_run
    assert manifest["counts"] == DEFAULT_COUNTS
    main = {}
    for e in manifest["edited"]:
        if e["layer"] < 46:
            main[e["role"]] = main.get(e["role"], 0) + 1
    assert main == MAIN_COUNTS
    assert {e["layer"] for e in manifest["edited"]} == set(range(47))
    old, new = tensor_bytes(src), tensor_bytes(out)
    assert list(old) == list(new)  # names and order
    changed = {name for name in old if old[name] != new[name]}
    assert changed == {e["name"] for e in manifest["edited"]}
    assert len(old) == 18329 and len(old) - len(changed) == 18329 - 6028
    assert file_hashes(src) == before  # the input is never modified


@pytest.mark.slow
def test_output_layout_is_identical(default_run):
    src, _, out, manifest, _ = default_run
    inventory = build_inventory(src)
    for shard in inventory.shards:
        a, b = (src / shard).read_bytes(), (out / shard).read_bytes()
        assert len(a) == len(b)
        header = 8 + int.from_bytes(a[:8], "little")
        assert a[:header] == b[:header]  # names, dtypes, shapes, offsets, __metadata__
    assert (src / INDEX_FILE).read_bytes() == (out / INDEX_FILE).read_bytes()
    for name in ("config.json", "generation_config.json"):
        assert (src / name).read_bytes() == (out / name).read_bytes()
    names = {p.name for p in out.iterdir()}
    ours = {MODEL_CARD_FILE, MANIFEST_FILE}
    assert names == {p.name for p in src.iterdir()} | ours  # no state or temp files left
    assert manifest["input"]["fingerprint"] == manifest["output"]["fingerprint"] == fingerprint(out)
    assert set(manifest["shards"]) == set(inventory.shards)
    assert manifest["plan"]["mtp"] == "ablate" and manifest["plan"]["layers"] == list(range(47))
    assert {"torch", "safetensors", "transformers"} <= set(manifest["versions"])


@pytest.mark.slow
def test_plain_edits_leave_residuals_at_rounding_level(default_run):
    src, directions_path, out, manifest, _ = default_run
    inputs = load_inputs(src, directions_path)
    plan = configured_plan(inputs, Ablation(), "auto")
    r = direction_for(plan, inputs.directions, 20)
    worst = {}
    for shard in manifest["shards"]:  # every edited tensor, each shard opened once
        with safe_open(str(src / shard), "pt") as before, safe_open(str(out / shard), "pt") as after:
            for e in (e for e in manifest["edited"] if e["shard"] == shard):
                assert e["direction_position"] == 20 and e["scale"] == 1.0 and e["method"] == "plain"
                w, w2 = before.get_tensor(e["name"]).float(), after.get_tensor(e["name"]).float()
                worst[e["role"]] = max(worst.get(e["role"], 0.0), residual_of(e, w, w2, r))
    assert set(worst) == set(DEFAULT_COUNTS)
    for role, value in worst.items():
        assert value < (FP32_LEVEL if role == "router" else BF16_LEVEL), role


@pytest.mark.slow
def test_router_stays_fp32_and_experts_bf16(default_run):
    src, _, out, manifest, _ = default_run
    router = next(e for e in manifest["edited"] if e["role"] == "router")
    with safe_open(str(out / router["shard"]), framework="pt") as handle:
        assert handle.get_slice(router["name"]).get_dtype() == "F32"
    expert = next(e for e in manifest["edited"] if e["role"] == "expert_down")
    with safe_open(str(out / expert["shard"]), framework="pt") as handle:
        assert handle.get_slice(expert["name"]).get_dtype() == "BF16"


def test_fused_experts_are_edited_per_expert(glm_air_layout_fused, tmp_path):
    src = Path(glm_air_layout_fused)
    directions = write_directions(src, tmp_path / "d.safetensors")
    manifest = run(src, directions, tmp_path / "out")
    assert manifest["counts"] == DEFAULT_COUNTS
    fused = [e for e in manifest["edited"] if e["fused_experts"]]
    assert len(fused) == 46 and all(e["residual_axis"] == 1 for e in fused)
    inputs = load_inputs(src, directions)
    r = direction_for(configured_plan(inputs, Ablation(), "auto"), inputs.directions, 1)
    for e in fused[:3] + fused[-1:]:
        assert residual(e, src, tmp_path / "out", r) < BF16_LEVEL
    old, new = tensor_bytes(src), tensor_bytes(tmp_path / "out")
    assert {n for n in old if old[n] != new[n]} == {e["name"] for e in manifest["edited"]}


@pytest.mark.slow
def test_layer_one_never_touches_layers_ten_to_nineteen(glm_air_layout, tmp_path):
    src = Path(glm_air_layout)
    directions = write_directions(src, tmp_path / "d.safetensors")
    manifest = run(src, directions, tmp_path / "out", layers="1")
    assert {e["layer"] for e in manifest["edited"]} == {1}
    assert manifest["counts"] == {"attn_out": 1, "expert_down": 128, "router": 1, "shared_expert_down": 1}
    old, new = tensor_bytes(src), tensor_bytes(tmp_path / "out")
    for name in old:
        if any(f"layers.{i}." in name for i in range(10, 20)):
            assert old[name] == new[name], name


@pytest.mark.slow
def test_norm_preserving_and_scales(glm_air_layout, tmp_path):
    src = Path(glm_air_layout)
    directions = write_directions(src, tmp_path / "d.safetensors")
    zero = run(src, directions, tmp_path / "zero", scale="0", ablation_method="norm_preserving")
    for shard in zero["shards"]:
        assert (src / shard).read_bytes() == (tmp_path / "zero" / shard).read_bytes()
    full = run(src, directions, tmp_path / "full", layers="3,7", ablation_method="norm_preserving")
    run(src, directions, tmp_path / "half", layers="3,7", ablation_method="norm_preserving", scale="0.5")
    inputs = load_inputs(src, directions)
    r = direction_for(configured_plan(inputs, Ablation(), "auto"), inputs.directions, 3)
    writers = [e for e in full["edited"] if e["side"] == "writer"]
    assert {e["method"] for e in writers} == {"norm_preserving"}
    assert {e["method"] for e in full["edited"] if e["role"] == "router"} == {"plain"}
    for e in writers[::10]:
        w = load(src, e["name"], e["shard"])
        w_full, w_half = (
            load(tmp_path / "full", e["name"], e["shard"]),
            load(tmp_path / "half", e["name"], e["shard"]),
        )
        torch.testing.assert_close(
            w_full.double().norm(dim=0), w.double().norm(dim=0), rtol=NORM_LEVEL, atol=0
        )
        torch.testing.assert_close(
            w_half.double().norm(dim=0), w.double().norm(dim=0), rtol=NORM_LEVEL, atol=0
        )
        along = [float((r @ x).norm() / x.norm()) for x in (w, w_half, w_full)]
        # Rescaling v' back to |v| scales its float32 error by |v| / |v'| (large only for a column
        # nearly along r); the bfloat16 rounding is not rescaled.
        stretch = float(
            (
                w.double().norm(dim=0)
                / (w.double() - torch.outer(r.double(), r.double() @ w.double())).norm(dim=0)
            ).max()
        )
        assert along[2] <= U_BF16 + FP32_LEVEL * stretch < along[1] < along[0]


@pytest.mark.slow
def test_projected_method_and_own_directions(glm_air_layout, tmp_path):
    src = Path(glm_air_layout)
    directions = write_directions(src, tmp_path / "d.safetensors")
    manifest = run(
        src,
        directions,
        tmp_path / "out",
        layers="2,30",
        direction_position="own",
        ablation_method="projected",
    )
    inputs = load_inputs(src, directions)
    plan = configured_plan(inputs, Ablation(layers="2,30", ablation_method="projected"), "own")
    for e in manifest["edited"]:
        assert e["direction_position"] == e["layer"] and e["method"] == "projected"
        r = direction_for(plan, inputs.directions, e["layer"])
        # r is made orthogonal in float64 and rounded once to float32 (u |mean|); this float32 dot
        # product adds H u |mean|
        mean = inputs.directions.harmless_mean[e["layer"]]
        assert abs(float(r @ mean)) <= (r.numel() + 2) * U32 * float(mean.norm())
        if e["role"] in ("attn_out", "router", "shared_expert_down"):
            assert residual(e, src, tmp_path / "out", r) < (
                FP32_LEVEL if e["role"] == "router" else BF16_LEVEL
            )


def test_embed_target_and_dense_llama(tmp_path):
    src = write_llama_layout(tmp_path / "llama", num_layers=4, hidden=16, inter=32)
    directions = write_directions(src, tmp_path / "d.safetensors", selected=2)
    manifest = run(src, directions, tmp_path / "out", targets="default,embed")
    assert manifest["counts"] == {"attn_out": 4, "embed": 1, "mlp_down": 4}
    inputs = load_inputs(src, directions)
    r = direction_for(configured_plan(inputs, Ablation(), "auto"), inputs.directions, None)
    embed = next(e for e in manifest["edited"] if e["role"] == "embed")
    assert embed["side"] == "embed" and embed["layer"] is None
    assert residual(embed, src, tmp_path / "out", r) < BF16_LEVEL


def test_output_side_biases(tmp_path):
    hidden, specs = 16, []
    for i in range(2):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,), torch.bfloat16),
            (p + "self_attn.q_proj.weight", (hidden, hidden), torch.bfloat16),
            (p + "self_attn.k_proj.weight", (hidden, hidden), torch.bfloat16),
            (p + "self_attn.v_proj.weight", (hidden, hidden), torch.bfloat16),
            (p + "self_attn.o_proj.weight", (hidden, hidden), torch.bfloat16),
            (p + "self_attn.o_proj.bias", (hidden,), torch.bfloat16),
            (p + "post_attention_layernorm.weight", (hidden,), torch.bfloat16),
            (p + "mlp.gate_proj.weight", (32, hidden), torch.bfloat16),
            (p + "mlp.up_proj.weight", (32, hidden), torch.bfloat16),
            (p + "mlp.down_proj.weight", (hidden, 32), torch.bfloat16),
            (p + "mlp.down_proj.bias", (hidden,), torch.bfloat16),
        ]
    specs = [
        ("model.embed_tokens.weight", (32, hidden), torch.bfloat16),
        *specs,
        ("model.norm.weight", (hidden,), torch.bfloat16),
        ("lm_head.weight", (32, hidden), torch.bfloat16),
    ]
    config = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": hidden,
        "tie_word_embeddings": False,
    }
    src = write_checkpoint(tmp_path / "biased", specs, config, num_shards=2)
    directions = write_directions(src, tmp_path / "d.safetensors", selected=1)
    assert "attn_out_bias" not in run(src, directions, tmp_path / "plain")["counts"]
    manifest = run(src, directions, tmp_path / "out", biases=True)
    assert manifest["counts"] == {"attn_out": 2, "attn_out_bias": 2, "mlp_down": 2, "mlp_down_bias": 2}
    inputs = load_inputs(src, directions)
    r = direction_for(configured_plan(inputs, Ablation(), "auto"), inputs.directions, 0)
    for e in manifest["edited"]:
        if e["role"].endswith("_bias"):
            b, b2 = load(src, e["name"], e["shard"]), load(tmp_path / "out", e["name"], e["shard"])
            assert abs(float(r @ b2)) / float(b.norm()) < BF16_LEVEL


def test_ablated_checkpoint_loads_and_equals_run_time_projection_of_every_write(tmp_path):
    """The edited checkpoint, loaded in transformers, computes exactly what the original computes when
    every write into the residual stream (embedding, attention output, MLP/MoE output) has r projected
    out at run time by `abliterate.edit.inference_edit.DirectionEdit`, the ablation selection scores. Routers are left out: they read the RMS-normed stream, whose per-channel gain
    brings an r component back, so editing them changes more than the writes."""
    from tiny_chat_model import HARMFUL, build_tiny_chat_model

    from abliterate.edit.inference_edit import DirectionEdit
    from abliterate.inference.loading import load_model
    from abliterate.measure.chat import render_chat

    src = build_tiny_chat_model(tmp_path / "tiny")
    directions = write_directions(src, tmp_path / "d.safetensors", selected=2, means=False, recorded=False)
    writers = "attn_out,mlp_down,expert_down,shared_expert_down,embed"
    run(src, directions, tmp_path / "out", targets=writers, direction_position="2")
    original, tokenizer = load_model(src)
    ablated, _ = load_model(tmp_path / "out")
    batch = tokenizer(
        render_chat(tokenizer, HARMFUL), return_tensors="pt", padding=True, add_special_tokens=False
    )
    r = load_inputs(src, directions).directions.vector(2)

    with torch.inference_mode():
        plain = original(**batch).logits
        with DirectionEdit(r).applied(original):  # the inference-time ablation direction selection scores
            hooked = original(**batch).logits
        edited = ablated(**batch).logits
    assert (plain - hooked).abs().max() > 1e-2  # the direction matters
    # The same float32 model math in two orders: bound of tests/numerics.py for 3 layers, 2 projected
    # writes per layer and the embedding, per token's logits (a skipped writer role is 7-50x above it).
    config = json.loads((src / "config.json").read_text())
    rtol = logits_rtol(
        config["num_hidden_layers"], accumulation_length(config, batch["input_ids"].shape[1]), 2
    )
    torch.testing.assert_close(edited, hooked, rtol=0, atol=rtol * float(hooked.norm(dim=-1).max()))


def test_single_file_checkpoint_and_parallel_shards_agree(tmp_path):
    layout = GlmLayout(num_layers=3, n_routed_experts=4, num_experts_per_tok=2, hidden_size=16)
    single = write_glm_layout(tmp_path / "single", layout, single_file=True)
    sharded = write_glm_layout(tmp_path / "sharded", layout, num_shards=4)
    d1 = write_directions(single, tmp_path / "d1.safetensors", selected=1)
    d2 = write_directions(sharded, tmp_path / "d2.safetensors", selected=1)
    run(single, d1, tmp_path / "o1")
    assert sorted(p.name for p in (tmp_path / "o1").iterdir()) == sorted(
        ["model.safetensors", "config.json", "generation_config.json", MODEL_CARD_FILE, MANIFEST_FILE]
    )
    inputs = load_inputs(sharded, d2)
    plan = configured_plan(inputs, Ablation(), "auto")
    serial = ablate_checkpoint(
        sharded, d2, tmp_path / "serial", plan, workers=1, progress=False, log=lambda _: None
    )
    parallel = ablate_checkpoint(
        sharded, d2, tmp_path / "par", plan, workers=3, progress=False, log=lambda _: None
    )
    assert serial["edited"] == parallel["edited"]
    assert file_hashes(tmp_path / "serial") == {
        k: v for k, v in file_hashes(tmp_path / "par").items() if k != MANIFEST_FILE
    } | {MANIFEST_FILE: file_hashes(tmp_path / "serial")[MANIFEST_FILE]}


# ---------------------------------------------------------------- resume and safety


SMALL = GlmLayout(
    num_layers=8, n_routed_experts=16, num_experts_per_tok=2, hidden_size=32, moe_intermediate_size=16
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    src = write_glm_layout(root / "in", SMALL, num_shards=6)
    directions = write_directions(src, root / "d.safetensors", selected=4)
    reference = root / "reference"
    run(src, directions, reference)
    return src, directions, reference


def test_inputs_are_read_once_per_process_and_again_when_a_file_changes(small, tmp_path):
    """The CLI, the flow and every shard task of one ablation share one read of the inputs; each
    caller gets its own warnings; a rewritten directions file or checkpoint is read again."""
    src, directions, _ = small
    model = tmp_path / "model"
    model.mkdir()
    for p in src.iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    first, again = load_inputs(model, directions), load_inputs(model, directions)
    assert again.inventory is first.inventory and again.directions is first.directions
    again.warnings.append("seen by this caller only")
    assert "seen by this caller only" not in load_inputs(model, directions).warnings
    copy = write_directions(model, tmp_path / "d.safetensors", selected=4, seed=5)
    before = load_inputs(model, copy).directions
    assert before is not first.directions
    write_directions(model, copy, selected=4, seed=6)  # replaced under the same name
    after = load_inputs(model, copy).directions
    assert after is not before and not torch.equal(after.direction, before.direction)
    config = model / "config.json"
    config.write_text(config.read_text() + " ")  # the checkpoint changed: read again
    assert load_inputs(model, directions).inventory is not first.inventory


def shard_hashes(folder: Path) -> dict[str, str]:
    return {k: v for k, v in file_hashes(folder).items() if k != MANIFEST_FILE}


def test_resume_after_a_crash_is_bit_identical(small, tmp_path):
    src, directions, reference = small
    out = tmp_path / "out"
    inputs = load_inputs(src, directions)
    plan = configured_plan(inputs, Ablation(), "auto")
    prepared = prepare_output(inputs, plan, out)
    first = inputs.inventory.shards[:2]
    for shard in first:
        ablate_shard(plan, inputs, shard, out)
    # What a kill leaves: a half-written temp file of the next shard, no manifest.
    (out / f".{inputs.inventory.shards[2]}.tmp-99999-1").write_bytes(b"partial")
    assert not (out / MANIFEST_FILE).exists() and prepared.run_key
    stamps = {s: (out / s).stat().st_mtime_ns for s in first}
    manifest = ablate_checkpoint(src, directions, out, plan, progress=False, log=lambda _: None)
    assert {s: (out / s).stat().st_mtime_ns for s in first} == stamps  # skipped, not rewritten
    assert shard_hashes(out) == shard_hashes(reference)
    assert manifest["edited"] == json.loads((reference / MANIFEST_FILE).read_text())["edited"]
    assert not any(p.name.startswith(".") for p in out.iterdir())


KILLER = """
import os, signal, sys
import abliterate.edit.engine as engine
edits, kill_at = [0], int(sys.argv[1])
edit = engine._edit_tensor
def killing_edit(*args):
    edits[0] += 1
    if edits[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a crash or the OOM killer
    edit(*args)
engine._edit_tensor = killing_edit
from abliterate.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_killed_process_resumes_bit_identical(small, tmp_path):
    """SIGKILL the CLI in the middle of a shard (half of the edits done); the rerun finishes the rest."""
    src, directions, reference = small
    out = tmp_path / "out"
    args = ["ablate", str(src), "--directions", str(directions), "--out", str(out), "--quiet"]
    edits = len(json.loads((reference / MANIFEST_FILE).read_text())["edited"])
    proc = subprocess.run([sys.executable, "-c", KILLER, str(edits // 2), *args], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST_FILE).exists()
    assert list(out.glob(".*.tmp-*")), "the kill should leave a half-written shard"
    done = {p.stem for p in (out / STATE_DIR).glob("*.safetensors.json")}
    assert 0 < len(done) < len(build_inventory(src).shards)
    stamps = {s: (out / s).stat().st_mtime_ns for s in done}
    assert main(args) == 0
    assert {s: (out / s).stat().st_mtime_ns for s in done} == stamps  # finished shards are not redone
    assert shard_hashes(out) == shard_hashes(reference)


def test_rerun_of_a_complete_output_rewrites_nothing(small, tmp_path):
    src, directions, reference = small
    out = tmp_path / "out"
    first = run(src, directions, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    again = run(src, directions, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == stamps
    assert again["edited"] == first["edited"] and again["shards"] == first["shards"]


def test_other_plan_into_an_existing_output_needs_overwrite(small, tmp_path):
    src, directions, _ = small
    out = tmp_path / "out"
    run(src, directions, out, layers="1")
    with pytest.raises(AbliterateError, match="different plan.*--overwrite"):
        run(src, directions, out, layers="2")
    manifest = ablate_checkpoint(
        src,
        directions,
        out,
        configured_plan(load_inputs(src, directions), Ablation(layers="2"), "auto"),
        overwrite=True,
        progress=False,
        log=lambda _: None,
    )
    assert {e["layer"] for e in manifest["edited"]} == {2}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(AbliterateError, match="not empty.*notes.txt"):
        run(src, directions, foreign)
    # --overwrite into someone else's directory deletes nothing of theirs ...
    plan = configured_plan(load_inputs(src, directions), Ablation(), "auto")
    quiet = {"progress": False, "log": lambda _: None}
    ablate_checkpoint(src, directions, foreign, plan, overwrite=True, **quiet)
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / MANIFEST_FILE).is_file()
    # ... and refuses one holding weights the checkpoint lacks.
    strays = tmp_path / "strays"
    strays.mkdir()
    (strays / "consolidated.safetensors").write_bytes(b"x")
    with pytest.raises(AbliterateError, match="weight files that are not this checkpoint's.*consolidated"):
        ablate_checkpoint(src, directions, strays, plan, overwrite=True, **quiet)


def test_output_inside_or_around_the_input_is_refused(small, tmp_path):
    src, directions, _ = small
    before = file_hashes(src)
    for out in (src, src / "ablated", src.parent):
        with pytest.raises(AbliterateError, match="input checkpoint"):
            run(src, directions, out)
    assert file_hashes(src) == before and not (src / "ablated").exists()


def test_dry_run_lists_matches_and_writes_nothing(small, tmp_path, capsys):
    src, directions, _ = small
    out = tmp_path / "never"
    code = main(
        [
            "ablate",
            str(src),
            "--directions",
            str(directions),
            "--out",
            str(out),
            "--dry-run",
            "--layers",
            "1-2",
        ]
    )
    assert code == 0 and not out.exists()
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.experts.15.down_proj.weight\texpert_down\t1" in text
    assert "1\tattn_out=1 expert_down=16 router=1 shared_expert_down=1" in text
    assert "expert_down\t32" in text and "layers.3." not in text


def test_cli_writes_and_reports(small, tmp_path, capsys):
    src, directions, reference = small
    out = tmp_path / "out"
    assert main(["ablate", str(src), "--directions", str(directions), "--out", str(out), "--quiet"]) == 0
    assert "expert_down 128" in capsys.readouterr().out  # (7 MoE layers + the MTP layer) x 16 experts
    assert shard_hashes(out) == shard_hashes(reference)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(
        configured_plan(load_inputs(src, directions), Ablation(layers="3", scale="0.5"), "auto").to_yaml()
    )
    assert (
        main(
            [
                "ablate",
                str(src),
                "--directions",
                str(directions),
                "--out",
                str(tmp_path / "p"),
                "--quiet",
                "--plan",
                str(plan_file),
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "p" / MANIFEST_FILE).read_text())
    assert {(e["layer"], e["scale"]) for e in manifest["edited"]} == {(3, 0.5)}
    assert (
        main(["ablate", str(src), "--directions", str(directions), "--out", str(out), "--layers", "8"]) == 2
    )
    assert "layer 8 is out of range" in capsys.readouterr().err


# ---------------------------------------------------------------- directions files


def test_hand_written_directions(small, tmp_path, capsys):
    src, _, _ = small
    hidden = SMALL.hidden_size
    one = tmp_path / "one.safetensors"
    save_directions(one, torch.randn(hidden), {})
    manifest = run(src, one, tmp_path / "o1")
    assert manifest["directions"]["single"] and {e["direction_position"] for e in manifest["edited"]} == {0}
    assert any("carries no model fingerprint" in w for w in load_inputs(src, one).warnings)
    rows = write_directions(src, tmp_path / "rows.safetensors", means=False, recorded=False)
    with pytest.raises(AbliterateError, match="records no selected position"):
        run(src, rows, tmp_path / "o2")
    manifest = run(src, rows, tmp_path / "o2", direction_position="5")
    assert {e["direction_position"] for e in manifest["edited"]} == {5}
    with pytest.raises(AbliterateError, match="projected method needs the harmless means"):
        run(src, rows, tmp_path / "o3", direction_position="5", ablation_method="projected")
    with pytest.raises(AbliterateError, match="one direction for every layer"):
        run(src, one, tmp_path / "o4", direction_position="own")


@pytest.mark.parametrize(
    "tensor, metadata, fragment",
    [
        (torch.randn(9, 16), {}, "hidden size is 32"),
        (torch.full((9, 32), float("nan")), {}, "NaN or Inf"),
        (torch.zeros(9, 32), {"selected_position": 4}, "zero vector"),
        (torch.randn(9, 32), {"selected_position": 9}, "out of range"),
        (torch.randn(5, 32), {"selected_position": 1}, "holds 5 residual positions"),
        (
            torch.randn(9, 32),
            {"selected_position": 1, "fingerprint": "0" * 32},
            "measured on a checkpoint with fingerprint",
        ),
    ],
)
def test_bad_directions_fail(small, tmp_path, tensor, metadata, fragment):
    src, _, _ = small
    path = save_directions(tmp_path / "bad.safetensors", tensor, metadata)
    with pytest.raises(AbliterateError, match=fragment):
        run(src, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fingerprint_mismatch_is_accepted_with_force(small, tmp_path):
    src, _, _ = small
    path = save_directions(
        tmp_path / "d.safetensors", torch.randn(9, 32), {"selected_position": 1, "fingerprint": "x"}
    )
    inputs = load_inputs(src, path, force=True)
    assert any("--force" in w for w in inputs.warnings)


def test_quantized_checkpoint_is_refused(tmp_path):
    specs = [
        ("model.embed_tokens.weight", (32, 8), torch.bfloat16),
        ("model.layers.0.self_attn.o_proj.weight", (8, 8), torch.float8_e4m3fn),
        ("model.layers.0.self_attn.o_proj.weight_scale_inv", (1, 1), torch.float32),
    ]
    src = write_checkpoint(
        tmp_path / "fp8", specs, {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 8}
    )
    d = save_directions(tmp_path / "d.safetensors", torch.randn(8), {})
    with pytest.raises(AbliterateError, match=r"quantized \(FP8.*o_proj"):
        load_inputs(src, d)


def test_plan_matches_without_structure_equals_with(small):
    src, directions, _ = small
    inputs = load_inputs(src, directions)
    plan = configured_plan(inputs, Ablation(), "auto")
    assert plan_matches(plan, inputs.inventory) == plan_matches(plan, inputs.inventory, inputs.structure)


# ---------------------------------------------------------------- the demo model


def demo_ready() -> bool:
    from abliterate.demo import DEMO_MODEL_DIR

    return (DEMO_MODEL_DIR / "model.safetensors.index.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not demo_ready(), reason="the demo model is not built")
def test_demo_model_stops_refusing(tmp_path):
    """Measure the demo model, ablate it with the default plan (selected direction): the output loads in
    transformers, refuses < 10% of the held-out harmful prompts, and moves harmless replies by KL < 0.05.
    A scale-0 plan changes no byte, so the effect is the edit's."""
    from abliterate.check.evaluate import evaluate_model
    from abliterate.config import Evaluation, Runtime, Template
    from abliterate.demo import DEMO_MODEL_DIR, prompt_file
    from abliterate.measure.prompts import load_prompts

    files = {
        (k, s): str(prompt_file("demo", k, s))
        for k in ("harmful", "harmless")
        for s in ("train", "val", "test")
    }
    argv = [
        "measure",
        str(DEMO_MODEL_DIR),
        "--out",
        str(tmp_path / "measure"),
        "--harmful",
        files["harmful", "train"],
        "--harmless",
        files["harmless", "train"],
        "--harmful-val",
        files["harmful", "val"],
        "--harmless-val",
        files["harmless", "val"],
    ]
    assert main(argv) == 0
    directions = tmp_path / "measure" / "directions.safetensors"
    manifest = run(DEMO_MODEL_DIR, directions, tmp_path / "out")
    assert manifest["plan"]["direction_position"] == "auto"
    result = evaluate_model(
        tmp_path / "out",
        load_prompts(files["harmful", "test"]),
        load_prompts(files["harmless", "test"]),
        Evaluation(),
        Template(),
        Runtime(device="cpu", dtype="float32"),
        False,
        baseline_dir=DEMO_MODEL_DIR,
        progress=False,
    )
    print(result.summary())
    assert result.baseline_refusal_rate_harmful >= 0.9
    assert result.refusal_rate_harmful < 0.10 and result.kl_harmless < 0.05
    run(DEMO_MODEL_DIR, directions, tmp_path / "zero", scale="0")
    for shard in manifest["shards"]:
        assert (DEMO_MODEL_DIR / shard).read_bytes() == (tmp_path / "zero" / shard).read_bytes()
