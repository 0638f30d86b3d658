"""Reliability of a run as a process (catalogue R, X): SIGKILL, Ctrl-C, two runs at once, a fresh
tracking store opened twice, identical runs writing identical files.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_guard import unchanged
from fixtures import CLI, assert_error, cli

from abliterate.demo import DEMO_MODEL_DIR
from abliterate.vocabulary import MANIFEST_FILE

from .common import SHARDS, ablate_args, no_partial_shard, shard_bytes, start_paused, tree

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


@pytest.mark.slow
def test_two_runs_into_one_output_the_second_stops_at_once(base, tmp_path, capsys):
    """R5: while one run writes an output, a second run into the same directory exits 2 at once with one
    line; the first finishes undisturbed, bit-identical to the reference."""
    model, directions, reference = base
    out = tmp_path / "out"
    with unchanged(model):
        first = start_paused(tmp_path / "gate", ablate_args(model, directions, out, "--workers", "1"))
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
        run = start_paused(tmp_path / "gate", args)
        run.send_signal(signal.SIGINT)
        code = run.wait(timeout=300)  # a bound on a hang, generous for a busy machine
        err = run.stderr.read().decode().strip().splitlines()
        assert code == 130, err
        assert not any("Traceback" in line for line in err), err  # (the plan it printed first comes before)
        assert err[-1] == (
            "abliterate ablate: interrupted; files already finished are kept and nothing partial "
            "carries a final name: rerun the same command to continue"
        )
        no_partial_shard(out, reference)
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
            cwd=Path(__file__).resolve().parents[2],
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
                **tree(out),
                "report.json": (tmp_path / "report.json").read_bytes(),
                "evaluation.json": (tmp_path / "evaluation.json").read_bytes(),
                **{f"measured/{k}": v for k, v in tree(measured).items()},
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
