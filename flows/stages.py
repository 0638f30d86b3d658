"""The flows' stages, each beside what it logs: measurement (inventory, structure, activations,
directions and selection) and ablation (plan, per-shard ablation, validation, evaluation).

The main flow runs both once; the sweep flow runs the measurement once and the ablation once
per variant. Every task is cached by content (tasks/), so a rerun with other ablation settings
shows the measurement stages as `cached`. Each stage prints one line to the console (logger
`abliterate.console`) and its duration to MLflow; tracebacks stay in the Prefect logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate.check.evaluate import replies_cost
from abliterate.check.validate import ValidationReport
from abliterate.config import (
    Ablation,
    Evaluation,
    Measurement,
    Prompts,
    Runtime,
    Selection,
    Template,
    flat_params,
)
from abliterate.edit.ablate import load_inputs
from abliterate.edit.matching import configured_plan, plan_matches, resolve_plan, role_counts
from abliterate.edit.model_card import update_model_card
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.inference.devices import resolve_runtime
from abliterate.inference.refusal import marker_phrases
from abliterate.inference.threads import apply_threads
from abliterate.measure.direction_file import load_directions
from abliterate.pipeline import PromptSets, decide_streaming, plan_position
from abliterate.select.selection import Selection as Chosen
from abliterate.select.selection import describe_rank
from abliterate.weights.hub import hub_origin
from abliterate.weights.structure import Structure
from abliterate_flows import plots
from abliterate_flows.ablate import ablate_flow, edit_threads, task_runner
from abliterate_flows.inventory import log_structure
from abliterate_flows.tracking import (
    DIRECTIONS,
    DURATION,
    EDIT,
    SELECTION,
    VALIDATION,
    Tracker,
    evaluation_metrics,
    metric,
)
from abliterate_tasks.inventory import inventory_task, structure_task
from abliterate_tasks.measure import directions_task, measure_task
from abliterate_tasks.validate import baseline_behaviour_task, evaluate_task, validate_task

console = logging.getLogger("abliterate.console")


# ------------------------------------------------------------------ console and timing


class Stages:
    """Times each stage into MLflow (`duration/<stage>`) and tells the console: name, `cached` or seconds."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.durations: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[_Stage]:
        record, began = _Stage(), time.perf_counter()
        yield record
        seconds = round(time.perf_counter() - began, 3)
        self.durations[name] = seconds
        self.tracker.metrics({metric(DURATION, name): seconds})
        cached = bool(record.states) and all(s == "Cached" for s in record.states)
        console.info(f"  {name:<12} {'cached' if cached else f'{seconds:.1f} s'}")


