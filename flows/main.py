"""The main flow `abliterate`: inventory -> structure -> measurement -> directions + selection ->
plan -> per-shard ablation (mapped) -> validation -> evaluation, one MLflow run per flow run.

The stages are plain functions that take a Tracker, so the sweep flow reuses them: the
measurement stage once, the ablation stage once per variant. Every task is cached by content
(see tasks/), so a rerun with other layer targets or scales reuses everything up to the plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from abliterate.ablate import load_inputs
from abliterate.checkpoint import check_output_location
from abliterate.demo import prompt_file
from abliterate.direction_file import load_directions
from abliterate.directions import DEFAULT_METHOD
from abliterate.errors import AbliterateError
from abliterate.evaluate import EvalSettings, EvaluationResult
from abliterate.matching import default_plan, plan_matches, role_counts
from abliterate.measure import MeasureSettings
from abliterate.plan import DEFAULT_TARGETS
from abliterate.prompts import load_prompts, prompts_sha256, split_prompts
from abliterate.selection import Selection, SelectionSettings
from abliterate.streaming import choose_streaming, parse_size
from abliterate.structure import Structure
from abliterate.validate import ValidationReport
from flows import plots
from flows.ablate import ablate_flow, task_runner
from flows.inventory import log_structure
from flows.runtime import project_dir, results_dir
from flows.tracking import Tracker, experiment_name, tracked_run
from tasks.inventory import inventory_task, structure_task
from tasks.measure import directions_task, measure_task
from tasks.validate import baseline_behaviour_task, evaluate_task, validate_task


@dataclass
class PromptSets:
    """Measurement and validation parts of each set (split here, seeded), and the test sets."""

    harmful: list[str]
    harmless: list[str]
    harmful_val: list[str]
    harmless_val: list[str]
    harmful_test: list[str]
    harmless_test: list[str]
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        harmful: str | None,
        harmless: str | None,
        harmful_test: str | None,
        harmless_test: str | None,
        validation_fraction: float,
        seed: int,
        default_set: str = "general",
    ) -> PromptSets:
        files = {
            "harmful": harmful or str(prompt_file(default_set, "harmful", "train")),
            "harmless": harmless or str(prompt_file(default_set, "harmless", "train")),
            "harmful_test": harmful_test or str(prompt_file(default_set, "harmful", "test")),
            "harmless_test": harmless_test or str(prompt_file(default_set, "harmless", "test")),
        }
        if not 0 < validation_fraction < 1:
            raise AbliterateError(f"validation fraction must lie in (0, 1), got {validation_fraction}")
        harmful_val, harmful_meas = split_prompts(load_prompts(files["harmful"]), validation_fraction, seed)
        harmless_val, harmless_meas = split_prompts(load_prompts(files["harmless"]), validation_fraction, seed)
        return cls(
            harmful_meas, harmless_meas, harmful_val, harmless_val,
            load_prompts(files["harmful_test"]), load_prompts(files["harmless_test"]), files,
        )  # fmt: skip

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"prompts.{k}.file": v for k, v in self.files.items()}
        for name in ("harmful", "harmless", "harmful_val", "harmless_val", "harmful_test", "harmless_test"):
            prompts = getattr(self, name)
            out[f"prompts.{name}.n"] = len(prompts)
            out[f"prompts.{name}.sha256"] = prompts_sha256(prompts)
        return out


def run_settings(
    prompts_args: tuple, position: int, system_prompt: str | None, chat_template_kwargs: dict[str, Any] | None,
    kl_threshold: float, batch_size: int, max_new_tokens: int,
) -> tuple[PromptSets, MeasureSettings, SelectionSettings, EvalSettings]:
    """The settings objects both flows build from their (flat, UI-friendly) parameters."""
    measure = MeasureSettings.create(
        chat_template_kwargs, position=position, system_prompt=system_prompt, batch_size=batch_size
    )
    evaluation = EvalSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt,
                              chat_template_kwargs=measure.chat_template_kwargs)
    selection = SelectionSettings(kl_threshold=kl_threshold, batch_size=batch_size)
    return PromptSets.load(*prompts_args), measure, selection, evaluation  # fmt: skip


@dataclass
class Measured:
    """What the measurement stage hands to every ablation: reused by all variants of a sweep."""

    model: str
    structure: Structure
    directions_path: str
    selection: Selection
    prompts: PromptSets


class Stopwatch:
    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.durations: dict[str, float] = {}

    def stage(self, name: str, began: float) -> None:
        self.durations[name] = round(time.perf_counter() - began, 3)
        self.tracker.metrics({f"duration.{name}": self.durations[name]})


def measurement_stage(
    tracker: Tracker,
    watch: Stopwatch,
    model: str,
    prompts: PromptSets,
    settings: MeasureSettings,
    direction_method: str,
    selection: SelectionSettings,
    work_dir: str,
    stream: bool = False,
    fixed_position: int | None = None,
) -> Measured:
    """`stream`: the model does not fit in memory, so it is measured layer by layer and the
    direction cannot be selected by inference-time scoring: `fixed_position` is required."""
    began = time.perf_counter()
    inventory = inventory_task(model)
    structure = structure_task(inventory)
    log_structure(tracker, structure, inventory.to_json())
    watch.stage("inventory", began)
    if stream and fixed_position is None:
        raise AbliterateError(
            f"{model} does not fit the memory budget, so it is measured layer-streamed; automatic direction "
            "selection needs the whole model in memory: pass an explicit direction position (e.g. "
            f"direction_position={int(structure.num_layers * 0.6)}), or a larger memory budget"
        )

    began = time.perf_counter()
    measurement = measure_task(model, prompts.harmful, prompts.harmless, settings, stream)
    watch.stage("measurement", began)

    began = time.perf_counter()
    args = (model, inventory.fingerprint, measurement, direction_method, prompts.harmful_val,
            prompts.harmless_val, selection, work_dir, fixed_position if stream else None)  # fmt: skip
    directions_path, chosen = directions_task(*args)
    if not Path(directions_path).is_file():  # the cached result names a file someone deleted: make it again
        directions_path, chosen = directions_task.with_options(refresh_cache=True)(*args)
    watch.stage("directions", began)
    log_directions(tracker, directions_path, chosen)
    tracker.params(
        {**prompts.params(), "measure": settings.as_dict(), "direction_method": direction_method,
         "selection": selection.as_dict()}
    )  # fmt: skip
    return Measured(model, structure, directions_path, chosen, prompts)


def log_directions(tracker: Tracker, directions_path: str, selection: Selection) -> None:
    directions = load_directions(directions_path)
    stats = directions.metadata.get("stats", {})
    tracker.series("direction_norm", dict(enumerate(stats.get("mean_diff_norm", []))))
    tracker.series("direction_snr", dict(enumerate(stats.get("snr", []))))
    tracker.series("direction_cos_selected", dict(enumerate(stats.get("cos_selected", []))))
    tracker.series("candidate_refusal_score", {c.position: c.refusal_score for c in selection.candidates})
    tracker.series("candidate_kl", {c.position: c.kl for c in selection.candidates})
    tracker.metrics({"selected_position": selection.position, "baseline_refusal_score": selection.baseline_refusal_score})
    tracker.params({"selected_position": selection.position, "directions_sha256": directions.sha256()})
    tracker.file(directions_path)
    tracker.json(directions.metadata, "directions.json")
    for name, figure in (
        ("direction_strength.png", plots.direction_strength(stats, selection.position) if stats else None),
        ("direction_cosine.png", plots.cosine_heatmap(directions.direction)),
        ("candidate_scores.png", plots.candidate_scores(
            [{"position": c.position, "refusal_score": c.refusal_score, "kl": c.kl} for c in selection.candidates],
            selection.position, selection.kl_threshold)),
    ):  # fmt: skip
        if figure is not None:
            tracker.figure(figure, f"plots/{name}")
            plots.close(figure)


@dataclass
class AblationSpec:
    """The ablation settings a user varies between runs."""

    layers: str = "all"
    scale: str = "1.0"
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    direction_position: str = "auto"  # auto (the selected one) | own | a residual position
    method: str = "plain"
    mtp: str = "ablate"
    biases: bool = False
    workers: int = 2  # shards ablated at once (threads), unless Dask is used
    dask_address: str | None = None  # a Dask scheduler, e.g. tcp://10.0.0.5:8786
    dask_workers: int | None = None  # a local Dask cluster of this many processes


def ablation_stage(
    tracker: Tracker,
    watch: Stopwatch,
    measured: Measured,
    spec: AblationSpec,
    out: str,
    evaluation: EvalSettings | None,
    overwrite: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Plan -> per-shard ablation -> validation -> evaluation, all logged to `tracker`'s run."""
    began = time.perf_counter()
    inputs = load_inputs(measured.model, measured.directions_path, force)
    report_warnings(tracker, inputs.warnings, "inputs")
    position = "selected" if spec.direction_position == "auto" else spec.direction_position
    plan = default_plan(
        inputs, layers=spec.layers, scale=spec.scale, targets=spec.targets, direction_position=position,
        method=spec.method, mtp=spec.mtp, biases=spec.biases,
    )  # fmt: skip
    matches = plan_matches(plan, inputs.inventory, inputs.structure)
    tracker.params({"plan": plan.to_dict()})
    tracker.text(plan.to_yaml(), "plan.yaml")
    tracker.metrics({f"matched.{role}": n for role, n in role_counts(matches).items()})
    runner = task_runner(spec.workers, spec.dask_address, spec.dask_workers)
    manifest = ablate_flow.with_options(task_runner=runner)(
        measured.model, measured.directions_path, out, plan.to_dict(), overwrite, force
    )
    output = manifest["output"]["path"]
    tracker.json(manifest, "abliteration.json")
    tracker.tags({"output_path": output})
    watch.stage("ablation", began)

    began = time.perf_counter()
    report: ValidationReport = validate_task(measured.model, output)
    watch.stage("validation", began)
    log_validation(tracker, report)
    summary: dict[str, Any] = {
        "output": output,
        "selected_position": measured.selection.position,
        "plan": plan.to_dict(),
        "matched": role_counts(matches),
        "validation_ok": report.ok,
    }
    if not report.ok:
        raise AbliterateError(
            f"validation of {output} failed ({len(report.failures)} failures), e.g. {report.failures[0]}; "
            "see validation.json in the MLflow run"
        )
    if evaluation is not None:
        began = time.perf_counter()
        p = measured.prompts
        before = baseline_behaviour_task(measured.model, p.harmful_test, p.harmless_test, evaluation)
        result: EvaluationResult = evaluate_task(
            output, p.harmful_test, p.harmless_test, evaluation, before, measured.model
        )
        watch.stage("evaluation", began)
        tracker.metrics(result.metrics())
        tracker.json(result.to_json(), "evaluation.json")
        tracker.table([vars(row) for row in result.examples], "examples.json")
        summary["evaluation"] = result.metrics()
        summary["examples"] = [vars(row) for row in result.examples]
    return summary


