"""Reliability of the edit stage: plans (catalogue P) and the output directory (catalogue O):
paths, overwrite, full disks and write failures.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from checkpoint_guard import unchanged
from fixtures import assert_error, cli

import abliterate.edit.engine as engine
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.edit.output import STATE_DIR
from abliterate.measure.direction_file import save_directions
from abliterate.vocabulary import MANIFEST_FILE, MODEL_CARD_FILE
from abliterate.weights.synthetic import write_glm_layout

from .common import LAYOUT, POSITIONS, SHARDS, H, ablate_args, no_partial_shard, shard_bytes, tree

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
        "absent.yaml does not exist",
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
    from abliterate.config import Ablation
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import configured_plan

    data = {**configured_plan(load_inputs(model, directions), Ablation(), "auto").to_dict(), **changes}
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
    mine = {k: v for k, v in tree(out).items() if k.startswith(("notes", "evaluation", "directions"))}
    with unchanged(model):
        assert_error(cli(capsys, *ablate_args(model, inside, out)), "ablate", "is not empty", "--overwrite")
        code, err = cli(capsys, *ablate_args(model, inside, out, "--overwrite"))
    assert code == 0, err
    assert any("--overwrite keeps" in line and "notes.txt" in line for line in err)
    after = tree(out)
    assert {k: after.get(k) for k in mine} == mine  # the user's files and the input, byte for byte
    assert not set(old_shards) - set(SHARDS) & set(after)  # the earlier run's own shards are gone
    assert shard_bytes(out) == shard_bytes(reference)
    assert sorted(json.loads((out / MANIFEST_FILE).read_text())["files"]) == sorted(
        [*SHARDS, *(p.name for p in model.iterdir() if p.name not in SHARDS), MODEL_CARD_FILE, MANIFEST_FILE]
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
        no_partial_shard(out, reference)
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

    def failing(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise error
        return write(*args, **kwargs)

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
        no_partial_shard(out, reference)
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


def _linked_model(model: Path, folder: Path, shard_target: Path) -> Path:
    """A copy of `model` whose first shard is a symbolic link to `shard_target` (holding its bytes)."""
    shutil.copytree(model, folder)
    shutil.copyfile(folder / SHARDS[0], shard_target)
    (folder / SHARDS[0]).unlink()
    (folder / SHARDS[0]).symlink_to(shard_target)
    return folder


def test_input_file_linked_into_the_output_is_refused(base, tmp_path, capsys):
    """O17: an input shard that is a link into --out (an earlier output): `ablate --overwrite` replaced
    the link's target, so the input then held ablated weights. Every file of the input is resolved
    before any write: exit 2, nothing written, input and output byte-identical."""
    model, directions, reference = base
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    linked = _linked_model(model, tmp_path / "linked", tmp_path / "keep")
    (linked / SHARDS[0]).unlink()
    (linked / SHARDS[0]).symlink_to(out / SHARDS[0])  # now the input's shard 1 is the output's file
    shutil.copyfile(model / SHARDS[0], out / SHARDS[0])  # holding the input's bytes, as a user might
    before = tree(out)
    with unchanged(model):
        assert_error(
            cli(capsys, *ablate_args(linked, directions, out, "--overwrite", "--force")),
            "ablate",
            f"input file {linked / SHARDS[0]} is a link to {out.resolve() / SHARDS[0]}",
            "would change the input",
        )
    assert tree(out) == before


def test_hub_snapshot_linking_into_the_output_or_an_output_in_the_cache_is_refused(
    base, tmp_path, capsys, monkeypatch
):
    """O18: the same through a Hugging Face cache snapshot whose file links outside the cache, into the
    output; and an output inside the cache itself (the downloaded inputs live there)."""
    import abliterate.paths as paths

    model, directions, _ = base
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("0" * 40)
    blobs = cache / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    for p in sorted(model.iterdir()):
        target = (out / p.name) if p.name == SHARDS[1] else (blobs / p.name)
        shutil.copyfile(p, target)
        (snapshot / p.name).symlink_to(os.path.relpath(target, snapshot))
    monkeypatch.setattr(paths.hub_constants, "HF_HUB_CACHE", str(cache))
    before = tree(out)
    with unchanged(cache):
        assert_error(
            cli(capsys, *ablate_args(snapshot, directions, out, "--overwrite", "--force")),
            "ablate",
            f"is a link to {out.resolve() / SHARDS[1]}",
        )
        assert_error(
            cli(capsys, *ablate_args(model, directions, cache / "ablated")),
            "ablate",
            "is inside the Hugging Face cache",
            "choose a directory outside it",
        )
    assert tree(out) == before and not (cache / "ablated").exists()


def test_overwrite_never_replaces_files_no_run_wrote(base, tmp_path, capsys):
    """O19: `--overwrite` into a folder holding the user's own config.json and another model's shard
    under the name this run writes (no abliterate record lists them) replaced both; now exit 2 naming
    them, every file kept."""
    model, directions, _ = base
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / SHARDS[0]).write_bytes(b"another model's shard")
    before = tree(out)
    with unchanged(model):
        assert_error(
            cli(capsys, *ablate_args(model, directions, out, "--overwrite")),
            "ablate",
            "config.json",
            SHARDS[0],
            "no abliterate run recorded as its own",
        )
    assert tree(out) == before


def test_records_folder_linked_elsewhere_and_link_loops_are_refused(base, tmp_path, capsys):
    """O20: the output's records folder (`.abliterate`) a link to another folder (the records would be
    written through it); a loop of symbolic links as --out or as MODEL: one line each, nothing written."""
    model, directions, _ = base
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_DIR).symlink_to(elsewhere)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with unchanged(model):
        assert_error(
            cli(capsys, *ablate_args(model, directions, out, "--overwrite")),
            "ablate",
            "is a symbolic link",
            "outside the output",
        )
        assert_error(cli(capsys, *ablate_args(model, directions, loop)), "ablate", str(loop))
        assert_error(cli(capsys, *ablate_args(loop, directions, tmp_path / "o2")), "ablate", str(loop))
        assert_error(cli(capsys, "inventory", loop), "inventory", str(loop))
    assert not list(elsewhere.iterdir()) and not (tmp_path / "o2").exists()
