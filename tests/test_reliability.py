"""Reliability catalogue (docs/RELIABILITY.md): every bad input and fault through the surfaces a
user touches. The CLI exits 2 with one line that says what is wrong, where and what to do; a
Prefect flow run ends Failed with that message; the input checkpoint is byte-identical before
and after (tests/checkpoint_guard.py); an output is either complete or recognisably unfinished.

Function-level cases live next to their code (test_inventory, test_ablate, test_plan, ...);
this file drives the same cases through `abliterate ...` and checks what the user is left with.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from checkpoint_guard import snapshot, unchanged
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import abliterate.edit.engine as engine
from abliterate.cli import main
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.edit.output import STATE_DIR
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import save_directions
from abliterate.vocabulary import INDEX_FILE, MANIFEST_FILE
from abliterate.weights.checkpoint import build_inventory, choose_profile
from abliterate.weights.structure import detect_structure
from abliterate.weights.synthetic import GlmLayout, write_checkpoint, write_glm_layout

# Shards of ~90 KB: big enough that a small filesystem fills up in the middle of one.
LAYOUT = GlmLayout(
    num_layers=3, n_routed_experts=4, hidden_size=64, intermediate_size=64, moe_intermediate_size=32
)
H, POSITIONS = LAYOUT.hidden_size, LAYOUT.num_layers + 1
SHARDS = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
CLI = "import sys; from abliterate.cli import main; sys.exit(main(sys.argv[1:]))"


def cli(capsys, *args: str | Path) -> tuple[int | str, list[str]]:
    """Exit code and stderr lines of `abliterate ARGS`; an exception escaping main is a crash."""
    try:
        code: int | str = main([str(a) for a in args])
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line and exit 2, never a traceback
        code = f"crash: {type(exc).__name__}: {exc}"
    return code, capsys.readouterr().err.strip().splitlines()


def assert_error(result: tuple[int | str, list[str]], command: str, *fragments: str) -> str:
    """Exit 2 and one line `abliterate COMMAND: error: ...` holding every fragment (what, where, what to do)."""
    code, err = result
    assert code == 2, f"expected exit 2, got {code}"
    lines = [line for line in err if line.startswith(f"abliterate {command}: error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {s: (folder / s).read_bytes() for s in SHARDS}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small GLM-4.5-layout checkpoint, its directions file and a reference output (via the CLI)."""
    root = tmp_path_factory.mktemp("reliability")
    model = write_glm_layout(root / "model", LAYOUT, num_shards=3)
    gen = torch.Generator().manual_seed(7)
    directions = save_directions(
        root / "directions.safetensors",
        torch.randn(POSITIONS, H, generator=gen),
        {"fingerprint": build_inventory(model).fingerprint, "selected_position": 2},
    )
    reference = root / "reference"
    args = ["ablate", str(model), "--directions", str(directions), "--out", str(reference), "--quiet"]
    assert main(args) == 0
    return model, directions, reference


def ablate_args(model: Path, directions: Path, out: Path, *extra: str) -> list[str]:
    return ["ablate", str(model), "--directions", str(directions), "--out", str(out), "--quiet", *extra]


# ---------------------------------------------------------------- checkpoint


