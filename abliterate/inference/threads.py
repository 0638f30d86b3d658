"""CPU threads that fit the machine as it is: torch's intra- and inter-op threads, chosen from the cores
this process may use and how many of them other processes keep busy now.

Why: torch's default is one intra-op thread per core. Every OpenMP parallel region then waits at its
barrier for the slowest of its threads, and beside one busy process one of them has no core: on a
2-core machine the demo's stages ran 3x to 57x slower with torch's two threads than on the quiet
machine, while one thread slowed down gracefully (benchmarks/bench_busy.py measures it).

`auto` (`Runtime.threads`, `Runtime.interop_threads`, abliterate/config.py):
- the cores available: the CPUs of this process's affinity mask (its cpuset), at most the cgroup's CPU
  quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) where one is set;
- less the cores other processes keep busy now: the busy share of those CPUs in /proc/stat over
  `SAMPLE_S` seconds while this process sleeps (stolen time counts as busy); where /proc/stat does not
  exist, the 1-minute load average, scaled to the available CPUs;
- rounded down with `SLACK` of a core to spare, at least 1 (`auto_threads`, a pure function).
Inter-op threads (`auto`: as many as the intra-op threads) can be set once per process, before any
parallel work; where that is past, they stay as they are and the choice says so.

`apply_threads(runtime)` decides once per process and setting, and applies the choice in the calling thread
every time; an `auto` choice is made again, at most every `RECHECK_S` seconds, from what the CPUs did since
the last call less this process's own CPU time (no sleep: /proc/stat and the process's CPU clock), so load
that arrives after the start is seen: two runs started together on an idle machine each sampled the other
asleep, both took two threads, and an FP8 edit then ran 65 s instead of 0.5 s in each. Long stages call it
between layers (`streaming.each_layer`), tasks and worker threads at their start. The choice applies in the
calling thread: torch's setting made in one thread does not bound the MKL/OpenMP team of
another (a matmul in a Prefect task thread used two threads after `torch.set_num_threads(1)` in the
main thread), so each task and each worker thread calls it.

The OpenMP wait policy matters as much as the count: `OMP_WAIT_POLICY=PASSIVE` (idle threads sleep at
once instead of spinning) is set as a default, never over the user's, by `prefer_passive_wait`, which
`import abliterate` runs (abliterate/__init__.py): OpenMP reads it once, when torch loads it, and every
command, flow, task and benchmark imports abliterate before torch. `KMP_BLOCKTIME=0` is the same for
Intel's OpenMP. Measured beside one busy loop on 2 cores (load average 12 with other jobs): torch's two
threads selected the demo's direction in 18 s with OpenMP's default (spinning) policy, in 1.1 s with
the passive one; one thread, 0.9 s (`bench_busy.py --settings 1,default,default-passive`).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from abliterate.config import Runtime, environment

# How long the busy share of the CPUs is sampled: 5 ticks of a 100 Hz clock per CPU tell a busy core
# from an idle one, and cost little beside a stage (0.2 s cost a short ablation 8 %).
SAMPLE_S = 0.05
SLACK = 0.25  # of a core: free cores are rounded down unless within a quarter core of the next
RECHECK_S = 2.0  # an auto choice is made again from what the CPUs did since the last look, at most this often
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class ThreadChoice:
    """What `apply_threads` chose and why: recorded as MLflow params and said on the console."""

    setting: str  # where the intra-op count came from: auto, a number set, or OMP_NUM_THREADS
    intra: int  # torch's intra-op threads
    interop: int  # torch's inter-op threads (as they are: they can be set only once per process)
    cores: float  # cores available to this process (affinity, cgroup quota)
    busy: float | None  # cores other processes kept busy when it was decided (None: not measured)
    wait_policy: str  # OMP_WAIT_POLICY as the OpenMP runtime read it (`unset`: OpenMP's default)

    def params(self) -> dict[str, Any]:
        return {
            "threads.intra": self.intra,
            "threads.interop": self.interop,
            "threads.cores_available": round(self.cores, 2),
            "threads.cores_busy": None if self.busy is None else round(self.busy, 2),
            "threads.omp_wait_policy": self.wait_policy,
        }

    def describe(self) -> str:
        if self.setting == "auto":
            busy = "" if self.busy is None else f", {self.busy:.1f} busy with other processes"
            why = f"auto: {self.cores:g} cores available{busy}"
        else:
            why = "OMP_NUM_THREADS" if self.setting == "OMP_NUM_THREADS" else "--threads"
        plural = "s" if self.intra != 1 else ""
        return f"{self.intra} torch thread{plural} ({why}); {self.interop} inter-op"


# ------------------------------------------------------------------ the choice (pure)


def auto_threads(cores: float, busy: float) -> int:
    """Intra-op threads for `cores` available cores of which other processes keep `busy` busy: the
    free cores rounded down (within `SLACK` of a core counts as whole), at least 1, at most the
    whole available cores."""
    whole = max(1, math.floor(cores))
    free = cores - min(max(busy, 0.0), cores)
    return max(1, min(whole, math.floor(free + SLACK)))


def cgroup_cores(
    cpu_max: str | None = None, quota_us: str | None = None, period_us: str | None = None
) -> float | None:
    """Cores a cgroup's CPU quota allows: v2 `cpu.max` text (`max 100000` or `150000 100000`), or v1's
    `cpu.cfs_quota_us` (-1: none) and `cpu.cfs_period_us`; None without a quota."""
    if cpu_max is not None:
        parts = cpu_max.split()
        if len(parts) == 2 and parts[0] != "max":
            return int(parts[0]) / int(parts[1])
        return None
    if quota_us is not None and period_us is not None and int(quota_us) > 0:
        return int(quota_us) / int(period_us)
    return None


def busy_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> float:
    """Cores busy between two /proc/stat readings ({cpu: (busy ticks, total ticks)}): the sum over the
    CPUs of each one's busy share of the interval."""
    out = 0.0
    for cpu, (busy1, total1) in after.items():
        busy0, total0 = before.get(cpu, (busy1, total1))
        if total1 > total0:
            out += (busy1 - busy0) / (total1 - total0)
    return out


