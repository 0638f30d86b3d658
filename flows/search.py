"""The search flow `abliterate-search`: the refusal-vs-KL front over layer kernels, weight roles and
routers (abliterate/search/study.py), tracked in MLflow, optionally writing the chosen trial.

inventory -> structure -> measurement -> directions (+ selection: `run`'s automatic choice)
-> expert profile (MoE: cached, one pass) -> search trials (the Optuna study in <project>/mlruns/search.db)
-> [with `out`: the chosen trial's plan -> per-shard ablation -> validation -> evaluation]

MLflow: one parent run per flow run (experiment `abliterate/<model>`) holding the measurement's
records, the expert profile (`plots/expert_routing.png`, `experts/routing.json`), the study's
trials and front (`search/trials.json`, `search/front.json`, `plots/search_front.png`) and, with
`out`, the chosen trial's ablation, validation and evaluation; one nested run per trial (its
parameters, kernels, plan and both objectives), logged as the trial finishes. A rerun resumes the
study: trials an earlier, killed run finished but did not log get their nested run now, and the
killed run's parent run is marked KILLED.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from abliterate.config import (
    Ablation,
    Evaluation,
    Measurement,
    Prompts,
    Runtime,
    Search,
    Selection,
    Template,
    flat_params,
)
from abliterate.edit.output import precheck_output
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.pipeline import run_paths
from abliterate.search.study import Decision, TrialResult, decide, front_entry, study_summary
from abliterate_flows import plots
from abliterate_flows.runtime import project_dir
from abliterate_flows.stages import Measured, Stages, ablation_stages, console, measurement_stages
from abliterate_flows.tracking import Tracker, experiment_name, source_tags, tracked_run
from abliterate_tasks.search import expert_profile_task, search_task

STUDY_TAG = "search.study"
TRIAL_TAG = "search.trial"


# ------------------------------------------------------------------ MLflow records of the study


def log_trial(
    parent: Tracker, experiment: str, study: str, trial: TrialResult | dict[str, Any], late: bool = False
) -> None:
    """One nested run: the trial's parameters, kernels and plan, and both objectives."""
    if isinstance(trial, TrialResult):
        number, params, plan, reference = trial.number, trial.parameters, trial.plan, trial.reference
        metrics = (
            {}
            if trial.score is None
            else {
                "refusal_rate": trial.score.refusal_rate,
                "kl": trial.score.kl,
                "refusals": trial.score.refusals,
                "prompts": trial.score.prompts,
                "seconds": trial.score.seconds,
            }
        )
    else:
        number, params, plan, reference = (
            trial["trial"],
            trial["parameters"],
            trial["plan"],
            trial.get("reference"),
        )
        metrics = {
            k: trial[k] for k in ("refusal_rate", "kl", "refusals", "prompts") if trial.get(k) is not None
        }
    tags = {
        STUDY_TAG: study,
        TRIAL_TAG: number,
        "search.reference": reference or "",
        "search.logged_late": late,
        "search.state": "failed" if not metrics else "complete",
    }
    with tracked_run(experiment, f"trial-{number}", tags, parent=parent) as child:
        child.params({"trial": number, **params})
        kernels = ((plan or {}).get("origin") or {}).get("search", {}).get("kernels", {})
        if kernels:
            child.params({f"kernel.{g}": spec for g, spec in kernels.items()})
        if plan is not None:
            child.text(AblationPlan.from_dict(plan).to_yaml(), "plan.yaml")
        if isinstance(trial, TrialResult) and trial.error:
            child.text(trial.error + "\n", "error.txt")
        child.metrics(metrics)


def _close_killed_runs(parent: Tracker, experiment_id: str, study: str) -> int:
    """Parent runs of this study still RUNNING belong to killed searches (the study's lock is ours)."""
    found = parent.client.search_runs(
        [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study}' and attributes.status = 'RUNNING'"
    )
    killed = [r for r in found if r.info.run_id != parent.run_id and "mlflow.parentRunId" not in r.data.tags]
    for run in killed:
        parent.client.set_terminated(run.info.run_id, "KILLED")
    return len(killed)