def _rewrite_header(shard: Path, change) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = change(json.loads(raw[8 : 8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _set_dtype(name: str, dtype: str):
    def change(header):
        header[name]["dtype"] = dtype
        return header

    return change


def _edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


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
        lambda m: _truncate(m / SHARDS[2], (m / SHARDS[2]).stat().st_size - 100),
        [SHARDS[2], "truncated", "re-download"],
    ),
    "shard cut inside its header": (
        lambda m: _truncate(m / SHARDS[0], 100),
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
    _rewrite_header(shard, _set_dtype(O_PROJ, "I16"))  # same byte size as BF16: only the dtype is wrong
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


def _entry(name: str, key: str, value):
    def change(header):
        header[name][key] = value
        return header

    return change


def _shift(name: str, delta: int):
    """Move one tensor's data offsets by `delta` bytes (its size unchanged)."""

    def change(header):
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + delta, end + delta]
        return header

    return change


def _first_tensor(shard: Path) -> str:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _last_tensor(shard: Path) -> str:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def _second_tensor(shard: Path) -> str:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]


# Headers that safetensors itself refuses: wrong JSON types, and byte ranges that do not tile the data.
BAD_HEADERS = {
    "offsets as strings": (
        lambda s: _rewrite_header(s, _entry(O_PROJ, "data_offsets", ["0", "8"])),
        ["`data_offsets`", "not two whole numbers", "re-download"],
    ),
    "shape a number": (
        lambda s: _rewrite_header(s, _entry(O_PROJ, "shape", 64)),
        ["`shape` 64", "not a list of whole numbers", "re-download"],
    ),
    "dtype a list": (
        lambda s: _rewrite_header(s, _entry(O_PROJ, "dtype", ["BF16"])),
        ['`dtype` ["BF16"]', "not one of safetensors' dtypes", "re-download"],
    ),
    "unknown dtype": (lambda s: _rewrite_header(s, _entry(O_PROJ, "dtype", "Q4")), ['`dtype` "Q4"']),
    "negative shape": (
        lambda s: _rewrite_header(s, _entry(O_PROJ, "shape", [-64, 64])),
        ["`shape` [-64, 64]"],
    ),
    "entry not an object": (
        lambda s: _rewrite_header(s, lambda h: {**h, O_PROJ: [1, 2]}),
        ["header entry for", "not an object"],
    ),
    "entry without offsets": (
        lambda s: _rewrite_header(s, lambda h: {**h, O_PROJ: {"dtype": "BF16", "shape": [64, 64]}}),
        ["lacks `data_offsets`"],
    ),
    "metadata not an object": (
        lambda s: _rewrite_header(s, lambda h: {**h, "__metadata__": ["pt"]}),
        ["`__metadata__` must map names to strings"],
    ),
    "metadata value not a string": (
        lambda s: _rewrite_header(s, lambda h: {**h, "__metadata__": {"format": 1}}),
        ["`__metadata__` must map names to strings"],
    ),
    "overlapping offsets": (
        lambda s: _rewrite_header(s, _shift(_second_tensor(s), -2)),
        ["overlaps", "safetensors refuses to load it", "re-download"],
    ),
    "gap between tensors": (
        lambda s: (_rewrite_header(s, _shift(_last_tensor(s), 2)), s.write_bytes(s.read_bytes() + b"\0\0")),
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
        _rewrite_header(odd / shard, lambda h: {renamed.get(k, k): v for k, v in h.items()})
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


# ---------------------------------------------------------------- directions


def _directions(tmp_path: Path, tensor: torch.Tensor, **metadata) -> Path:
    return save_directions(tmp_path / "bad.safetensors", tensor, metadata)


def _fingerprint(model: Path) -> str:
    return build_inventory(model).fingerprint


BAD_DIRECTIONS = {
    "wrong hidden size": (lambda m: torch.randn(POSITIONS, 16), {}, ["hidden size is 64"]),
    "NaN": (lambda m: torch.full((POSITIONS, H), float("nan")), {"selected_position": 2}, ["NaN or Inf"]),
    "Inf": (lambda m: torch.full((POSITIONS, H), float("inf")), {"selected_position": 2}, ["NaN or Inf"]),
    "zero vector": (lambda m: torch.zeros(POSITIONS, H), {"selected_position": 2}, ["zero vector"]),
    "selected position out of range": (
        lambda m: torch.randn(POSITIONS, H),
        {"selected_position": 9},
        ["out of range"],
    ),
    "direction of another shape": (
        lambda m: torch.randn(POSITIONS, H, 2),
        {},
        ["expected [positions, hidden] or [hidden]"],
    ),
    "positions of another depth": (
        lambda m: torch.randn(9, H),
        {"selected_position": 1},
        ["holds 9 residual positions", "measured on another model"],
    ),
    "measured on another model": (
        lambda m: torch.randn(POSITIONS, H),
        {"selected_position": 2, "fingerprint": "f" * 32},
        ["fingerprint " + "f" * 32, "measure this model, or pass --force"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DIRECTIONS))
def test_bad_directions_file_fails_and_writes_nothing(base, tmp_path, capsys, case):
    model, _, _ = base
    make, metadata, fragments = BAD_DIRECTIONS[case]
    path = _directions(tmp_path, make(model), **metadata)
    with unchanged(model):
        assert_error(cli(capsys, *ablate_args(model, path, tmp_path / "out")), "ablate", *fragments)
    assert not (tmp_path / "out").exists()


def test_unreadable_directions_file(base, tmp_path, capsys):
    model, directions, _ = base
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(directions.read_bytes()[:50])
    for path, fragments in [
        (tmp_path / "absent.safetensors", ["does not exist", "run `abliterate measure` first"]),
        (cut, [str(cut), "is not a readable safetensors file"]),
    ]:
        with unchanged(model):
            assert_error(cli(capsys, *ablate_args(model, path, tmp_path / "out")), "ablate", *fragments)
    assert not (tmp_path / "out").exists()


def test_directions_metadata_of_the_wrong_type(base, tmp_path, capsys):
    model, _, _ = base
    path = _directions(tmp_path, torch.randn(POSITIONS, H), selected_position="x")
    assert_error(cli(capsys, *ablate_args(model, path, tmp_path / "out")), "ablate", "selected_position")


def test_direction_position_out_of_range(base, tmp_path, capsys):
    model, directions, _ = base
    with unchanged(model):
        assert_error(
            cli(capsys, *ablate_args(model, directions, tmp_path / "out", "--direction-layer", "9")),
            "ablate",
            "direction position 9 is out of range",
            "positions 0..3",
        )
    assert not (tmp_path / "out").exists()


def test_foreign_directions_pass_with_force_and_a_warning(base, tmp_path, capsys):
    model, directions, reference = base
    foreign = save_directions(tmp_path / "foreign.safetensors", *_load_same(directions, fingerprint="f" * 32))
    with unchanged(model):
        code, err = cli(capsys, *ablate_args(model, foreign, tmp_path / "out", "--force"))
    assert code == 0 and any("warning:" in line and "(--force)" in line for line in err)
    assert shard_bytes(tmp_path / "out") == shard_bytes(reference)  # same numbers, same output


def _load_same(path: Path, **changes) -> tuple[torch.Tensor, dict]:
    from abliterate.measure.direction_file import load_directions

    d = load_directions(path)
    return d.direction, {"selected_position": d.selected_position, **changes}


def _with_means(
    tmp_path: Path,
    direction: torch.Tensor,
    harmless: torch.Tensor,
    harmful: torch.Tensor | None = None,
    **metadata,
) -> Path:
    harmful = torch.randn(POSITIONS, H) if harmful is None else harmful
    return save_directions(
        tmp_path / "means.safetensors",
        direction,
        {"selected_position": 2, **metadata},
        harmful_mean=harmful,
        harmless_mean=harmless,
    )


def test_non_finite_means_are_refused_never_a_silent_fallback(base, tmp_path, capsys):
    """D15: a NaN in `harmless_mean` once made --projected fall back to the plain edit for that layer
    while the manifest said `projected`; every tensor of the file is now checked finite."""
    model, _, _ = base
    harmless = torch.randn(POSITIONS, H)
    harmless[1, 3] = float("nan")
    path = _with_means(tmp_path, torch.randn(POSITIONS, H), harmless)
    with unchanged(model):
        for method in ("projected", "plain"):
            assert_error(
                cli(capsys, *ablate_args(model, path, tmp_path / "out", "--method", method, "--force")),
                "ablate",
                "`harmless_mean`",
                "NaN or Inf at positions [1]",
                "re-measure",
            )
        harmful = torch.randn(POSITIONS, H)
        harmful[0, 0] = float("inf")
        path = _with_means(tmp_path, torch.randn(POSITIONS, H), torch.randn(POSITIONS, H), harmful)
        assert_error(
            cli(capsys, *ablate_args(model, path, tmp_path / "out", "--force")),
            "ablate",
            "`harmful_mean`",
            "positions [0]",
        )
        save_directions(tmp_path / "int.safetensors", torch.randn(POSITIONS, H), {"selected_position": 2})
        from safetensors.torch import save_file

        save_file(
            {
                "direction": torch.randn(POSITIONS, H),
                "harmless_mean": torch.ones(POSITIONS, H, dtype=torch.int32),
            },
            str(tmp_path / "int.safetensors"),
            metadata={"selected_position": "2"},
        )
        assert_error(
            cli(capsys, *ablate_args(model, tmp_path / "int.safetensors", tmp_path / "out", "--force")),
            "ablate",
            "`harmless_mean`",
            "must be floating point",
        )
    assert not (tmp_path / "out").exists()


def test_direction_whose_float32_norm_overflows_still_edits(base, tmp_path, capsys):
    """D16: entries of 1e30 square to inf in float32, so the float32 norm was inf and the unit vector
    zero: the output was the input, reported as a success. Normalised in float64, the run edits."""
    model, _, reference = base
    from abliterate.measure.direction_file import load_directions

    huge = save_directions(
        tmp_path / "huge.safetensors",
        torch.randn(POSITIONS, H, generator=torch.Generator().manual_seed(7)) * 1e30,
        {"selected_position": 2},
    )
    assert torch.isinf(load_directions(huge).direction[2].norm())  # the float32 norm does overflow
    out = tmp_path / "out"
    with unchanged(model):
        assert cli(capsys, *ablate_args(model, huge, out, "--force"))[0] == 0
        assert all((out / s).read_bytes() != (model / s).read_bytes() for s in SHARDS)
        assert cli(capsys, "validate", model, out, "--quiet")[0] == 0
    # the same direction as the reference's up to the float32 rounding of the scaled entries
    assert sum((out / s).read_bytes() != (reference / s).read_bytes() for s in SHARDS) <= len(SHARDS)


# ---------------------------------------------------------------- plan

BAD_PLANS = {
    "layer out of range": (["--layers", "3"], ["layer 3 is out of range", "decoder layers 0..2"]),
    "layer range backwards": (["--layers", "2-1"], ["runs backwards", "write it as 1-2"]),
    "unreadable layer spec": (["--layers", "1..2"], ["cannot read '1..2'", "`5,7,9-12`"]),
    "unknown role": (
        ["--targets", "attn_out,writer"],
        ["unknown or unsupported target role 'writer'", "choose from"],
    ),
    "role that is not a target": (["--targets", "norm"], ["target role 'norm'"]),
    "empty target set": (["--targets", ""], ["--targets", "is empty", "choose from"]),
    "negative scale": (["--scale", "-1"], ["scale -1.0 for layer 0", "outside [0, 2.0]"]),
    "absurd scale": (["--scale", "1e9"], ["outside [0, 2.0]", "would damage the model"]),
    "NaN scale": (["--scale", "nan"], ["'nan' is not finite"]),
    "one scale per layer, wrong count": (
        ["--scale", "1,1"],
        ["lists 2 values but the plan targets 3 layers"],
    ),
    "bad kernel": (["--scale", "gauss:center=1"], ["lacks width"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_plan_fails_and_writes_nothing(base, tmp_path, capsys, case):
    model, directions, _ = base
    options, fragments = BAD_PLANS[case]
    with unchanged(model):
        assert_error(
            cli(capsys, *ablate_args(model, directions, tmp_path / "out", *options)), "ablate", *fragments
        )
    assert not (tmp_path / "out").exists()


def test_bad_plan_file(base, tmp_path, capsys):
    model, directions, _ = base
    plan = tmp_path / "plan.yaml"
    for text, fragment in [("layers: [: 1", "not valid YAML"), ("- 1", "must be a mapping")]:
        plan.write_text(text)
        with unchanged(model):
            assert_error(
                cli(capsys, *ablate_args(model, directions, tmp_path / "out", "--plan", plan)),
                "ablate",
                fragment,
            )
    assert_error(
        cli(capsys, *ablate_args(model, directions, tmp_path / "out", "--plan", tmp_path / "absent.yaml")),
        "ablate",
        "cannot read plan file",
    )
    assert not (tmp_path / "out").exists()


PLAN_TYPES = {
    "biases a string": (
        {"biases": "false"},
        ["`biases` is 'false' (a string)", "true or false", "biases: false"],
    ),
    "targets a string": (
        {"targets": "attn_out"},
        ["`targets` is 'attn_out' (a string)", "a list of weight roles"],
    ),
    "layers a string": ({"layers": "0-2"}, ["`layers` is '0-2' (a string)", "a list of layer numbers"]),
    "scale a number": ({"scale": 1.0}, ["`scale` is 1.0 (a number)", "a mapping of layer number to scale"]),
    "num_layers a boolean": ({"num_layers": True}, ["`num_layers` is True (a boolean)"]),
    "direction position a string of digits": (
        {"direction_position": "2"},
        ["`direction_position` is '2' (a string)"],
    ),
    "method a list": ({"method": ["plain"]}, ["`method` is ['plain'] (a list)"]),
    "embed_scale a string": ({"embed_scale": "1"}, ["`embed_scale` is '1' (a string)"]),
    "format a string": ({"format": "1"}, ["`format` is '1' (a string)"]),
    "scale of a boolean": ({"scale": {"0": True, "1": 1.0, "2": 1.0, "3": 1.0}}, ["`scale`"]),
    "selected position a string": ({"selected_position": "2"}, ["`selected_position` is '2' (a string)"]),
}


def _plan_file(model: Path, directions: Path, path: Path, **changes) -> Path:
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import default_plan

    data = {**default_plan(load_inputs(model, directions)).to_dict(), **changes}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("case", sorted(PLAN_TYPES))
def test_plan_file_of_the_wrong_type_fails_in_one_line(base, tmp_path, capsys, case):
    """P14: a string where a list or a boolean belongs is an error naming the file and the key, never
    misread (`biases: "false"` turned biases on; `targets: attn_out` split into letters)."""
    model, directions, _ = base
    change, fragments = PLAN_TYPES[case]
    plan = _plan_file(model, directions, tmp_path / "plan.yaml", **change)
    with unchanged(model):
        assert_error(
            cli(capsys, *ablate_args(model, directions, tmp_path / "out", "--plan", plan)),
            "ablate",
            f"plan file {plan}",
            *fragments,
        )
    assert not (tmp_path / "out").exists()


def test_plan_file_not_utf8_and_kernels_that_overflow(base, tmp_path, capsys):
    """P15, P16: a plan file in another encoding is one line with its byte offset; a Gaussian kernel
    whose width is tiny or whose peak is huge is computed without overflow and checked like any scale."""
    model, directions, _ = base
    plan = tmp_path / "plan.yaml"
    plan.write_bytes(b"# r\xe9glages\nlayers: [1]\n")
    with unchanged(model):
        assert_error(
            cli(capsys, *ablate_args(model, directions, tmp_path / "out", "--plan", plan)),
            "ablate",
            f"plan file {plan} is not valid UTF-8 at byte offset 3 (line 1)",
            "re-save it as UTF-8",
        )
        assert_error(
            cli(
                capsys,
                *ablate_args(
                    model,
                    directions,
                    tmp_path / "out",
                    "--scale",
                    "gauss:center=1,width=1,peak=1e308,floor=-1e308",
                ),
            ),
            "ablate",
            "outside [0, 2.0]",
        )
        out = tmp_path / "narrow"
        assert (
            cli(capsys, *ablate_args(model, directions, out, "--scale", "gauss:center=1,width=1e-300"))[0]
            == 0
        )
    scales = {e["layer"]: e["scale"] for e in json.loads((out / MANIFEST_FILE).read_text())["edited"]}
    assert scales == {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.0}  # only the centre layer is edited (3 is the MTP layer)
    assert not (tmp_path / "out").exists()


def test_plan_that_changes_nothing_is_an_error(base, tmp_path, capsys):
    """P17: a plan asking for a change (scales above 0) whose every edit rounds away reported success
    with an output equal to the input; it is an error now. Scales of exactly 0 still copy the input,
    as asked, and re-ablating an ablated output is allowed (the direction is gone already)."""
    model, directions, reference = base
    with unchanged(model):
        assert_error(
            cli(capsys, *ablate_args(model, directions, tmp_path / "tiny", "--scale", "1e-30")),
            "ablate",
            "every byte of them stayed as it was",
            "--scale",
        )
        assert not (tmp_path / "tiny" / MANIFEST_FILE).exists()
        assert cli(capsys, *ablate_args(model, directions, tmp_path / "zero", "--scale", "0"))[0] == 0
        assert shard_bytes(tmp_path / "zero") == shard_bytes(model)
        assert (
            cli(
                capsys, *ablate_args(reference, directions, tmp_path / "again", "--force", "--scale", "1e-30")
            )[0]
            == 0
        )


def test_plan_matching_no_tensor_is_an_error(base, tmp_path, capsys):
    model, directions, _ = base
    # layers 1-2 are MoE: they have no dense mlp_down, so this plan edits nothing at all
    args = ablate_args(
        model, directions, tmp_path / "out", "--targets", "mlp_down", "--layers", "1-2", "--mtp", "skip"
    )
    with unchanged(model):
        assert_error(cli(capsys, *args), "ablate", "matches no tensor")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- output directory


def test_output_same_as_inside_or_around_the_input(base, tmp_path, capsys):
    model, directions, _ = base
    for out, fragment in [
        (model, "inside the input checkpoint"),
        (model / "ablated", "inside the input checkpoint"),
        (model.parent, "contains the input checkpoint"),
    ]:
        with unchanged(model):
            assert_error(cli(capsys, *ablate_args(model, directions, out)), "ablate", str(out), fragment)
    assert not (model / "ablated").exists()


def test_output_not_empty_or_a_file(base, tmp_path, capsys):
    model, directions, _ = base
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    with unchanged(model, busy):
        assert_error(
            cli(capsys, *ablate_args(model, directions, busy)),
            "ablate",
            "is not empty",
            "notes.txt",
            "--overwrite",
            "choose an empty directory",
        )
        assert_error(
            cli(capsys, *ablate_args(model, directions, tmp_path / "file")),
            "ablate",
            "exists and is not a directory",
        )
    assert (tmp_path / "file").read_text() == "mine"


def _tree(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `folder` (the small outputs of these tests)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_deletes_only_what_an_earlier_run_wrote(base, tmp_path, capsys):
    """O11: --overwrite into an earlier output keeps the files the user added there (notes, an
    evaluation folder) and the --directions file lying inside it; it deletes only files an earlier
    abliterate run recorded as its own (here: shards of another checkpoint that this run does not write)."""
    model, directions, reference = base
    out = tmp_path / "out"
    other = write_glm_layout(tmp_path / "other", LAYOUT, num_shards=2)  # other shard names
    other_dirs = save_directions(
        tmp_path / "o.safetensors", torch.randn(POSITIONS, H), {"selected_position": 2}
    )
    assert cli(capsys, *ablate_args(other, other_dirs, out))[0] == 0
    old_shards = sorted(p.name for p in out.glob("*.safetensors"))
    (out / "notes.txt").write_text("mine")
    (out / "evaluation").mkdir()
    (out / "evaluation" / "replies.json").write_text("[]")
    inside = out / "directions.safetensors"
    shutil.copyfile(directions, inside)
    mine = {k: v for k, v in _tree(out).items() if k.startswith(("notes", "evaluation", "directions"))}
    with unchanged(model):
        assert_error(cli(capsys, *ablate_args(model, inside, out)), "ablate", "is not empty", "--overwrite")
        code, err = cli(capsys, *ablate_args(model, inside, out, "--overwrite"))
    assert code == 0, err
    assert any("--overwrite keeps" in line and "notes.txt" in line for line in err)
    after = _tree(out)
    assert {k: after.get(k) for k in mine} == mine  # the user's files and the input, byte for byte
    assert not set(old_shards) - set(SHARDS) & set(after)  # the earlier run's own shards are gone
    assert shard_bytes(out) == shard_bytes(reference)
    assert sorted(json.loads((out / MANIFEST_FILE).read_text())["files"]) == sorted(
        [*SHARDS, *(p.name for p in model.iterdir() if p.name not in SHARDS), MANIFEST_FILE]
    )
    code, lines = cli(capsys, "validate", model, out, "--quiet")
    assert code == 0


def test_directions_file_where_the_output_writes_is_refused(base, tmp_path, capsys):
    """O12: an input lying where the ablation writes (the directions file saved as OUT/config.json)
    is refused before anything is written, never overwritten."""
    model, directions, _ = base
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(directions, out / "config.json")
    with unchanged(model, out):
        assert_error(
            cli(capsys, *ablate_args(model, out / "config.json", out, "--overwrite", "--force")),
            "ablate",
            "the directions file",
            "config.json, which the ablation writes",
            "move it",
        )


def test_report_and_output_paths_checked_before_the_work(base, prompts, tmp_path, capsys):
    """O13, O14: `measure --out` an existing file, `validate/evaluate --out` a directory or a file inside
    the models, each refused in one line before any work (the report was lost at the end)."""
    model, directions, reference = base
    _, good, _, _ = prompts
    (tmp_path / "file").write_text("mine")
    with unchanged(model, reference):
        assert_error(
            cli(
                capsys,
                "measure",
                DEMO_MODEL_DIR,
                "--harmful",
                good,
                "--harmless",
                good,
                "--out",
                tmp_path / "file",
                "--direction-position",
                "none",
            ),
            "measure",
            "is a file",
        )
        assert_error(
            cli(capsys, "validate", model, reference, "--out", tmp_path),
            "validate",
            "is a directory",
            "give a file name",
        )
        assert_error(
            cli(capsys, "validate", model, reference, "--out", reference / "report.json"),
            "validate",
            "inside the input",
            "choose a file outside it",
        )
        assert_error(
            cli(capsys, "validate", model, reference, "--out", tmp_path / "absent" / "r.json"),
            "validate",
            "does not exist",
        )
        assert_error(
            cli(capsys, "evaluate", DEMO_MODEL_DIR, "--harmful", good, "--harmless", good, "--out", tmp_path),
            "evaluate",
            "is a directory",
        )
    assert (tmp_path / "file").read_text() == "mine"


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs (covered by the injected-failure test)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def mounts():
    mounted: list[Path] = []
    yield lambda where, options: (_mount_tmpfs(where, options), mounted.append(where))
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def _no_partial_shard(out: Path, reference: Path) -> None:
    """Whatever a failed run left: every shard under its final name is complete; no manifest."""
    assert not (out / MANIFEST_FILE).exists()
    for shard in SHARDS:
        if (out / shard).exists():
            assert (out / shard).read_bytes() == (reference / shard).read_bytes(), f"partial {shard}"
    assert not list(out.glob(".*.tmp-*")), "temporary shard left behind"


def test_output_on_a_read_only_filesystem(base, tmp_path, capsys, mounts):
    """Root ignores file modes, so a read-only mount stands for an unwritable output."""
    model, directions, _ = base
    mounts(tmp_path / "ro", "ro,size=64k")
    with unchanged(model):
        code, err = cli(capsys, *ablate_args(model, directions, tmp_path / "ro" / "out"))
    assert code != 0 and not (tmp_path / "ro" / "out").exists()


def test_disk_full_mid_shard_leaves_no_partial_shard_and_a_rerun_completes(base, tmp_path, capsys, mounts):
    model, directions, reference = base
    small = [p for p in model.iterdir() if p.name not in SHARDS]
    # Room for the copied small files, the run's records, shard 1 and half of shard 2.
    room = 32 * 1024 + sum(p.stat().st_size for p in small) + (model / SHARDS[0]).stat().st_size
    room += (model / SHARDS[1]).stat().st_size // 2
    disk = tmp_path / "disk"
    mounts(disk, f"size={(room // 4096 + 1) * 4}k")
    out = disk / "out"
    args = ablate_args(model, directions, out, "--workers", "1")
    with unchanged(model):
        code, _ = cli(capsys, *args)
        assert code != 0
        _no_partial_shard(out, reference)
        assert (out / SHARDS[0]).is_file() and not (out / SHARDS[1]).exists()  # failed inside shard 2
        kept = (out / SHARDS[0]).stat().st_mtime_ns
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # the user frees space
        assert cli(capsys, *args)[0] == 0
    assert (out / SHARDS[0]).stat().st_mtime_ns == kept  # the finished shard is not redone
    assert shard_bytes(out) == shard_bytes(reference)


def _fail_writes_after(monkeypatch, calls: int, error: OSError) -> None:
    """Make the engine's n-th write of edited bytes fail, as a full or broken disk does."""
    count = [0]
    write = engine._write_rounded

    def failing(dst, work, dtype):
        count[0] += 1
        if count[0] > calls:
            raise error
        write(dst, work, dtype)

    monkeypatch.setattr(engine, "_write_rounded", failing)


def test_injected_write_failure_leaves_no_partial_shard_and_a_rerun_completes(
    base, tmp_path, capsys, monkeypatch
):
    """The same as the small filesystem, anywhere: the write of an edited tensor fails mid-shard."""
    model, directions, reference = base
    edited_in_first = sum(
        1 for e in json.loads((reference / MANIFEST_FILE).read_text())["edited"] if e["shard"] == SHARDS[0]
    )
    out = tmp_path / "out"
    args = ablate_args(model, directions, out, "--workers", "1")
    with unchanged(model):
        with monkeypatch.context() as patch:
            _fail_writes_after(patch, edited_in_first + 2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            code, _ = cli(capsys, *args)
        assert code != 0
        _no_partial_shard(out, reference)
        assert (out / SHARDS[0]).is_file() and not (out / SHARDS[1]).exists()
        assert cli(capsys, *args)[0] == 0
    assert shard_bytes(out) == shard_bytes(reference)
    assert not (out / STATE_DIR).exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_write_failures_are_one_line_errors(base, tmp_path, capsys, monkeypatch, err):
    model, directions, _ = base
    _fail_writes_after(monkeypatch, 3, OSError(err, os.strerror(err)))
    result = cli(capsys, *ablate_args(model, directions, tmp_path / "out", "--workers", "1"))
    assert_error(result, "ablate", os.strerror(err), "model-0000", "rerun")  # what, which shard, what to do


# ---------------------------------------------------------------- validation


def _edit_tensor_bytes(folder: Path, name: str, change, source: Path | None = None) -> None:
    """Store `change(values)` (a float32 tensor -> tensor) as one tensor of a checkpoint, in place, in its
    own dtype; `values` are the tensor's values in `source` (default: the checkpoint itself)."""
    t = build_inventory(folder).tensors[name]
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[t.dtype]
    path = folder / t.shard
    raw = bytearray(path.read_bytes())
    read = bytearray(((source or folder) / t.shard).read_bytes()[t.start : t.end])
    values = torch.frombuffer(read, dtype=dtype).reshape(t.shape).float()
    raw[t.start : t.end] = change(values).to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(raw))


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
        _rewrite_header(shard, _shift(_second_tensor(shard), -2))
        fragments = ["is unreadable", "overlaps"]
    else:
        make, fragments = CORRUPTIONS[case]
        _edit_tensor_bytes(out, victim, make(directions))
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
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import default_plan, direction_for, plan_matches

    model, directions, reference = base
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    inputs = load_inputs(model, directions)
    plan = default_plan(inputs)
    for m in plan_matches(plan, inputs.inventory, inputs.structure):
        r = direction_for(plan, inputs.directions, m.tensor.layer).double()
        axis = m.tensor.residual_axis

        def exact(w: torch.Tensor, r=r, axis=axis) -> torch.Tensor:
            w = w.double()
            along = [1] * w.dim()
            along[axis] = r.numel()
            projection = torch.tensordot(w, r, dims=([axis], [0])).unsqueeze(axis)
            return w - r.view(along) * projection

        _edit_tensor_bytes(out, m.tensor.name, exact, source=model)
    with unchanged(model):
        code, _ = cli(capsys, "validate", model, out, "--quiet", "--out", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0, report["failures"]
    assert report["recomputed"]["within_rounding"] > 0 and report["recomputed"]["differs"] == 0
    assert any("only within float32 rounding" in w for w in report["warnings"])


# ---------------------------------------------------------------- process

KILLER = """
import os, signal, sys
import abliterate.edit.engine as engine
calls, kill_at = [0], int(sys.argv[1])
copy = engine._copy_range
def killing_copy(*args):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    copy(*args)
engine._copy_range = killing_copy
from abliterate.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigkill_with_parallel_workers_then_rerun_is_bit_identical(base, tmp_path):
    """Killed between byte copies while two shards are being written at once (--workers 2)."""
    model, directions, reference = base
    out = tmp_path / "out"
    args = ablate_args(model, directions, out, "--workers", "2")
    copies = len(json.loads((reference / MANIFEST_FILE).read_text())["edited"]) + len(SHARDS)  # ranges copied
    with unchanged(model):
        killed = subprocess.run([sys.executable, "-c", KILLER, str(copies // 2), *args], capture_output=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
        assert not (out / MANIFEST_FILE).exists() and not all((out / s).exists() for s in SHARDS)
        _no_partial_shard_but_temps(out, reference)
        rerun = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True)
        assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert shard_bytes(out) == shard_bytes(reference)
    assert not list(out.glob(".*")), "temporary files or records left in a finished output"


# A run that waits, before copying its first byte range, until GATE exists; it says so in GATE.waiting.
# Meanwhile it holds its output directory's lock, as a long run does.
PAUSED = """
import sys, time
from pathlib import Path
import abliterate.edit.engine as engine
gate = Path(sys.argv[1])
copy = engine._copy_range
def waiting_copy(*args, **kwargs):
    stop = args[4] if len(args) > 4 else kwargs.get("stop")
    Path(str(gate) + ".waiting").touch()
    while not gate.exists() and not (stop is not None and stop.is_set()):
        time.sleep(0.02)
    return copy(*args, **kwargs)
engine._copy_range = waiting_copy
from abliterate.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _start_paused(gate: Path, args: list[str]) -> subprocess.Popen:
    run = subprocess.Popen(
        [sys.executable, "-c", PAUSED, str(gate), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    waiting = Path(str(gate) + ".waiting")
    for _ in range(3000):
        if waiting.exists() or run.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"])
    assert waiting.exists(), run.communicate(timeout=60)
    return run


@pytest.mark.slow
def test_two_runs_into_one_output_the_second_stops_at_once(base, tmp_path, capsys):
    """R5: while one run writes an output, a second run into the same directory exits 2 at once with one
    line; the first finishes undisturbed, bit-identical to the reference."""
    model, directions, reference = base
    out = tmp_path / "out"
    with unchanged(model):
        first = _start_paused(tmp_path / "gate", ablate_args(model, directions, out, "--workers", "1"))
        try:
            assert_error(
                cli(capsys, *ablate_args(model, directions, out)),
                "ablate",
                "is being written by another abliterate run",
                "wait for it to finish",
            )
            assert_error(
                cli(capsys, *ablate_args(model, directions, out, "--overwrite")),
                "ablate",
                "is being written by another abliterate run",
            )
        finally:
            (tmp_path / "gate").touch()
            code = first.wait(timeout=300)
        assert code == 0, first.stderr.read().decode()[-2000:]
    assert shard_bytes(out) == shard_bytes(reference)


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_rerun_finishes(base, tmp_path):
    """R6: Ctrl-C (SIGINT) in the middle of an ablation prints one line, no traceback, exit code 130;
    rerunning the same command finishes bit-identical to an uninterrupted run."""
    model, directions, reference = base
    out = tmp_path / "out"
    args = ablate_args(model, directions, out, "--workers", "1")
    with unchanged(model):
        run = _start_paused(tmp_path / "gate", args)
        run.send_signal(signal.SIGINT)
        code = run.wait(timeout=300)  # a bound on a hang, generous for a busy machine
        err = run.stderr.read().decode().strip().splitlines()
        assert code == 130, err
        assert not any("Traceback" in line for line in err), err  # (the plan it printed first comes before)
        assert err[-1] == (
            "abliterate ablate: interrupted; files already finished are kept and nothing partial "
            "carries a final name: rerun the same command to continue"
        )
        _no_partial_shard(out, reference)
        rerun = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True)
        assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert shard_bytes(out) == shard_bytes(reference)


STORE_RUN = """
import os, sys, time
from pathlib import Path
os.environ["ABLITERATE_HOME"] = sys.argv[1]
os.environ.pop("MLFLOW_TRACKING_URI", None)
from abliterate_flows.runtime import configure
configure()
from abliterate_flows.tracking import tracked_run
gate = Path(sys.argv[2])
Path(sys.argv[3]).touch()
while not gate.exists():
    time.sleep(0.005)
with tracked_run("abliterate/model", sys.argv[3]) as run:
    run.params({"a": 1})
    run.metrics({"m": 1.0})
"""


@pytest.mark.slow
def test_two_runs_on_a_fresh_store_both_succeed(tmp_path):
    """R7: two runs that open a fresh MLflow store at the same moment (a new machine, two terminals):
    MLflow's schema migration crashed one of them (`duplicate column name: step`); the first opening of
    the store now happens under a lock file beside mlflow.db, and both runs are recorded."""
    home, gate = tmp_path / "home", tmp_path / "gate"
    ready = [tmp_path / "a", tmp_path / "b"]
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", STORE_RUN, str(home), str(gate), str(r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
        )
        for r in ready
    ]
    for _ in range(1200):
        if all(r.exists() for r in ready) or any(run.poll() is not None for run in runs):
            break
        subprocess.run(["sleep", "0.05"])
    gate.touch()  # both start together
    results = [(run.wait(timeout=300), run.stderr.read().decode()[-1500:]) for run in runs]
    assert [code for code, _ in results] == [0, 0], results
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("abliterate/model")
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_identical_runs_write_identical_files(base, prompts, tmp_path, capsys):
    """X1-X3: every file an identical run writes is byte-identical: the output directory (abliteration.json
    held the directions metadata in safetensors' hash order), the directions files of `measure`, and
    the validation and evaluation reports (they held the wall time)."""
    model, directions, _ = base
    _, good, _, _ = prompts
    trees = []
    for _ in range(2):
        out = tmp_path / "out"
        assert cli(capsys, *ablate_args(model, directions, out))[0] == 0
        assert cli(capsys, "validate", model, out, "--quiet", "--out", tmp_path / "report.json")[0] == 0
        measured = tmp_path / "measured"
        assert (
            cli(
                capsys,
                "measure",
                DEMO_MODEL_DIR,
                "--harmful",
                good,
                "--harmless",
                good,
                "--out",
                measured,
                "--direction-position",
                "none",
                "--quiet",
            )[0]
            == 0
        )
        assert (
            cli(
                capsys,
                "evaluate",
                DEMO_MODEL_DIR,
                "--harmful",
                good,
                "--harmless",
                good,
                "--max-new-tokens",
                "4",
                "--quiet",
                "--out",
                tmp_path / "evaluation.json",
            )[0]
            == 0
        )
        trees.append(
            {
                **_tree(out),
                "report.json": (tmp_path / "report.json").read_bytes(),
                "evaluation.json": (tmp_path / "evaluation.json").read_bytes(),
                **{f"measured/{k}": v for k, v in _tree(measured).items()},
            }
        )
        shutil.rmtree(out), shutil.rmtree(measured)
    assert trees[0].keys() == trees[1].keys()
    assert [k for k in trees[0] if trees[0][k] != trees[1][k]] == []


def _no_partial_shard_but_temps(out: Path, reference: Path) -> None:
    """After a SIGKILL no cleanup ran: temp files may remain, never a partial shard under its name."""
    for shard in SHARDS:
        if (out / shard).exists():
            assert (out / shard).read_bytes() == (reference / shard).read_bytes(), f"partial {shard}"


@pytest.mark.slow
def test_two_runs_to_different_outputs_at_once(base, tmp_path):
    model, directions, reference = base
    with unchanged(model):
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", CLI, *ablate_args(model, directions, tmp_path / name)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for name in ("a", "b")
        ]
        results = [(run.wait(timeout=120), run.stderr.read().decode()) for run in runs]
    assert [code for code, _ in results] == [0, 0], results
    assert shard_bytes(tmp_path / "a") == shard_bytes(reference) == shard_bytes(tmp_path / "b")


# ---------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    good = root / "harmless.txt"
    good.write_text("Write a haiku about spring.\nName three rivers.\nHow do magnets work?\n")
    files = {
        "empty": (b"", ["no prompts", "empty"]),
        "blank lines only": (b"\n   \n\t\n\n", ["no prompts", "blank"]),
        "not UTF-8": (
            b"Name a colour.\nCaf\xe9 menu ideas\n",
            ["not valid UTF-8 at byte offset 18 (line 2)", "re-save"],
        ),
    }
    for name, (data, _) in files.items():
        (root / f"{name}.txt").write_bytes(data)
    huge = root / "huge.txt"
    huge.write_text("Name a colour.\n" + "word " * 400 + "\nHow do I pick a lock?\n")
    return root, good, files, huge


@pytest.mark.parametrize("case", ["empty", "blank lines only", "not UTF-8"])
def test_bad_prompt_file_fails_before_any_work(prompts, tmp_path, capsys, case):
    root, good, files, _ = prompts
    bad = root / f"{case}.txt"
    with unchanged(DEMO_MODEL_DIR):
        result = cli(
            capsys,
            "measure",
            DEMO_MODEL_DIR,
            "--harmful",
            bad,
            "--harmless",
            good,
            "--out",
            tmp_path / "m",
            "--direction-position",
            "none",
        )
    assert_error(result, "measure", str(bad), *files[case][1])
    assert not (tmp_path / "m").exists()


def test_prompt_beyond_the_context_is_named(prompts, tmp_path, capsys):
    root, good, _, huge = prompts
    with unchanged(DEMO_MODEL_DIR):
        result = cli(
            capsys,
            "measure",
            DEMO_MODEL_DIR,
            "--harmful",
            huge,
            "--harmless",
            good,
            "--out",
            tmp_path / "m",
            "--direction-position",
            "none",
        )
    # named by its file and line (line 2), not by its index in the shuffled measurement split
    assert_error(
        result,
        "measure",
        f"harmful prompt {huge} line 2 is",
        "more than the model's context of 256 tokens",
        "shorten or remove it",
    )
    assert not (tmp_path / "m").exists()


def test_csv_prompt_over_the_csv_field_limit_is_named_by_line(prompts, tmp_path, capsys):
    """Q8: a CSV prompt longer than the csv module's 128 KiB field limit was a traceback (`field larger
    than field limit`); it is read, and then named by its file and line as longer than the context."""
    _, good, _, _ = prompts
    big = tmp_path / "big.csv"
    big.write_text('prompt\n"Name a colour."\n"' + "word " * 40_000 + '"\n')
    with unchanged(DEMO_MODEL_DIR):
        result = cli(
            capsys,
            "measure",
            DEMO_MODEL_DIR,
            "--harmful",
            big,
            "--harmless",
            good,
            "--out",
            tmp_path / "m",
            "--direction-position",
            "none",
        )
    assert_error(result, "measure", f"harmful prompt {big} line 3 is", "more than the model's context")
    assert not (tmp_path / "m").exists()


def test_reserved_template_kwargs_and_odd_prompt_files_fail_before_loading(prompts, tmp_path, capsys):
    """Q9, Q10: chat-template variables the tool sets itself (`messages`, `add_generation_prompt`, ...)
    and a prompt file that is a FIFO or a dangling link are one line, before the model is loaded."""
    _, good, _, _ = prompts
    base = [
        "measure",
        DEMO_MODEL_DIR,
        "--harmless",
        good,
        "--out",
        tmp_path / "m",
        "--direction-position",
        "none",
    ]
    with unchanged(DEMO_MODEL_DIR):
        for kwargs in ('{"add_generation_prompt": false}', "messages=[]"):
            assert_error(
                cli(capsys, *base, "--harmful", good, "--chat-template-kwargs", kwargs),
                "measure",
                "--chat-template-kwargs",
                "set by the tool itself; remove them",
            )
        fifo, dangling = tmp_path / "fifo.txt", tmp_path / "dangling.txt"
        os.mkfifo(fifo)
        dangling.symlink_to(tmp_path / "gone.txt")
        assert_error(cli(capsys, *base, "--harmful", fifo), "measure", str(fifo), "a FIFO")
        assert_error(
            cli(capsys, *base, "--harmful", dangling), "measure", str(dangling), "a dangling symbolic link"
        )
    assert not (tmp_path / "m").exists()


def test_measure_output_inside_the_model_is_refused(prompts, tmp_path, capsys):
    _, good, _, _ = prompts
    model = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_DIR, model)
    with unchanged(model):
        result = cli(
            capsys,
            "measure",
            model,
            "--harmful",
            good,
            "--harmless",
            good,
            "--out",
            model,
            "--direction-position",
            "none",
        )
        assert_error(result, "measure", "inside the input checkpoint")


# ---------------------------------------------------------------- properties: mutated inputs

# Any JSON value (YAML for plans): what a careless edit, a bad tool or a corrupt download leaves behind.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=4,
)
PROPERTY = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _quiet_cli(*args: str | Path) -> tuple[int | str, list[str]]:
    """`abliterate ARGS` with its output captured; an exception escaping main is a crash."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code: int | str = main([str(a) for a in args])
        except Exception as exc:  # noqa: BLE001 - a traceback is what this property forbids
            code = f"crash: {type(exc).__name__}: {exc}"
    return code, err.getvalue().strip().splitlines()


def _one_line_or_a_correct_run(model: Path, directions: Path, work: Path, *extra: str | Path) -> str:
    """The property: `inventory` and `ablate` exit 2 with one error line, or succeed; a successful
    ablation's output passes `abliterate validate` against the (mutated) input. Returns the outcome."""
    code, err = _quiet_cli("inventory", model)
    assert code in (0, 2), (code, err)
    if code == 2:
        assert len([line for line in err if line.startswith("abliterate inventory: error: ")]) == 1, err
    out = work / "out"
    code, err = _quiet_cli(*ablate_args(model, directions, out, "--force", *extra))
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [line for line in err if line.startswith("abliterate ablate: error: ")]
        assert len(lines) == 1 and "\n" not in lines[0], err
        return "error"
    code, err = _quiet_cli(
        "validate", model, out, "--quiet", "--directions", directions, "--out", work / "report.json"
    )
    assert code == 0, json.loads((work / "report.json").read_text())["failures"] if code == 1 else (code, err)
    return "run"


def _mutated_copy(model: Path, work: Path) -> Path:
    copy = work / "model"
    shutil.copytree(model, copy)
    return copy


@st.composite
def header_mutations(draw):
    return (
        draw(st.sampled_from(SHARDS)),
        draw(st.sampled_from(["target", "first", "last", "__metadata__", "new"])),
        draw(
            st.sampled_from(
                [
                    "entry",
                    "dtype",
                    "shape",
                    "data_offsets",
                    "nudge offsets",
                    "nudge shape",
                    "delete",
                    "extra key",
                ]
            )
        ),
        draw(JSON_VALUES),
        draw(st.integers(-64, 64)),
    )


def _mutate_header(header: dict, which: str, kind: str, value, delta: int) -> dict:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    name = {
        "target": next((n for n in names if n.endswith("o_proj.weight")), names[0]),
        "first": names[0],
        "last": names[-1],
        "__metadata__": "__metadata__",
        "new": "model.extra.weight",
    }[which]
    entry = header.get(name)
    if kind == "delete":
        header.pop(name, None)
    elif kind == "entry" or not isinstance(entry, dict) or name == "__metadata__":
        header[name] = value
    elif kind in ("dtype", "shape", "data_offsets"):
        entry[kind] = value
    elif kind == "nudge offsets":
        entry["data_offsets"] = [entry["data_offsets"][0] + delta, entry["data_offsets"][1] + delta]
    elif kind == "nudge shape":
        entry["shape"] = [entry["shape"][0] + delta, *entry["shape"][1:]] if entry["shape"] else [delta]
    else:
        entry["extra"] = value
    return header


@pytest.mark.slow
@PROPERTY
@given(mutation=header_mutations())
def test_any_header_mutation_is_one_line_or_a_correct_run(base, mutation):
    """C26 (property): a shard header mutated in type or value, or a tensor moved by a few bytes, gives
    exit 2 with one line or a run whose output validates; never a traceback, never a changed input."""
    model, directions, _ = base
    shard, which, kind, value, delta = mutation
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy = _mutated_copy(model, work)
        _rewrite_header(copy / shard, lambda h: _mutate_header(h, which, kind, value, delta))
        with unchanged(copy):
            event(_one_line_or_a_correct_run(copy, directions, work))


CONFIG_KEYS = [
    "hidden_size",
    "num_hidden_layers",
    "n_routed_experts",
    "n_shared_experts",
    "first_k_dense_replace",
    "num_nextn_predict_layers",
    "tie_word_embeddings",
    "model_type",
    "architectures",
    "vocab_size",
    "max_position_embeddings",
    "num_attention_heads",
    "rope_theta",
    "torch_dtype",
]


@PROPERTY
@given(
    key=st.sampled_from(CONFIG_KEYS) | st.text(max_size=5),
    value=JSON_VALUES | st.integers(0, 12),
    delete=st.booleans(),
)
@pytest.mark.slow
def test_any_config_mutation_is_one_line_or_a_correct_run(base, key, value, delete):
    """C27 (property): config.json with any key set to any JSON value (null, NaN, strings, lists,
    absurd numbers) or removed: exit 2 with one line, or a run whose output validates."""
    model, directions, _ = base
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy = _mutated_copy(model, work)
        config = json.loads((copy / "config.json").read_text())
        if delete:
            config.pop(key, None)
        else:
            config[key] = value
        (copy / "config.json").write_text(json.dumps(config))
        with unchanged(copy):
            event(_one_line_or_a_correct_run(copy, directions, work))


PLAN_KEYS = [
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
    "format",
]
PLAN_VALUES = (
    JSON_VALUES
    | st.sampled_from(["plain", "norm_preserving", "projected", "skip", "own", "selected", "embed"])
    | st.lists(st.integers(0, 4), max_size=4)
    | st.lists(st.sampled_from(["attn_out", "router", "embed"]), max_size=3)
    | st.dictionaries(
        st.sampled_from(["0", "1", "2", "3"]), st.floats(-1, 3) | st.floats(0, 1e-20), min_size=4, max_size=4
    )
)


@pytest.mark.slow
@PROPERTY
@given(key=st.sampled_from(PLAN_KEYS) | st.text(max_size=5), value=PLAN_VALUES, delete=st.booleans())
def test_any_plan_mutation_is_one_line_or_a_correct_run(base, key, value, delete):
    """P18 (property): a plan file with any key set to any value (a string where a list or a boolean
    belongs, NaN, nested structures, other layers, scales, roles, methods) or removed: exit 2 with one
    line, or a run whose output validates."""
    model, directions, _ = base
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import default_plan

    data = default_plan(load_inputs(model, directions)).to_dict()
    if delete:
        data.pop(key, None)
    else:
        data[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plan = work / "plan.yaml"
        plan.write_text(yaml.safe_dump(data))
        with unchanged(model):
            event(_one_line_or_a_correct_run(model, directions, work, "--plan", plan))


@PROPERTY
@given(
    scales=st.lists(st.floats(0, 2) | st.floats(0, 1e-12) | st.just(0.0), min_size=4, max_size=4),
    method=st.sampled_from(["plain", "norm_preserving", "projected"]),
    targets=st.lists(
        st.sampled_from(["attn_out", "mlp_down", "expert_down", "shared_expert_down", "router", "embed"]),
        min_size=1,
        max_size=6,
        unique=True,
    ),
)
@pytest.mark.slow
def test_any_valid_plan_runs_and_validates(base, tmp_path_factory, scales, method, targets):
    """P19 (property): every valid plan, including scales so small that the edit rounds away, runs to an
    output that validates, or is refused in one line (a plan matching no tensor; one that would leave
    every byte unchanged); never a silent no-op reported as success."""
    model, directions, _ = base
    means = tmp_path_factory.getbasetemp() / "means.safetensors"
    if not means.exists():
        gen = torch.Generator().manual_seed(7)
        save_directions(
            means,
            torch.randn(POSITIONS, H, generator=gen),
            {"selected_position": 2},
            harmful_mean=torch.randn(POSITIONS, H, generator=gen),
            harmless_mean=torch.randn(POSITIONS, H, generator=gen),
        )
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import default_plan

    data = default_plan(load_inputs(model, means, force=True)).to_dict()
    data.update(
        scale={str(i): v for i, v in zip(data["layers"], scales, strict=True)}, method=method, targets=targets
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plan = work / "plan.yaml"
        plan.write_text(yaml.safe_dump(data))
        with unchanged(model):
            event(_one_line_or_a_correct_run(model, means, work, "--plan", plan))


# ---------------------------------------------------------------- Prefect


@pytest.mark.slow
def test_flow_fails_on_a_damaged_checkpoint_in_the_inventory_task(prefect_env, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from abliterate_flows.main import abliterate_flow

    model = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_DIR, model)
    _truncate(model / SHARDS[1], (model / SHARDS[1]).stat().st_size - 64)
    out = tmp_path / "out"
    with unchanged(model):
        # streaming="never": nothing reads the checkpoint before the inventory task
        state = abliterate_flow(
            model=str(model),
            out=str(out),
            prompts={"prompt_set": "demo"},
            evaluation={"evaluate": False},
            runtime={"streaming": "never"},
            return_state=True,
        )
    assert state.is_failed()
    assert SHARDS[1] in state.message and "truncated" in state.message and "re-download" in state.message
    with pytest.raises(AbliterateError, match="truncated"):
        state.result()
    with get_client(sync_client=True) as client:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        runs = client.read_task_runs(flow_run_filter=flow_run)
    inventory = [r for r in runs if r.name.startswith("weight-inventory")]
    assert [r.state.type.value for r in inventory] == ["FAILED"] and "truncated" in inventory[0].state.message
    assert not out.exists()


@pytest.mark.slow
def test_flow_fails_on_a_layer_out_of_range(prefect_env, tmp_path):
    from abliterate_flows.main import abliterate_flow

    out = tmp_path / "out"
    with unchanged(DEMO_MODEL_DIR):
        state = abliterate_flow(
            model=str(DEMO_MODEL_DIR),
            out=str(out),
            ablation={"layers": "99"},
            evaluation={"evaluate": False},
            return_state=True,
        )
    assert state.is_failed()
    assert "layer 99 is out of range" in state.message and "decoder layers 0..4" in state.message
    assert not out.exists()


def _task_names(state) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        return [r.name for r in client.read_task_runs(flow_run_filter=flow_run)]


@pytest.mark.slow
def test_flows_refuse_bad_paths_and_settings_before_any_work(prefect_env, base, prompts, tmp_path):
    """F3-F6 through the flows: a work dir inside the model (`run` and `sweep` alike), a sweep variant
    named out of --out, an output that is a file, a layer out of range, a device this torch lacks, a
    header of the wrong type, an over-long prompt (named by file and line): each a Failed flow run with
    the one-line message, before the measurement where it can be known then, with nothing written and
    the input unchanged."""
    from abliterate_flows.main import abliterate_flow
    from abliterate_flows.sweep import sweep_flow

    model = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_DIR, model)
    out, quick = (
        tmp_path / "out",
        {
            "evaluation": {"evaluate": False},
            "selection": {"direction_position": "own"},
            "prompts": {"prompt_set": "demo"},
        },
    )
    (tmp_path / "file").write_text("mine")
    with unchanged(model):
        for call, fragments in [
            (
                lambda: abliterate_flow(
                    model=str(model), out=str(out), work_dir=str(model / "work"), **quick, return_state=True
                ),
                ["inside the input checkpoint"],
            ),
            (
                lambda: sweep_flow(
                    model=str(model),
                    out=str(out),
                    work_dir=str(model / "work"),
                    return_state=True,
                    evaluation={"evaluate": False},
                ),
                ["inside the input checkpoint"],
            ),
            (
                lambda: sweep_flow(
                    model=str(model), out=str(out), variants=[{"name": "../escape"}], return_state=True
                ),
                ["variant #0: name '../escape'", "folder under --out"],
            ),
            (
                lambda: abliterate_flow(
                    model=str(model), out=str(tmp_path / "file"), **quick, return_state=True
                ),
                ["exists and is not a directory"],
            ),
            (
                lambda: abliterate_flow(
                    model=str(model), out=str(out), ablation={"layers": "7"}, **quick, return_state=True
                ),
                ["layer 7 is out of range"],
            ),
        ] + (
            []
            if torch.cuda.is_available()
            else [  # a device this torch lacks: a CPU-only build asked for CUDA
                (
                    lambda: abliterate_flow(
                        model=str(model),
                        out=str(out),
                        runtime={"device": "cuda:3"},
                        **quick,
                        return_state=True,
                    ),
                    ["no CUDA device"],
                ),
            ]
        ):
            state = call()
            assert state.is_failed() and all(f in state.message for f in fragments), state.message
            assert "Traceback" not in state.message
            assert not any(n.startswith("activation-measurement") for n in _task_names(state))
        _, _, _, huge = prompts
        state = abliterate_flow(
            model=str(model),
            out=str(out),
            **{**quick, "prompts": {"prompt_set": "demo", "harmful": str(huge)}},
            return_state=True,
        )
        assert state.is_failed() and f"harmful prompt {huge} line 2 is" in state.message, state.message
    assert not out.exists() and (tmp_path / "file").read_text() == "mine"
    damaged = tmp_path / "damaged"
    shutil.copytree(DEMO_MODEL_DIR, damaged)
    shard = next(p for p in sorted(damaged.glob("*.safetensors")))
    _rewrite_header(shard, _entry(_first_tensor(shard), "data_offsets", ["0", "8"]))
    with unchanged(damaged):
        state = abliterate_flow(model=str(damaged), out=str(out), **quick, return_state=True)
    assert state.is_failed() and "`data_offsets`" in state.message and "re-download" in state.message
    assert any(n.startswith("weight-inventory") for n in _task_names(state)) and not out.exists()


@pytest.mark.slow
def test_ablate_flow_keeps_what_is_not_its_own_locks_and_reproduces(prefect_env, base, tmp_path):
    """F7 (O11, R5, X1, D15 through the `ablate` flow, the per-shard subflow every run uses): --overwrite
    keeps the user's files and the directions file inside the output; a second run into an output being
    written fails at once; identical runs write identical files; a NaN harmless mean fails the run."""
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import default_plan
    from abliterate_flows.ablate import ablate_flow

    model, directions, reference = base
    plan = default_plan(load_inputs(model, directions))
    out = tmp_path / "out"
    with unchanged(model):
        assert ablate_flow(str(model), str(directions), str(out), plan)["counts"]
        first = _tree(out)
        shutil.rmtree(out)
        ablate_flow(str(model), str(directions), str(out), plan)
        assert _tree(out) == first  # every file, abliteration.json included
        (out / "notes.txt").write_text("mine")
        inside = out / "directions.safetensors"
        shutil.copyfile(directions, inside)
        other = default_plan(load_inputs(model, inside), layers="1")
        ablate_flow(str(model), str(inside), str(out), other, overwrite=True)
        assert (out / "notes.txt").read_text() == "mine" and inside.read_bytes() == directions.read_bytes()

        busy = tmp_path / "busy"
        run = _start_paused(tmp_path / "gate", ablate_args(model, directions, busy, "--workers", "1"))
        try:
            state = ablate_flow(str(model), str(directions), str(busy), plan, return_state=True)
            assert state.is_failed() and "is being written by another abliterate run" in state.message
        finally:
            (tmp_path / "gate").touch()
            assert run.wait(timeout=300) == 0
        assert shard_bytes(busy) == shard_bytes(reference)

        harmless = torch.randn(POSITIONS, H)
        harmless[2, 0] = float("nan")
        bad = _with_means(tmp_path, torch.randn(POSITIONS, H), harmless)
        state = ablate_flow(str(model), str(bad), str(tmp_path / "nan"), plan, force=True, return_state=True)
        assert state.is_failed() and "`harmless_mean`" in state.message and "NaN or Inf" in state.message
    assert not (tmp_path / "nan").exists()


@pytest.mark.slow
def test_flow_validation_catches_a_damaged_output(prefect_env, tmp_path):
    """F8: the `abliterate` flow rerun over its own output after an edited tensor was damaged in a way
    that keeps it orthogonal to the direction: the validation task reruns (the output changed) and
    recomputes every edited tensor, and the flow fails; the input is unchanged throughout."""
    from abliterate_flows.main import abliterate_flow

    model, out = tmp_path / "demo", tmp_path / "out"
    shutil.copytree(DEMO_MODEL_DIR, model)
    settings = {
        "evaluation": {"evaluate": False},
        "selection": {"direction_position": "2"},
        "prompts": {"prompt_set": "demo"},
    }
    with unchanged(model):
        first = abliterate_flow(model=str(model), out=str(out), **settings, return_state=True)
        assert first.is_completed(), first.message
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        victim = next(e["name"] for e in manifest["edited"] if e["role"] == "attn_out")
        _edit_tensor_bytes(out, victim, lambda w: w * 0.5)  # still orthogonal to the direction
        second = abliterate_flow(model=str(model), out=str(out), **settings, return_state=True)
    assert second.is_failed(), second.message
    assert (
        "validation of" in second.message
        and "differs from the edit recomputed from the input" in second.message
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
