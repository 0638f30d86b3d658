"""Weight inventory, role classification and structure detection on real GLM-4.5-Air names."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from abliterate.cli import main
from abliterate.errors import AbliterateError
from abliterate.vocabulary import INDEX_FILE
from abliterate.weights.checkpoint import build_inventory, fingerprint, read_header
from abliterate.weights.structure import detect_structure
from abliterate.weights.synthetic import GlmLayout, write_glm_layout, write_llama_layout

AIR_MAIN = {"attn_out": 46, "mlp_down": 1, "expert_down": 5760, "shared_expert_down": 45, "router": 45}
AIR_MTP = {"attn_out": 1, "expert_down": 128, "shared_expert_down": 1, "router": 1, "mtp": 5, "embed": 1}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a shard's header JSON in place (keeps the data bytes)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = json.dumps(edit(header)).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def drop_tensor(path: Path, name: str) -> None:
    """Remove one tensor from a shard, header entry and bytes, so the file stays a valid safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    begin, end = header.pop(name)["data_offsets"]
    data = raw[8 + n :]
    for key, entry in header.items():
        if key != "__metadata__" and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [o - (end - begin) for o in entry["data_offsets"]]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[:begin] + data[end:])


def test_glm_air_layout_counts(glm_air_layout):
    structure = detect_structure(build_inventory(glm_air_layout))
    assert structure.tensors == 18329
    assert structure.num_layers == 46 and structure.hidden_size == 8
    assert structure.dense_layers == [0] and structure.moe_layers == list(range(1, 46))
    assert structure.mtp_layers == [46]
    assert structure.experts_per_layer == 128 and structure.shared_experts == 1
    assert structure.router_dtype == "F32" and structure.router_bias
    assert not structure.tied_embeddings and not structure.fused_experts
    assert {k: structure.roles[k] for k in AIR_MAIN} == AIR_MAIN
    assert {k: structure.mtp_roles[k] for k in AIR_MTP} == AIR_MTP
    assert structure.roles["embed"] == 1 and structure.roles["lm_head"] == 1
    assert structure.unrecognised == []


def test_every_tensor_has_byte_range_layer_and_expert(glm_air_layout):
    inv = build_inventory(glm_air_layout)
    t = inv.tensors["model.layers.7.mlp.experts.127.down_proj.weight"]
    assert (t.role, t.layer, t.expert, t.residual_axis, t.dtype, t.shape) == (
        "expert_down",
        7,
        127,
        0,
        "BF16",
        (8, 4),
    )
    assert t.end - t.start == 8 * 4 * 2
    router = inv.tensors["model.layers.45.mlp.gate.weight"]
    assert (router.role, router.dtype, router.shape, router.residual_axis) == ("router", "F32", (128, 8), 1)
    # the byte range is exactly where safetensors stores the tensor
    from safetensors import safe_open

    with safe_open(str(glm_air_layout / t.shard), "pt") as f:
        expected = f.get_tensor(t.name).view(torch.uint8).flatten().numpy().tobytes()
    with open(glm_air_layout / t.shard, "rb") as handle:
        handle.seek(t.start)
        assert handle.read(t.nbytes) == expected


def test_layer_matching_is_exact(glm_air_layout):
    inv = build_inventory(glm_air_layout)
    layer1 = [t for t in inv.tensors.values() if t.layer == 1]
    assert layer1 and all(t.name.startswith("model.layers.1.") for t in layer1)
    assert inv.role_counts({1})["expert_down"] == 128
    assert inv.role_counts({1})["attn_out"] == 1


def test_fused_expert_layout_gives_same_counts(glm_air_layout_fused):
    structure = detect_structure(build_inventory(glm_air_layout_fused))
    assert structure.fused_experts
    assert {k: structure.roles[k] for k in AIR_MAIN} == AIR_MAIN
    assert structure.mtp_roles["expert_down"] == 128
    inv = build_inventory(glm_air_layout_fused)
    down = inv.tensors["model.layers.3.mlp.experts.down_proj"]
    assert (down.role, down.fused_experts, down.residual_axis, down.shape) == (
        "expert_down",
        True,
        1,
        (128, 8, 4),
    )
    gate_up = inv.tensors["model.layers.3.mlp.experts.gate_up_proj"]
    assert (gate_up.role, gate_up.residual_axis, gate_up.shape) == ("expert_in", 2, (128, 8, 8))