def _logged_trials(parent: Tracker, experiment_id: str, study: str) -> set[int]:
    runs = parent.client.search_runs(
        [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study}'", max_results=50000
    )
    return {
        int(r.data.tags[TRIAL_TAG])
        for r in runs
        if TRIAL_TAG in r.data.tags and r.data.tags.get("search.state") == "complete"
    }


def _trial_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial: the objectives, then the parameters as columns."""
    rows = []
    for r in records:
        entry = front_entry(r)
        rows.append({k: v for k, v in entry.items() if k != "parameters"} | entry["parameters"])
    return rows


# ------------------------------------------------------------------ the flow's steps


def profile_experts_step(
    stages: Stages,
    measured: Measured,
    measurement: Measurement,
    template: Template,
    search: Search,
) -> list[tuple[int, int]]:
    """Which experts the prompts reach (logged for every MoE model); returns the router_bias
    candidates, most refusal-specific first (none unless the search has the router_bias component)."""
    if not measured.structure.moe_layers:
        return []
    parent, sets = stages.tracker, measured.prompts
    with stages.stage("experts") as s:
        profile = s.run(
            expert_profile_task,
            measured.model,
            sets.harmful,
            sets.harmless,
            measurement,
            template,
            measured.runtime,
            measured.stream,
        )
    parent.table(profile.rows(), "experts/routing.json")
    parent.json(profile.to_json(), "experts/profile.json")
    figure = plots.expert_routing(profile.layers, profile.harmful, profile.harmless)
    parent.figure(figure, "plots/expert_routing.png")
    plots.close(figure)
    if "router_bias" not in search.components:
        return []
    experts = [(layer, e) for layer, e, _ in profile.most_specific(search.router_experts)]
    parent.params({"search.suppressible_experts": experts})
    return experts


def study_step(
    stages: Stages,
    experiment: str,
    measured: Measured,
    experts: list[tuple[int, int]],
    search: Search,
    selection: Selection,
    template: Template,
    evaluation: Evaluation,
) -> dict[str, Any]:
    """The study's trials on the held-out (validation) prompts, each logged as a nested run as it
    finishes; trials an earlier, killed run finished but did not log are logged afterwards."""
    parent = stages.tracker
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    study: dict[str, Any] = {}

    def on_start(info: dict[str, Any]) -> None:
        study.update(info)
        parent.tags({STUDY_TAG: info["study"]})
        parent.json(info, "search/study.json")
        closed = _close_killed_runs(parent, experiment_id, info["study"])
        console.info(
            f"  search       study {info['study']} in {info['storage']}"
            + (f" (marked {closed} killed run(s) KILLED)" if closed else "")
        )

    def on_trial(result: TrialResult) -> None:
        log_trial(parent, experiment, study["study"], result)
        if result.score is None:
            console.info(f"  trial {result.number:<5} failed: {result.error}")
        else:
            console.info(
                f"  trial {result.number:<5} refusals {result.score.refusals}/{result.score.prompts}, "
                f"KL {result.score.kl:.3g}" + (" (run's automatic choice)" if result.reference else "")
            )

    sets, limit = measured.prompts, search.max_prompts
    with stages.stage("search") as s:
        result = s.run(
            search_task,
            measured.model,
            measured.directions_path,
            sets.harmful_val[:limit],
            sets.harmless_val[:limit],
            search,
            selection,
            template,
            evaluation,
            measured.runtime,
            str(project_dir() / "mlruns"),
            measured.stream,
            experts,
            on_trial,
            on_start,
        )
    logged = _logged_trials(parent, experiment_id, result["study"])
    for record in result["trials"]:  # trials a killed run finished before it could log them
        if record["trial"] not in logged:
            log_trial(parent, experiment, result["study"], record, late=True)
    return result


def log_front(parent: Tracker, result: dict[str, Any], decision: Decision, search: Search) -> None:
    """The parent run's record of the study: every trial, the front, its figure and the headline figures."""
    records, front, reference, chosen = decision.trials, decision.front, decision.reference, decision.chosen
    parent.table(_trial_table(records), "search/trials.json")
    parent.table(_trial_table(front), "search/front.json")
    figure = plots.search_front(records, front, reference, chosen, search.kl_max)
    parent.figure(figure, "plots/search_front.png")
    plots.close(figure)
    parent.tags({"front": ",".join(str(r["trial"]) for r in front)})
    metrics = {
        "search.trials_complete": len(records),
        "search.new_trials": len(result["new_trials"]),
        "search.front_size": len(front),
        "search.trials_per_minute": result["trials_per_minute"],
        "search.baseline_refusal_rate": result["baseline"]["refusal_rate"],
    }
    if chosen:
        metrics.update(
            {
                "search.chosen_trial": chosen["trial"],
                "search.chosen_refusal_rate": chosen["refusal_rate"],
                "search.chosen_kl": chosen["kl"],
            }
        )
    if reference:
        metrics.update(
            {
                "search.reference_refusal_rate": reference["refusal_rate"],
                "search.reference_kl": reference["kl"],
            }
        )
    parent.metrics(metrics)