def cpu_ticks(text: str, cpus: set[int]) -> dict[int, tuple[int, int]]:
    """{cpu: (busy ticks, total ticks)} of `cpus` from /proc/stat text. Busy: all but idle and iowait
    (stolen time counts: the hypervisor gave the core to someone else); guest time is already in user."""
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        cpu = int(name[3:])
        if cpu not in cpus:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total = sum(values)
        out[cpu] = (total - values[3] - values[4], total)
    return out


def others_busy(before: Look, after: Look) -> float | None:
    """Cores other processes kept busy between two looks: the busy share of the CPUs less this process's
    own CPU time over the interval, at least 0; None where /proc/stat was not read or no time passed."""
    elapsed = after.at - before.at
    if before.ticks is None or after.ticks is None or elapsed <= 0:
        return None
    return max(0.0, busy_between(before.ticks, after.ticks) - (after.own - before.own) / elapsed)


# ------------------------------------------------------------------ this machine, now


@dataclass(frozen=True)
class Look:
    """What the CPUs and this process had done at one moment (`look`)."""

    at: float  # time.monotonic()
    ticks: dict[int, tuple[int, int]] | None  # /proc/stat of this process's CPUs (`cpu_ticks`)
    own: float  # this process's CPU seconds, every thread (time.process_time)


def look() -> Look:
    text = _read(PROC_STAT)
    return Look(time.monotonic(), None if text is None else cpu_ticks(text, affinity()), time.process_time())


def affinity() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def quota_cores() -> float | None:
    """The CPU quota of this process's cgroup (v2 or v1), where one is set."""
    own = _read(Path("/proc/self/cgroup")) or ""
    v2 = [line.split(":", 2)[2] for line in own.splitlines() if line.startswith("0::")]
    for folder in [CGROUP_ROOT / p.lstrip("/") for p in v2] + [CGROUP_ROOT]:
        text = _read(folder / "cpu.max")
        if text is not None:
            return cgroup_cores(cpu_max=text)
    for folder in (CGROUP_ROOT / "cpu", CGROUP_ROOT / "cpu,cpuacct"):
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return cgroup_cores(quota_us=quota, period_us=period)
    return None


