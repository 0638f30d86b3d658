"""Reliability of the weights stage (catalogue C): damaged, mistyped or unknown checkpoints, indexes
and configs fail in one line and stay as they were; the guard that checks it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from checkpoint_guard import snapshot, unchanged
from fixtures import assert_error, cli

from abliterate.measure.direction_file import save_directions
from abliterate.vocabulary import INDEX_FILE, MANIFEST_FILE
from abliterate.weights.checkpoint import build_inventory, choose_profile
from abliterate.weights.structure import detect_structure
from abliterate.weights.synthetic import write_checkpoint

from .common import POSITIONS, SHARDS, H, ablate_args, entry, rewrite_header, second_tensor, shift, truncate


def _set_dtype(name: str, dtype: str):
    def change(header):
        header[name]["dtype"] = dtype
        return header

    return change


def _edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _duplicate_in_header(shard: Path) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].decode().rstrip()
    first = json.loads(text)
    name = next(k for k in first if k != "__metadata__")
    new = (text[:-1] + f',"{name}":' + json.dumps(first[name]) + "}").encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


O_PROJ = "model.layers.1.self_attn.o_proj.weight"


DAMAGE = {
    "missing shard": (
        lambda m: (m / SHARDS[1]).unlink(),
        [SHARDS[1], "is missing", "download the complete checkpoint"],
    ),
    "truncated shard": (
        lambda m: truncate(m / SHARDS[2], (m / SHARDS[2]).stat().st_size - 100),
        [SHARDS[2], "truncated", "re-download"],
    ),
    "shard cut inside its header": (
        lambda m: truncate(m / SHARDS[0], 100),
        [SHARDS[0], "corrupt or truncated header", "re-download"],
    ),
    "corrupt header JSON": (
        lambda m: (m / SHARDS[0]).write_bytes(
            (m / SHARDS[0]).read_bytes()[:8] + b"!!!!" + (m / SHARDS[0]).read_bytes()[12:]
        ),
        [SHARDS[0], "corrupt header (invalid JSON", "re-download"],
    ),
    "index not JSON": (
        lambda m: (m / INDEX_FILE).write_text("{"),
        [INDEX_FILE, "not valid JSON", "restore it"],
    ),
    "index lists a tensor the shard lacks": (
        lambda m: _edit_json(
            m / INDEX_FILE, lambda i: {**i, "weight_map": {**i["weight_map"], "extra.weight": SHARDS[0]}}
        ),
        ["'extra.weight'", SHARDS[0], "does not hold it", "re-download"],
    ),
    "shard holds a tensor the index lacks": (
        lambda m: _edit_json(
            m / INDEX_FILE,
            lambda i: {**i, "weight_map": {k: v for k, v in i["weight_map"].items() if k != O_PROJ}},
        ),
        [O_PROJ, "does not list it", "index and the shards disagree"],
    ),
    "duplicate tensor name in a header": (
        lambda m: _duplicate_in_header(m / SHARDS[0]),
        [SHARDS[0], "twice", "re-download"],
    ),
    "config hidden_size differs from the weights": (
        lambda m: _edit_json(m / "config.json", lambda c: {**c, "hidden_size": 32}),
        ["hidden size 32", "config.json's hidden_size does not match the weights"],
    ),
    "config expert count differs from the weights": (
        lambda m: _edit_json(m / "config.json", lambda c: {**c, "n_routed_experts": 8}),
        ["layer 1: config.json says 8 routed experts", "experts.4.down_proj"],
    ),
    "config has fewer layers than the weights": (
        lambda m: _edit_json(m / "config.json", lambda c: {**c, "num_hidden_layers": 2}),
        ["tensors of layer 3 exist", "num_hidden_layers=2", "does not describe this checkpoint"],
    ),
    "no config.json": (lambda m: (m / "config.json").unlink(), ["config.json is missing", "copy it"]),
    "unknown architecture": (
        lambda m: _edit_json(
            m / "config.json", lambda c: {**c, "model_type": "mystery", "architectures": ["X"]}
        ),
        [
            "unknown architecture ['X']",
            "closest: glm4_moe",
            "attn_out 4",
            "--family NAME",
            "--map 'REGEX=ROLE'",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_fails_in_one_line_and_stays_as_it_was(base, tmp_path, capsys, case):
    model, _, _ = base
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    damage, fragments = DAMAGE[case]
    damage(damaged)
    # A directions file without fingerprint: the checkpoint's own defect must be the error.
    directions = save_directions(
        tmp_path / "d.safetensors", torch.randn(POSITIONS, H), {"selected_position": 2}
    )
    out = tmp_path / "out"
    with unchanged(damaged):
        assert_error(cli(capsys, "inventory", damaged), "inventory", *fragments)
        assert_error(cli(capsys, *ablate_args(damaged, directions, out)), "ablate", *fragments)
    assert not out.exists()


def test_unsupported_dtype_of_a_target_tensor(base, tmp_path, capsys):
    model, _, _ = base
    odd = tmp_path / "odd"
    shutil.copytree(model, odd)
    shard = odd / build_inventory(model).tensors[O_PROJ].shard
    rewrite_header(shard, _set_dtype(O_PROJ, "I16"))  # same byte size as BF16: only the dtype is wrong
    directions = save_directions(
        tmp_path / "d.safetensors", torch.randn(POSITIONS, H), {"selected_position": 2}
    )
    with unchanged(odd):
        assert_error(
            cli(capsys, *ablate_args(odd, directions, tmp_path / "out")),
            "ablate",
            O_PROJ,
            "stored as I16",
            "only BF16, F16, F32 can be edited",
        )
    assert not (tmp_path / "out").exists()


def test_quantized_checkpoint_is_refused_with_what_to_do(tmp_path, capsys):
    specs = [
        ("model.embed_tokens.weight", (32, 8), torch.bfloat16),
        ("model.layers.0.self_attn.o_proj.weight", (8, 8), torch.float8_e4m3fn),
        ("model.layers.0.self_attn.o_proj.weight_scale_inv", (1, 1), torch.float32),
    ]
    model = write_checkpoint(
        tmp_path / "fp8", specs, {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 8}
    )
    directions = save_directions(tmp_path / "d.safetensors", torch.randn(8), {})
    with unchanged(model):
        assert_error(
            cli(capsys, *ablate_args(model, directions, tmp_path / "out")),
            "ablate",
            "quantized (FP8",
            "o_proj",
            "ablate the unquantized (bf16/fp16/fp32) checkpoint",
        )
    assert not (tmp_path / "out").exists()


def _last_tensor(shard: Path) -> str:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


# Headers that safetensors itself refuses: wrong JSON types, and byte ranges that do not tile the data.
BAD_HEADERS = {
    "offsets as strings": (
        lambda s: rewrite_header(s, entry(O_PROJ, "data_offsets", ["0", "8"])),
        ["`data_offsets`", "not two whole numbers", "re-download"],
    ),
    "shape a number": (
        lambda s: rewrite_header(s, entry(O_PROJ, "shape", 64)),
        ["`shape` 64", "not a list of whole numbers", "re-download"],
    ),
    "dtype a list": (
        lambda s: rewrite_header(s, entry(O_PROJ, "dtype", ["BF16"])),
        ['`dtype` ["BF16"]', "not one of safetensors' dtypes", "re-download"],
    ),
    "unknown dtype": (lambda s: rewrite_header(s, entry(O_PROJ, "dtype", "Q4")), ['`dtype` "Q4"']),
    "negative shape": (
        lambda s: rewrite_header(s, entry(O_PROJ, "shape", [-64, 64])),
        ["`shape` [-64, 64]"],
    ),
    "entry not an object": (
        lambda s: rewrite_header(s, lambda h: {**h, O_PROJ: [1, 2]}),
        ["header entry for", "not an object"],
    ),
    "entry without offsets": (
        lambda s: rewrite_header(s, lambda h: {**h, O_PROJ: {"dtype": "BF16", "shape": [64, 64]}}),
        ["lacks `data_offsets`"],
    ),
    "metadata not an object": (
        lambda s: rewrite_header(s, lambda h: {**h, "__metadata__": ["pt"]}),
        ["`__metadata__` must map names to strings"],
    ),
    "metadata value not a string": (
        lambda s: rewrite_header(s, lambda h: {**h, "__metadata__": {"format": 1}}),
        ["`__metadata__` must map names to strings"],
    ),
    "overlapping offsets": (
        lambda s: rewrite_header(s, shift(second_tensor(s), -2)),
        ["overlaps", "safetensors refuses to load it", "re-download"],
    ),
    "gap between tensors": (
        lambda s: (rewrite_header(s, shift(_last_tensor(s), 2)), s.write_bytes(s.read_bytes() + b"\0\0")),
        ["leaves bytes", "unused", "re-download"],
    ),
    "bytes after the last tensor": (
        lambda s: s.write_bytes(s.read_bytes() + b"\0" * 16),
        ["16 bytes after its last tensor", "safetensors refuses such a file"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_header_of_the_wrong_type_or_coverage_fails_in_one_line(base, tmp_path, capsys, case):
    """C18-C22: a header safetensors would refuse is refused by every command, in one line, before any
    write; in particular overlapping offsets never let the ablation rewrite a tensor the plan never named."""
    model, directions, _ = base
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    shard = damaged / build_inventory(model).tensors[O_PROJ].shard
    damage, fragments = BAD_HEADERS[case]
    damage(shard)
    out = tmp_path / "out"
    with unchanged(damaged):
        assert_error(cli(capsys, "inventory", damaged), "inventory", shard.name, *fragments)
        assert_error(
            cli(capsys, *ablate_args(damaged, directions, out, "--force")), "ablate", shard.name, *fragments
        )
    assert not out.exists()


BAD_INDEXES = {
    "shard name with a folder part": (
        lambda w: {**w, O_PROJ: "../" + w[O_PROJ]},
        ["not a plain file name", "outside its own folder"],
    ),
    "absolute shard name": (lambda w: {**w, O_PROJ: "/tmp/" + w[O_PROJ]}, ["not a plain file name"]),
    "shard name a number": (lambda w: {**w, O_PROJ: 3}, ["the shard 3, not a file name"]),
    "shard not a .safetensors file": (lambda w: {**w, O_PROJ: "config.json"}, ["not a .safetensors file"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_index_of_the_wrong_type_fails_in_one_line(base, tmp_path, capsys, case):
    """C23: weight_map names plain shard files of the folder; a name leading elsewhere could read (and
    make the output write) outside it."""
    model, directions, _ = base
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    change, fragments = BAD_INDEXES[case]
    _edit_json(damaged / INDEX_FILE, lambda i: {**i, "weight_map": change(i["weight_map"])})
    out = tmp_path / "out"
    with unchanged(damaged):
        assert_error(cli(capsys, "inventory", damaged), "inventory", INDEX_FILE, O_PROJ, *fragments)
        assert_error(cli(capsys, *ablate_args(damaged, directions, out, "--force")), "ablate", *fragments)
    _edit_json(damaged / INDEX_FILE, lambda i: {**i, "metadata": "big"})
    assert_error(cli(capsys, "inventory", damaged), "inventory", '`metadata` is "big", not an object')
    assert not out.exists()


BAD_CONFIGS = {
    "hidden_size null": ({"hidden_size": None}, ["config.json lacks `hidden_size`"]),
    "hidden_size a string": ({"hidden_size": "64"}, ['`hidden_size` is "64"', "whole number in [1,"]),
    "layers NaN": ({"num_hidden_layers": float("nan")}, ["`num_hidden_layers` is nan", "whole number"]),
    "layers a boolean": ({"num_hidden_layers": True}, ["`num_hidden_layers` is true"]),
    "layers absurd": (
        {"num_hidden_layers": 10**18},
        ["`num_hidden_layers` is 1000000000000000000", "[1, 100000]"],
    ),
    "experts negative": ({"n_routed_experts": -4}, ["`n_routed_experts` is -4"]),
    "experts a float": ({"n_routed_experts": 4.0}, ["`n_routed_experts` is 4.0"]),
    "tied embeddings a string": (
        {"tie_word_embeddings": "false"},
        ['`tie_word_embeddings` is "false"', "true or false"],
    ),
    "model_type a list": ({"model_type": ["glm4_moe"]}, ['`model_type` is ["glm4_moe"]', "must be a string"]),
    "dense layers null": ({"first_k_dense_replace": None}, ["layer 0 is MoE by config.json"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_of_the_wrong_type_fails_in_one_line(base, tmp_path, capsys, case):
    """C24: config.json values of the wrong type or range name the file, the key and the fix (null where
    the tool needs a number, strings, NaN, booleans, absurd counts) instead of a traceback."""
    model, directions, _ = base
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    change, fragments = BAD_CONFIGS[case]
    _edit_json(damaged / "config.json", lambda c: {**c, **change})
    out = tmp_path / "out"
    with unchanged(damaged):
        assert_error(cli(capsys, "inventory", damaged), "inventory", *fragments)
        assert_error(cli(capsys, *ablate_args(damaged, directions, out, "--force")), "ablate", *fragments)
    assert not out.exists()


SPECIAL_ENTRIES = {
    "dangling symbolic link": (lambda p: p.symlink_to(p.parent / "gone.json"), "a dangling symbolic link"),
    "FIFO": (lambda p: os.mkfifo(p), "a FIFO"),
}


@pytest.mark.parametrize("case", sorted(SPECIAL_ENTRIES))
def test_dangling_link_or_fifo_in_the_input_is_named(base, prompts, tmp_path, capsys, case):
    """C25: a dangling link (an incomplete Hugging Face cache download) or a FIFO among the input's files
    is named as what it is, by ablate (which would copy it) and by measure (whose loader would read
    it), instead of "cannot write the output; free space"; a shard that is one is named too."""
    model, directions, _ = base
    odd = tmp_path / "odd"
    shutil.copytree(model, odd)
    make, what = SPECIAL_ENTRIES[case]
    make(odd / "tokenizer.json")
    _, good, _, _ = prompts
    with unchanged(odd):
        assert_error(
            cli(capsys, *ablate_args(odd, directions, tmp_path / "out")),
            "ablate",
            "tokenizer.json",
            what,
            "not a regular file",
        )
        assert_error(
            cli(
                capsys,
                "measure",
                odd,
                "--harmful",
                good,
                "--harmless",
                good,
                "--out",
                tmp_path / "m",
                "--direction-position",
                "none",
            ),
            "measure",
            "tokenizer.json",
            what,
        )
        (odd / "tokenizer.json").unlink()
        (odd / SHARDS[1]).rename(tmp_path / "moved")
        make(odd / SHARDS[1])
        assert_error(cli(capsys, "inventory", odd), "inventory", SHARDS[1], what)
        (odd / SHARDS[1]).unlink()
        (tmp_path / "moved").rename(odd / SHARDS[1])
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()


def test_unknown_architecture_mapped_explicitly(base, tmp_path, capsys):
    """A model of an unknown type that names its attention output its own way: --family gives the
    layout, --map the odd tensor; without the mapping the structure check names what is missing."""
    model, directions, _ = base
    odd = tmp_path / "odd"
    shutil.copytree(model, odd)
    _edit_json(odd / "config.json", lambda c: {**c, "model_type": "mystery", "architectures": ["MysteryLM"]})
    renamed = {
        f"model.layers.{i}.self_attn.o_proj.weight": f"model.layers.{i}.attn.dense.weight" for i in range(4)
    }
    for shard in SHARDS:
        rewrite_header(odd / shard, lambda h: {renamed.get(k, k): v for k, v in h.items()})
    _edit_json(
        odd / INDEX_FILE,
        lambda i: {**i, "weight_map": {renamed.get(k, k): v for k, v in i["weight_map"].items()}},
    )
    rule = r"model\.layers\.(?P<layer>\d+)\.attn\.dense\.weight=attn_out"
    with unchanged(odd):
        assert_error(
            cli(capsys, "inventory", odd),
            "inventory",
            "closest: glm4_moe",
            "unrecognised e.g.",
            "attn.dense.weight",
            "--map",
        )
        assert_error(
            cli(capsys, "inventory", odd, "--family", "glm4_moe"),
            "inventory",
            "layer 0: expected 1 attention output projection (attn_out), found 0",
        )
        assert_error(cli(capsys, "inventory", odd, "--map", rule), "inventory", "pass --family NAME too")
        assert cli(capsys, "inventory", odd, "--family", "glm4_moe", "--map", rule)[0] == 0
        structure = detect_structure(build_inventory(odd, choose_profile(odd, "glm4_moe", [rule])))
        # the same rules carry into the ablation: the renamed attention outputs are edited
        out = tmp_path / "odd-out"
        args = ablate_args(odd, directions, out, "--family", "glm4_moe", "--map", rule, "--force")
        assert cli(capsys, *args)[0] == 0
    assert structure.roles["attn_out"] == 3 and structure.mtp_roles["attn_out"] == 1
    edited = {e["name"] for e in json.loads((out / MANIFEST_FILE).read_text())["edited"]}
    assert set(renamed.values()) <= edited
    # and validation reads the output with the same rules
    assert cli(capsys, "validate", odd, out, "--family", "glm4_moe", "--map", rule, "--quiet")[0] == 0
    for bad, fragment in [
        ("nothing", "write REGEX=ROLE"),
        ("x=writer", "unknown role 'writer'"),
        ("(=attn_out", "not a valid regular expression"),
        (r"model\.layers\.\d+\.attn\.dense\.weight=attn_out", "(?P<layer>"),
        (r"model\.layers\.(?P<layer>\d+)\.e\.\d+\.w=expert_down", "(?P<expert>"),
    ]:
        assert_error(
            cli(capsys, "inventory", odd, "--family", "glm4_moe", "--map", bad), "inventory", fragment
        )


def test_guard_notices_a_change(tmp_path):
    """The guard itself: a rewritten byte, an added file and a touched mtime all fail it."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"abc")
    before = snapshot(folder)
    for change in (
        lambda: (folder / "a.safetensors").write_bytes(b"abd"),
        lambda: (folder / ".a.tmp").write_bytes(b""),
        lambda: os.utime(folder / "a.safetensors", ns=(1, 1)),
    ):
        with pytest.raises(AssertionError, match="was modified"):
            with unchanged(folder):
                change()
    assert snapshot(folder) != before