def test_single_file_checkpoint(tmp_path):
    model = write_glm_layout(
        tmp_path / "single", GlmLayout(num_layers=3, n_routed_experts=4), single_file=True
    )
    assert not (model / INDEX_FILE).exists()
    structure = detect_structure(build_inventory(model))
    assert structure.shards == 1
    assert structure.roles["expert_down"] == 8 and structure.roles["router"] == 2


def test_dense_llama_checkpoint(tmp_path):
    structure = detect_structure(build_inventory(write_llama_layout(tmp_path / "llama", num_layers=4)))
    assert structure.family == "llama"
    assert structure.moe_layers == [] and structure.dense_layers == [0, 1, 2, 3]
    assert structure.roles["attn_out"] == 4 and structure.roles["mlp_down"] == 4
    assert "router" not in structure.roles and structure.mtp_layers == []


def test_matches_a_checkpoint_transformers_saved(tmp_path):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    config = Glm4MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        attention_bias=True,
        first_k_dense_replace=1,
    )
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config)
    for fused in (False, True):
        out = tmp_path / f"saved-{fused}"
        model.save_pretrained(out, save_original_format=not fused, max_shard_size="20KB")
        inv = build_inventory(out)
        structure = detect_structure(inv)
        assert len(inv.shards) > 1
        assert structure.roles["expert_down"] == 8 and structure.roles["router"] == 2
        assert structure.roles["shared_expert_down"] == 2 and structure.roles["mlp_down"] == 1
        assert structure.fused_experts == fused
        assert inv.unclassified() == []
        with open(out / INDEX_FILE) as handle:
            assert set(json.load(handle)["weight_map"]) == set(inv.tensors)
    # Our per-expert names are exactly transformers' own (original-format) names.
    saved = build_inventory(tmp_path / "saved-False")
    ours = write_glm_layout(
        tmp_path / "ours",
        GlmLayout(
            num_layers=3,
            n_routed_experts=4,
            num_nextn_predict_layers=0,
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=8,
            head_dim=8,
            vocab_size=64,
        ),
    )
    mine = build_inventory(ours)
    assert set(mine.tensors) == set(saved.tensors)
    for name, t in mine.tensors.items():
        assert saved.tensors[name].shape == t.shape, name


def test_fingerprint_changes_with_a_shard(tmp_path, glm_air_layout):
    model = copy_model(glm_air_layout, tmp_path / "m")
    before = fingerprint(model)
    assert before == build_inventory(model).fingerprint == fingerprint(glm_air_layout)
    rewrite_header(model / "model-00003-of-00008.safetensors", lambda h: h)  # re-serialised header
    assert fingerprint(model) != before


# --- bad input: every case fails with AbliterateError naming what and where --------------------


def small(tmp_path) -> Path:
    return write_glm_layout(tmp_path / "m", GlmLayout(num_layers=3, n_routed_experts=4), num_shards=3)


