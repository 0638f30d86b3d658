"""The main flow `abliterate`, one MLflow run per flow run:

weight inventory -> structure detection -> activation measurement -> directions + selection
-> ablation plan -> per-shard ablation (subflow, mapped) -> validation -> evaluation

The stages and what they log are in flows/stages.py; the settings in abliterate/config.py.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from abliterate.config import Ablation, Evaluation, Measurement, Prompts, Runtime, Selection, Template
from abliterate.edit.model_card import reproduce_command
from abliterate.edit.output import precheck_output
from abliterate.errors import AbliterateError
from abliterate.pipeline import check_plans, check_settings, run_paths
from abliterate_flows.stages import Stages, ablation_stages, measurement_stages
from abliterate_flows.tracking import (
    describe,
    experiment_description,
    experiment_name,
    model_title,
    position_label,
    run_name,
    source_tags,
    tracked_run,
)


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
    precheck_output(out, overwrite)
    check_plans(model, [(ablation, selection.direction_position)], measurement)
    check_settings(evaluation)
    run = {"prefect.flow_run_id": flow_run.get_id(), "prefect.flow_run_name": flow_run.get_name()}
    tags = {
        **run,
        "prefect.flow_name": "abliterate",
        "model_dir": model,
        "output_path": out,
        **source_tags(source, model),
    }
    position = selection.direction_position

    def name(chosen: int | None = None) -> str:
        return run_name("run", *describe(ablation), position_label(position, chosen), model_title(model))

    with tracked_run(
        experiment_name(model), name(), tags, description=experiment_description(model)
    ) as tracker:
        stages = Stages(tracker)
        measured = measurement_stages(
            stages, model, prompts, template, measurement, selection, runtime, work, evaluation
        )
        if position == "auto" and measured.selection is not None:
            tracker.rename(name(measured.selection.position))
        sections = [prompts, template, measurement, selection, ablation, evaluation, runtime]
        summary = ablation_stages(
            stages,
            measured,
            ablation,
            evaluation,
            template,
            runtime,
            out,
            overwrite,
            force,
            command=reproduce_command("run", source, out, sections),
        )
        summary.update(mlflow_run_id=tracker.run_id, durations=stages.durations, **run)
        tracker.json(summary, "summary.json")
    return summary
