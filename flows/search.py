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
    measure_settings,
)
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.search.study import ScoreSettings, StudySettings, TrialResult, choose, pareto
from abliterate_flows import plots
from abliterate_flows.main import check_out, run_paths, source_tags
from abliterate_flows.runtime import project_dir
from abliterate_flows.stages import Stages, ablation_stages, console, measurement_stages
from abliterate_flows.tracking import Tracker, experiment_name, tracked_run
from abliterate_tasks.search import expert_profile_task, search_task

STUDY_TAG = "search.study"
TRIAL_TAG = "search.trial"


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


def search_record(record: dict[str, Any]) -> dict[str, Any]:
    """A front entry as the result shows it: trial number, refusal rate, KL, parameters."""
    return {
        k: record[k]
        for k in ("trial", "refusal_rate", "kl", "refusals", "prompts", "parameters", "reference")
    }


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
        check_out(out, overwrite)
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
        sets, compute = measured.prompts, measured.runtime
        experts: list[tuple[int, int]] = []
        if measured.structure.moe_layers:  # which experts the prompts reach: logged for every MoE model
            with stages.stage("experts") as s:
                profile = s.run(
                    expert_profile_task,
                    model,
                    sets.harmful,
                    sets.harmless,
                    measure_settings(measurement, template, compute),
                    compute.device,
                    measured.stream,
                )
            parent.table(profile.rows(), "experts/routing.json")
            parent.json(profile.to_json(), "experts/profile.json")
            figure = plots.expert_routing(profile.layers, profile.harmful, profile.harmless)
            parent.figure(figure, "plots/expert_routing.png")
            plots.close(figure)
            if "router_bias" in search.components:
                experts = [(layer, e) for layer, e, _ in profile.most_specific(search.router_experts)]
                parent.params({"search.suppressible_experts": experts})

        limit = search.max_prompts
        harmful_val, harmless_val = sets.harmful_val[:limit], sets.harmless_val[:limit]
        scoring = ScoreSettings(
            reply_tokens=search.reply_tokens,
            batch_size=compute.batch_size,
            markers=tuple(evaluation.marker_list()),
            system_prompt=template.system_prompt,
            chat_template_kwargs=tuple(sorted(template.chat_template_kwargs.items())),
        )
        settings = StudySettings(
            trials=search.trials,
            components=tuple(search.components),
            methods=tuple(search.methods),
            seed=search.search_seed,
            startup_trials=search.startup_trials,
            parallel_trials=search.parallel_trials,
            router_experts=search.router_experts,
            skip_last_fraction=selection.skip_last_fraction,
            study=search.study,
        )
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

        with stages.stage("search") as s:
            result = s.run(
                search_task,
                model,
                measured.directions_path,
                harmful_val,
                harmless_val,
                settings,
                scoring,
                str(project_dir() / "mlruns"),
                compute.dtype,
                compute.device,
                measured.stream,
                experts,
                on_trial,
                on_start,
            )
        records = result["trials"]
        logged = _logged_trials(parent, experiment_id, result["study"])
        for record in records:  # trials a killed run finished before it could log them
            if record["trial"] not in logged:
                log_trial(parent, experiment, result["study"], record, late=True)
        front = pareto(records)
        reference = next((r for r in records if r.get("reference") == "run"), None)
        try:
            chosen, reason = choose(records, search.kl_max, search.trial), None
        except AbliterateError as exc:
            chosen, reason = None, str(exc)
        parent.table(
            [
                {k: v for k, v in search_record(r).items() if k != "parameters"} | r["parameters"]
                for r in records
            ],
            "search/trials.json",
        )
        parent.table(
            [
                {k: v for k, v in search_record(r).items() if k != "parameters"} | r["parameters"]
                for r in front
            ],
            "search/front.json",
        )
        figure = plots.search_front(records, front, reference, chosen, search.kl_max)
        parent.figure(figure, "plots/search_front.png")
        plots.close(figure)
        parent.tags({"front": ",".join(str(r["trial"]) for r in front)})
        parent.metrics(
            {
                "search.trials_complete": len(records),
                "search.new_trials": len(result["new_trials"]),
                "search.front_size": len(front),
                "search.trials_per_minute": result["trials_per_minute"],
                "search.baseline_refusal_rate": result["baseline"]["refusal_rate"],
                **(
                    {
                        "search.chosen_trial": chosen["trial"],
                        "search.chosen_refusal_rate": chosen["refusal_rate"],
                        "search.chosen_kl": chosen["kl"],
                    }
                    if chosen
                    else {}
                ),
                **(
                    {
                        "search.reference_refusal_rate": reference["refusal_rate"],
                        "search.reference_kl": reference["kl"],
                    }
                    if reference
                    else {}
                ),
            }
        )
        summary: dict[str, Any] = {
            "study": result["study"],
            "storage": result["storage"],
            "trials_complete": len(records),
            "new_trials": len(result["new_trials"]),
            "resumed_from": result["resumed_from"],
            "stale_trials": result["stale_trials"],
            "seconds": result["seconds"],
            "trials_per_minute": result["trials_per_minute"],
            "baseline": result["baseline"],
            "selected_position": measured.selection.position if measured.selection else None,
            "reference": search_record(reference) if reference else None,
            "pareto": [search_record(r) for r in front],
            "chosen": {**search_record(chosen), "plan": chosen["plan"]} if chosen else None,
            "chosen_reason": reason,
            "kl_max": search.kl_max,
        }
        if out:
            if chosen is None:
                raise AbliterateError(f"nothing to write to {out}: {reason}")
            console.info(
                f"  writing      trial {chosen['trial']} (refusal rate {chosen['refusal_rate']:.3f}, "
                f"KL {chosen['kl']:.3g}) to {out}"
            )
            recorded = dict(chosen["plan"])
            origin = dict(recorded.get("origin") or {})
            origin["search"] = {
                **origin.get("search", {}),
                "objectives": {k: chosen[k] for k in ("refusal_rate", "kl", "refusals", "prompts")},
                "kl_max": search.kl_max,
                "pareto": [r["trial"] for r in front],
            }
            plan = AblationPlan.from_dict({**recorded, "origin": origin}, f"trial {chosen['trial']}'s plan")
            written = ablation_stages(
                stages, measured, Ablation(), evaluation, template, runtime, out, overwrite, force, plan=plan
            )
            summary.update({k: v for k, v in written.items() if k != "plan"})
        summary.update(mlflow_run_id=parent.run_id, durations=stages.durations, **run)
        parent.json(summary, "summary.json")
    return summary
