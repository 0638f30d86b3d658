"""Automatic search: the Optuna study of the refusal-vs-KL front, and the trial to write.

A multi-objective TPE study (both objectives minimised) over the space of `abliterate.search.space`:
each trial's parameters become an `AblationPlan` (`plan_for`), scored without rewriting the
checkpoint, applied at inference time (`abliterate.search.scoring`): the refusal rate of short
greedy replies to held-out harmful prompts and the mean first-token KL(unmodified || trial) on
held-out harmless prompts.

Trial 0 of a new study is `run`'s automatic choice (`default_params`): the front starts from the
default and the search looks for better trade-offs. The study lives in SQLite
(`<project>/mlruns/search.db`); its name hashes the model, the directions, the held-out prompts,
the scoring and the search space, so a rerun of the same search resumes it: trials a killed run
left running are marked failed and their parameters tried again, and `trials` is the number of
complete trials the study should hold (a rerun with more continues). One process runs a study at a
time (a lock file beside the database).

The chosen trial (`choose`): the front's trial with the fewest refusals among those whose KL is at
most `kl_max` (ties: the lower KL), or the trial the user names.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import event

from abliterate.config import Evaluation, Runtime, Search, Selection, Template
from abliterate.edit.ablate import load_inputs
from abliterate.edit.inference_edit import PlanEdit, storage_dtypes
from abliterate.edit.matching import resolve_plan
from abliterate.edit.output import directions_digest
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.inference.devices import resolve_runtime
from abliterate.inference.runner import model_forward
from abliterate.measure.prompts import prompts_sha256
from abliterate.paths import file_lock
from abliterate.search.scoring import TrialScore, TrialScorer, scoring_signature
from abliterate.search.space import SearchSpace, default_params, kernel_spec, plan_for, search_space, suggest
from abliterate.vocabulary import STUDY_FILE
from abliterate.weights.checkpoint import choose_profile

# ------------------------------------------------------------------ the study


def study_name(*parts: Any) -> str:
    """`search-<hash>` of what the trials' scores depend on (model, directions, prompts, space, scoring)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return "search-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def study_storage(root: str | Path) -> str:
    """The SQLite URL of the study database under `root` (the project's mlruns/ folder)."""
    return f"sqlite:///{(Path(root) / STUDY_FILE).resolve()}"


@contextmanager
def study_lock(root: str | Path, name: str) -> Iterator[None]:
    """Held while a process runs the study: a second search of the same study stops at once."""
    path = Path(root) / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AbliterateError(
                f"another search is running study {name} (lock {path}): wait for it to finish or stop it"
            ) from None
        yield
    finally:
        os.close(fd)