@dataclass
class _Stage:
    states: list[str] = field(default_factory=list)

    def run(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a task in the flow and remember whether its result came from the cache."""
        state = task(*args, return_state=True, **kwargs)
        self.states.append(state.name)
        return state.result()


def report_warnings(tracker: Tracker, warnings: list[str], stage: str) -> None:
    """Show warnings on the console and keep them with the MLflow run."""
    for warning in warnings:
        console.warning(f"warning: {warning}")
    if warnings:
        tracker.text("\n".join(warnings) + "\n", f"warnings/{stage}.txt")


# ------------------------------------------------------------------ measurement


@dataclass
class Measured:
    """What the measurement stages hand to every ablation: reused by all variants of a sweep."""

    model: str
    structure: Structure
    directions_path: str
    selection: Chosen | None  # None: no single direction (`own`)
    prompts: PromptSets
    stream: bool  # measured, scored and evaluated one decoder layer at a time
    runtime: Runtime  # resolved for the model: concrete device and dtype


def measurement_stages(
    stages: Stages,
    model: str,
    prompts: Prompts,
    template: Template,
    measurement: Measurement,
    selection: Selection,
    runtime: Runtime,
    work_dir: str,
    evaluation: Evaluation | None = None,
) -> Measured:
    """`evaluation` gives the refusal markers (and probe length) that selection finds refusal tokens with."""
    tracker = stages.tracker
    sets = PromptSets.load(model, prompts)
    with stages.stage("inventory") as s:
        inventory = s.run(inventory_task, model)
        structure = s.run(structure_task, inventory)
    log_structure(tracker, structure, inventory.to_json())
    compute = resolve_runtime(runtime, model)
    stream = decide_streaming(model, compute)
    threads = apply_threads(runtime)
    console.info(f"  threads      {threads.describe()}")
    tracker.params(
        {
            **sets.params(),
            **flat_params(prompts, template, measurement, selection, runtime),
            **threads.params(),
            "streaming": stream,
            "compute.device": compute.device,
            "compute.dtype": compute.dtype,
            "refusal_markers": list(marker_phrases(evaluation)),
            **{f"hub.{k}": v for k, v in (hub_origin(model) or {}).items()},
        }
    )
    if stream:
        console.info(
            f"  streaming    the model exceeds the memory budget (or --streaming always): measured, scored "
            f"and evaluated one decoder layer at a time on {compute.device}"
        )
    with stages.stage("measurement") as s:
        measured = s.run(
            measure_task, model, sets.harmful, sets.harmless, measurement, template, compute, stream
        )
    with stages.stage("directions") as s:
        args = (
            model,
            inventory.fingerprint,
            measured,
            measurement.direction_method,
            selection.direction_position,
            sets.harmful_val,
            sets.harmless_val,
            selection,
            evaluation,
            work_dir,
            compute.device,
            stream,
        )
        directions_path, chosen = s.run(directions_task, *args)
        if not Path(directions_path).is_file():  # the cached result names a file someone deleted
            directions_path, chosen = s.run(directions_task.with_options(refresh_cache=True), *args)
    log_directions(tracker, directions_path, chosen)
    rank = describe_rank(chosen) if chosen is not None and chosen.scored else None
    if rank:
        console.info(f"  rank         {rank}")
    return Measured(model, structure, directions_path, chosen, sets, stream, compute)


def log_directions(tracker: Tracker, directions_path: str, chosen: Chosen | None) -> None:
    directions = load_directions(directions_path)
    stats = directions.metadata.get("stats", {})
    tracker.series(metric(DIRECTIONS, "norm"), dict(enumerate(stats.get("mean_diff_norm", []))))
    tracker.series(metric(DIRECTIONS, "snr"), dict(enumerate(stats.get("snr", []))))
    tracker.series(metric(DIRECTIONS, "cos_selected"), dict(enumerate(stats.get("cos_selected", []))))
    tracker.params({"directions_sha256": directions.sha256()})
    tracker.file(directions_path)
    tracker.json(directions.metadata, "directions.json")
    figures = {"direction_cosine.png": plots.cosine_heatmap(directions.direction)}
    if chosen is not None:
        tracker.params({"selected_position": chosen.position})
        tracker.metrics({metric(SELECTION, "position"): chosen.position})
        if stats:
            figures["direction_strength.png"] = plots.direction_strength(stats, chosen.position)
    if chosen is not None and chosen.scored:
        log_rank_choice(tracker, chosen)
        scores = {c.position: c.refusal_score for c in chosen.candidates}
        tracker.series(metric(SELECTION, "candidate_refusal_score"), scores)
        tracker.series(metric(SELECTION, "candidate_kl"), {c.position: c.kl for c in chosen.candidates})
        tracker.metrics(
            {
                metric(SELECTION, "baseline_refusal_score"): chosen.baseline_refusal_score,
                metric(SELECTION, "weight_reads"): chosen.weight_reads,
                metric(SELECTION, "refusals_found"): chosen.refusals_found,
                metric(SELECTION, "seconds_probe"): chosen.seconds_probe,
                metric(SELECTION, "seconds_scoring"): chosen.seconds_scoring,
                metric(SELECTION, "rounds"): len(chosen.rounds),
                metric(SELECTION, "fully_scored"): len(chosen.candidates),
                metric(SELECTION, "ranked_out"): len(chosen.ranked_out),
                metric(SELECTION, "prefiltered_out"): len(chosen.prefiltered_out),
            }
        )
        if chosen.prefiltered_out:  # each candidate the measured separation left out: its rank by it
            tracker.series(
                metric(SELECTION, "prefiltered_out_rank"),
                {r.position: r.rank for r in chosen.prefiltered_out},
            )
        if chosen.ranked_out:  # each left-out candidate's scores on the prompts of its last round
            tracker.series(
                metric(SELECTION, "ranked_out_refusal_score"),
                {r.position: r.refusal_score for r in chosen.ranked_out},
            )
            tracker.series(metric(SELECTION, "ranked_out_kl"), {r.position: r.kl for r in chosen.ranked_out})
            tracker.series(
                metric(SELECTION, "ranked_out_round"), {r.position: r.round for r in chosen.ranked_out}
            )
        tracker.params(
            {
                "refusal_token_ids": chosen.refusal_token_ids,
                "refusal_tokens": chosen.refusal_tokens,
                "refusal_tokens_source": chosen.refusal_tokens_source,
            }
        )
        figures["candidate_scores.png"] = plots.candidate_scores(
            [
                {"position": c.position, "refusal_score": c.refusal_score, "kl": c.kl}
                for c in chosen.candidates
            ],
            chosen.position,
            chosen.kl_threshold,
        )
    for name, figure in figures.items():
        tracker.figure(figure, f"plots/{name}")
        plots.close(figure)


def log_rank_choice(tracker: Tracker, chosen: Chosen) -> None:
    """The rank selection chose at its position (`selection/rank`, 1: one direction), how the rank pass went
    (param `rank_pass`: none, skipped or scored; `selection/rank_floor`, the Wilson upper bound of a subspace
    refusing none, against `selection/rank_one_direction_rate`; `selection/rank_limit`, the most refusals a
    rank could leave and earn; `selection/ranks_dropped`), every rank it scored there (per subspace method,
    step = rank: refusal score and first-token refusals on the harmful prompts each saw
    (`rank_harmful_prompts`), KL where scored, whether it earns) and each direction of the chosen edit's
    share of the refusal score (`selection/share.<method>`, `none` at rank 1, step = the direction's row;
    docs/DESIGN.md)."""
    rank_pass, one = chosen.rank_pass, chosen.ranks[0]
    tracker.params(
        {
            "selected_rank": chosen.rank,
            "selected_subspace": chosen.subspace or "none",
            "rank_pass": rank_pass.state,
        }
    )
    tracker.metrics({metric(SELECTION, "rank"): chosen.rank})
    if rank_pass.state != "none":
        tracker.metrics(
            {
                metric(SELECTION, "rank_floor"): rank_pass.floor,
                metric(SELECTION, "rank_one_direction_rate"): one.refusals / max(one.prompts, 1),
                metric(SELECTION, "rank_limit"): rank_pass.limit,
                metric(SELECTION, "ranks_dropped"): rank_pass.dropped,
                metric(SELECTION, "rank_passes"): len(rank_pass.rounds),
            }
        )
    for method in sorted({r.subspace for r in chosen.ranks if r.subspace}):
        rows = [r for r in chosen.ranks if r.subspace in (None, method)]  # rank 1 is every method's first
        tracker.series(
            metric(SELECTION, f"rank_refusal_score.{method}"), {r.rank: r.refusal_score for r in rows}
        )
        tracker.series(
            metric(SELECTION, f"rank_kl.{method}"), {r.rank: r.kl for r in rows if r.kl is not None}
        )
        tracker.series(metric(SELECTION, f"rank_refusals.{method}"), {r.rank: r.refusals for r in rows})
        tracker.series(metric(SELECTION, f"rank_harmful_prompts.{method}"), {r.rank: r.prompts for r in rows})
        tracker.series(metric(SELECTION, f"rank_earns.{method}"), {r.rank: int(r.earns) for r in rows})
    for method in {d.subspace for d in chosen.shares}:
        shares = {d.index: d.share for d in chosen.shares if d.subspace == method}
        tracker.series(metric(SELECTION, f"share.{method or 'none'}"), shares)


# ------------------------------------------------------------------ ablation, validation, evaluation


def ablation_stages(
    stages: Stages,
    measured: Measured,
    ablation: Ablation,
    evaluation: Evaluation,
    template: Template,
    runtime: Runtime,
    out: str,
    overwrite: bool = False,
    force: bool = False,
    direction_position: str = "auto",
    plan: AblationPlan | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Plan -> per-shard ablation -> validation -> evaluation, all logged to the stages' run; the
    output's model card then carries the verdict, the figures and `command` (what reproduces the run).

    `direction_position` (a sweep variant's): auto (the measured choice), own, or a residual position.
    `plan`: a plan made elsewhere (a search trial's) instead of the one `ablation` describes."""
    tracker = stages.tracker
    with stages.stage("ablation"):
        inputs = load_inputs(measured.model, measured.directions_path, force)
        report_warnings(tracker, inputs.warnings, "inputs")
        if plan is None:
            position = plan_position(direction_position, measured.selection is not None)
            plan = configured_plan(inputs, ablation, position)
            tracker.params(flat_params(ablation))
        else:
            plan = resolve_plan(plan, inputs)
        matches = plan_matches(plan, inputs.inventory, inputs.structure)
        tracker.params({"plan": {k: v for k, v in plan.to_dict().items() if k != "origin"}})
        tracker.metrics({metric(EDIT, "rank"): plan.rank})
        tracker.text(plan.to_yaml(), "plan.yaml")
        tracker.metrics({metric(EDIT, f"matched.{role}"): n for role, n in role_counts(matches).items()})
        runner = task_runner(runtime)
        manifest = ablate_flow.with_options(task_runner=runner)(
            measured.model, measured.directions_path, out, plan, overwrite, force, edit_threads(runtime)
        )
        output = manifest["output"]["path"]
        tracker.json(manifest, "abliteration.json")
        tracker.tags({"output_path": output})

    with stages.stage("validation") as s:
        report: ValidationReport = s.run(validate_task, measured.model, output)
    log_validation(tracker, report)
    summary: dict[str, Any] = {
        "output": output,
        "selected_position": measured.selection.position if measured.selection else None,
        "plan": plan.to_dict(),
        "matched": role_counts(matches),
        "validation_ok": report.ok,
    }
    if not report.ok:
        update_model_card(output, validation_ok=False, command=command)
        raise AbliterateError(
            f"validation of {output} failed ({len(report.failures)} failures), e.g. {report.failures[0]}; "
            "see validation.json in the MLflow run"
        )
    if evaluation.evaluate:
        summary.update(evaluation_stage(stages, measured, evaluation, template, runtime, output))
    update_model_card(output, summary.get("evaluation"), report.ok, command)
    return summary


def evaluation_stage(
    stages: Stages,
    measured: Measured,
    evaluation: Evaluation,
    template: Template,
    runtime: Runtime,
    output: str,
) -> dict[str, Any]:
    """Before (cached per prompt set) and after, in memory or layer-streamed like the measurement,
    counting the refusal tokens selection found (the baseline's own when there was no selection)."""
    tracker = stages.tracker
    compute = measured.runtime
    stream = measured.stream
    tokens = (
        measured.selection.refusal_token_ids if measured.selection and measured.selection.scored else None
    )
    tracker.params({**flat_params(evaluation), "evaluation.full_replies_made": evaluation.replies(stream)})
    p = measured.prompts
    cost = replies_cost(
        measured.model, len(p.harmful_test) + len(p.harmless_test), evaluation, compute, stream
    )
    if cost:
        console.info(f"  evaluation   {cost} (twice: before and after)")
    with stages.stage("evaluation") as s:
        before = s.run(
            baseline_behaviour_task,
            measured.model,
            p.harmful_test,
            p.harmless_test,
            evaluation,
            template,
            compute,
            stream,
            tokens,
        )
        result = s.run(
            evaluate_task,
            output,
            p.harmful_test,
            p.harmless_test,
            evaluation,
            template,
            compute,
            stream,
            before,
            measured.model,
        )
    tracker.metrics(evaluation_metrics(result.metrics()))
    tracker.json(result.to_json(), "evaluation.json")
    if result.examples:
        tracker.table([vars(row) for row in result.examples], "examples.json")
    return {"evaluation": result.metrics(), "examples": [vars(row) for row in result.examples]}


def log_validation(tracker: Tracker, report: ValidationReport) -> None:
    tracker.json(report.to_json(), "validation.json")
    report_warnings(tracker, report.warnings, "validation")
    tracker.metrics(
        {
            metric(VALIDATION, "ok"): float(report.ok),
            metric(VALIDATION, "changed"): report.changed,
            metric(VALIDATION, "failures"): len(report.failures),
        }
    )
    changed = {metric(VALIDATION, f"changed.{role}"): n for role, n in report.changed_by_role.items()}
    tracker.metrics(changed)
    residuals = {
        metric(VALIDATION, f"residual.{role}"): w.residual for role, w in report.worst_residual.items()
    }
    tracker.metrics(residuals)
