"""Reliability of a run as a process (catalogue R, X): SIGKILL, Ctrl-C, two runs at once, a fresh
tracking store opened twice, identical runs writing identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
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


# ------------------------------------------------------------------ signals: Ctrl-C of a terminal, SIGKILL


def _processes_of(home: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment names ABLITERATE_HOME=home: the run,
    its temporary Prefect server, any worker."""
    marker = f"ABLITERATE_HOME={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(
                        (int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
                    )
        except OSError:
            continue
    return found


def _server_of(home: Path) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, cmd in _processes_of(home) if "uvicorn" in cmd]


def _start_run(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path, dict]:
    """`abliterate ARGS` in a fresh interpreter and a process group of its own (a terminal's foreground
    job), with a fresh project home and Prefect home; returns once its temporary server answers."""
    home = tmp_path / "home"
    env = {
        **os.environ,
        "ABLITERATE_HOME": str(home),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    run = subprocess.Popen(
        [sys.executable, "-c", CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 400
    while not _server_of(home) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _server_of(home), run.communicate(timeout=60)
    return run, home, env


def _gone(home: Path, within: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + within
    while (left := _processes_of(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "search"])
def test_ctrl_c_in_a_terminal_exits_130_leaves_no_server_and_the_rerun_finishes(base, tmp_path, command):
    """R8: Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the temporary Prefect
    server died first, the run waited 75 s for it and ended in a connection traceback, exit 1. Now the
    server runs in a session of its own and is stopped by the run: exit 130 within seconds, one line,
    no process of the run left; the same command then finishes."""
    out = tmp_path / "out"
    args = [command, str(DEMO_MODEL_DIR), "--out", str(out), "--quiet"]
    if command == "search":
        args += ["--trials", "2", "--max-prompts", "4", "--reply-tokens", "2"]
    run, home, env = _start_run(tmp_path, args)
    time.sleep(3)  # into the flow's first tasks
    os.killpg(run.pid, signal.SIGINT)
    began = time.monotonic()
    _, err = run.communicate(timeout=120)
    took = time.monotonic() - began
    lines = err.decode().strip().splitlines()
    assert run.returncode == 130, lines[-20:]
    assert took < 30, took
    assert not any("Traceback" in line for line in lines), lines[-20:]
    assert lines[-1].startswith(f"abliterate {command}: interrupted"), lines[-5:]
    assert not _gone(home, 15)
    rerun = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, env=env, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    assert (out / MANIFEST_FILE).is_file()
    assert not _gone(home, 15)


@pytest.mark.slow
def test_sigkilled_run_leaves_no_orphaned_server(tmp_path):
    """R9: a SIGKILLed run (the OOM killer, `kill -9`) left its temporary Prefect server running, orphaned.
    The server is tied to the run (PR_SET_PDEATHSIG): it ends within seconds of it."""
    run, home, _ = _start_run(
        tmp_path, ["run", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "out"), "--quiet"]
    )
    run.kill()
    run.wait(timeout=30)
    assert not _gone(home, 20)


def test_report_on_a_full_disk_leaves_no_empty_report(base, tmp_path, capsys, monkeypatch):
    """O21: `validate/evaluate --out` on a full disk left an empty report under its final name. Reports
    are written whole (a temporary file beside them, fsynced, renamed): exit 2 in one line, no file under
    the report's name, no temporary file; an earlier report stays as it was."""
    import errno

    import abliterate.paths as paths

    model, _, reference = base

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    report = tmp_path / "report.json"
    monkeypatch.setattr(paths.os, "fsync", full)
    assert_error(
        cli(capsys, "validate", model, reference, "--quiet", "--out", report),
        "validate",
        f"cannot write {report}",
        "No space left on device",
        "free space",
    )
    assert not report.exists() and not list(tmp_path.glob(".report.json.tmp-*"))
    earlier = '{"ok": true, "original": "M", "ablated": "A", "failures": []}\n'  # a report of an earlier run
    report.write_text(earlier)
    assert cli(capsys, "validate", model, reference, "--quiet", "--out", report)[0] == 2
    assert report.read_text() == earlier


@pytest.mark.slow
def test_measure_with_selection_twice_writes_identical_files(tmp_path, capsys):
    """X4: `measure` with the automatic selection twice: the directions files held the selection's probe
    and scoring seconds and differed on every run; the timings now go to the console (and MLflow)."""
    files = []
    for k in range(2):
        out = tmp_path / f"m{k}"
        code, err = cli(capsys, "measure", DEMO_MODEL_DIR, "--out", out)
        assert code == 0, err
        assert any(line.startswith("selection: ") and " s scoring" in line for line in err)
        files.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert files[0] == files[1]
    assert b"seconds" not in files[0]["directions.json"]


# ------------------------------------------------------------------ the tool's home: read-only, full


def _cli_in(tmp_path: Path, home: Path, args: list[str], timeout: float = 500) -> subprocess.CompletedProcess:
    """`abliterate ARGS` in a fresh interpreter with ABLITERATE_HOME=home, a fresh HOME and PREFECT_HOME."""
    env = {
        **os.environ,
        "ABLITERATE_HOME": str(home),
        "HOME": str(tmp_path / "user"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-c", CLI, *map(str, args)],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
    )


def _fill(disk: Path) -> None:
    """Write until the filesystem under `disk` is full."""
    with open(disk / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("state", ["read-only", "read-only with its stores", "full"])
@pytest.mark.parametrize("command", ["run", "search"])
def test_a_read_only_or_full_home_is_one_line_and_writes_nothing(tmp_path, mounts, command, state):
    """R10: ABLITERATE_HOME on a read-only filesystem (empty, or holding the stores of earlier runs) or on
    a full one: MLflow's SQLite store failed with a traceback (`sqlite3.OperationalError: database or
    disk is full`, wrapped twice). Now exit 2, one line naming the path or the store and what to do;
    no output written."""
    home = tmp_path / "home"
    mounts(home, "size=256k")
    if state == "read-only with its stores":
        (home / "mlruns").mkdir()
        (home / "results").mkdir()
    if state == "full":
        _fill(home)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)
    out = tmp_path / "out"
    args = [command, DEMO_MODEL_DIR, "--quiet"]
    args += (
        ["--out", out] if command == "run" else ["--trials", "2", "--max-prompts", "4", "--reply-tokens", "2"]
    )
    done = _cli_in(tmp_path, home, args)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, lines[-20:]
    assert not any("Traceback" in line for line in lines), lines[-30:]
    last = lines[-1]
    assert last.startswith(f"abliterate {command}: error: ") and str(home) in last, last
    fix = "free space" if state == "full" else "read-only"
    assert fix in last, last
    assert not (out / MANIFEST_FILE).exists()


@pytest.mark.parametrize("command", ["measure", "evaluate"])
def test_measure_and_evaluate_on_a_full_disk_leave_no_file_under_a_final_name(
    tmp_path, capsys, mounts, command
):
    """R11: `measure --out` and `evaluate --report` onto a full filesystem (a real one: a tmpfs filled up):
    one line naming the file and `free space`, exit 2; no directions file, no report, no temporary file."""
    disk = tmp_path / "disk"
    mounts(disk, "size=64k")
    _fill(disk)
    if command == "measure":
        args = ["measure", DEMO_MODEL_DIR, "--out", disk / "m", "--quiet", "--direction-position", "3"]
    else:
        args = [
            "evaluate",
            DEMO_MODEL_DIR,
            "--report",
            disk / "report.json",
            "--quiet",
            "--max-new-tokens",
            "2",
        ]
    assert_error(cli(capsys, *args), command, str(disk), "No space left on device", "free space")
    left = sorted(p.name for p in disk.rglob("*") if p.name != "filler")
    assert left in ([], ["m"]), left  # at most the empty folder measure creates first


def kill_server_mid_run(tmp_path: Path) -> tuple[subprocess.Popen, Path, bytes, float]:
    """`run` on the demo model with its temporary Prefect server SIGKILLed in the flow's first tasks:
    (the finished run, its home, its stderr, seconds from the kill to its end)."""
    run, home, _ = _start_run(
        tmp_path, ["run", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "out"), "--quiet"]
    )
    deadline = time.monotonic() + 400  # the flow runs once it has opened its MLflow store
    while not (home / "mlruns" / "mlflow.db").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # into the flow's first tasks
    for pid, _cmd in _server_of(home):
        os.kill(pid, signal.SIGKILL)
    began = time.monotonic()
    _, err = run.communicate(timeout=400)
    return run, home, err, time.monotonic() - began


@pytest.mark.slow
def test_prefect_server_killed_in_the_middle_of_a_run_is_one_line(tmp_path):
    """R12: the temporary Prefect server killed in the middle of a run (the OOM killer, a user's `kill`):
    a connection traceback (httpx.ConnectError), exit 1. Now exit 2, one line saying the server stopped
    answering and to rerun; no process of the run left."""
    run, home, err, _ = kill_server_mid_run(tmp_path)
    lines = err.decode().strip().splitlines()
    assert run.returncode == 2, lines[-20:]
    last = lines[-1]
    assert last.startswith("abliterate run: error: Prefect's temporary server stopped answering"), lines[-5:]
    assert "rerun the same command" in last
    assert not any("Error logging to API" in line for line in lines), lines[-20:]
    assert not any(line.startswith("Traceback") for line in lines), lines[-30:]
    assert not _gone(home, 15)
