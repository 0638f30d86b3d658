"""`abliterate search MODEL --trials N [--out DIR]`: the refusal-vs-KL front, found by Optuna."""

from __future__ import annotations

import argparse
import json
import time

from abliterate.cli.run import (
    FLOW_SECTIONS,
    add_flow_options,
    check_before_server,
    flow_sections,
    prepare_flows,
)
from abliterate.config import Search
from abliterate.figures import figure

# The search decides the ablation settings; its own section replaces them.
SEARCH_SECTIONS = tuple(cls for cls in FLOW_SECTIONS if cls.section != "ablation") + (Search,)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "search",
        help="search the ablation's parameters for the refusal-vs-KL front (Optuna), optionally write the choice",
        description=(
            "Run the Prefect flow `abliterate-search`: measure MODEL (cached), then run an Optuna study "
            "(multi-objective TPE) over the direction position (fractions mix neighbouring positions), the ablation "
            "method, and a layer kernel (peak position, width, peak and floor weight) for each component group: "
            "attention outputs, dense MLPs, routed experts, shared experts, routers; optionally (--components "
            "default,router_bias) the router correction bias of the most refusal-specific experts. Each trial is "
            "scored at inference time, without rewriting the checkpoint: the refusals of short greedy replies "
            "to held-out harmful prompts, then the margin (the mean first-token refusal log-odds), and the "
            "first-token KL on held-out harmless prompts. Trial 0 is `run`'s "
            "automatic choice. The study lives in mlruns/search.db: a killed search resumes, a rerun with more "
            "--trials continues. Each trial is a nested MLflow run; the parent holds the front. With --out, the "
            "chosen trial (the front's fewest refusals, then most margin, with KL <= --kl-max, or --trial K) is "
            "confirmed on a slice of the held-out prompts the study never scored (--confirm-fraction; with run's "
            "choice beside it), then written through the shard engine, validated and evaluated on the test "
            "prompts (without test files: the confirmation slice of your own prompt files)."
        ),
    )
    parser.add_argument(
        "model", metavar="MODEL", help="Hugging Face checkpoint directory, or a Hub id org/name[@revision]"
    )
    parser.add_argument(
        "--out", default=None, help="write the chosen trial's checkpoint here (default: search only)"
    )
    add_flow_options(parser, SEARCH_SECTIONS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    sections = flow_sections(args, SEARCH_SECTIONS)  # bad settings fail here, before a server starts
    check_before_server(args.model, args.out, sections, args.overwrite, args.work_dir)
    prepare_flows(args.quiet)
    from abliterate_flows.search import search_flow

    result = search_flow(
        model=args.model,
        out=args.out,
        overwrite=args.overwrite,
        force=args.force,
        work_dir=args.work_dir,
        **sections,
    )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(format_result(result, began))
    return 0


def format_result(result: dict, began: float) -> str:
    rate = result.get("trials_per_minute")
    lines = [
        "",
        f"study {result['study']} ({result['storage']}): {result['trials_complete']} complete trials, "
        f"{result['new_trials']} new" + (f", {rate:.1f} trials/minute" if rate else ""),
        f"unmodified model: refusal rate {result['baseline']['refusal_rate']:.3f} on the held-out harmful prompts",
        f"{'trial':>6} {'refusal':>8} {'bound':>6} {'score':>7} {'KL':>10}  method          position",
    ]
    for r in result["pareto"]:
        note = "  <- run's automatic choice" if r.get("reference") else ""
        chosen = "  <- chosen" if result.get("chosen") and result["chosen"]["trial"] == r["trial"] else ""
        p = r["parameters"]
        bound = (r.get("refusal_bounds") or [None, float("nan")])[1]
        score = r.get("refusal_score")
        lines.append(
            f"{r['trial']:>6} {r['refusal_rate']:>8.3f} {bound:>6.3f} "
            f"{float('nan') if score is None else score:>7.2f} {r['kl']:>10.3g}  {p['method']:<15} "
            f"{p['direction_position']:.3f}{note}{chosen}"
        )
    level = result.get("confidence")
    if level:
        lines.append(
            f"(bound: the {level:.0%} Wilson upper bound of the refusal rate; score: refusal log-odds)"
        )
    ref = result.get("reference")
    if ref and all(r["trial"] != ref["trial"] for r in result["pareto"]):
        lines.append(
            f"run's automatic choice (trial {ref['trial']}): refusal rate {ref['refusal_rate']:.3f}, "
            f"KL {figure(ref['kl'])} (not on the front)"
        )
    if result.get("chosen"):
        c = result["chosen"]
        lines.append(
            f"chosen: trial {c['trial']} (refusal rate {c['refusal_rate']:.3f}, KL {figure(c['kl'])})"
        )
    else:
        lines.append(f"chosen: none ({result.get('chosen_reason')})")
    confirmation = result.get("confirmation")
    if confirmation:
        n = confirmation["prompts"]
        for name, label in (("chosen", "the choice"), ("reference", "run's choice")):
            item = confirmation.get(name)
            if item:
                lines.append(
                    f"confirmation of {label} (trial {item['trial']}) on {n['harmful']} + {n['harmless']} prompts "
                    f"the study never scored: refusal rate {item['refusal_rate']:.3f} "
                    f"({item['refusals']}/{item['prompts']}; study {item['study_refusal_rate']:.3f}, upper bound "
                    f"{item['study_upper_bound']:.3f}), KL {item['kl']:.3g}"
                )
        if confirmation.get("warning"):
            lines.append(f"WARNING: {confirmation['warning']}")
    if result.get("output"):
        lines.append(
            f"written to {result['output']}: validation {'passed' if result.get('validation_ok') else 'FAILED'}"
        )
        for kind, item in (result.get("evaluation_prompts") or {}).items():
            lines.append(f"{kind} test prompts: {item['n']} from {item['source']}")
        for warning in result.get("warnings") or []:
            lines.append(f"warning: {warning}")
        ev = result.get("evaluation") or {}
        if "refusal_rate_harmful" in ev:
            lines.append(
                f"test prompts: refusal rate {figure(ev.get('baseline_refusal_rate_harmful'))} before, "
                f"{figure(ev['refusal_rate_harmful'])} after; first-token KL {figure(ev.get('kl_harmless'))}"
            )
    lines.append(f"Prefect flow run '{result['prefect.flow_run_name']}' ({result['prefect.flow_run_id']})")
    lines.append(
        f"MLflow parent run {result['mlflow_run_id']}; wall time {time.perf_counter() - began:.1f} s"
    )
    return "\n".join(lines)