def report_warnings(tracker: Tracker, warnings: list[str], stage: str) -> None:
    """Show warnings in the Prefect log (log_prints) and keep them with the MLflow run."""
    for warning in warnings:
        print(f"warning: {warning}")
    if warnings:
        tracker.text("\n".join(warnings) + "\n", f"warnings/{stage}.txt")


def log_validation(tracker: Tracker, report: ValidationReport) -> None:
    tracker.json(report.to_json(), "validation.json")
    report_warnings(tracker, report.warnings, "validation")
    tracker.metrics({"validation.ok": float(report.ok), "validation.changed": report.changed,
                     "validation.failures": len(report.failures)})  # fmt: skip
    tracker.metrics({f"validation.changed.{role}": n for role, n in report.changed_by_role.items()})
    tracker.metrics({f"residual.{role}": w.residual for role, w in report.worst_residual.items()})


@flow(name="abliterate", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def abliterate_flow(
    model: str,
    out: str,
    harmful: str | None = None,
    harmless: str | None = None,
    harmful_test: str | None = None,
    harmless_test: str | None = None,
    validation_fraction: float = 0.25,
    seed: int = 0,
    position: int = -1,
    system_prompt: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    direction_method: str = DEFAULT_METHOD,
    kl_threshold: float = 0.1,
    layers: str | int = "all",
    direction_position: str | int = "auto",
    scale: str | float = "1.0",
    targets: list[str] = list(DEFAULT_TARGETS),  # noqa: B006 - Prefect shows it in the UI form
    method: str = "plain",
    mtp: str = "ablate",
    evaluate: bool = True,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    overwrite: bool = False,
    force: bool = False,
    work_dir: str | None = None,
    prompt_set: str = "general",
    workers: int = 2,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    memory_budget: str | None = None,
    streaming: str = "auto",
) -> dict[str, Any]:
    """Abliterate MODEL into OUT: measure the refusal direction, project it out of every matched
    weight shard by shard, validate the output and evaluate its behaviour. Tracked in MLflow.

    Prompt files default to the project's `prompt_set` (general or demo); each of `harmful` and
    `harmless` is split (seeded) into measurement and validation parts, the test files evaluate.
    `layers`: all | 10-30 | 5,7,9-12. `direction_position`: auto | own | N. `scale`: 1.0 | list |
    gauss:center=..,width=..,peak=... `method`: plain | norm_preserving | projected. `mtp`: ablate | skip.
    Shards are ablated by `workers` threads, or on Dask: `dask_address` (a scheduler) or `dask_workers`
    (a local cluster of processes). A model larger than `memory_budget` (e.g. "64GiB"; default: the free
    memory) is measured layer-streamed (`streaming`: auto | always | never); it then needs an explicit
    `direction_position`, and evaluation is skipped (it needs the whole model).
    """
    model = str(Path(model).resolve())
    out = str(Path(out).resolve())
    work = str(check_output_location(model, work_dir or results_dir()))  # never write into the input
    check_output_location(model, project_dir() / "mlruns")
    prompts, settings, selection, evaluation = run_settings(
        (harmful, harmless, harmful_test, harmless_test, validation_fraction, seed, prompt_set),
        position, system_prompt, chat_template_kwargs, kl_threshold, batch_size, max_new_tokens,
    )  # fmt: skip
    # `prefect deployment run -p scale=0.8` sends numbers: the specs are text
    spec = AblationSpec(str(layers), str(scale), list(targets), str(direction_position), method, mtp, False,
                        workers, dask_address, dask_workers)  # fmt: skip
    stream = choose_streaming(model, parse_size(memory_budget), mode=streaming)
    fixed = int(direction_position) if str(direction_position).isdigit() else None
    if stream or not evaluate:  # evaluation needs the whole model in memory
        evaluation = None
    tags = {"prefect.flow_run_id": flow_run.get_id(), "prefect.flow_name": "abliterate", "model_dir": model,
            "output_path": out}  # fmt: skip
    with tracked_run(experiment_name(model), flow_run.get_name() or "abliterate", tags) as tracker:
        watch = Stopwatch(tracker)
        tracker.params({"streaming": stream})
        measured = measurement_stage(
            tracker, watch, model, prompts, settings, direction_method, selection, work, stream, fixed
        )
        summary = ablation_stage(tracker, watch, measured, spec, out, evaluation, overwrite, force)
        summary.update(mlflow_run_id=tracker.run_id, durations=watch.durations)
        tracker.json(summary, "summary.json")
    return summary