def test_missing_shard(tmp_path):
    model = small(tmp_path)
    (model / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(AbliterateError, match="shard model-00002-of-00003.safetensors .* is missing"):
        build_inventory(model)


def test_index_names_tensor_not_in_shard(tmp_path):
    model = small(tmp_path)
    index = json.loads((model / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.1.mlp.experts.9.down_proj.weight"] = "model-00001-of-00003.safetensors"
    (model / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(AbliterateError, match=r"experts\.9\.down_proj.* does not hold it"):
        build_inventory(model)


def test_shard_holds_tensor_not_in_index(tmp_path):
    model = small(tmp_path)
    index = json.loads((model / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.2.self_attn.o_proj.weight"]
    (model / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(AbliterateError, match=r"layers\.2\.self_attn\.o_proj\.weight.* does not list it"):
        build_inventory(model)


def test_corrupt_header_json(tmp_path):
    model = small(tmp_path)
    shard = model / "model-00001-of-00003.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"!!!!"
    shard.write_bytes(bytes(raw))
    with pytest.raises(AbliterateError, match="model-00001-of-00003.safetensors has a corrupt header"):
        build_inventory(model)


def test_truncated_shard(tmp_path):
    model = small(tmp_path)
    shard = model / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(AbliterateError, match="truncated"):
        build_inventory(model)
    shard.write_bytes(b"\x01\x02")
    with pytest.raises(AbliterateError, match="truncated"):
        build_inventory(model)


def test_duplicate_tensor_across_shards(tmp_path):
    model = small(tmp_path)
    save_file({"model.layers.2.self_attn.o_proj.weight": torch.zeros(8, 8)}, str(model / "extra.safetensors"))
    index = json.loads((model / INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "extra.safetensors"  # make extra.safetensors a listed shard
    (model / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(AbliterateError, match="stored twice"):
        build_inventory(model)


def test_duplicate_names_in_one_header(tmp_path):
    model = small(tmp_path)
    shard = model / "model-00001-of-00003.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].decode()
    first = json.loads(text)
    name = next(k for k in first if k != "__metadata__")
    dup = text.rstrip()[:-1] + f',"{name}":' + json.dumps(first[name]) + "}"
    new = dup.encode() + b" " * (-len(dup) % 8)
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    with pytest.raises(AbliterateError, match="twice"):
        read_header(shard)


def test_config_expert_count_mismatch_names_layer_and_tensor(tmp_path):
    model = small(tmp_path)
    inv_before = build_inventory(model)
    victim = "model.layers.2.mlp.experts.3.down_proj.weight"
    shard = model / inv_before.tensors[victim].shard

    drop_tensor(shard, victim)
    index = json.loads((model / INDEX_FILE).read_text())
    del index["weight_map"][victim]
    (model / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(
        AbliterateError, match=r"layer 2: config.json says 4 routed experts.*experts\.3\.down_proj"
    ):
        detect_structure(build_inventory(model))


def test_config_mismatches(tmp_path):
    model = small(tmp_path)
    config = json.loads((model / "config.json").read_text())
    for key, value, message in [
        ("hidden_size", 16, "hidden size 16"),
        ("first_k_dense_replace", 2, "layer 1 is dense by config.json"),
        ("num_hidden_layers", 2, "num_hidden_layers=2"),
        ("tie_word_embeddings", True, "tie_word_embeddings=True"),
    ]:
        (model / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(AbliterateError, match=message):
            detect_structure(build_inventory(model))
    (model / "config.json").unlink()
    with pytest.raises(AbliterateError, match="config.json is missing"):
        detect_structure(build_inventory(model))


def test_unknown_architecture_lists_families_and_recognised_roles(tmp_path):
    model = small(tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(
        json.dumps({**config, "model_type": "mystery", "architectures": ["X"]})
    )
    with pytest.raises(AbliterateError, match="unknown architecture.*glm4_moe.*--family"):
        detect_structure(build_inventory(model))


def test_quantized_checkpoint_is_reported(tmp_path):
    model = tmp_path / "fp8"
    model.mkdir()
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(4, 8),
            "model.layers.0.self_attn.o_proj.weight": torch.zeros(8, 8).to(torch.float8_e4m3fn),
            "model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1, 1),
        },
        str(model / "model.safetensors"),
    )
    inv = build_inventory(model)
    assert inv.quantization["model.layers.0.self_attn.o_proj.weight"] == "FP8"
    assert inv.quantization["model.layers.0.self_attn.o_proj.weight_scale_inv"] == "FP8 (block scales)"


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_json(glm_air_layout, capsys):
    assert main(["inventory", str(glm_air_layout), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in (
        "architecture",
        "family",
        "num_layers",
        "hidden_size",
        "dense_layers",
        "moe_layers",
        "mtp_layers",
        "experts_per_layer",
        "tensors",
        "bytes",
        "shards",
        "roles",
        "mtp_roles",
    ):
        assert key in report
    assert report["architecture"] == "Glm4MoeForCausalLM" and report["family"] == "glm4_moe"
    assert report["shards"] == 8 and report["tensors"] == 18329 and report["mtp_layers"] == [46]
    assert {k: report["roles"][k] for k in AIR_MAIN} == AIR_MAIN


def test_cli_table_and_error_exit(glm_air_layout, tmp_path, capsys):
    assert main(["inventory", str(glm_air_layout)]) == 0
    out = capsys.readouterr().out
    assert "expert_down" in out and "5,760" in out and "MoE 1-45" in out
    assert main(["inventory", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_qwen3_moe_checkpoint_transformers_saved(tmp_path):
    """qwen3_moe: routed experts without a shared expert, MoE layers from decoder_sparse_step/mlp_only_layers."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        decoder_sparse_step=1,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "qwen3moe", max_shard_size="20KB")
    inv = build_inventory(tmp_path / "qwen3moe")
    structure = detect_structure(inv)
    assert structure.family == "qwen3_moe" and inv.unclassified() == []
    assert structure.dense_layers == [0] and structure.moe_layers == [1, 2, 3]
    assert structure.roles["expert_down"] == 12 and structure.roles["router"] == 3
    assert structure.roles["mlp_down"] == 1 and structure.shared_experts == 0
    assert structure.roles["norm"] == 4 * 4 + 1  # input/post-attention norms, q_norm/k_norm, final norm