def open_study(root: str | Path, name: str, search: Search) -> optuna.Study:
    """The study `name` in `root`/search.db, created if missing. Its sampler is seeded with the search's
    seed plus the number of trials already stored, so a resumed search draws new points, not its first
    ones; with trials scored together it lies about the running ones (constant liar)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with file_lock(Path(root) / f"{STUDY_FILE}.lock"):  # one process creates or migrates the schema
        storage = optuna.storages.RDBStorage(
            study_storage(root), engine_kwargs={"connect_args": {"timeout": 60}}
        )
        _write_ahead_log(storage.engine)
        study = optuna.create_study(
            study_name=name, storage=storage, directions=["minimize", "minimize"], load_if_exists=True
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(
            seed=search.search_seed + len(study.get_trials(deepcopy=False)),
            multivariate=True,
            n_startup_trials=search.startup_trials,
            constant_liar=search.parallel_trials > 1,
        )
    return study


def _write_ahead_log(engine: Any) -> None:
    """SQLite in write-ahead-log mode, synced at checkpoints: every suggested parameter is a commit, and
    with the default rollback journal each one waits for a sync of the disk (about 1 s per trial here
    against 0.15 s). A killed process loses nothing committed; a power cut at most the last commits."""

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections made from now on get the pragmas


def recover_stale(study: optuna.Study) -> list[int]:
    """Trials a killed run left running (this process holds the study's lock, so no one runs them):
    marked failed, and their parameters queued to be tried again. Returns their numbers."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs=dict(t.user_attrs))
    return [t.number for t in stale]


def complete_trials(study: optuna.Study) -> list[Any]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def trial_record(t: Any) -> dict[str, Any]:
    """A complete trial as the search reports it."""
    return {
        "trial": t.number,
        "refusal_rate": t.values[0],
        "kl": t.values[1],
        "refusals": t.user_attrs.get("refusals"),
        "prompts": t.user_attrs.get("prompts"),
        "parameters": dict(t.params),
        "reference": t.user_attrs.get("reference"),
        "plan": t.user_attrs.get("plan"),
    }


# ------------------------------------------------------------------ the front and the choice


def pareto(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records (search trials, sweep variants: anything with a refusal rate and a KL) no other
    record beats on both (lower is better), by refusal rate then KL, ties in the given order."""
    front = [
        p
        for p in records
        if not any(
            q["refusal_rate"] <= p["refusal_rate"]
            and q["kl"] <= p["kl"]
            and (q["refusal_rate"] < p["refusal_rate"] or q["kl"] < p["kl"])
            for q in records
        )
    ]
    return sorted(front, key=lambda p: (p["refusal_rate"], p["kl"]))


def choose(records: list[dict[str, Any]], search: Search) -> dict[str, Any]:
    """The trial to write: `search.trial` when given (a complete trial), else the front's trial with the
    fewest refusals among those with KL <= `search.kl_max` (ties: the lower KL, then the earlier trial)."""
    if search.trial is not None:
        found = [r for r in records if r["trial"] == search.trial]
        if not found:
            raise AbliterateError(
                f"trial {search.trial} is not a complete trial of this study: "
                f"choose from {sorted(r['trial'] for r in records)}"
            )
        return found[0]
    front = pareto(records)
    allowed = [r for r in front if r["kl"] <= search.kl_max]
    if not allowed:
        least = min(front, key=lambda r: r["kl"])
        raise AbliterateError(
            f"no trial on the front has a KL of at most {search.kl_max:g}: the lowest is {least['kl']:.4g} "
            f"(trial {least['trial']}); raise --kl-max, run more trials, or name one with --trial"
        )
    return min(allowed, key=lambda r: (r["refusal_rate"], r["kl"], r["trial"]))


def front_entry(record: dict[str, Any]) -> dict[str, Any]:
    """A trial as the search's result shows it: number, objectives, parameters, reference."""
    return {
        k: record[k]
        for k in ("trial", "refusal_rate", "kl", "refusals", "prompts", "parameters", "reference")
    }


@dataclass
class Decision:
    """A study's complete trials read for the user: the front, `run`'s automatic choice (trial 0 of a new
    study) and the trial to write (None, with the reason, when no trial qualifies)."""

    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    reference: dict[str, Any] | None
    chosen: dict[str, Any] | None
    reason: str | None = None

    def chosen_plan(self, search: Search) -> AblationPlan:
        """The chosen trial's plan, its origin recording the objectives, the bound and the front."""
        if self.chosen is None:
            raise AbliterateError(f"no trial to write: {self.reason}")
        chosen = self.chosen
        recorded = dict(chosen["plan"])
        origin = dict(recorded.get("origin") or {})
        origin["search"] = {
            **origin.get("search", {}),
            "objectives": {k: chosen[k] for k in ("refusal_rate", "kl", "refusals", "prompts")},
            "kl_max": search.kl_max,
            "pareto": [r["trial"] for r in self.front],
        }
        return AblationPlan.from_dict({**recorded, "origin": origin}, f"trial {chosen['trial']}'s plan")


def decide(records: list[dict[str, Any]], search: Search) -> Decision:
    """The front of the complete trials, run's automatic choice among them, and the trial to write."""
    reference = next((r for r in records if r.get("reference") == "run"), None)
    try:
        chosen, reason = choose(records, search), None
    except AbliterateError as exc:
        chosen, reason = None, str(exc)
    return Decision(records, pareto(records), reference, chosen, reason)


def study_summary(
    result: dict[str, Any], decision: Decision, search: Search, selected_position: int | None
) -> dict[str, Any]:
    """What a search reports (`run_study`'s result read with `decide`): the study, this run's trials
    and timing, the unmodified model's score, the front, run's choice and the chosen trial."""
    reference, chosen = decision.reference, decision.chosen
    return {
        "study": result["study"],
        "storage": result["storage"],
        "trials_complete": len(decision.trials),
        "new_trials": len(result["new_trials"]),
        "resumed_from": result["resumed_from"],
        "stale_trials": result["stale_trials"],
        "seconds": result["seconds"],
        "trials_per_minute": result["trials_per_minute"],
        "baseline": result["baseline"],
        "selected_position": selected_position,
        "reference": front_entry(reference) if reference else None,
        "pareto": [front_entry(r) for r in decision.front],
        "chosen": {**front_entry(chosen), "plan": chosen["plan"]} if chosen else None,
        "chosen_reason": decision.reason,
        "kl_max": search.kl_max,
    }


# ------------------------------------------------------------------ running the trials


@dataclass
class TrialResult:
    """What the search hands to whoever records it (the flow: one nested MLflow run per trial)."""

    number: int
    parameters: dict[str, Any]
    plan: dict[str, Any] | None
    score: TrialScore | None  # None: the trial failed (its plan could not be built)
    reference: str | None = None
    error: str | None = None


@dataclass
class SearchProgress:
    new: list[TrialResult] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    seconds: float = 0.0


def run_search(
    study: optuna.Study,
    space: SearchSpace,
    scorer: TrialScorer,
    make_edit: Callable[[AblationPlan], Any],
    search: Search,
    on_trial: Callable[[TrialResult], None] | None = None,
    origin: dict[str, Any] | None = None,
) -> SearchProgress:
    """Ask, score and tell until the study holds `search.trials` complete trials, `search.parallel_trials`
    at a time. `make_edit(plan)` gives the plan's PlanEdit (resolved against the model and directions).
    `on_trial` sees every finished trial."""
    trials, parallel = search.trials, search.parallel_trials
    progress = SearchProgress(stale=recover_stale(study))
    began = time.perf_counter()
    if not study.get_trials(deepcopy=False):
        reference = default_params(space)
        if reference is not None:
            study.enqueue_trial(reference, user_attrs={"reference": "run"})
    failures = 0
    while len(complete_trials(study)) < trials:
        wanted = min(parallel, trials - len(complete_trials(study)))
        asked, plans, edits = [], [], []
        for _ in range(wanted):
            t = study.ask()
            params = suggest(t, space)
            record = {
                "search": {
                    "study": study.study_name,
                    "trial": t.number,
                    "parameters": params,
                    "kernels": {g: kernel_spec(params, g) for g, _ in space.groups},
                    **(origin or {}),
                }
            }
            try:
                plan = plan_for(params, space, record)
                edit = make_edit(plan)
            except AbliterateError as exc:
                study.tell(t, state=TrialState.FAIL)
                failures += 1
                result = TrialResult(t.number, params, None, None, t.user_attrs.get("reference"), str(exc))
                progress.new.append(result)
                if on_trial:
                    on_trial(result)
                if failures > max(10, trials):
                    raise AbliterateError(
                        f"{failures} trials failed to build a plan, the last: {exc}"
                    ) from None
                continue
            asked.append((t, params))
            plans.append(plan)
            edits.append(edit)
        if not edits:
            continue
        for (t, params), plan, score in zip(asked, plans, scorer.score(edits), strict=True):
            t.set_user_attr("plan", plan.to_dict())
            t.set_user_attr("refusals", score.refusals)
            t.set_user_attr("prompts", score.prompts)
            t.set_user_attr("seconds", score.seconds)
            study.tell(t, [score.refusal_rate, score.kl])
            result = TrialResult(t.number, params, plan.to_dict(), score, t.user_attrs.get("reference"))
            progress.new.append(result)
            if on_trial:
                on_trial(result)
    progress.seconds = time.perf_counter() - began
    return progress


def trials_per_minute(progress: SearchProgress) -> float | None:
    scored = [r for r in progress.new if r.score is not None]
    if not scored or progress.seconds <= 0:
        return None
    return len(scored) / progress.seconds * 60.0


# ------------------------------------------------------------------ one search, end to end


def run_study(
    model_dir: str | Path,
    directions_path: str | Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    search: Search,
    selection: Selection,
    template: Template,
    evaluation: Evaluation,
    runtime: Runtime,
    root: str | Path,
    stream: bool = False,
    experts: Sequence[tuple[int, int]] = (),
    on_trial: Callable[[TrialResult], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Open (or resume) the study of this model, directions, held-out prompts, scoring and space in
    `root`/search.db and run it until it holds `search.trials` complete trials. The held-out prompts
    are rendered by `template` and scored with `evaluation`'s refusal markers, `runtime.batch_size`
    prompts a pass, on `runtime`'s device and dtype (`stream`: layer-streamed). `experts`: the
    router_bias candidates, most refusal-specific first. `on_start` sees the study's name and space
    once this process holds the study's lock, before the first trial. Returns the study's name, the
    space, this run's new trials and timing, the unmodified model's score and every complete trial
    (`trial_record`)."""
    runtime = resolve_runtime(runtime, model_dir)
    inputs = load_inputs(model_dir, directions_path)
    profile = choose_profile(model_dir)
    if profile is None:
        raise AbliterateError(f"{model_dir} is of no known family: the search needs its role rules")
    space = search_space(inputs, search, selection, experts)
    signature = json.loads(
        json.dumps(
            {
                "model": inputs.inventory.fingerprint,
                "directions": directions_digest(inputs.directions),
                "harmful": prompts_sha256(list(harmful)),
                "harmless": prompts_sha256(list(harmless)),
                "scoring": scoring_signature(search, evaluation, template, runtime),
                "space": space.to_json(),
                "seed": search.search_seed,
                "dtype": runtime.dtype,
            },
            default=str,
        )
    )
    name = search.study or study_name(signature)
    with study_lock(root, name):
        if on_start:
            on_start({"study": name, "storage": study_storage(root), "space": space.to_json()})
        study = open_study(root, name, search)
        stored = study.user_attrs.get("signature")
        if stored is None:
            study.set_user_attr("signature", signature)
        elif stored != signature:
            changed = sorted(k for k in signature if stored.get(k) != signature[k])
            raise AbliterateError(
                f"study {name} in {study_storage(root)} was made by another search ({', '.join(changed)} differ): "
                "its scores would not compare; name another --study, or leave --study out"
            )
        before = len(complete_trials(study))
        forward, tokenizer = model_forward(model_dir, runtime.dtype, runtime.device, stream, progress)
        scorer = TrialScorer(
            forward, tokenizer, harmful, harmless, search, evaluation, template, runtime, progress
        )
        storage = storage_dtypes(inputs.inventory)

        def make_edit(plan: AblationPlan) -> PlanEdit:
            return PlanEdit(resolve_plan(plan, inputs), inputs.directions, profile, storage)

        done = run_search(study, space, scorer, make_edit, search, on_trial)
        records = [trial_record(t) for t in complete_trials(study)]
    return {
        "study": name,
        "storage": study_storage(root),
        "space": space.to_json(),
        "resumed_from": before,
        "stale_trials": done.stale,
        "new_trials": [asdict(r) for r in done.new],
        "seconds": round(done.seconds, 3),
        "trials_per_minute": trials_per_minute(done),
        "baseline": asdict(scorer.baseline),
        "weight_reads": forward.weight_reads,
        "trials": records,
    }
