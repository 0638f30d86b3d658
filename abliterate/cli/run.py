"""`abliterate run` (the main flow on any model) and `abliterate demo` (the same on the demo model)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from abliterate.cli.console import progress_bars_off
from abliterate.config import (
    Ablation,
    Evaluation,
    Measurement,
    Prompts,
    Runtime,
    Section,
    Selection,
    Template,
    add_options,
    from_args,
)
from abliterate.errors import AbliterateError
from abliterate.figures import evaluation_lines

FLOW_SECTIONS: tuple[type[Section], ...] = (
    Prompts,
    Template,
    Measurement,
    Selection,
    Ablation,
    Evaluation,
    Runtime,
)


def add_flow_options(
    parser: argparse.ArgumentParser, sections: tuple[type[Section], ...] = FLOW_SECTIONS
) -> None:
    """The flow's parameters as options, one group per configuration section, then the run's own."""
    for cls in sections:
        add_options(parser, cls)
    other = parser.add_argument_group("run")
    other.add_argument(
        "--overwrite", action="store_true", help="replace the contents of a non-empty output directory"
    )
    other.add_argument(
        "--force", action="store_true", help="accept a directions file measured on another checkpoint"
    )
    other.add_argument(
        "--work-dir",
        help="where directions files are written (default: ./results; task results "
        "persist under $ABLITERATE_RESULTS/prefect-storage)",
    )
    other.add_argument("--json", action="store_true", help="print the run summary as JSON")
    other.add_argument("--quiet", action="store_true", help="no stage lines, progress bars or summary text")


def flow_sections(
    args: argparse.Namespace, sections: tuple[type[Section], ...] = FLOW_SECTIONS
) -> dict[str, Any]:
    """The flow's keyword arguments: one settings object per section, checked before any work."""
    return {cls.section: from_args(cls, args) for cls in sections}


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="the whole pipeline as the Prefect flow `abliterate`, tracked in MLflow",
        description=(
            "Run the main flow on MODEL: weight inventory, structure detection, activation measurement, "
            "directions and automatic selection, the ablation plan, per-shard ablation, validation and "
            "evaluation. Every stage is a cached Prefect task: a rerun with other --layers or --scale reuses "
            "the measurement, and the console says which stages were cached. Each run is one MLflow run in "
            "the experiment `abliterate/<model name>`. With PREFECT_API_URL / MLFLOW_TRACKING_URI set, the "
            "run goes to those servers; otherwise a temporary local Prefect server and the SQLite store "
            "./mlruns/mlflow.db are used. A residual position i is the input of decoder layer i (position L: "
            "the last layer's output); a token position counts tokens from the end of the prompt."
        ),
    )
    run.add_argument(
        "model",
        metavar="MODEL",
        help="Hugging Face checkpoint directory (safetensors), or a Hub id "
        "org/name[@revision] (read from or downloaded into the Hugging Face cache)",
    )
    run.add_argument("--out", required=True, help="output directory for the ablated checkpoint")
    add_flow_options(run)
    run.set_defaults(func=run_command)

    demo = sub.add_parser(
        "demo",
        help="run the main flow on the built-in demo model and print how to look at the results",
        description=(
            "Abliterate the built-in demo model (a tiny GLM-4.5-MoE-shaped chat model that refuses harmful "
            "requests) with its own prompt sets, into ./results/demo-abliterated: the same as `abliterate run` "
            "on abliterate/demo/model. Prints one line per stage, refusal rates before and after, the KL on "
            "harmless prompts, example replies, and the commands that open the Prefect and MLflow UIs. The "
            "output is replaced on every run, so reruns with other --layers or --scale reuse the cached "
            "measurement and overwrite it."
        ),
    )
    demo.add_argument("--out", default=None, help="output directory (default: ./results/demo-abliterated)")
    add_flow_options(demo)
    demo.set_defaults(func=demo_command)


class _Stderr(logging.StreamHandler):
    """Writes to the stderr of the moment, not the one of the first command of the process (a second
    command in the same process, or a test capturing its output, has its own)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def console(quiet: bool) -> None:
    """Stage lines and warnings on stderr, plain; Prefect's own console output stays in its logs."""
    log = logging.getLogger("abliterate.console")
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def prepare_flows(quiet: bool) -> None:
    """Before the first flow of this process: a PREFECT_API_URL that answers, defaults, the console, and a
    word on the server start."""
    from abliterate.pipeline import check_prefect_server
    from abliterate_flows.runtime import announce_prefect_server, configure

    check_prefect_server()
    configure()
    console(quiet)
    progress_bars_off()  # the console is one line per stage: no bars (each would leave a line behind)
    if not quiet:
        announce_prefect_server()


