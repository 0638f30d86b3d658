"""The search flow `abliterate-search`: the refusal-vs-KL front over layer kernels, weight roles and
routers (abliterate/search/study.py), tracked in MLflow, optionally writing the chosen trial.

inventory -> structure -> measurement -> directions (+ selection: `run`'s automatic choice)
-> expert profile (MoE: cached, one pass) -> search trials (the Optuna study in <project>/mlruns/search.db) on the validation prompts less a
   seeded confirmation slice (`search.confirm_fraction`) -> the choice confirmed on that slice
-> [with `out`: the chosen trial's plan -> per-shard ablation -> validation -> evaluation]

The evaluation's test prompts: the given test files; where the user gave training files but no test
file, the confirmation slice of them (prompts of the user's own, never measured, never scored by the
study; listed in the result and in MLflow), never the project's built-in set; where the user gave no
file at all, the project's set, with a warning when it does not fit the model's vocabulary.

MLflow: one parent run per flow run (experiment `abliterate/<model>`) holding the measurement's
records, the expert profile (`plots/expert_routing.png`, `experts/routing.json`), the study's
trials and front (`search/trials.json`, `search/front.json`, `plots/search_front.png`) and, with
`out`, the chosen trial's ablation, validation and evaluation; one nested run per trial (its
parameters, kernels, plan and both objectives), logged as the trial finishes. A rerun resumes the
study: trials an earlier, killed run finished but did not log get their nested run now, and the
killed run's parent run is marked KILLED.
"""

from __future__ import annotations

from dataclasses import replace
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
from abliterate.inference.loading import load_tokenizer
from abliterate.measure.prompts import prompts_sha256, split_prompts
from abliterate.pipeline import PromptSets, check_settings, run_paths
from abliterate.search.study import (
    Decision,
    TrialResult,
    check_study_database,
    decide,
    front_entry,
    study_summary,
)
from abliterate_flows import plots
from abliterate_flows.runtime import project_dir
from abliterate_flows.stages import Measured, Stages, ablation_stages, console, measurement_stages
from abliterate_flows.tracking import (
    SEARCH,
    TRIAL,
    Tracker,
    experiment_description,
    experiment_name,
    grouped,
    model_title,
    run_name,
    source_tags,
    tracked_run,
)
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
                "refusal_score": trial.score.refusal_score,
                "margin": trial.score.margin,
                "objective": trial.score.objective,
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
            k: trial[k]
            for k in ("refusal_rate", "refusal_score", "margin", "objective", "kl", "refusals", "prompts")
            if trial.get(k) is not None
        }
    tags = {
        STUDY_TAG: study,
        TRIAL_TAG: number,
        "search.reference": reference or "",
        "search.logged_late": late,
        "search.state": "failed" if not metrics else "complete",
    }
    position = params.get("direction_position")
    name = run_name(
        f"trial {number}",
        params.get("method"),
        f"position {position:.2f}" if isinstance(position, float) else position,
        f"rank {plan['rank']} {plan['subspace']}" if (plan or {}).get("rank", 1) > 1 else None,  # type: ignore[index]
        "run's automatic choice" if reference else None,
    )
    with tracked_run(experiment, name, tags, parent=parent) as child:
        child.params({"trial": number, **params})
        kernels = ((plan or {}).get("origin") or {}).get("search", {}).get("kernels", {})
        if kernels:
            child.params({f"kernel.{g}": spec for g, spec in kernels.items()})
        if plan is not None:
            child.text(AblationPlan.from_dict(plan).to_yaml(), "plan.yaml")
        if isinstance(trial, TrialResult) and trial.error:
            child.text(trial.error + "\n", "error.txt")
        child.metrics(grouped(TRIAL, metrics))


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


