"""`abliterate run` (the main flow on any model) and `abliterate demo` (the same on the demo model)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from abliterate.plan import DEFAULT_TARGETS


def add_flow_options(parser: argparse.ArgumentParser, evaluate_option: bool = True) -> None:
    """Options shared by `run` and `sweep`: prompts, measurement and selection settings."""
    prompts = parser.add_argument_group("prompts (each set is split, seeded, into measurement and validation parts)")
    prompts.add_argument("--harmful", help="harmful prompts (.txt/.jsonl/.json/.csv/.parquet); default: the project's")
    prompts.add_argument("--harmless", help="harmless prompts; default: the project's general-purpose set")
    prompts.add_argument("--harmful-test", help="harmful prompts for the evaluation; default: the project's test split")
    prompts.add_argument("--harmless-test", help="harmless prompts for the evaluation")
    prompts.add_argument("--validation-fraction", type=float, default=0.25, help="part held out to select the direction")
    prompts.add_argument("--seed", type=int, default=0, help="seed of the measurement/validation split")
    measure = parser.add_argument_group("measurement")
    measure.add_argument("--position", type=int, default=-1, help="token measured, from the prompt's end (-1: last)")
    measure.add_argument("--system-prompt", help="system message rendered before every prompt")
    measure.add_argument(
        "--chat-template-kwargs", action="append", default=[], metavar="JSON|KEY=VALUE",
        help="extra chat-template variables, as in `abliterate measure` (repeatable; e.g. enable_thinking=false)",
    )  # fmt: skip
    measure.add_argument(
        "--direction-method", choices=["mean_diff", "projected"], default="projected",
        help="projected (default): the mean difference made orthogonal to the harmless mean; mean_diff: as is",
    )  # fmt: skip
    measure.add_argument("--kl-threshold", type=float, default=0.1, help="largest harmless first-token KL a selected direction may cause")
    measure.add_argument("--batch-size", type=int, default=16)
    other = parser.add_argument_group("run")
    if evaluate_option:  # a sweep always evaluates: its variants are compared on refusal and KL
        other.add_argument("--no-evaluate", action="store_true",
                           help="skip the behavioural evaluation (for models that do not fit in memory)")  # fmt: skip
    other.add_argument("--max-new-tokens", type=int, default=48, help="reply length in the evaluation")
    other.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    other.add_argument("--force", action="store_true", help="accept a directions file measured on another checkpoint")
    other.add_argument("--work-dir", help="where directions files are written (default: ./results; task results "
                       "persist under $ABLITERATE_RESULTS/prefect-storage)")  # fmt: skip
    other.add_argument("--json", action="store_true", help="print the run summary as JSON")


def add_ablation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ablation")
    group.add_argument("--layers", default="all", help="target layers: all | 10-30 | 5,7,9-12 (exact indices)")
    group.add_argument("--direction-position", "--direction-layer", dest="direction_position", default="auto",
                       help="auto (selected by evidence) | own | a residual position")  # fmt: skip
    group.add_argument("--scale", default="1.0", help="1.0 | one value per target layer | gauss:center=20,width=5,peak=1")
    group.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="weight roles to edit (comma list; add embed)")
    group.add_argument("--method", choices=["plain", "norm_preserving", "projected"], default="plain")
    group.add_argument("--mtp", choices=["ablate", "skip"], default="ablate", help="MTP layers: edit like the last layer, or leave")
    group.add_argument("--workers", type=int, default=2, help="shards ablated at the same time (threads)")
    group.add_argument("--dask-address", help="ablate shards on this Dask scheduler (tcp://host:8786); needs shared storage")
    group.add_argument("--dask-workers", type=int, help="ablate shards on a local Dask cluster of this many processes")
    group.add_argument("--memory-budget", help="memory the model may take, e.g. 64GiB (default: the free memory); "
                       "a larger model is measured layer-streamed and needs --direction-position N")
    group.add_argument("--stream", choices=["auto", "always", "never"], default="auto",
                       help="layer-streamed measurement: auto (when the model exceeds the budget), always, never")


def flow_parameters(args: argparse.Namespace, prompt_set: str = "general") -> dict[str, Any]:
    from abliterate.cli.measure import parse_template_kwargs

    template_kwargs = parse_template_kwargs(args.chat_template_kwargs)
    return {
        "harmful": args.harmful, "harmless": args.harmless, "harmful_test": args.harmful_test,
        "harmless_test": args.harmless_test, "validation_fraction": args.validation_fraction, "seed": args.seed,
        "position": args.position, "system_prompt": args.system_prompt, "chat_template_kwargs": template_kwargs,
        "direction_method": args.direction_method, "kl_threshold": args.kl_threshold,
        "evaluate": not getattr(args, "no_evaluate", False), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "overwrite": args.overwrite, "force": args.force, "work_dir": args.work_dir, "prompt_set": prompt_set,
    }  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="the whole pipeline as the Prefect flow `abliterate`, tracked in MLflow",
        description=(
            "Run the main flow on MODEL: weight inventory, structure detection, activation measurement, "
            "directions and automatic selection, the ablation plan, per-shard ablation, validation and "
            "evaluation. Every stage is a cached Prefect task: a rerun with other --layers or --scale reuses "
            "the measurement. Each run is one MLflow run in the experiment `abliterate/<model name>`. "
            "With PREFECT_API_URL / MLFLOW_TRACKING_URI set, the run goes to those servers; otherwise a "
            "temporary local Prefect server and the SQLite store ./mlruns/mlflow.db are used."
        ),
    )
    run.add_argument("model", metavar="MODEL", help="Hugging Face checkpoint directory (safetensors)")
    run.add_argument("--out", required=True, help="output directory for the ablated checkpoint")
    add_ablation_options(run)
    add_flow_options(run)
    run.set_defaults(func=run_command)

    demo = sub.add_parser(
        "demo",
        help="run the main flow on the built-in demo model and print how to look at the results",
        description=(
            "Abliterate the built-in demo model (a tiny GLM-4.5-MoE-shaped chat model that refuses harmful "
            "requests) with its own prompt sets, into ./results/demo-abliterated. Prints refusal rates before "
            "and after, the KL on harmless prompts, example replies, and the commands that open the Prefect "
            "and MLflow UIs. The output is replaced on every run, so reruns with other --layers or --scale "
            "reuse the cached measurement and overwrite it."
        ),
    )
    demo.add_argument("--out", default=None, help="output directory (default: ./results/demo-abliterated)")
    add_ablation_options(demo)
    add_flow_options(demo)
    demo.set_defaults(func=demo_command)


def run_flow(args: argparse.Namespace, model: str, out: str, prompt_set: str) -> dict[str, Any]:
    from flows.runtime import configure

    configure()
    from flows.main import abliterate_flow

    params = flow_parameters(args, prompt_set) | {
        "model": model, "out": out, "layers": args.layers, "direction_position": args.direction_position,
        "scale": args.scale, "targets": [t.strip() for t in args.targets.split(",") if t.strip()],
        "method": args.method, "mtp": args.mtp, "workers": args.workers, "dask_address": args.dask_address,
        "dask_workers": args.dask_workers, "memory_budget": args.memory_budget, "streaming": args.stream,
    }  # fmt: skip
    return abliterate_flow(**params)


def run_command(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    summary = run_flow(args, args.model, args.out, "general")
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary, began))
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from abliterate.demo import DEMO_MODEL_DIR
    from flows.runtime import results_dir

    began = time.perf_counter()
    out = args.out or str(results_dir() / "demo-abliterated")
    if args.out is None:
        args.overwrite = True  # the default output is disposable: reruns with other settings replace it
    summary = run_flow(args, str(DEMO_MODEL_DIR), out, "demo")
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(format_summary(summary, began))
    print(ui_commands())
    return 0


def format_summary(summary: dict[str, Any], began: float) -> str:
    lines = [
        "",
        f"abliterated model: {summary['output']}",
        f"direction: residual position {summary['selected_position']} (selected automatically)"
        if summary["plan"].get("direction_position") == "selected"
        else f"direction: {summary['plan'].get('direction_position')}",
        "edited tensors: " + ", ".join(f"{role} {n:,}" for role, n in summary["matched"].items()),
        f"validation: {'passed' if summary['validation_ok'] else 'FAILED'}",
    ]
    ev = summary.get("evaluation")
    if ev:
        lines += [
            f"refusal rate on harmful prompts: {ev.get('baseline_refusal_rate_harmful', float('nan')):.2f} before, "
            f"{ev['refusal_rate_harmful']:.2f} after",
            f"refusal rate on harmless prompts: {ev.get('baseline_refusal_rate_harmless', float('nan')):.2f} before, "
            f"{ev['refusal_rate_harmless']:.2f} after",
            f"first-token KL on harmless prompts: {ev.get('kl_harmless', float('nan')):.2g} nats",
        ]
        rows = summary.get("examples", [])
        for row in [r for r in rows if r["kind"] == "harmful"][:2] + [r for r in rows if r["kind"] == "harmless"][:2]:
            lines.append(f"  [{row['kind']}] {row['prompt']}")
            lines.append(f"     before: {row['response_before']}")
            lines.append(f"     after:  {row['response_after']}")
    lines.append(f"MLflow run {summary['mlflow_run_id']}; wall time {time.perf_counter() - began:.1f} s")
    return "\n".join(lines)


def ui_commands() -> str:
    from flows.runtime import tracking_uri

    venv_bin = Path(__file__).resolve().parents[2] / ".venv" / "bin"
    prefix = f"{venv_bin}/" if venv_bin.is_dir() else ""
    return "\n".join(
        [
            "",
            "Look at the runs:",
            f"  MLflow UI:  {prefix}mlflow ui --backend-store-uri {tracking_uri()} --port 5000   "
            "then open http://127.0.0.1:5000",
            f"  Prefect UI: {prefix}prefect server start   then open http://127.0.0.1:4200 (flow runs, cached tasks)",
        ]
    )