SCALE = "model.layers.1.mlp.experts.1.down_proj.weight_scale_inv"  # [4, 2]: weight [64, 32] in blocks of 16


def _quantization(change):
    def edit(config):
        config["quantization_config"] = change(dict(config["quantization_config"]))
        return config

    return edit


def _compressed(groups):
    return lambda qc: {"quant_method": "compressed-tensors", "config_groups": groups}


def _rename_tensor(model: Path, name: str, new: str) -> None:
    shard = model / build_inventory(model).tensors[name].shard
    rewrite_header(shard, lambda h: {(new if k == name else k): v for k, v in h.items()})
    _edit_json(
        model / INDEX_FILE,
        lambda i: {**i, "weight_map": {(new if k == name else k): v for k, v in i["weight_map"].items()}},
    )


FP8_BLOCK = "`quantization_config.weight_block_size`"
FP8_CASES = {
    "block size with a zero": (
        lambda m: _edit_json(m / "config.json", _quantization(lambda q: {**q, "weight_block_size": [0, 16]})),
        ["config.json", FP8_BLOCK, "is [0, 16]", "two whole numbers"],
    ),
    "block size fractional": (
        lambda m: _edit_json(
            m / "config.json", _quantization(lambda q: {**q, "weight_block_size": [16.5, 16]})
        ),
        ["config.json", FP8_BLOCK, "is [16.5, 16]", "two whole numbers"],
    ),
    "block size true": (
        lambda m: _edit_json(m / "config.json", _quantization(lambda q: {**q, "weight_block_size": True})),
        ["config.json", FP8_BLOCK, "is true"],
    ),
    "block size of one number": (
        lambda m: _edit_json(m / "config.json", _quantization(lambda q: {**q, "weight_block_size": [16]})),
        ["config.json", FP8_BLOCK, "is [16]"],
    ),
    "block size of another checkpoint": (
        lambda m: _edit_json(
            m / "config.json", _quantization(lambda q: {**q, "weight_block_size": [32, 32]})
        ),
        ["_scale_inv", "do not match weight", "in blocks [32, 32]", "config.json", "re-download"],
    ),
    "config_groups a list": (
        lambda m: _edit_json(m / "config.json", _quantization(_compressed([{"weights": {}}]))),
        ["config.json", "`quantization_config.config_groups` is [", "must be an object"],
    ),
    "config group weights a string": (
        lambda m: _edit_json(m / "config.json", _quantization(_compressed({"g": {"weights": "float8"}}))),
        ["config.json", '`quantization_config.config_groups.g.weights` is "float8"'],
    ),
    "block_structure a string": (
        lambda m: _edit_json(
            m / "config.json",
            _quantization(
                _compressed(
                    {
                        "g": {
                            "weights": {
                                "type": "float",
                                "num_bits": 8,
                                "strategy": "block",
                                "block_structure": "16x16",
                            }
                        }
                    }
                )
            ),
        ),
        ["config.json", '`quantization_config.config_groups.g.weights.block_structure` is "16x16"'],
    ),
    "quant_method a number": (
        lambda m: _edit_json(m / "config.json", _quantization(lambda q: {**q, "quant_method": 8})),
        ["config.json", "`quantization_config.quant_method` is 8", "must be a string"],
    ),
    # the same 8 values as [4, 2], transposed: they would scale the wrong blocks
    "scale of the right size but the wrong shape": (
        lambda m: rewrite_header(m / build_inventory(m).tensors[SCALE].shard, entry(SCALE, "shape", [2, 4])),
        [SCALE, "of shape [2, 4] do not match weight [64, 32] in blocks [16, 16]", "expected [4, 2]"],
    ),
    "scale flattened": (
        lambda m: rewrite_header(m / build_inventory(m).tensors[SCALE].shard, entry(SCALE, "shape", [8])),
        [SCALE, "of shape [8]", "expected [4, 2]"],
    ),
    "scale of an integer dtype": (
        lambda m: rewrite_header(m / build_inventory(m).tensors[SCALE].shard, _set_dtype(SCALE, "I32")),
        [SCALE, "is stored as I32", "scales must be F32, BF16, F16"],
    ),
    "scale missing": (
        lambda m: _rename_tensor(m, SCALE, SCALE + "_old"),
        [
            "FP8 tensor model.layers.1.mlp.experts.1.down_proj.weight has no scale " + SCALE,
            "quantization_config.quant_method 'fp8'",
            "weight_scale_inv",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(FP8_CASES))
def test_fp8_config_and_scales_are_checked_at_the_boundary(fp8_base, tmp_path, capsys, case):
    """C28-C30: an FP8 checkpoint's `quantization_config` values (block size, config groups, method)
    and its scale tensors (shape against the weight and the block size, not only the element count;
    dtype; presence) are checked where they are read: one line naming the file or tensor, the key and
    what it must be, from `inventory` and `ablate`; nothing written, input unchanged."""
    model, directions, _ = fp8_base
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    damage, fragments = FP8_CASES[case]
    damage(damaged)
    out = tmp_path / "out"
    with unchanged(damaged):
        assert_error(cli(capsys, "inventory", damaged), "inventory", *fragments)
        assert_error(cli(capsys, *ablate_args(damaged, directions, out, "--force")), "ablate", *fragments)
    assert not out.exists()
