"""The search on the demo model: trials per minute, and the front against `run`'s automatic choice.

    .venv/bin/python benchmarks/bench_search.py [--trials 50] [--threads 1] [--streamed] [--parallel 4]
                                                [--figure docs/search_front.png]

What `abliterate search abliterate/demo/model --trials 50` does, without Prefect and MLflow (so the
figure is the search's own speed): the demo's measurement split (75 % of its train files, seed 0)
measured in memory, selection on the validation split (25 %) gives run's automatic choice, then a
fresh study of `--trials` trials with the default settings (the five component groups, three methods,
24-token replies on all 64 + 64 validation prompts) in a temporary folder. Trial 0 of every study is
run's automatic choice, scored like every other trial.

Then both plans are written through the shard engine and evaluated on the test prompts (189 harmful,
129 harmless; 48-token greedy replies, first-token KL against the original), side by side, as
`abliterate run` / `abliterate search --out` evaluate them.

`--streamed` scores the trials layer-streamed instead (`--parallel` trials per pass over the weights).

Figures seen (2026-12-01, this 2-core CPU shared with other jobs at load average about 5, one torch
thread): 50 trials in 64 s (47 trials/minute); run's choice (trial 0) 0 refusals of 64, KL 4.6e-7 on
the validation prompts, 0.00 refusals and KL 5.6e-7 on the test prompts; the search's choice (trial 49,
projected, position 3.38) 0 refusals, KL 1.0e-7, and 0.00 and 2.0e-7 on the test prompts.
`--streamed --parallel 5 --trials 20`: 36 trials/minute (the demo is tiny: a pass costs little).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--streamed", action="store_true", help="score the trials layer-streamed")
    parser.add_argument("--parallel", type=int, default=1, help="trials scored together (streamed: per pass)")
    parser.add_argument("--figure", default=None, help="save the front figure here (PNG)")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from abliterate.check.evaluate import evaluate_model
    from abliterate.config import Ablation, Evaluation, Measurement, Runtime, Search, Selection, Template
    from abliterate.demo import DEMO_MODEL_DIR, prompt_file
    from abliterate.edit.ablate import ablate_checkpoint, load_inputs
    from abliterate.edit.matching import configured_plan
    from abliterate.edit.plan import AblationPlan
    from abliterate.inference.loading import load_model
    from abliterate.measure.directions import compute_directions, write_directions
    from abliterate.measure.means import measure_checkpoint
    from abliterate.measure.prompts import load_prompts, split_prompts
    from abliterate.search.study import choose, pareto, run_study
    from abliterate.select.selection import select_direction
    from abliterate.weights.checkpoint import build_inventory
    from abliterate_flows import plots

    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    harmful_val, harmful = split_prompts(load_prompts(prompt_file("demo", "harmful", "train")), 0.25, 0)
    harmless_val, harmless = split_prompts(load_prompts(prompt_file("demo", "harmless", "train")), 0.25, 0)
    measurement, template = Measurement(), Template()
    runtime = Runtime(device="cpu", dtype="float32", batch_size=16)
    began = time.perf_counter()
    measured = measure_checkpoint(
        str(DEMO_MODEL_DIR), harmful, harmless, measurement, template, runtime, False
    )
    directions = compute_directions(measured, measurement.direction_method)
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    selection = select_direction(
        model,
        tokenizer,
        directions,
        harmful_val,
        harmless_val,
        measurement,
        template,
        Selection(),
        Evaluation(),
        runtime,
        progress=False,
    )
    del model
    path = write_directions(
        work / "directions",
        directions,
        measured,
        build_inventory(DEMO_MODEL_DIR).fingerprint,
        selection.position,
    )
    measure_seconds = time.perf_counter() - began

    study = Search(
        trials=args.trials,
        components=["attn_out", "mlp_down", "expert_down", "shared_expert_down", "router"],
        methods=["plain", "norm_preserving", "projected"],
        parallel_trials=args.parallel,
        reply_tokens=24,
        kl_max=0.01,
    )
    load = os.getloadavg()[0]
    result = run_study(
        DEMO_MODEL_DIR,
        path,
        harmful_val,
        harmless_val,
        study,
        Selection(),
        Template(),
        Evaluation(),
        Runtime(device="cpu", dtype="float32", batch_size=16),
        work / "mlruns",
        stream=args.streamed,
    )
    records = result["trials"]
    front = pareto(records)
    reference = next(r for r in records if r.get("reference") == "run")
    chosen = choose(records, study)

    test_harmful = load_prompts(prompt_file("demo", "harmful", "test"))
    test_harmless = load_prompts(prompt_file("demo", "harmless", "test"))
    inputs = load_inputs(DEMO_MODEL_DIR, path)
    evaluations = {}
    for name, plan in (
        ("run", configured_plan(inputs, Ablation(), "auto")),
        ("search", AblationPlan.from_dict(chosen["plan"])),
    ):
        out = work / name
        ablate_checkpoint(DEMO_MODEL_DIR, path, out, plan, progress=False, log=lambda _: None, inputs=inputs)
        ev = evaluate_model(
            out,
            test_harmful,
            test_harmless,
            Evaluation(max_new_tokens=48),
            Template(),
            Runtime(device="cpu", dtype="float32", batch_size=16),
            False,
            baseline_dir=DEMO_MODEL_DIR,
            progress=False,
        )
        evaluations[name] = {
            "refusal_rate_harmful": ev.refusal_rate_harmful,
            "kl_harmless": ev.kl_harmless,
            "refusal_rate_harmless": ev.refusal_rate_harmless,
            "baseline_refusal_rate_harmful": ev.baseline_refusal_rate_harmful,
        }

    summary = {
        "trials": len(records),
        "search_seconds": result["seconds"],
        "trials_per_minute": result["trials_per_minute"],
        "measure_and_select_seconds": round(measure_seconds, 1),
        "load_average_at_start": load,
        "threads": args.threads,
        "streamed": args.streamed,
        "parallel": args.parallel,
        "selected_position": selection.position,
        "validation": {
            "run": {k: reference[k] for k in ("trial", "refusal_rate", "kl", "refusals", "prompts")},
            "search": {k: chosen[k] for k in ("trial", "refusal_rate", "kl", "refusals", "prompts")},
        },
        "front": [
            {k: r[k] for k in ("trial", "refusal_rate", "kl")}
            | {
                "method": r["parameters"]["method"],
                "position": round(r["parameters"]["direction_position"], 3),
            }
            for r in front
        ],
        "test": evaluations,
    }
    print(json.dumps(summary, indent=2))
    print(
        f"\n{len(records)} trials in {result['seconds']:.0f} s: {result['trials_per_minute']:.1f} trials/minute "
        f"({args.threads} torch thread(s), load average {load:.1f} at the start)"
    )
    print(f"{'':<28} {'refusal (val)':>14} {'KL (val)':>10} {'refusal (test)':>15} {'KL (test)':>10}")
    for name, item in (
        ("run's automatic choice", reference),
        (f"search's choice (trial {chosen['trial']})", chosen),
    ):
        ev = evaluations["run" if item is reference else "search"]
        print(
            f"{name:<28} {item['refusal_rate']:>14.3f} {item['kl']:>10.2e} {ev['refusal_rate_harmful']:>15.3f} "
            f"{ev['kl_harmless']:>10.2e}"
        )
    if args.figure:
        figure = plots.search_front(records, front, reference, chosen, 0.01)
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.figure, dpi=90)
        plots.close(figure)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
