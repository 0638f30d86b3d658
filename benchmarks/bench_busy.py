"""The demo's stages and a short search beside busy processes: torch threads `auto` against torch's default.

    .venv/bin/python benchmarks/bench_busy.py [--trials 4] [--prompts 48] [--tokens 16] [--busy 0,1,2]
                                              [--settings auto,default] [--cap 60] [--json FILE]

For each condition (the machine as it is, then beside one and two busy loops: `python -c "while True:
pass"` processes, each in a session of its own, started before and killed after it), each thread
setting runs in a fresh process:
- `auto`: what every command does (abliterate.inference.threads: OMP_WAIT_POLICY=PASSIVE set when
  abliterate is imported, before torch, then `apply_threads` with the default Runtime section);
- `default`: torch's own choice (one intra-op thread per core, OpenMP's default wait policy: spin);
- for the record, also `N` (`--threads N`, with the passive wait policy) and `default-passive`
  (torch's thread count, passive wait policy) separate the two causes.
The stages, through the pipeline and domain functions (no Prefect, no MLflow, so the figures are the
stages' own), on at most `--prompts` prompts of each of the demo's sets: measurement (its measurement
split of the train prompts) and direction selection (a third as many validation prompts, every
candidate scored), ablation through the shard engine, evaluation on the test prompts (first-token
figures and `--tokens`-token greedy replies against the original), and a fresh search study of
`--trials` trials on the validation prompts. Model loading counts in each stage's time; the imports
are made before the first clock starts. A run of a setting other than auto still going after `--cap`
seconds is stopped: its unfinished stages print as `>CAP` (torch's default beside busy loops; so the
whole benchmark stays within about five minutes on a quiet machine).

Prints one line per stage: seconds quiet / busy1 / busy2 with each setting, the slowdown ratios
(busy / quiet, same setting), and whether every stage of `auto` stays within 2.5x beside one busy loop
(issue 24's "done when"). "Quiet" is the machine as found: the load average is printed with it.

Figures seen (2026-12-05 12:20, the same CPU quiet, load average 0.9: auto chose 2 threads quiet, 1
beside the loops; seconds quiet / busy1 / busy2):
    measurement  auto 0.27 0.22 0.34 (0.83x 1.27x)   default  0.21  3.51  1.53
    selection    auto 0.30 0.19 0.28 (0.63x 0.92x)   default  0.20  6.38  1.23
    ablation     auto 0.05 0.05 0.09 (1.08x 1.86x)   default  0.10  0.10  0.22
    evaluation   auto 1.60 1.18 1.66 (0.74x 1.04x)   default  1.12 27.29 10.54
    search       auto 1.29 1.04 1.70 (0.81x 1.32x)   default  1.02  2.80  2.92
    auto: every stage within 2.5x of quiet beside one busy loop: yes (112 s in all)
(two threads with the passive wait policy are slower than one on the demo's small matrices.)

Figures seen (2026-12-05, this 2-core CPU with other jobs at load average 8-11, so auto chose one
thread in every condition; seconds quiet / busy1 / busy2):
    measurement  auto 0.53 0.66 0.57 (1.26x 1.09x)   default  2.40  4.25 10.69
    selection    auto 0.51 0.59 0.58 (1.15x 1.13x)   default  6.12 15.12 16.47
    ablation     auto 0.13 0.17 0.07 (1.34x 0.52x)   default  0.30  0.39  0.34
    evaluation   auto 3.27 5.05 3.50 (1.55x 1.07x)   default 34.58   >60   >60
    search       auto 2.60 3.96 3.74 (1.52x 1.44x)   default   >60   >60   >60
    auto: every stage within 2.5x of quiet beside one busy loop: yes (260 s in all)
The same run with the loops in the benchmark's own session (before they got sessions of their own):
auto 1.27x-2.64x beside one loop (selection 2.59x, search 2.64x), 1.98x-5.28x beside two: with
autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled) a session's processes share one
session's part of the CPU, so a loop there halves what the stages get, whatever their threads.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("measurement", "selection", "ablation", "evaluation", "search")
LIMIT = 2.5  # issue 24: no stage more than 2.5x slower beside one busy loop


def child(setting: str, trials: int, prompts: int, tokens: int) -> None:
    """Run the stages in this process with `setting`; print the threads, then each stage's seconds as
    it ends (one JSON line each, so that a run cut short still tells what it finished).

    `setting`: auto | default | N (apply_threads with N threads) | default-passive (torch's threads,
    OMP_WAIT_POLICY=PASSIVE)."""
    if setting == "default":  # torch before abliterate, whose import sets OMP_WAIT_POLICY=PASSIVE
        import torch
    importlib.import_module("abliterate")  # as in every command: OMP_WAIT_POLICY=PASSIVE before torch loads
    import torch
    import transformers.models.glm4_moe.modeling_glm4_moe  # noqa: F401 - imported before any clock starts

    from abliterate.check.evaluate import evaluate_model
    from abliterate.config import Evaluation, Measurement, Runtime, Search, Selection, Template
    from abliterate.demo import DEMO_MODEL_DIR, prompt_file
    from abliterate.edit.ablate import ablate_checkpoint
    from abliterate.inference.devices import resolve_runtime
    from abliterate.inference.threads import apply_threads
    from abliterate.measure.directions import write_directions
    from abliterate.measure.prompts import load_prompts, split_prompts
    from abliterate.pipeline import direction_stage, measure_stage
    from abliterate.search.study import run_study
    from abliterate.weights.checkpoint import build_inventory

    if not setting.startswith("default"):
        choice = apply_threads(Runtime(threads=setting))
        chosen = {"intra": choice.intra, "interop": choice.interop, "busy": choice.busy}
    else:
        chosen = {"intra": torch.get_num_threads(), "interop": torch.get_num_interop_threads()}
    chosen["wait"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(json.dumps({"threads": chosen}), flush=True)
    model = str(DEMO_MODEL_DIR)
    work = Path(tempfile.mkdtemp(prefix="bench-busy-"))
    sets = {}
    for kind in ("harmful", "harmless"):
        val, train = split_prompts(load_prompts(prompt_file("demo", kind, "train")), 0.25, 0)
        sets[kind] = train[:prompts]
        sets[kind + "_val"] = val[: max(1, prompts // 3)]
        sets[kind + "_test"] = load_prompts(prompt_file("demo", kind, "test"))[:prompts]
    harmful, harmless, harmful_val, harmless_val = (
        sets[k] for k in ("harmful", "harmless", "harmful_val", "harmless_val")
    )
    test = (sets["harmful_test"], sets["harmless_test"])
    measurement, template, selection = Measurement(), Template(), Selection()
    evaluation = Evaluation(max_new_tokens=tokens)
    runtime = resolve_runtime(Runtime(device="cpu"), model)

    def timed(name, fn):
        began = time.perf_counter()
        out = fn()
        print(json.dumps({"stage": name, "seconds": round(time.perf_counter() - began, 3)}), flush=True)
        return out

    measured = timed(
        "measurement",
        lambda: measure_stage(model, harmful, harmless, measurement, template, runtime, progress=False),
    )
    directions, chosen_direction = timed(
        "selection",
        lambda: direction_stage(
            model,
            measured,
            measurement.direction_method,
            selection.direction_position,
            harmful_val,
            harmless_val,
            selection,
            evaluation,
            runtime.device,
            progress=False,
        ),
    )
    path = write_directions(
        work / "directions",
        directions,
        measured,
        build_inventory(model).fingerprint,
        chosen_direction.position,
    )
    out = work / "ablated"
    timed("ablation", lambda: ablate_checkpoint(model, path, out, progress=False, log=lambda _: None))
    timed(
        "evaluation",
        lambda: evaluate_model(
            out, *test, evaluation, template, runtime, False, baseline_dir=model, progress=False
        ),
    )
    study = Search(trials=trials, startup_trials=trials)
    timed(
        "search",
        lambda: run_study(
            model,
            path,
            harmful_val,
            harmless_val,
            study,
            selection,
            template,
            evaluation,
            runtime,
            work / "mlruns",
        ),
    )


def busy_loops(n: int) -> list[subprocess.Popen]:
    # Each in a session of its own, like a program started elsewhere: where the kernel groups the scheduling
    # by session (sched_autogroup), a loop in this benchmark's session would take half of its share instead.
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)
    ]
    time.sleep(1.0 if n else 0.0)  # running before the stages start
    return loops


def stop(loops: list[subprocess.Popen]) -> None:
    for p in loops:
        p.kill()
    for p in loops:
        p.wait()


def run_child(setting: str, args: argparse.Namespace) -> dict:
    """One fresh process with `setting`; stages not finished within `args.cap` seconds are None (the
    settings compared with auto; auto itself runs to the end)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")
    }
    command = [sys.executable, __file__, "--child", setting, "--trials", str(args.trials)]
    command += ["--prompts", str(args.prompts), "--tokens", str(args.tokens)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    began = time.perf_counter()
    try:
        stdout, stderr = proc.communicate(timeout=None if setting == "auto" else args.cap)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    else:
        if proc.returncode != 0:
            raise SystemExit(f"the {setting} run failed:\n{stderr[-3000:]}")
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    seconds = {line["stage"]: line["seconds"] for line in lines if "stage" in line}
    threads = next((line["threads"] for line in lines if "threads" in line), None)
    return {
        "threads": threads,
        "seconds": {stage: seconds.get(stage) for stage in STAGES},
        "wall": round(time.perf_counter() - began, 1),
    }


def fmt(x: float | None, cap: float) -> str:
    return f"{x:>9.2f}" if x is not None else f"{'>' + format(cap, '.0f'):>9}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="search trials (default 4)")
    parser.add_argument("--prompts", type=int, default=48, help="at most N prompts of each set (default 48)")
    parser.add_argument("--tokens", type=int, default=16, help="reply tokens in the evaluation (default 16)")
    parser.add_argument("--busy", default="0,1,2", help="busy loops per condition (default 0,1,2)")
    parser.add_argument(
        "--settings",
        default="auto,default",
        help="thread settings compared: auto, default, N, default-passive",
    )
    parser.add_argument(
        "--cap", type=float, default=60, help="seconds a run may take before it is cut (default 60)"
    )
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.trials, args.prompts, args.tokens)
        return

    conditions = [int(n) for n in args.busy.split(",")]
    settings = args.settings.split(",")
    runs: dict[str, dict[int, dict]] = {s: {} for s in settings}
    loads: dict[int, list[float]] = {}
    began = time.perf_counter()
    for n in conditions:
        loops = busy_loops(n)
        try:
            loads[n] = [round(x, 2) for x in os.getloadavg()]
            for setting in settings:
                run = runs[setting][n] = run_child(setting, args)
                print(
                    f"busy loops {n}, {setting}: threads {run['threads']}, "
                    + ", ".join(f"{k} {fmt(v, args.cap).strip()} s" for k, v in run["seconds"].items()),
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            stop(loops)

    names = ["quiet" if n == 0 else f"busy{n}" for n in conditions]
    print(
        "\nload average (1, 5, 15 min) at the start of each condition: "
        + ", ".join(f"{a} {loads[n]}" for a, n in zip(names, conditions, strict=True))
    )
    print(
        "threads: "
        + "; ".join(
            f"{s} {[runs[s][n]['threads']['intra'] if runs[s][n]['threads'] else None for n in conditions]}"
            for s in settings
        )
    )
    print(f"{'stage':<12} {'setting':<16} " + " ".join(f"{a + ' s':>9}" for a in names) + "  slowdown")
    verdict = True
    for stage in STAGES:
        for setting in settings:
            s = [runs[setting][n]["seconds"][stage] for n in conditions]
            ratios = ["-" if x is None or s[0] is None else f"{x / s[0]:.2f}x" for x in s[1:]]
            if setting == "auto" and conditions[0] == 0 and 1 in conditions:
                one = runs[setting][1]["seconds"][stage]
                verdict &= one is not None and s[0] is not None and one / s[0] <= LIMIT
            print(
                f"{stage:<12} {setting:<16} "
                + " ".join(fmt(x, args.cap) for x in s)
                + "  "
                + " ".join(ratios)
            )
    if "auto" in settings and conditions[0] == 0 and 1 in conditions:
        print(
            f"auto: every stage within {LIMIT}x of quiet beside one busy loop: {'yes' if verdict else 'NO'}"
            f" ({time.perf_counter() - began:.0f} s in all)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"loads": loads, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