def held_out_split(sets: PromptSets, search: Search, seed: int) -> dict[str, list[str]]:
    """The validation prompts split in two (seeded): what the study scores (`harmful`, `harmless`, at
    most `search.max_prompts` each) and the confirmation slice it never scores (`confirm_harmful`,
    `confirm_harmless`; empty with `confirm_fraction` 0 or a set of fewer than 2 prompts)."""
    out: dict[str, list[str]] = {}
    for kind, val in (("harmful", sets.harmful_val), ("harmless", sets.harmless_val)):
        confirm, study = [], list(val)
        if search.confirm_fraction > 0 and len(val) >= 2:
            confirm, study = split_prompts(list(val), search.confirm_fraction, seed)
        out[kind], out[f"confirm_{kind}"] = study[: search.max_prompts], confirm
    return out


def study_step(
    stages: Stages,
    experiment: str,
    measured: Measured,
    experts: list[tuple[int, int]],
    search: Search,
    selection: Selection,
    template: Template,
    evaluation: Evaluation,
    held: dict[str, list[str]],
) -> dict[str, Any]:
    """The study's trials on the held-out (validation) prompts less the confirmation slice, each logged
    as a nested run as it finishes; trials an earlier, killed run finished but did not log are logged
    afterwards; then the choice confirmed on the slice."""
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
                f"refusal score {result.score.refusal_score:.2f}, KL {result.score.kl:.3g}"
                + (" (run's automatic choice)" if result.reference else "")
            )

    with stages.stage("search") as s:
        result = s.run(
            search_task,
            measured.model,
            measured.directions_path,
            held["harmful"],
            held["harmless"],
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
            (held["confirm_harmful"], held["confirm_harmless"]),
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
                "search.chosen_rank": (chosen.get("plan") or {}).get("rank", 1),  # written when > 1
            }
        )
    if reference:
        metrics.update(
            {
                "search.reference_refusal_rate": reference["refusal_rate"],
                "search.reference_kl": reference["kl"],
            }
        )
    confirmation = decision.confirmation
    if confirmation:
        for name in ("chosen", "reference"):
            item = confirmation.get(name)
            if item:
                metrics.update(
                    {
                        f"search.confirm.{name}_trial": item["trial"],
                        f"search.confirm.{name}_refusal_rate": item["refusal_rate"],
                        f"search.confirm.{name}_refusals": item["refusals"],
                        f"search.confirm.{name}_kl": item["kl"],
                        f"search.confirm.{name}_refusal_score": item["refusal_score"],
                        f"search.confirm.{name}_study_upper_bound": item["study_upper_bound"],
                    }
                )
        metrics["search.confirm.holds"] = float(bool(confirmation["chosen"]["holds"]))
        parent.json(confirmation, "search/confirmation.json")
    parent.metrics(grouped(SEARCH, metrics))


def report_confirmation(decision: Decision) -> None:
    """The confirmation on the console: both figures, and a loud warning when the choice failed it."""
    confirmation = decision.confirmation
    if not confirmation:
        return
    n = confirmation["prompts"]
    for name, label in (("chosen", "chosen trial"), ("reference", "run's choice")):
        item = confirmation.get(name)
        if item:
            console.info(
                f"  confirm      {label} {item['trial']}: {item['refusals']}/{item['prompts']} refusals on "
                f"{n['harmful']} + {n['harmless']} prompts the study never scored (study "
                f"{item['study_refusal_rate']:.3f}, upper bound {item['study_upper_bound']:.3f}), KL {item['kl']:.3g}"
            )
    if confirmation["warning"]:
        console.warning(f"WARNING: the search's choice does not hold: {confirmation['warning']}")


