"""The sweep flow `abliterate-sweep`: several ablation variants (layer targets, scales, methods)
against one cached measurement, each a nested MLflow run under one parent, reported on the
refusal-vs-KL front."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from abliterate.config import Ablation, Evaluation, Measurement, Prompts, Runtime, Selection, Template
from abliterate.edit.output import precheck_output
from abliterate.errors import AbliterateError
from abliterate.paths import child as child_path
from abliterate.pipeline import check_plans, check_settings, run_paths
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

EXAMPLE_VARIANTS = [
    {"name": "all-layers", "layers": "all"},
    {"name": "half-scale", "layers": "all", "scale": 0.5},
    {"name": "norm-preserving", "layers": "all", "ablation_method": "norm_preserving"},
]


def parse_variants(variants: list[dict[str, Any]]) -> list[tuple[str, Ablation, str]]:
    """(name, ablation settings, direction position) per variant; names are folder names under OUT."""
    if not variants:
        raise AbliterateError("the sweep has no variants: give a list such as " + str(EXAMPLE_VARIANTS))
    out, names = [], set()
    for i, raw in enumerate(variants):
        if not isinstance(raw, dict):
            raise AbliterateError(
                f"variant #{i} is {raw!r}; each variant is a mapping such as {EXAMPLE_VARIANTS[0]}"
            )
        fields = {k: v for k, v in raw.items() if k not in ("name", "direction_position")}
        if "method" in fields:  # the older name of the ablation method
            fields["ablation_method"] = fields.pop("method")
        unknown = set(fields) - set(Ablation.model_fields)
        if unknown:
            known = ", ".join(["name", "direction_position", *Ablation.model_fields])
            raise AbliterateError(f"variant #{i} has unknown keys {sorted(unknown)}; known: {known}")
        name = raw.get("name") or f"variant-{i}"
        if (
            not isinstance(name, str)
            or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name)
            or name in names
        ):
            raise AbliterateError(
                f"variant #{i}: name {name!r} must be unique and use letters, digits, '.', '_' or '-' (it names "
                "the variant's folder under --out)"
            )
        names.add(name)
        position = Selection(direction_position=raw.get("direction_position", "auto")).direction_position
        out.append((name, Ablation(**fields), position))
    return out


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
    specs = parse_variants(variants)
    if selection.direction_position == "none":
        raise AbliterateError("direction position `none` only measures: use `abliterate measure` for that")
    source = model
    model, out, work = run_paths(model, out, work_dir)
    if Path(out).exists() and not Path(out).is_dir():
        raise AbliterateError(
            f"output {out} exists and is not a directory: the sweep writes one folder per variant in it"
        )
    targets = {name: child_path(out, name, "variant name") for name, _, _ in specs}  # never outside OUT
    for target in targets.values():
        precheck_output(str(target), overwrite)
    check_plans(model, [(ablation, position) for _, ablation, position in specs])
    check_settings(evaluation)
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
