"""Reliability through the Prefect flows (catalogue F): each failure is a Failed flow run with the
one-line message, nothing written, the input unchanged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from checkpoint_guard import unchanged
from fixtures import assert_error, console

from abliterate.demo import DEMO_MODEL_DIR
from abliterate.errors import AbliterateError
from abliterate.vocabulary import MANIFEST_FILE

from .common import (
    POSITIONS,
    SHARDS,
    H,
    ablate_args,
    edit_tensor_bytes,
    entry,
    first_tensor,
    rewrite_header,
    shard_bytes,
    start_paused,
    tree,
    truncate,
    with_means,
)


@pytest.mark.slow
def test_flow_fails_on_a_damaged_checkpoint_in_the_inventory_task(prefect_env, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from abliterate_flows.main import abliterate_flow

    model = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_DIR, model)
    truncate(model / SHARDS[1], (model / SHARDS[1]).stat().st_size - 64)
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
    rewrite_header(shard, entry(first_tensor(shard), "data_offsets", ["0", "8"]))
    with unchanged(damaged):
        state = abliterate_flow(model=str(damaged), out=str(out), **quick, return_state=True)
    assert state.is_failed() and "`data_offsets`" in state.message and "re-download" in state.message
    assert any(n.startswith("weight-inventory") for n in _task_names(state)) and not out.exists()


@pytest.mark.slow
def test_ablate_flow_keeps_what_is_not_its_own_locks_and_reproduces(prefect_env, base, tmp_path):
    """F7 (O11, R5, X1, D15 through the `ablate` flow, the per-shard subflow every run uses): --overwrite
    keeps the user's files and the directions file inside the output; a second run into an output being
    written fails at once; identical runs write identical files; a NaN harmless mean fails the run."""
    from abliterate.config import Ablation
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import configured_plan
    from abliterate_flows.ablate import ablate_flow

    model, directions, reference = base
    plan = configured_plan(load_inputs(model, directions), Ablation(), "auto")
    out = tmp_path / "out"
    with unchanged(model):
        assert ablate_flow(str(model), str(directions), str(out), plan)["counts"]
        first = tree(out)
        shutil.rmtree(out)
        ablate_flow(str(model), str(directions), str(out), plan)
        assert tree(out) == first  # every file, abliteration.json included
        (out / "notes.txt").write_text("mine")
        inside = out / "directions.safetensors"
        shutil.copyfile(directions, inside)
        other = configured_plan(load_inputs(model, inside), Ablation(layers="1"), "auto")
        ablate_flow(str(model), str(inside), str(out), other, overwrite=True)
        assert (out / "notes.txt").read_text() == "mine" and inside.read_bytes() == directions.read_bytes()

        busy = tmp_path / "busy"
        run = start_paused(tmp_path / "gate", ablate_args(model, directions, busy, "--workers", "1"))
        try:
            state = ablate_flow(str(model), str(directions), str(busy), plan, return_state=True)
            assert state.is_failed() and "is being written by another abliterate run" in state.message
        finally:
            (tmp_path / "gate").touch()
            assert run.wait(timeout=300) == 0
        assert shard_bytes(busy) == shard_bytes(reference)

        harmless = torch.randn(POSITIONS, H)
        harmless[2, 0] = float("nan")
        bad = with_means(tmp_path, torch.randn(POSITIONS, H), harmless)
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
        edit_tensor_bytes(out, victim, lambda w: w * 0.5)  # still orthogonal to the direction
        second = abliterate_flow(model=str(model), out=str(out), **settings, return_state=True)
    assert second.is_failed(), second.message
    assert (
        "validation of" in second.message
        and "differs from the edit recomputed from the input" in second.message
    )


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--search-seed", "-1"], ["--search-seed", "greater than or equal to 0"]),
        (["--study", "/../../x"], ["--study", "is no study name"]),
        (["--study", ".hidden"], ["--study", "is no study name"]),
        (["--memory-budget", "9" * 400], ["memory budget", "beyond any machine"]),
    ],
)
def test_search_settings_are_typed_at_the_boundary(tmp_path, capsys, extra, fragments):
    """S1: a negative seed reached Optuna's sampler (a traceback), a study name `/../../x` wrote its lock
    file outside the tool's home, a memory budget of 400 nines overflowed: each is one line naming the
    option, before any server starts."""
    result = console(capsys, "search", DEMO_MODEL_DIR, *extra)
    assert_error(result, "search", *fragments)
    assert not (tmp_path / "x.lock").exists()


@pytest.mark.parametrize("case", ["garbage", "directory", "dangling link", "locked name"])
def test_study_database_and_lock_errors_are_one_line(tmp_path, case):
    """S2: a garbage or directory search.db (SQLAlchemy's traceback), a lock name leading out of the
    tool's home: one line naming the database or the lock, nothing written outside `root`."""
    from abliterate.config import Search
    from abliterate.search.study import open_study, study_lock

    root = tmp_path / "mlruns"
    root.mkdir()
    db = root / "search.db"
    if case == "garbage":
        db.write_bytes(b"not a database at all, just bytes" * 10)
        fragments = [str(db), "is not an SQLite database", "move it away"]
    elif case == "directory":
        db.mkdir()
        fragments = [str(db), "is a directory", "move it away"]
    elif case == "dangling link":
        db.symlink_to(tmp_path / "gone.db")
        fragments = [str(db), "dangling symbolic link"]
    if case == "locked name":
        with pytest.raises(AbliterateError, match="not a plain file name"), study_lock(root, "/../../x"):
            pass
        assert not (tmp_path / "x.lock").exists() and not list(tmp_path.parent.glob("x.lock"))
        return
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(AbliterateError) as caught:
        open_study(root, "s", Search())
    assert all(f in str(caught.value) for f in fragments), str(caught.value)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# A process that holds the study database's write lock (a `sqlite3` shell inside a transaction), says
# "locked" once it does, and keeps it until killed.
HOLD_DATABASE = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(600)
"""


def _hold_database(db) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_DATABASE, str(db)], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"locked"
    return holder


def test_locked_study_database_and_study_fail_within_seconds_naming_the_holder(tmp_path):
    """S4: a study database another process keeps locked: the search waited 60 s, then one line that said
    nothing of who. Now it waits `STUDY_BUSY_TIMEOUT_S` (2 s), and the line names the database and the
    process that holds it; a second search of the same study names the search that runs it."""
    from abliterate.config import Search
    from abliterate.search.study import STUDY_BUSY_TIMEOUT_S, open_study, study_lock

    root = tmp_path / "mlruns"
    open_study(root, "first", Search())  # the database exists, as after an earlier search
    holder = _hold_database(root / "search.db")
    try:
        began = time.monotonic()
        with pytest.raises(AbliterateError) as caught:
            open_study(root, "second", Search())
        took = time.monotonic() - began
    finally:
        holder.kill()
        holder.wait()
    message = str(caught.value)
    assert took < STUDY_BUSY_TIMEOUT_S + 10, took
    assert "\n" not in message
    for fragment in (str(root / "search.db"), "database is locked", f"process {holder.pid} (", "rerun"):
        assert fragment in message, message

    # the same study run by another process: its pid and command line in the message, at once
    runner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from abliterate.search.study import study_lock\n"
            "with study_lock(sys.argv[1], 'busy'):\n    print('running', flush=True); time.sleep(600)",
            str(root),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert runner.stdout.readline().strip() == b"running"
        with pytest.raises(AbliterateError) as caught, study_lock(root, "busy"):
            pass
    finally:
        runner.kill()
        runner.wait()
    assert f"another search is running study busy (process {runner.pid} (" in str(caught.value)


def test_a_database_locked_in_the_middle_of_a_search_is_one_line(tmp_path):
    """S5: an error of the study database while the trials are asked for and told (Optuna's
    StorageInternalError around SQLAlchemy's around sqlite3's, a traceback): the database locked by
    another process after the first trial. One line naming the database, the reason and the holder,
    within seconds; the finished trial is kept and a rerun completes the study."""
    import optuna

    from abliterate.config import Evaluation, Measurement, Runtime, Search, Selection, Template
    from abliterate.demo import prompt_file
    from abliterate.measure.directions import compute_directions, write_directions
    from abliterate.measure.means import measure_checkpoint
    from abliterate.measure.prompts import load_prompts
    from abliterate.search.study import run_study
    from abliterate.weights.checkpoint import build_inventory

    harmful = load_prompts(prompt_file("demo", "harmful", "train"))[:16]
    harmless = load_prompts(prompt_file("demo", "harmless", "train"))[:16]
    runtime = Runtime(device="cpu", dtype="float32", batch_size=16)
    measured = measure_checkpoint(
        str(DEMO_MODEL_DIR), harmful, harmless, Measurement(), Template(), runtime, False
    )
    directions = write_directions(
        tmp_path / "directions",
        compute_directions(measured, "projected"),
        measured,
        build_inventory(DEMO_MODEL_DIR).fingerprint,
        3,
    )
    root = tmp_path / "mlruns"
    settings = Search(trials=3, study="locked", reply_tokens=2, max_prompts=4, startup_trials=2)
    sections = (Selection(), Template(), Evaluation(), Runtime(batch_size=8), root)
    holders = []

    def lock_after_the_first(result):
        if not holders:
            holders.append(_hold_database(root / "search.db"))

    try:
        began = time.monotonic()
        with pytest.raises(AbliterateError) as caught:
            run_study(
                DEMO_MODEL_DIR,
                directions,
                harmful[:8],
                harmless[:8],
                settings,
                *sections,
                on_trial=lock_after_the_first,
            )
        took = time.monotonic() - began
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in (
        str(root / "search.db"),
        "database is locked",
        f"process {holders[0].pid} (",
        "finished trials are kept",
    ):
        assert fragment in message, message
    assert took < 120, took  # Optuna tries a new trial 5 times: 5 x (2 s + up to 2 s), not 5 x 60 s
    storage = f"sqlite:///{root / 'search.db'}"
    kept = optuna.load_study(study_name="locked", storage=storage).get_trials()
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in kept) == 1
    again = run_study(DEMO_MODEL_DIR, directions, harmful[:8], harmless[:8], settings, *sections)
    assert len(again["trials"]) == 3 and again["resumed_from"] == 1