def evaluation_prompts(
    model: str, prompts: Prompts, sets: PromptSets, held: dict[str, list[str]]
) -> tuple[PromptSets, dict[str, Any], list[str]]:
    """The test prompts of the after-search evaluation: each kind's test file when given; else, when the
    user gave that kind's training file, its confirmation slice (or, without one, the study's validation
    prompts, said so); else the project's set. Returns the sets to evaluate with, a record of which
    prompts they are, and warnings (the project's set does not fit the model's vocabulary)."""
    record: dict[str, Any] = {}
    test = {"harmful": sets.harmful_test, "harmless": sets.harmless_test}
    warnings = []
    for kind in ("harmful", "harmless"):
        given_test, given_train = getattr(prompts, f"{kind}_test"), getattr(prompts, kind)
        if given_test:
            source = f"the test file {given_test}"
        elif given_train:
            if held[f"confirm_{kind}"]:
                test[kind] = held[f"confirm_{kind}"]
                source = (
                    f"the confirmation slice of {given_train} (never measured, never scored by the study)"
                )
            else:
                test[kind] = held[kind]
                source = f"the validation part of {given_train} the study scored (no confirmation slice)"
        else:
            source = f"the project's prompt set ({sets.files[f'{kind}_test']})"
        record[kind] = {"source": source, "n": len(test[kind]), "sha256": prompts_sha256(test[kind])}
        record[kind]["prompts"] = list(test[kind])
    if not (prompts.harmful_test or prompts.harmful):
        share = unknown_share(model, test["harmful"] + test["harmless"])
        if share > 0.01:
            warnings.append(
                f"the project's prompt set does not fit this model's vocabulary ({share:.0%} of its tokens are "
                "unknown): no prompt set matches, so the test figures mean little; give prompts in the model's "
                "language and casing with --harmful/--harmless (and --harmful-test/--harmless-test)"
            )
    evaluated = replace(sets, harmful_test=test["harmful"], harmless_test=test["harmless"])
    return evaluated, record, warnings


def unknown_share(model: str, texts: list[str]) -> float:
    """The share of the tokens of `texts` that the model's tokenizer does not know (0 without an unknown token)."""
    tokenizer = load_tokenizer(model)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None or not texts:
        return 0.0
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return sum(i == unknown for i in ids) / max(len(ids), 1)


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
    """The chosen trial's plan through the shard engine, validated and evaluated on the test prompts
    (`measured.prompts`' test sets: `evaluation_prompts`)."""
    chosen = decision.chosen
    if chosen is None:
        raise AbliterateError(f"nothing to write to {out}: {decision.reason}")
    console.info(
        f"  writing      trial {chosen['trial']} (refusal rate {chosen['refusal_rate']:.3f}, "
        f"refusal score {chosen.get('refusal_score') or float('nan'):.2f}, KL {chosen['kl']:.3g}) to {out}"
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
    check_settings(evaluation)
    check_study_database(project_dir() / "mlruns")
    run = {"prefect.flow_run_id": flow_run.get_id(), "prefect.flow_run_name": flow_run.get_name()}
    tags = {
        **run,
        "prefect.flow_name": "abliterate-search",
        "model_dir": model,
        "output_path": out or "",
        **source_tags(source, model),
    }
    experiment = experiment_name(model)
    title = model_title(model)
    with tracked_run(
        experiment,
        run_name("search", f"{search.trials} trials", title),
        tags,
        description=experiment_description(model),
    ) as parent:
        stages = Stages(parent)
        measured = measurement_stages(
            stages, model, prompts, template, measurement, selection, runtime, work, evaluation
        )
        parent.params(flat_params(search))
        experts = profile_experts_step(stages, measured, measurement, template, search)
        held = held_out_split(measured.prompts, search, prompts.seed)
        result = study_step(
            stages, experiment, measured, experts, search, selection, template, evaluation, held
        )
        decision = decide(result["trials"], search, result.get("confirmation"))
        log_front(parent, result, decision, search)
        chosen = f"chosen trial {decision.chosen['trial']}" if decision.chosen else "no trial chosen"
        parent.rename(run_name("search", f"{len(decision.trials)} trials", chosen, title))
        report_confirmation(decision)
        position = measured.selection.position if measured.selection else None
        summary = study_summary(result, decision, search, position)
        if out:
            sets, tested, warnings = evaluation_prompts(model, prompts, measured.prompts, held)
            parent.json(tested, "search/evaluation_prompts.json")
            for warning in warnings:
                console.warning(f"warning: {warning}")
            summary["evaluation_prompts"] = tested
            summary["warnings"] = warnings
            summary.update(
                write_choice_step(
                    stages,
                    replace(measured, prompts=sets),
                    decision,
                    search,
                    evaluation,
                    template,
                    runtime,
                    out,
                    overwrite,
                    force,
                )
            )
        summary.update(mlflow_run_id=parent.run_id, durations=stages.durations, **run)
        parent.json(summary, "summary.json")
    return summary
