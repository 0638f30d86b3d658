"""The console as people read it: figures with significant digits and labelled before/after, help
texts wrapped at spaces and naming every default, one meaning per option name, cheap checks before any
Prefect server starts, `--quiet` quiet and no blank lines on a terminal (a pseudo-terminal shows what a
user sees), and `evaluate` finding the prompt sets `run` uses."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from fixtures import CLI, ROOT, assert_error, cli
from test_chat import Terminal

from abliterate.cli import build_parser, main
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.figures import evaluation_lines, figure

COMMANDS = [a for a in build_parser()._subparsers._group_actions if a.dest == "command"][0].choices


# ------------------------------------------------------------------ figures


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (4.3e-07, "4.3e-07"),
        (11.085, "11.1"),
        (-17.376, "-17.4"),
        (0.0, "0"),
        (1.0, "1"),
        (1 / 189, "0.00529"),
    ],
)
def test_figures_keep_significant_digits(value, shown):
    assert figure(value) == shown
    assert figure(None) == "n/a" and figure(189) == "189"


def test_every_evaluation_figure_is_labelled_before_and_after():
    lines = evaluation_lines(
        {
            "refusal_rate_harmful": 0.0,
            "baseline_refusal_rate_harmful": 1.0,
            "refusal_score_harmful": -17.376,
            "baseline_refusal_score_harmful": 11.085,
            "kl_harmless": 4.3e-07,
        }
    )
    assert lines == [
        "refusal rate on harmful prompts (full replies): 1 before, 0 after",
        "first-token refusal score (log-odds) on harmful prompts: 11.1 before, -17.4 after",
        "first-token KL(before || after) on harmless prompts: 4.3e-07 nats",
    ]
    assert evaluation_lines({"refusal_score_harmful": -2.0}) == [
        "first-token refusal score (log-odds) on harmful prompts: -2"  # no baseline: the model alone
    ]


# ------------------------------------------------------------------ help texts


def help_text(command: str, columns: int, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[command]
    return sub.format_help()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_breaks_lines_at_spaces_only(command, monkeypatch):
    """At any terminal width every word of --help is a word of the unwrapped text (never `a ttn_out`)."""
    words = set(help_text(command, 100_000, monkeypatch).split())
    for columns in (30, 47, 64, 80, 113):
        broken = set(help_text(command, columns, monkeypatch).split()) - words
        assert not broken, (columns, sorted(broken)[:5])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_names_every_default(command):
    """Every option that takes a value says its default (or is required)."""
    for action in COMMANDS[command]._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.required:
            continue
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
            continue  # a plain switch: off unless given
        assert "default" in action.help.lower(), (command, action.option_strings, action.help)


def test_out_is_a_folder_in_every_command_and_reports_are_report(tmp_path, capsys):
    for name, parser in COMMANDS.items():
        for action in parser._actions:
            if "--out" in action.option_strings and action.help != argparse.SUPPRESS:
                assert action.metavar in (None, "DIR"), name
                assert any(w in action.help for w in ("director", "folder", "checkpoint")), (
                    name,
                    action.help,
                )
    for name in ("validate", "evaluate"):
        dests = {s: a.dest for a in COMMANDS[name]._actions for s in a.option_strings}
        assert dests["--report"] == dests["--out"] == "report"  # the old spelling, hidden, still works
        assert "--out" not in COMMANDS[name].format_help()
    args = build_parser().parse_args(["validate", "A", "B", "--out", str(tmp_path / "r.json")])
    assert args.report == str(tmp_path / "r.json")
    assert "--out is deprecated, use --report" in capsys.readouterr().err


def test_evaluate_takes_the_test_sets_run_takes():
    """`evaluate` names the test prompt files as `run` does (--harmful-test, --harmless-test,
    --prompt-set) and demands none; the old --harmful/--harmless still work, with a note."""
    run_flags = {s for a in COMMANDS["run"]._actions for s in a.option_strings}
    for flag in ("--harmful-test", "--harmless-test", "--prompt-set"):
        assert flag in run_flags
        (action,) = [a for a in COMMANDS["evaluate"]._actions if flag in a.option_strings]
        assert not action.required
    args = build_parser().parse_args(["evaluate", "M", "--harmful", "h.txt"])
    assert args.harmful_test == "h.txt"


# ------------------------------------------------------------------ cheap checks first


def run_without_server(*args: str) -> subprocess.CompletedProcess:
    """`abliterate ARGS` in a fresh interpreter that then reports whether Prefect was ever imported."""
    code = CLI.replace(
        "sys.exit(main(sys.argv[1:]))",
        "rc = main(sys.argv[1:]); print('prefect' in sys.modules); sys.exit(rc)",
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--layers", "0-9"], "layer"),
        (["--markers", "no-such-markers.txt"], "no-such-markers.txt"),
        (["--harmful", "no-such-prompts.txt"], "no-such-prompts.txt"),
        (["--direction-position", "9"], "direction position 9"),
    ],
)
def test_bad_arguments_fail_before_a_prefect_server_starts(tmp_path, extra, fragment):
    done = run_without_server("run", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "out"), *extra)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and fragment in errors[0], done.stderr
    assert "Prefect server" not in done.stderr and done.stdout.strip() == "False"
    assert not (tmp_path / "out").exists()


def test_a_missing_model_or_an_output_inside_it_fail_first(tmp_path, capsys):
    assert_error(
        cli(capsys, "run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")), "run", "nowhere"
    )
    inside = DEMO_MODEL_DIR / "out"
    assert_error(cli(capsys, "run", str(DEMO_MODEL_DIR), "--out", str(inside)), "run", "inside")
    assert not inside.exists()


# ------------------------------------------------------------------ on a terminal


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    m = root / "m"
    assert (
        main(["measure", str(DEMO_MODEL_DIR), "--out", str(m), "--direction-position", "3", "--quiet"]) == 0
    )
    out = root / "out"
    assert (
        main(
            [
                "ablate",
                str(DEMO_MODEL_DIR),
                "--directions",
                str(m / "directions.safetensors"),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    return out


@pytest.mark.slow
def test_evaluate_quiet_on_a_terminal_finds_runs_prompt_sets(ablated, tmp_path):
    """No prompt files: the demo output is evaluated on the demo set's test split, as `run` does; with
    --quiet the terminal shows no bar (no carriage return, no blank line), only the figures."""
    report = tmp_path / "r.json"
    term = Terminal(
        "evaluate",
        str(ablated),
        "--baseline",
        str(DEMO_MODEL_DIR),
        "--quiet",
        "--max-new-tokens",
        "3",
        "--examples",
        "0",
        "--report",
        str(report),
        "--device",
        "cpu",
    )
    shown = term.read_until("nats")
    assert term.close() == 0
    assert "\r" not in shown and "\n\n" not in shown, shown
    data = json.loads(report.read_text())
    test_sets = ROOT / "abliterate" / "data" / "demo"
    assert data["n_harmful"] == len((test_sets / "harmful_test.txt").read_text().splitlines())
    assert data["n_harmless"] == len((test_sets / "harmless_test.txt").read_text().splitlines())
    assert " before, " in shown and " after" in shown and "KL(before || after)" in shown


@pytest.mark.slow
def test_run_on_a_terminal_shows_one_line_per_stage(tmp_path):
    """A flow run in a pseudo-terminal: the stage lines follow each other, no blank line between."""
    env = {"ABLITERATE_HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["run", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "out"), "--layers", "0-3", "--no-evaluate"]
    term = Terminal(*args, "--device", "cpu", env=env)
    shown = term.read_until("wall time", timeout=900)
    assert term.close(timeout=120) == 0
    stages = shown.split("\n  inventory", 1)[1].split("\nabliterated model", 1)[0]
    assert "\n\n" not in stages.rstrip("\n") and "\r" not in stages, repr(stages)
    assert "validation" in stages