def available_cores() -> float:
    """CPUs of this process's affinity, at most the cgroup's quota."""
    cpus = len(affinity())
    quota = quota_cores()
    return min(float(cpus), quota) if quota is not None else float(cpus)


def busy_cores(seconds: float = SAMPLE_S) -> float | None:
    """Cores of this process's CPUs that other processes keep busy now (this thread sleeps meanwhile);
    the 1-minute load average scaled to those CPUs where /proc/stat cannot be read; None where neither."""
    cpus = affinity()
    before = _read(PROC_STAT)
    if before is not None:
        time.sleep(seconds)
        after = _read(PROC_STAT) or before
        return busy_between(cpu_ticks(before, cpus), cpu_ticks(after, cpus))
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return min(load, len(cpus)) * len(cpus) / (os.cpu_count() or len(cpus))


# ------------------------------------------------------------------ applying it


def prefer_passive_wait() -> None:
    """OpenMP threads that sleep at once at a barrier instead of spinning (never over the user's own
    setting). Effective only before torch is first imported: OpenMP reads it when it loads."""
    if "torch" in sys.modules:  # too late: OpenMP has read its environment; leave it as it says
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")


_decided: dict[tuple[str, str], ThreadChoice] = {}
_looked: dict[tuple[str, str], Look] = {}  # when each auto choice was last made or checked
_last: list[tuple[str, str]] = []  # the setting decided or reused last in this process
_lock = threading.Lock()
_applied = threading.local()


def apply_threads(runtime: Runtime | None = None, share: int = 1) -> ThreadChoice:
    """Choose torch's threads for `runtime`'s setting once per process (an auto choice again when
    `RECHECK_S` have passed since it was last checked: `others_busy` since then), and apply the choice
    in the calling thread. `runtime` None: the setting this process chose last (a shard task's, after
    the command chose), else the default setting. `share`: this thread is one of that many working at
    once (the shard workers): each gets its part of the intra-op threads, at least 1."""
    import torch  # heavy; imported here so that `prefer_passive_wait` can run before it loads

    with _lock:
        if runtime is None and _last:
            key = _last[-1]
        else:
            runtime = runtime or Runtime()
            key = (runtime.threads, runtime.interop_threads)
        choice = _decided.get(key)
        if choice is None:
            choice = _decided[key] = _decide(runtime or Runtime(), torch)  # runtime is set: no choice yet
            _looked[key] = look()
        elif choice.setting == "auto" and time.monotonic() - _looked[key].at >= RECHECK_S:
            now = look()
            busy = others_busy(_looked[key], now)
            if busy is not None:
                choice = _decided[key] = replace(choice, intra=auto_threads(choice.cores, busy), busy=busy)
            _looked[key] = now
        _last[:] = [key]
    intra = max(1, choice.intra // max(1, share))
    if getattr(_applied, "intra", None) != intra:
        torch.set_num_threads(intra)
        _applied.intra = intra
    return choice


def omp_threads(text: str | None) -> int | None:
    """The first number of OMP_NUM_THREADS (`4`, or a nested list `4,2`); None where it names none."""
    first = (text or "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) >= 1 else None


def _decide(runtime: Runtime, torch: Any) -> ThreadChoice:
    env = environment()
    cores = available_cores()
    busy = None
    setting = runtime.threads
    if setting == "auto" and omp_threads(env.omp_num_threads) is not None:
        intra = omp_threads(env.omp_num_threads)
        setting = "OMP_NUM_THREADS"
    elif setting == "auto":
        busy = busy_cores()
        intra = auto_threads(cores, busy if busy is not None else 0.0)
    else:
        intra = int(setting)
    wanted = intra if runtime.interop_threads == "auto" else int(runtime.interop_threads)
    try:
        torch.set_num_interop_threads(wanted)
    except RuntimeError:  # parallel work has started, or it was set before: it stays as it is
        pass
    return ThreadChoice(
        setting, intra, torch.get_num_interop_threads(), cores, busy, env.omp_wait_policy or "unset"
    )
