"""Reliability of the measure stage: directions files (catalogue D) and prompt files (catalogue Q)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_guard import unchanged
from fixtures import assert_error, cli

from abliterate.demo import DEMO_MODEL_DIR
from abliterate.measure.direction_file import save_directions
from abliterate.weights.checkpoint import build_inventory

from .common import POSITIONS, SHARDS, H, ablate_args, shard_bytes, with_means


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


def test_non_finite_means_are_refused_never_a_silent_fallback(base, tmp_path, capsys):
    """D15: a NaN in `harmless_mean` once made --projected fall back to the plain edit for that layer
    while the manifest said `projected`; every tensor of the file is now checked finite."""
    model, _, _ = base
    harmless = torch.randn(POSITIONS, H)
    harmless[1, 3] = float("nan")
    path = with_means(tmp_path, torch.randn(POSITIONS, H), harmless)
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
        path = with_means(tmp_path, torch.randn(POSITIONS, H), torch.randn(POSITIONS, H), harmful)
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


# Characters str.splitlines splits at that are no line end: inside a prompt they stay.
INNER = {
    "U+2028": "\u2028",
    "U+2029": "\u2029",
    "form feed": "\f",
    "vertical tab": "\x0b",
    "U+0085": "\x85",
    "file separator": "\x1c",
}


@pytest.mark.parametrize("name", sorted(INNER))
@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_prompt_files_split_at_line_ends_only(prompts, tmp_path, capsys, name, end):
    """Q11: a prompt holding U+2028, a form feed, a vertical tab (...) was split in two; only \\n, \\r\\n and
    \\r end a line (prompt files, JSONL files and marker files), and `measure` reads as many prompts as lines."""
    from abliterate.inference.refusal import read_markers
    from abliterate.measure.prompts import load_prompts

    _, good, _, _ = prompts
    c = INNER[name]
    lines = [f"Explain{c}how tides work.", f"Name{c}three rivers.", "Write a haiku."]
    path = tmp_path / "p.txt"
    path.write_bytes(end.join(lines).encode() + end.encode())
    assert [str(p) for p in load_prompts(path)] == lines
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(end.join(json.dumps({"prompt": line}, ensure_ascii=False) for line in lines), newline="")
    assert [str(p) for p in load_prompts(jsonl)] == lines
    markers = tmp_path / "markers.txt"
    markers.write_bytes(end.join(lines).encode())
    assert read_markers(markers) == lines
    code, err = cli(
        capsys, "measure", DEMO_MODEL_DIR, "--harmful", path, "--harmless", good, "--out", tmp_path / "m",
        "--direction-position", "none", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((tmp_path / "m" / "directions.json").read_text())
    assert record["n_harmful"] == 3, record


def test_marker_adds_to_the_built_in_list(tmp_path):
    """Q12: `--marker X`, documented as adding to the markers, replaced the built-in list (the refusing demo
    model then measured 1.00 -> 0.00 with nothing ablated). It adds to the built-in list or the --markers
    file, in that order, without duplicates; a blank one is refused."""
    from abliterate.config import Evaluation
    from abliterate.inference.refusal import marker_phrases
    from abliterate.vocabulary import DEFAULT_REFUSAL_MARKERS

    assert marker_phrases(Evaluation(marker=["zzz"])) == (*DEFAULT_REFUSAL_MARKERS, "zzz")
    assert marker_phrases(Evaluation(marker=[DEFAULT_REFUSAL_MARKERS[0]])) == tuple(DEFAULT_REFUSAL_MARKERS)
    file = tmp_path / "m.txt"
    file.write_text("# mine\nnope\n")
    assert marker_phrases(Evaluation(markers=str(file), marker=["zzz"])) == ("nope", "zzz")


def test_marker_keeps_the_refusals_of_the_demo_model(prompts, tmp_path, capsys):
    """Q12 through the CLI: the refusing demo model refuses as much with `--marker zzz` as without."""
    rates = []
    for extra in ([], ["--marker", "zzz"]):
        report = tmp_path / f"r{len(extra)}.json"
        code, err = cli(
            capsys, "evaluate", DEMO_MODEL_DIR, "--max-new-tokens", "8", "--quiet", "--out", report, *extra
        )
        assert code == 0, err
        rates.append(json.loads(report.read_text())["refusal_rate_harmful"])
    assert rates[0] == rates[1] and rates[0] > 0.5, rates


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--markers", "missing.txt"], ["marker file", "missing.txt", "does not exist"]),
        (["--marker", ""], ["--marker", "blank"]),
        (["--memory-budget", "9" * 400], ["memory budget", "beyond any machine"]),
    ],
)
def test_cheap_checks_run_before_the_model_loads(prompts, tmp_path, capsys, extra, fragments):
    """Q13: the settings that need no model (markers, the memory budget) fail before `measure` loads the
    model, not after the measurement (the markers were read by the selection, after it)."""
    _, good, _, _ = prompts
    with unchanged(DEMO_MODEL_DIR):
        result = cli(
            capsys, "measure", DEMO_MODEL_DIR, "--harmful", good, "--harmless", good, "--out", tmp_path / "m",
            *[str(tmp_path / e) if e == "missing.txt" else e for e in extra],
        )  # fmt: skip
    assert_error(result, "measure", *fragments)
    assert not any(line.startswith("model ") for line in result[1])  # the model was never loaded
    assert not (tmp_path / "m").exists()


def test_chat_takes_lines_that_are_not_utf8_and_a_missing_tokenizer_in_one_line(base, tmp_path, capsys):
    """Q15: `abliterate chat` given bytes that are not UTF-8 at its prompt (a TypeError traceback from the
    tokenizer, the chat over) and a checkpoint without tokenizer files (transformers' reason over seven
    lines): the line is refused and the chat goes on; the missing tokenizer is one line saying what to copy."""
    import subprocess
    import sys

    from fixtures import CLI

    chat = subprocess.run(
        [sys.executable, "-c", CLI, "chat", str(DEMO_MODEL_DIR), "--max-reply-tokens", "2"],
        input=b"\xff\xfe\x00bad\nhello\n",
        capture_output=True,
        timeout=300,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert chat.returncode == 0, chat.stderr.decode()[-2000:]
    assert b"Traceback" not in chat.stderr
    replies = chat.stdout.decode().split("you> ")
    assert "not valid UTF-8" in replies[1] and replies[2].strip(), replies  # then "hello" gets its reply
    model, _, _ = base
    line = assert_error(
        cli(capsys, "chat", model),
        "chat",
        f"cannot load a tokenizer from {model}",
        "copy the tokenizer files",
    )
    assert "\n" not in line
