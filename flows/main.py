"""The main flow `abliterate`, one MLflow run per flow run:

weight inventory -> structure detection -> activation measurement -> directions + selection
-> ablation plan -> per-shard ablation (subflow, mapped) -> validation -> evaluation

The stages and what they log are in flows/stages.py; the settings in abliterate/config.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from abliterate.config import Ablation, Evaluation, Measurement, Prompts, Runtime, Selection, Template
from abliterate.edit.matching import plan_matches
from abliterate.edit.output import precheck_output
from abliterate.edit.plan import build_plan
from abliterate.errors import AbliterateError
from abliterate.weights.checkpoint import build_inventory, check_output_location
from abliterate.weights.hub import hub_origin, resolve_model
from abliterate.weights.structure import detect_structure
from abliterate_flows.runtime import project_dir, results_dir
from abliterate_flows.stages import Stages, ablation_stages, measurement_stages
from abliterate_flows.tracking import experiment_name, tracked_run


def run_paths(model: str, out: str | None, work_dir: str | None) -> tuple[str, str | None, str]:
    """Absolute paths, checked before any work: nothing the run writes may lie inside the model. A Hub
    id `org/name[@revision]` becomes its snapshot folder in huggingface_hub's cache (abliterate.weights.hub)."""
    model = str(Path(resolve_model(model)).resolve())
    work = str(check_output_location(model, work_dir or results_dir()))
    check_output_location(model, project_dir() / "mlruns")
    check_output_location(model, results_dir() / "prefect-storage")  # where Prefect persists task results
    return model, str(check_output_location(model, out)) if out else None, work


def check_out(out: str, overwrite: bool) -> None:
    """The output's cheap checks (not a file, not in use, empty or an earlier output), before any work."""
    precheck_output(out, overwrite)


def check_plans(model: str, specs: list[tuple[Ablation, str]]) -> None:
    """Each ablation's layers, scales, targets and direction position against the model's headers,
    before the measurement: a plan that cannot run fails in seconds, not after an hour. A checkpoint
    whose headers cannot be read is left to the inventory task, which reports it."""
    try:
        inventory = build_inventory(model)
        structure = detect_structure(inventory)
    except AbliterateError:
        return
    for ablation, position in specs:
        if position.isdigit() and int(position) > structure.num_layers:
            raise AbliterateError(
                f"direction position {position} is out of range: the model has residual positions "
                f"0..{structure.num_layers}"
            )
        plan = build_plan(
            structure.num_layers,
            structure.mtp_layers,
            layers=ablation.layers,
            scale=ablation.scale,
            targets=ablation.targets,
            direction_position=position if position.isdigit() else "own",
            method=ablation.ablation_method,
            mtp=ablation.mtp,
            biases=ablation.biases,
        )
        plan_matches(plan, inventory, structure)


def source_tags(source: str, model_dir: str) -> dict[str, str]:
    """MLflow tags naming where the model came from: as typed, and the Hub repository and commit of a
    cached snapshot."""
    tags = {"model_source": source}
    origin = hub_origin(model_dir)
    if origin:
        tags.update({"hub.repo_id": origin["repo_id"], "hub.commit": origin["commit"]})
    return tags


@flow(name="abliterate", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def abliterate_flow(
    model: str,
    out: str,
    prompts: Prompts = Prompts(),
    template: Template = Template(),
    measurement: Measurement = Measurement(),
    selection: Selection = Selection(),
    ablation: Ablation = Ablation(),
    evaluation: Evaluation = Evaluation(),
    runtime: Runtime = Runtime(),
    overwrite: bool = False,
    force: bool = False,
    work_dir: str | None = None,
) -> dict[str, Any]:
    """Abliterate MODEL into OUT: measure the refusal direction, project it out of every matched
    weight shard by shard, validate the output and evaluate its behaviour, tracked in MLflow.
    Each section's fields are documented in abliterate/config.py and by `abliterate run --help`."""
    if selection.direction_position == "none":
        raise AbliterateError("direction position `none` only measures: use `abliterate measure` for that")
    source = model
    model, out, work = run_paths(model, out, work_dir)
    check_out(out, overwrite)
    check_plans(model, [(ablation, selection.direction_position)])
    run = {"prefect.flow_run_id": flow_run.get_id(), "prefect.flow_run_name": flow_run.get_name()}
    tags = {
        **run,
        "prefect.flow_name": "abliterate",
        "model_dir": model,
        "output_path": out,
        **source_tags(source, model),
    }
    with tracked_run(experiment_name(model), flow_run.get_name() or "abliterate", tags) as tracker:
        stages = Stages(tracker)
        measured = measurement_stages(
            stages, model, prompts, template, measurement, selection, runtime, work, evaluation
        )
        summary = ablation_stages(
            stages, measured, ablation, evaluation, template, runtime, out, overwrite, force
        )
        summary.update(mlflow_run_id=tracker.run_id, durations=stages.durations, **run)
        tracker.json(summary, "summary.json")
    return summary
