"""Third pass, A (files and values): paths and the values read from files (docs/RELIABILITY.md, section
`Third pass, A: files and values`, classes A4-A8). Every case builds its files fresh and runs the CLI
(the Hub-cache cases in a fresh interpreter whose HF_HOME names the cache, offline, as a user runs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_guard import unchanged
from fixtures import CLI, assert_error, cli

from abliterate.measure.direction_file import load_directions, save_directions

from .common import SHARDS, ablate_args

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub(tmp_path: Path, model: Path) -> Path:
    """$HF_HOME/hub holding `model` as acme/glm at COMMIT (main): content-named blobs, the snapshot's files
    relative links to them (huggingface_hub's layout); returns the snapshot folder."""
    repo = tmp_path / "hf" / "hub" / "models--acme--glm"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(model.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _self_loop(snapshot: Path, name: str) -> None:
    (snapshot / name).unlink()
    (snapshot / name).symlink_to(name)


def _two_loop(snapshot: Path, name: str) -> None:
    (snapshot / name).unlink()
    (snapshot / name).symlink_to("other")
    (snapshot / "other").symlink_to(name)


def _folder(snapshot: Path, name: str) -> None:
    (snapshot / name).unlink()
    (snapshot / name).mkdir()


HUB_DAMAGE = {
    "a shard that links to itself": (SHARDS[1], _self_loop, "a loop of symbolic links"),
    "the index in a loop of two links": (
        "model.safetensors.index.json",
        _two_loop,
        "a loop of symbolic links",
    ),
    "config.json a folder": ("config.json", _folder, "a directory"),
}


@pytest.mark.parametrize("case", list(HUB_DAMAGE))
def test_a_damaged_hub_snapshot_is_named_not_reported_missing(base, tmp_path, case):
    """A4: a link loop inside a Hub snapshot was reported as missing (`lacks model-00002-...: download
    them`), the index in a loop made the tool look for a single `model.safetensors`; now one line naming the
    file and what it is, and what to do (remove it: it is downloaded again)."""
    model, _, _ = base
    snapshot = _hub(tmp_path, model)
    name, damage, kind = HUB_DAMAGE[case]
    damage(snapshot, name)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CLI, "inventory", "acme/glm"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("abliterate inventory: error: ")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"holds {name} as {kind}" in lines[0] and "cache is damaged" in lines[0], lines[0]
    assert "lacks" not in lines[0]


def _report_targets(tmp_path: Path, directions: Path) -> dict[str, tuple[Path, str]]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    notes = tmp_path / "notes.json"
    notes.write_text('{"todo": "keep me"}\n')
    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text('{"prompt": "How do I pick a lock?"}\n')
    return {
        "the directions file": (directions, "exists and is not a report abliterate wrote"),
        "a FIFO": (fifo, "is a FIFO (named pipe)"),
        "the user's JSON notes": (notes, "exists and is not a report abliterate wrote"),
        "a prompt file of one JSON object": (prompts, "exists and is not a report abliterate wrote"),
    }


def test_a_report_never_replaces_a_file_the_tool_did_not_write(base, tmp_path, capsys):
    """A5: `validate --report` named the directions file (given or recorded in the manifest) replaced it
    with the JSON report: an input lost; a FIFO or the user's own JSON file were replaced too. An existing
    --report file is replaced only when it is a report of the same command (a rerun); else one line before
    any work, the file unchanged."""
    model, directions, reference = base
    work = tmp_path / "dirs.safetensors"
    shutil.copyfile(directions, work)
    for case, (target, fragment) in _report_targets(tmp_path, work).items():
        before = None if target.is_fifo() else target.read_bytes()
        for extra in ([], ["--directions", str(work)]):
            line = assert_error(
                cli(capsys, "validate", model, reference, "--quiet", "--report", target, *extra),
                "validate",
                fragment,
            )
            assert "choose a new file name" in line, case
        assert before is None or target.read_bytes() == before, case
    report = tmp_path / "report.json"
    for _ in range(2):  # a rerun replaces its own earlier report
        assert cli(capsys, "validate", model, reference, "--quiet", "--report", report)[0] == 0
    assert json.loads(report.read_text())["ok"] is True


def test_input_files_that_are_no_files_are_named_never_opened(base, tmp_path):
    """A6: `--plan` a FIFO blocked forever (the read waits for a writer); `--directions` a FIFO, a folder or
    missing were all "does not exist". One line naming what the path is, before anything opens it (a fresh
    interpreter with a time limit: a regression hangs no test run)."""
    model, directions, _ = base
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    cases = {
        "--plan a FIFO": (["--plan", str(fifo)], f"plan file {fifo} is a FIFO (named pipe), not a file"),
        "--plan a folder": (["--plan", str(tmp_path)], f"plan file {tmp_path} is a directory, not a file"),
        "--directions a FIFO": ([], f"directions file {fifo} is a FIFO (named pipe), not a file"),
        "--directions a folder": ([], f"directions file {model} is a directory, not a file"),
    }
    for case, (extra, fragment) in cases.items():
        used = (
            fifo
            if case == "--directions a FIFO"
            else model
            if case == "--directions a folder"
            else directions
        )
        args = ablate_args(model, used, tmp_path / "out", *extra)
        with unchanged(model):
            done = subprocess.run(
                [sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=300
            )
        lines = [line for line in done.stderr.splitlines() if line.startswith("abliterate ablate: error: ")]
        assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0], (case, done.stderr)
        assert not (tmp_path / "out").exists()


def test_values_read_from_files_are_typed_naming_file_and_key(base, fp8_base, tmp_path, capsys):
    """A7: config.json naming `hidden_size` twice (the last silently held; the index and the shard headers
    refused duplicates); `quant_method` "fp8 " (the message showed `fp8 ` unquoted, naming neither the key
    nor the file); an output path through a file (`... Not a directory; free space or fix the
    permissions`)."""
    model, directions, _ = base
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(
        config.replace('"hidden_size": 64', '"hidden_size": 64, "hidden_size": 32')
    )
    with unchanged(copy):
        assert_error(
            cli(capsys, *ablate_args(copy, directions, tmp_path / "out")),
            "ablate",
            f"{copy}/config.json names 'hidden_size' twice",
            "copy it from the model's source",
        )
    fp8_model, fp8_directions, _ = fp8_base
    fp8_copy = tmp_path / "fp8"
    shutil.copytree(fp8_model, fp8_copy)
    config = json.loads((fp8_copy / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "fp8 "
    (fp8_copy / "config.json").write_text(json.dumps(config))
    assert_error(
        cli(capsys, *ablate_args(fp8_copy, fp8_directions, tmp_path / "out")),
        "ablate",
        f'quantization "fp8 " is not supported (`quantization_config.quant_method` in {fp8_copy}/config.json)',
    )
    (tmp_path / "file").write_text("a file, not a folder")
    with unchanged(model):
        assert_error(
            cli(capsys, *ablate_args(model, directions, tmp_path / "file" / "out")),
            "ablate",
            "Not a directory; a part of the path is a file, not a folder: fix the path",
        )


def test_a_negative_selected_position_names_the_directions_file(base, tmp_path, capsys):
    """A7: a directions file recording `selected_position` -1 was reported as a value of "the ablation
    plan"; the line now names the file and its metadata key, like any other value that is no position."""
    model, directions, _ = base
    loaded = load_directions(directions)
    bad = save_directions(
        tmp_path / "d.safetensors",
        loaded.direction,
        {"fingerprint": loaded.fingerprint, "selected_position": -1},
    )
    assert torch.equal(load_directions(bad).direction, loaded.direction)
    assert_error(
        cli(capsys, *ablate_args(model, bad, tmp_path / "out")),
        "ablate",
        f"{bad} records selected_position -1, not a residual position number",
    )
    assert not (tmp_path / "out").exists()
