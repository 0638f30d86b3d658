"""The sweep flow `abliterate-sweep`: several ablation variants (layer targets, scales, methods)
against one cached measurement, each a nested MLflow run under one parent, reported on the
refusal-vs-KL front."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from abliterate.config import Evaluation, Measurement, Prompts, Runtime, Selection, Template
from abliterate.search.study import pareto
from abliterate_flows import plots
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
from abliterate_flows.variants import EXAMPLE_VARIANTS, check_sweep, parse_variants  # noqa: F401 - served names


def refusal_kl_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark the variants no other variant beats on both refusal rate and KL (the search's front)."""
    front = {id(p) for p in pareto(points)}
    for p in points:
        p["on_front"] = id(p) in front
    return points


@flow(name="abliterate-sweep", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def sweep_flow(
    model: str,
    out: str,
    variants: list[dict[str, Any]] = EXAMPLE_VARIANTS,  # noqa: B006 - Prefect shows it in the UI form
    prompts: Prompts = Prompts(),
    template: Template = Template(),
    measurement: Measurement = Measurement(),
    selection: Selection = Selection(),
    evaluation: Evaluation = Evaluation(),
    runtime: Runtime = Runtime(),
    overwrite: bool = False,
    force: bool = False,
    work_dir: str | None = None,
) -> dict[str, Any]:
    """Ablate MODEL once per variant into OUT/<variant name>, measuring once; every variant is
    evaluated and placed on the refusal-rate vs harmless-KL plane. A variant is a mapping of
    `name`, `direction_position` and any ablation setting (layers, scale, targets, ablation_method,
    mtp, biases)."""
    source = model
    specs, model, out, work, targets = check_sweep(
        model, out, variants, selection, measurement, evaluation, overwrite, work_dir
    )
    evaluation = evaluation.model_copy(update={"evaluate": True})  # variants are compared by their evaluation
    run = {"prefect.flow_run_id": flow_run.get_id(), "prefect.flow_run_name": flow_run.get_name()}
    tags = {
        **run,
        "prefect.flow_name": "abliterate-sweep",
        "model_dir": model,
        "output_path": out,
        **source_tags(source, model),
    }
    title = model_title(model)
    with tracked_run(
        experiment_name(model),
        run_name("sweep", f"{len(specs)} variants: " + ", ".join(name for name, _, _ in specs), title),
        tags,
        description=experiment_description(model),
    ) as parent:
        measured = measurement_stages(
            Stages(parent), model, prompts, template, measurement, selection, runtime, work, evaluation
        )
        chosen = measured.selection.position if measured.selection else None
        points = []
        for name, ablation, position in specs:
            target = str(targets[name])
            child_name = run_name(
                f"sweep/{name}", *describe(ablation), position_label(position, chosen), title
            )
            with tracked_run(
                experiment_name(model),
                child_name,
                {**tags, "variant": name, "output_path": target},
                parent=parent,
            ) as child:
                child.params({"variant": name})
                summary = ablation_stages(
                    Stages(child),
                    measured,
                    ablation,
                    evaluation,
                    template,
                    runtime,
                    target,
                    overwrite,
                    force,
                    position,
                )
            ev = summary["evaluation"]
            # full replies when made; a layer-streamed model's first-token refusal rate otherwise
            measure = "refusal_rate" if "refusal_rate_harmful" in ev else "first_token_refusal_rate"
            points.append(
                {
                    "name": name,
                    "refusal_rate": ev[f"{measure}_harmful"],
                    "kl": ev["kl_harmless"],
                    "refusal_rate_harmless": ev[f"{measure}_harmless"],
                    "refusal_measure": measure,
                    "output": summary["output"],
                    "mlflow_run_id": child.run_id,
                    "ablation": ablation.model_dump(),
                    "direction_position": position,
                }
            )
        refusal_kl_front(points)
        parent.table([{k: v for k, v in p.items() if k != "ablation"} for p in points], "variants.json")
        figure = plots.refusal_vs_kl(points)
        parent.figure(figure, "plots/refusal_vs_kl.png")
        plots.close(figure)
        front = [p["name"] for p in points if p["on_front"]]
        parent.tags({"front": ",".join(front)})
        return {
            "variants": points,
            "front": front,
            "mlflow_run_id": parent.run_id,
            **run,
            "selected_position": measured.selection.position if measured.selection else None,
        }
