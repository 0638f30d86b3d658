"""torch's CPU threads (abliterate/inference/threads.py): the `auto` choice from core counts, loads and
cgroup quotas (pure functions), reading this machine, applying the choice, and the setting through the
CLI. No timings here: benchmarks/bench_busy.py measures what the choice buys."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import ROOT, assert_error, cli
from hypothesis import given
from hypothesis import strategies as st

from abliterate.config import Runtime
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.errors import AbliterateError
from abliterate.inference.threads import (
    SLACK,
    Look,
    ThreadChoice,
    affinity,
    apply_threads,
    auto_threads,
    available_cores,
    busy_between,
    busy_cores,
    cgroup_cores,
    cpu_ticks,
    omp_threads,
    others_busy,
)

cores = st.floats(min_value=0.1, max_value=512, allow_nan=False)
loads = st.floats(min_value=0, max_value=1024, allow_nan=False)


# ------------------------------------------------------------------ the choice


@pytest.mark.parametrize(
    ("cores", "busy", "threads"),
    [
        (2, 0.0, 2),  # quiet: every core
        (2, 0.2, 2),  # a little background work: within the slack
        (2, 0.3, 1),  # more than the slack: no second thread beside it
        (2, 1.0, 1),  # one busy loop: the measured case (two threads 3x-57x slower, one graceful)
        (2, 2.0, 1),  # two: still one thread, never zero
        (2, 7.0, 1),  # a load beyond the cores
        (16, 3.0, 13),
        (16, 3.3, 12),
        (4, 0.25, 4),  # exactly the slack
        (1.5, 0.0, 1),  # a quota of one and a half cores: one whole thread
        (0.5, 0.0, 1),  # half a core: still one
        (64, 0.0, 64),
    ],
)
def test_auto_threads_examples(cores, busy, threads):
    assert auto_threads(cores, busy) == threads


@given(cores, loads)
def test_auto_threads_between_one_and_the_whole_cores(cores, busy):
    threads = auto_threads(cores, busy)
    assert 1 <= threads <= max(1, math.floor(cores))
    # the free cores, rounded down within the slack: never more threads than cores nobody else uses
    assert threads == 1 or threads <= cores - busy + SLACK


@given(cores, loads, loads)
def test_auto_threads_never_more_on_a_busier_machine(cores, busy, more):
    low, high = sorted((busy, more))
    assert auto_threads(cores, high) <= auto_threads(cores, low)


@given(st.integers(min_value=1, max_value=512))
def test_auto_threads_on_a_quiet_machine_takes_every_core(n):
    assert auto_threads(float(n), 0.0) == n


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"cpu_max": "max 100000\n"}, None),  # v2, no quota
        ({"cpu_max": "150000 100000\n"}, 1.5),
        ({"cpu_max": "200000 100000"}, 2.0),
        ({"quota_us": "-1\n", "period_us": "100000\n"}, None),  # v1, no quota
        ({"quota_us": "50000", "period_us": "100000"}, 0.5),
        ({"quota_us": "400000", "period_us": "100000"}, 4.0),
        ({}, None),
    ],
)
def test_cgroup_quota_in_cores(kwargs, expected):
    assert cgroup_cores(**kwargs) == expected


@given(st.integers(1, 64), st.integers(1, 1000))
def test_a_quota_bounds_the_threads(quota_cores, period_ms):
    """A quota of Q cores on a bigger machine gives at most Q threads, whatever the period."""
    quota = cgroup_cores(cpu_max=f"{quota_cores * period_ms * 1000} {period_ms * 1000}")
    assert quota == quota_cores
    assert auto_threads(min(512.0, quota), 0.0) == quota_cores


STAT_BEFORE = """cpu  300 0 100 500 10 0 0 0 0 0
cpu0 100 0 0 100 0 0 0 0 0 0
cpu1 100 0 50 200 10 0 0 0 0 0
cpu2 100 0 50 200 0 0 0 0 0 0
intr 12345
"""
# over the interval: cpu0 100 ticks all busy (user), cpu1 idle 80 + iowait 20 (not busy), cpu2 50 user
# + 50 stolen (busy: the hypervisor gave the core to someone else)
STAT_AFTER = """cpu  500 0 100 580 30 0 0 50 0 0
cpu0 200 0 0 100 0 0 0 0 0 0
cpu1 100 0 50 280 30 0 0 0 0 0
cpu2 150 0 50 200 0 0 0 50 0 0
intr 12399
"""


def test_busy_cores_from_proc_stat():
    every = {0, 1, 2}
    assert busy_between(cpu_ticks(STAT_BEFORE, every), cpu_ticks(STAT_AFTER, every)) == 2.0
    assert busy_between(cpu_ticks(STAT_BEFORE, {1}), cpu_ticks(STAT_AFTER, {1})) == 0.0  # only our CPUs count
    assert cpu_ticks(STAT_BEFORE, {0}) == {0: (100, 200)}
    assert busy_between({}, {}) == 0.0


def test_others_busy_leaves_out_this_process():
    """Between two looks 2 cores were busy (STAT_BEFORE -> STAT_AFTER); this process used 1.5 CPU s of
    them in 1 s: others kept 0.5 busy. Never below 0; nothing known without /proc/stat or elapsed time."""
    every = {0, 1, 2}
    before = Look(10.0, cpu_ticks(STAT_BEFORE, every), 3.0)
    after = Look(11.0, cpu_ticks(STAT_AFTER, every), 4.5)
    assert others_busy(before, after) == pytest.approx(0.5, abs=1e-12)
    assert others_busy(before, Look(11.0, after.ticks, 6.0)) == 0.0  # more than the CPUs counted: clamped
    assert others_busy(before, Look(11.0, None, 4.5)) is None
    assert others_busy(before, Look(10.0, after.ticks, 4.5)) is None


RECHECK = (
    "import json, subprocess, sys, time\n"
    "from abliterate.config import Runtime\n"
    "from abliterate.inference import threads\n"
    "threads.RECHECK_S = 0.5\n"
    "first = threads.apply_threads(Runtime())\n"
    "loop = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
    "try:\n"
    "    time.sleep(1.5)\n"
    "    second = threads.apply_threads()\n"
    "finally:\n"
    "    loop.kill()\n"
    "import torch\n"
    "print(json.dumps({'first': first.params(), 'second': second.params(), 'torch': torch.get_num_threads()}))\n"
)


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads /proc/stat")
def test_auto_sees_load_that_arrives_after_the_choice():
    """A busy loop started after a process chose its threads is counted at the next call past RECHECK_S
    (from the CPUs' ticks since, less the process's own time, with no sleep of its own), and the
    choice follows it in the calling thread."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")
    }
    done = subprocess.run(
        [sys.executable, "-c", RECHECK], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    second = seen["second"]
    assert second["threads.cores_busy"] >= 0.75  # the loop's core (and whatever else ran) counted
    cores = second["threads.cores_available"]
    assert second["threads.intra"] == auto_threads(cores, second["threads.cores_busy"]) == seen["torch"]
    assert second["threads.intra"] <= max(1, math.floor(cores - 0.75 + SLACK))


@pytest.mark.parametrize(
    ("text", "n"), [("4", 4), ("4,2", 4), (" 3 ", 3), ("", None), ("0", None), ("x", None)]
)
def test_omp_num_threads_read_as_openmp_does(text, n):
    assert omp_threads(text) == n


def test_this_machine():
    cpus = affinity()
    assert 1 <= len(cpus) <= (os.cpu_count() or 1)
    assert 0 < available_cores() <= len(cpus)
    busy = busy_cores(0.05)
    assert busy is not None and 0.0 <= busy <= len(cpus)  # each CPU's busy share is at most its ticks


# ------------------------------------------------------------------ the setting


@pytest.mark.parametrize(
    ("value", "held"), [("auto", "auto"), ("AUTO", "auto"), (1, "1"), ("8", "8"), (" 3 ", "3")]
)
def test_thread_settings(value, held):
    assert Runtime(threads=value).threads == held
    assert Runtime(interop_threads=value).interop_threads == held


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5", True, ""])
def test_bad_thread_settings_are_one_line_errors(value):
    with pytest.raises(AbliterateError, match=r"--threads \(runtime.threads\): use auto or a number") as info:
        Runtime(threads=value)
    assert "\n" not in str(info.value)
    with pytest.raises(AbliterateError, match="--interop-threads"):
        Runtime(interop_threads=value)


# ------------------------------------------------------------------ applying it


@pytest.fixture
def one_thread_after():
    """The test session runs on one torch thread (conftest.py's OMP_NUM_THREADS=1, which `auto` takes):
    make the default setting this process's latest choice again."""
    yield
    apply_threads(Runtime())


def test_apply_a_number(one_thread_after):
    choice = apply_threads(Runtime(threads="2"))
    assert (choice.setting, choice.intra, torch.get_num_threads()) == ("2", 2, 2)
    assert choice.busy is None  # a number is taken as is: nothing measured
    assert apply_threads(share=2).intra == 2 and torch.get_num_threads() == 1  # a shard worker's part
    assert apply_threads(Runtime(threads="2")) is choice  # decided once per process and setting
    assert choice.params()["threads.intra"] == 2
    assert choice.describe().startswith("2 torch threads (--threads); ")


def test_auto_takes_omp_num_threads(one_thread_after):
    """conftest.py sets OMP_NUM_THREADS=1 (unless the environment had its own): auto takes it as is."""
    choice = apply_threads(Runtime())
    assert choice.setting == "OMP_NUM_THREADS"
    assert choice.intra == omp_threads(os.environ["OMP_NUM_THREADS"]) == torch.get_num_threads()


CHOOSE = (
    "import json, sys\n"
    "if sys.argv[1] == 'torch-first':\n"
    "    import torch\n"
    "from abliterate.config import Runtime\n"
    "from abliterate.inference.threads import apply_threads\n"
    "import torch\n"
    "c = apply_threads(Runtime())\n"
    "print(json.dumps({**c.params(), 'torch': torch.get_num_threads(), 'interop': torch.get_num_interop_threads()}))\n"
)


def choose_in_fresh_process(order: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")
    }
    done = subprocess.run(
        [sys.executable, "-c", CHOOSE, order], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_auto_in_a_fresh_process_measures_the_machine():
    """As a command starts: the load measured, inter-op threads set before any parallel work, and
    OMP_WAIT_POLICY=PASSIVE in place before torch loaded (abliterate's import sets it)."""
    chosen = choose_in_fresh_process("abliterate-first")
    assert 1 <= chosen["threads.intra"] == chosen["torch"] <= chosen["threads.cores_available"]
    assert chosen["threads.interop"] == chosen["interop"] == chosen["threads.intra"]
    assert chosen["threads.cores_busy"] is not None
    assert chosen["threads.omp_wait_policy"] == "PASSIVE"


def test_wait_policy_left_alone_once_torch_is_loaded():
    """Set after OpenMP has read its environment it would do nothing: it is not set, and the record says so."""
    assert choose_in_fresh_process("torch-first")["threads.omp_wait_policy"] == "unset"


def test_thread_choice_text():
    choice = ThreadChoice("auto", 1, 1, 2.0, 1.04, "PASSIVE")
    assert (
        choice.describe()
        == "1 torch thread (auto: 2 cores available, 1.0 busy with other processes); 1 inter-op"
    )
    assert choice.params() == {
        "threads.intra": 1,
        "threads.interop": 1,
        "threads.cores_available": 2.0,
        "threads.cores_busy": 1.04,
        "threads.omp_wait_policy": "PASSIVE",
    }


# ------------------------------------------------------------------ through the CLI


def test_threads_through_the_cli(tmp_path, capsys, one_thread_after):
    code, err = cli(
        capsys, "measure", DEMO_MODEL_DIR, "--out", tmp_path / "m", "--direction-position", "none",
        "--threads", "2", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--threads", "0"), ("--threads", "some"), ("--interop-threads", "x"), ("--threads", "100000")],
)
def test_bad_threads_on_the_cli_are_one_line_errors(tmp_path, capsys, flag, value):
    out = tmp_path / "m"
    result = cli(capsys, "measure", DEMO_MODEL_DIR, "--out", out, flag, value)
    assert_error(result, "measure", flag, "use auto or a number of threads from 1 to 1024", repr(value))
    assert not out.exists()