def write_choice_step(
    stages: Stages,
    measured: Measured,
    decision: Decision,
    search: Search,
    evaluation: Evaluation,
    template: Template,
    runtime: Runtime,
    out: str,
    overwrite: bool,
    force: bool,
) -> dict[str, Any]:
    """The chosen trial's plan through the shard engine, validated and evaluated on the test prompts."""
    chosen = decision.chosen
    if chosen is None:
        raise AbliterateError(f"nothing to write to {out}: {decision.reason}")
    console.info(
        f"  writing      trial {chosen['trial']} (refusal rate {chosen['refusal_rate']:.3f}, "
        f"KL {chosen['kl']:.3g}) to {out}"
    )
    written = ablation_stages(
        stages,
        measured,
        Ablation(),
        evaluation,
        template,
        runtime,
        out,
        overwrite,
        force,
        plan=decision.chosen_plan(search),
    )
    return {k: v for k, v in written.items() if k != "plan"}


# ------------------------------------------------------------------ the flow


@flow(name="abliterate-search", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def search_flow(
    model: str,
    out: str | None = None,
    search: Search = Search(),
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
    """Search MODEL's ablation parameters (direction position, ablation method, a layer kernel per
    component group, optionally the routers' expert choice) for the refusal-vs-KL front, each trial
    scored at inference time on the held-out validation prompts; with OUT, write the chosen trial
    through the shard engine, validate and evaluate it on the test prompts. The study resumes and
    continues across runs (`search.trials` is the number of complete trials it should hold)."""
    if selection.direction_position == "none":
        raise AbliterateError("direction position `none` only measures: use `abliterate measure` for that")
    source = model
    model, out, work = run_paths(model, out, work_dir)
    if out:
        precheck_output(out, overwrite)
    run = {"prefect.flow_run_id": flow_run.get_id(), "prefect.flow_run_name": flow_run.get_name()}
    tags = {
        **run,
        "prefect.flow_name": "abliterate-search",
        "model_dir": model,
        "output_path": out or "",
        **source_tags(source, model),
    }
    experiment = experiment_name(model)
    with tracked_run(experiment, f"search-{flow_run.get_name()}", tags) as parent:
        stages = Stages(parent)
        measured = measurement_stages(
            stages, model, prompts, template, measurement, selection, runtime, work, evaluation
        )
        parent.params(flat_params(search))
        experts = profile_experts_step(stages, measured, measurement, template, search)
        result = study_step(stages, experiment, measured, experts, search, selection, template, evaluation)
        decision = decide(result["trials"], search)
        log_front(parent, result, decision, search)
        position = measured.selection.position if measured.selection else None
        summary = study_summary(result, decision, search, position)
        if out:
            summary.update(
                write_choice_step(
                    stages, measured, decision, search, evaluation, template, runtime, out, overwrite, force
                )
            )
        summary.update(mlflow_run_id=parent.run_id, durations=stages.durations, **run)
        parent.json(summary, "summary.json")
    return summary