def check_before_server(
    model: str,
    out: str | None,
    sections: dict[str, Any],
    overwrite: bool = False,
    work_dir: str | None = None,
) -> None:
    """The cheap checks of every argument, before Prefect starts a server (seconds, not a minute): the
    settings (devices among them) were checked making `sections`; here the refusal markers, the paths
    (nothing written inside the model, the output usable), the prompt files, and the plan (layers,
    scales, targets, direction position) against the model's headers. A Hub id is resolved (and
    downloaded) by the flow, which checks the rest then."""
    from abliterate.edit.output import precheck_output
    from abliterate.paths import folder_to_write
    from abliterate.pipeline import PromptSets, check_plans, check_settings, check_subspace, run_paths
    from abliterate.weights.hub import parse_hub_id

    check_settings(sections["evaluation"])
    if parse_hub_id(model) is not None:
        return
    if not Path(model).is_dir():
        raise AbliterateError(
            f"MODEL {model} is no folder and no Hub id org/name[@revision]: give a checkpoint folder"
        )
    model, out, work = run_paths(model, out, work_dir)
    folder_to_write(work, "--work-dir" if work_dir else "the results folder (ABLITERATE_HOME/results)")
    if out is not None:
        folder_to_write(out, "--out")
        precheck_output(out, overwrite)
    if "ablation" in sections:
        check_plans(
            model,
            [(sections["ablation"], sections["selection"].direction_position)],
            sections.get("measurement"),
        )
    prompts = PromptSets.load(model, sections["prompts"])
    if "ablation" in sections:
        check_subspace(sections["ablation"], prompts)


def run_flow(args: argparse.Namespace, model: str, out: str) -> dict[str, Any]:
    sections = flow_sections(args)  # bad settings fail here, before a server starts
    check_before_server(model, out, sections, args.overwrite, args.work_dir)
    prepare_flows(args.quiet)
    from abliterate_flows.main import abliterate_flow

    return abliterate_flow(
        model=model, out=out, overwrite=args.overwrite, force=args.force, work_dir=args.work_dir, **sections
    )


def run_command(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    summary = run_flow(args, args.model, args.out)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary, began))
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from abliterate.demo import DEMO_MODEL_DIR
    from abliterate_flows.runtime import results_dir

    began = time.perf_counter()
    out = args.out or str(results_dir() / "demo-abliterated")
    if args.out is None:
        args.overwrite = True  # the default output is disposable: reruns with other settings replace it
    summary = run_flow(args, str(DEMO_MODEL_DIR), out)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(format_summary(summary, began))
    print(ui_commands(summary["mlflow_run_id"]))
    return 0


def format_summary(summary: dict[str, Any], began: float) -> str:
    plan = summary["plan"]
    if plan.get("direction_position") == "auto":
        direction = (
            f"direction: residual position {plan['selected_position']} (the input of decoder layer "
            f"{plan['selected_position']}), removed from every targeted layer"
        )
    elif plan.get("direction_position") == "own":
        direction = "direction: each layer's own residual position"
    else:
        direction = f"direction: residual position {plan.get('direction_position')}"
    if plan.get("rank", 1) > 1:  # a plan writes its rank only above 1
        direction += f"; {plan['rank']} directions of its {plan['subspace']} subspace removed together"
    lines = [
        "",
        f"abliterated model: {summary['output']}",
        direction,
        "edited tensors: " + ", ".join(f"{role} {n:,}" for role, n in summary["matched"].items()),
        f"validation: {'passed' if summary['validation_ok'] else 'FAILED'}",
    ]
    ev = summary.get("evaluation")
    if ev:
        lines += evaluation_lines(ev)
        if "refusal_rate_harmful" not in ev:
            lines.append(
                "full replies: not made (layer-streamed; --full-replies always makes them, one read per new token)"
            )
        rows = summary.get("examples", [])
        for row in [r for r in rows if r["kind"] == "harmful"][:2] + [
            r for r in rows if r["kind"] == "harmless"
        ][:2]:
            lines.append(f"  [{row['kind']}] {row['prompt']}")
            lines.append(f"     before: {row['response_before']}")
            lines.append(f"     after:  {row['response_after']}")
    lines.append(f"Prefect flow run '{summary['prefect.flow_run_name']}' ({summary['prefect.flow_run_id']})")
    lines.append(f"MLflow run {summary['mlflow_run_id']}; wall time {time.perf_counter() - began:.1f} s")
    return "\n".join(lines)


def ui_commands(run_id: str) -> str:
    """How to look at this run: the MLflow experiment in its machine-learning view, and the Prefect UI."""
    from abliterate_flows.runtime import tracking_uri
    from abliterate_flows.tracking import client, experiment_ui_path

    experiment = client().get_run(run_id).info.experiment_id
    venv_bin = Path(__file__).resolve().parents[2] / ".venv" / "bin"
    prefix = f"{venv_bin}/" if venv_bin.is_dir() else ""
    return "\n".join(
        [
            "",
            "Look at the runs:",
            f"  MLflow UI:  {prefix}mlflow ui --backend-store-uri {tracking_uri()} --port 5000",
            f"              then open http://127.0.0.1:5000/{experiment_ui_path(experiment)}",
            f"  Prefect UI: PREFECT_SERVER_ANALYTICS_ENABLED=false {prefix}prefect server start",
            "              then open http://127.0.0.1:4200 (flow runs, their task runs, which were cached)",
        ]
    )
