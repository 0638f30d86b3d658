"""The search on the demo model: trials per minute, and the front against `run`'s automatic choice.

    .venv/bin/python benchmarks/bench_search.py [--trials 50] [--threads 1] [--streamed] [--parallel 4]
                                                [--figure docs/search_front.png] [--device cuda]

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

The cost of a trial against its floor: a trial is one greedy generation of `reply_tokens` tokens for
every held-out harmful prompt plus one forward pass over the held-out prompts (first-token figures).
The floor is plain transformers `model.generate` of the same prompts (rendered alike), the same
number of new tokens (all of them: the unmodified demo model's refusals end after a few tokens, an
ablated model's replies go on) and the same batches on the same machine, no hook, no study, no
marker check (best of 3, timed before and after the study); printed as seconds per trial against it (the target:
at most 1.3x). The chosen trial is also confirmed, as the flow does, on the validation prompts the
study never scored (`--confirm-fraction`, seeded).
`--device` / `--dtype` (default cpu, float32) is where every model of it runs: measurement, selection,
the trials and the test evaluations (`benchmarks/gpu_check.sh` runs it with `--device cuda`).

Also printed: CPU seconds per trial (between the ends of consecutive trials) against the floor's CPU
seconds: with one torch thread, a ratio the machine's load from other jobs hardly moves.

Figures seen (this 2-core CPU, one torch thread, load average 0.7): 50 trials in 17 s (177
trials/minute); 0.339 s per trial (0.311 s scoring) against a floor of 0.263 s: 1.29x (CPU seconds
1.29x; the code before the first-step log-probabilities and the grouped study writes: 1.49x). Run's
choice (trial 0) 0 of 48 refusals, KL 5.3e-7 on the study's prompts, 0 of 16 on the confirmation
prompts, 0.00 refusals and KL 5.6e-7 on the test prompts; the search's choice (trial 39, projected,
position 3.53) 0 of 48, KL 8.7e-8, 0 of 16 confirmed, and 0.00 and 1.5e-7 on the test prompts.
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
    parser.add_argument("--confirm-fraction", type=float, default=0.25)
    parser.add_argument(
        "--device", default="cpu", help="where the models run: cpu | cuda | cuda:N (default cpu)"
    )
    parser.add_argument(
        "--dtype", default="float32", help="compute dtype: float32 | bfloat16 | float16 (default float32)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from abliterate.check.evaluate import evaluate_model
    from abliterate.config import Ablation, Evaluation, Measurement, Runtime, Search, Selection, Template
    from abliterate.demo import DEMO_MODEL_DIR, prompt_file
    from abliterate.edit.ablate import ablate_checkpoint, load_inputs
    from abliterate.edit.matching import configured_plan
    from abliterate.edit.plan import AblationPlan
    from abliterate.inference.devices import resolve_runtime
    from abliterate.inference.loading import length_sorted_batches, load_model, pad_token_id
    from abliterate.measure.chat import encode_prompts
    from abliterate.measure.directions import compute_directions, write_directions
    from abliterate.measure.means import measure_checkpoint
    from abliterate.measure.prompts import load_prompts, split_prompts
    from abliterate.search.study import choose, run_study, search_front
    from abliterate.select.selection import select_direction
    from abliterate.weights.checkpoint import build_inventory
    from abliterate_flows import plots

    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    harmful_val, harmful = split_prompts(load_prompts(prompt_file("demo", "harmful", "train")), 0.25, 0)
    harmless_val, harmless = split_prompts(load_prompts(prompt_file("demo", "harmless", "train")), 0.25, 0)
    measurement, template = Measurement(), Template()
    runtime = resolve_runtime(Runtime(device=args.device, dtype=args.dtype, batch_size=16), DEMO_MODEL_DIR)
    began = time.perf_counter()
    measured = measure_checkpoint(
        str(DEMO_MODEL_DIR), harmful, harmless, measurement, template, runtime, False
    )
    directions = compute_directions(measured, measurement.direction_method)
    model, tokenizer = load_model(DEMO_MODEL_DIR, runtime.dtype, runtime.device)
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

    confirm_harmful, harmful_val = split_prompts(harmful_val, args.confirm_fraction, 0)
    confirm_harmless, harmless_val = split_prompts(harmless_val, args.confirm_fraction, 0)
    study = Search(
        trials=args.trials,
        confirm_fraction=args.confirm_fraction,
        components=["attn_out", "mlp_down", "expert_down", "shared_expert_down", "router"],
        methods=["plain", "norm_preserving", "projected"],
        parallel_trials=args.parallel,
        reply_tokens=24,
        kl_max=0.01,
    )

    def generate_floor() -> float:
        """Plain `generate` of the study's harmful prompts: the same rendering, tokens and batches."""
        from transformers import GenerationConfig

        plain, tok = load_model(DEMO_MODEL_DIR)
        encoded = encode_prompts(tok, harmful_val, Template(), "harmful", new_tokens=study.reply_tokens)
        config = GenerationConfig(
            max_new_tokens=study.reply_tokens,
            min_new_tokens=study.reply_tokens,  # every reply its full length: a trial's replies may not stop
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_token_id(tok),
            eos_token_id=plain.generation_config.eos_token_id,
        )
        best, best_cpu = float("inf"), float("inf")
        for _ in range(3):
            began, began_cpu = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                for batch in length_sorted_batches(encoded, 16, pad_token_id(tok)):
                    plain.generate(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        generation_config=config,
                    )
            best = min(best, time.perf_counter() - began)
            best_cpu = min(best_cpu, time.process_time() - began_cpu)
        return best, best_cpu

    floor_before, floor_cpu_before = generate_floor()
    load = os.getloadavg()[0]
    marks: list[tuple[float, float]] = []  # (wall, CPU) clock as each trial ends

    def on_trial(_result) -> None:
        marks.append((time.perf_counter(), time.process_time()))

    result = run_study(
        DEMO_MODEL_DIR,
        path,
        harmful_val,
        harmless_val,
        study,
        Selection(),
        Template(),
        Evaluation(),
        runtime,
        work / "mlruns",
        stream=args.streamed,
        confirm=(confirm_harmful, confirm_harmless),
        on_trial=on_trial,
    )
    floor_after, floor_cpu_after = generate_floor()
    floor, floor_cpu = min(floor_before, floor_after), min(floor_cpu_before, floor_cpu_after)
    load_end = os.getloadavg()[0]
    scored = [t for t in result["new_trials"] if t["score"]]
    per_trial = result["seconds"] / max(len(scored), 1)
    # CPU seconds of a trial (one torch thread: what the machine's load does not inflate): between the
    # ends of consecutive trials, i.e. everything a trial costs, study bookkeeping included
    cpu_per_trial = (marks[-1][1] - marks[0][1]) / max(len(marks) - 1, 1)
    scoring = sum(t["score"]["seconds"] for t in scored) / max(len(scored), 1)
    records = result["trials"]
    front = search_front(records)
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
            runtime,
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
        "seconds_per_trial": round(per_trial, 4),
        "scoring_seconds_per_trial": round(scoring, 4),
        "generate_floor_seconds": round(floor, 4),
        "ratio_to_floor": round(per_trial / floor, 2),
        "cpu_seconds_per_trial": round(cpu_per_trial, 4),
        "generate_floor_cpu_seconds": round(floor_cpu, 4),
        "cpu_ratio_to_floor": round(cpu_per_trial / floor_cpu, 2),
        "held_out": {
            "study": [len(harmful_val), len(harmless_val)],
            "confirmation": [len(confirm_harmful), len(confirm_harmless)],
        },
        "confirmation": result["confirmation"],
        "measure_and_select_seconds": round(measure_seconds, 1),
        "load_average_at_start": load,
        "load_average_at_end": load_end,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "streamed": args.streamed,
        "parallel": args.parallel,
        "selected_position": selection.position,
        "validation": {
            "run": {
                k: reference[k]
                for k in ("trial", "refusal_rate", "refusal_score", "kl", "refusals", "prompts")
            },
            "search": {
                k: chosen[k] for k in ("trial", "refusal_rate", "refusal_score", "kl", "refusals", "prompts")
            },
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
    print(
        f"seconds per trial {per_trial:.3f} (scoring {scoring:.3f}) against the floor of plain generate of the same "
        f"{len(harmful_val)} prompts, {study.reply_tokens} tokens, batch 16: {floor:.3f} s -> {per_trial / floor:.2f}x"
    )
    print(
        f"CPU seconds per trial {cpu_per_trial:.3f} against the floor's {floor_cpu:.3f} -> {cpu_per_trial / floor_cpu:.2f}x "
        f"(load average {load:.1f} at the start, {load_end:.1f} at the end)"
    )
    c = result["confirmation"]
    if c:
        for name in ("chosen", "reference"):
            item = c.get(name)
            if item:
                print(
                    f"confirmation of trial {item['trial']} on {c['prompts']['harmful']} + {c['prompts']['harmless']} "
                    f"prompts the study never scored: {item['refusals']}/{item['prompts']} refusals (study upper bound "
                    f"{item['study_upper_bound']:.3f}), KL {item['kl']:.2e}"
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
