"""Automatic search: the Optuna study of the refusal-vs-KL front, and the trial to write.

A multi-objective TPE study (both objectives minimised) over the space of `abliterate.search.space`:
each trial's parameters become an `AblationPlan` (`plan_for`), scored without rewriting the
checkpoint, applied at inference time (`abliterate.search.scoring`): the refusal objective (the
refusals of short greedy replies to held-out harmful prompts, then the margin: the mean first-token
refusal probability, each prompt's counted down to `refusal_floor`) and the mean first-token KL(unmodified || trial) on held-out harmless prompts.

Trial 0 of a new study is `run`'s automatic choice (`default_params`): the front starts from the
default and the search looks for better trade-offs. The study lives in SQLite
(`<project>/mlruns/search.db`); its name hashes the model, the directions, the held-out prompts,
the scoring and the search space, so a rerun of the same search resumes it: trials a killed run
left running are marked failed and their parameters tried again, and `trials` is the number of
complete trials the study should hold (a rerun with more continues). One process runs a study at a
time (a lock file beside the database).

The chosen trial (`choose`): the front's trial with the lowest refusal objective (the fewest
refusals, then the most margin) among those whose KL is at most `kl_max` (ties: the lower KL), or the
trial the user names; a trial removing several directions (rank > 1) only where it earns its KL
against the rank-1 trials' choice (`choose`). Every rate carries its Wilson bound at `confidence` (`wilson_bounds`: 36
prompts without a refusal still allow a rate of 0.096 at 95 %). The choice is then confirmed
(`confirm_choice`) on a seeded part of the held-out prompts that the study never scored: the chosen
trial and run's choice (trial 0) are scored there; a chosen trial that refuses more there than its
study's upper bound fails, and (`on_confirm_failure`) the next stronger trials of the front are
confirmed in turn and the first that holds is written instead, or the choice is kept with a
warning, or nothing is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError

from abliterate.config import Evaluation, Runtime, Search, Selection, Template
from abliterate.edit.ablate import load_inputs
from abliterate.edit.inference_edit import PlanEdit, fp8_blocks, storage_dtypes
from abliterate.edit.matching import resolve_plan
from abliterate.edit.output import directions_digest
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.inference.devices import resolve_runtime
from abliterate.inference.runner import model_forward
from abliterate.inference.scores import wilson_bounds
from abliterate.inference.threads import apply_threads
from abliterate.measure.prompts import prompts_sha256
from abliterate.paths import check_sqlite_file, child, file_lock, holders
from abliterate.search.scoring import TrialScore, TrialScorer, scoring_signature
from abliterate.search.space import SearchSpace, default_params, kernel_spec, plan_for, search_space, suggest
from abliterate.search.storage import StudyStorage, write_pending
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


# How long a write waits for another process's write lock on the study database (SQLite's busy
# timeout). Optuna's own transactions last milliseconds, even with several searches of other studies
# writing the same database; a lock held longer is someone else's (a `sqlite3` shell in a
# transaction, a stuck process): the search says who after this wait, instead of 60 s of silence
# (Optuna tries a new trial's insert 5 times, so `ask` gives up after about 5 x (2 + 1) s).
STUDY_BUSY_TIMEOUT_S = 2


@contextmanager
def study_lock(root: str | Path, name: str) -> Iterator[None]:
    """Held while a process runs the study: a second search of the same study stops at once, naming
    the process that runs it (its pid is written into the lock file). The lock file stays inside
    `root` whatever the name (`paths.child`: a plain file name, no link out)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    path = child(root, f".{name}.lock", "study lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise AbliterateError(
            f"cannot create the study lock {path}: {exc.strerror or exc}; free space or fix the permissions of "
            f"{root} (or set ABLITERATE_HOME to a writable folder)"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AbliterateError(
                f"another search is running study {name} ({_lock_holder(path)}, lock {path}): wait for it to "
                "finish or stop it"
            ) from None
        with suppress(OSError):  # who holds it, for the message above (the lock works without it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _lock_holder(path: Path) -> str:
    """The process that holds the study lock `path`: the pid it wrote there, with its command line."""
    try:
        pid = int(path.read_text().strip() or "0")
        command = " ".join(
            Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
        )
        return f"process {pid} ({command[:120]})"
    except (OSError, ValueError):
        found = holders([path])
        return found[0] if found else "another process"


def open_study(root: str | Path, name: str, search: Search) -> optuna.Study:
    """The study `name` in `root`/search.db, created if missing. Its sampler is seeded with the search's
    seed plus the number of trials already stored, so a resumed search draws new points, not its first
    ones; with trials scored together it lies about the running ones (constant liar)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    database = check_study_database(root)
    with (
        study_errors(database),
        file_lock(Path(root) / f"{STUDY_FILE}.lock"),
    ):  # one process creates the schema
        storage = StudyStorage(
            study_storage(root), engine_kwargs={"connect_args": {"timeout": STUDY_BUSY_TIMEOUT_S}}
        )
        _write_ahead_log(storage.engine)
        study = optuna.create_study(
            study_name=name, storage=storage, directions=["minimize", "minimize"], load_if_exists=True
        )
    with warnings.catch_warnings(), study_errors(database):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(
            seed=search.search_seed + len(study.get_trials(deepcopy=False)),
            multivariate=True,
            n_startup_trials=search.startup_trials,
            constant_liar=search.parallel_trials > 1,
        )
    return study


def check_study_database(root: str | Path) -> Path:
    """The study database's path, refused in one line when it is no SQLite file (a folder, a link to
    nothing, garbage): what SQLAlchemy would report as a traceback."""
    return check_sqlite_file(Path(root) / STUDY_FILE, "the study database")


def _database_reason(exc: BaseException) -> str:
    """The first line of the deepest SQLite error behind `exc` (Optuna wraps SQLAlchemy's, which wraps
    sqlite3's, in a generic "An exception is raised during the commit"), else of `exc` itself."""
    found: BaseException = exc
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        orig = getattr(e, "orig", None)
        if isinstance(orig, BaseException):
            found = orig
            break
        if isinstance(e, (sqlite3.Error, SQLAlchemyError)):
            found = e
        todo += [e.__cause__, e.__context__]
    text = str(found).strip() or type(found).__name__
    return text.splitlines()[0][:200]


@contextmanager
def study_errors(database: Path, filesystem: bool = True) -> Iterator[None]:
    """SQLite, SQLAlchemy, Optuna (and with `filesystem`, OS) errors of the study database as one line
    naming it: while it is opened, and while the trials are asked for and told (a database another
    process locks, a disk filling up or a folder turned read-only in the middle of a search)."""
    caught: tuple[type[BaseException], ...] = (SQLAlchemyError, optuna.exceptions.OptunaError, sqlite3.Error)
    if filesystem:
        caught += (OSError,)
    try:
        yield
    except AbliterateError:
        raise
    except caught as exc:
        reason = _database_reason(exc)
        if "locked" in reason or "busy" in reason:
            others = holders([database, f"{database}-wal", f"{database}-shm"])
            who = f"held by {', '.join(others)}" if others else "held by another process"
            what = (
                f"another process keeps it locked ({who}: another search writing the same database, or a "
                "program with it open in a transaction): let it finish or stop it, then rerun (finished trials "
                "are kept)"
            )
        elif "readonly" in reason or "read-only" in reason or "unable to open" in reason:
            what = (
                "its folder is not writable: fix the permissions or set ABLITERATE_HOME to a writable folder"
            )
        elif "disk" in reason or "full" in reason:
            what = "free space, then rerun (finished trials are kept)"
        else:
            what = "move it away (a new database is created) or restore it from a backup"
        raise AbliterateError(f"the study database {database} cannot be used ({reason}): {what}") from exc


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
        "objective": t.values[0],
        "refusal_rate": t.user_attrs.get("refusal_rate", t.values[0]),
        "refusal_score": t.user_attrs.get("refusal_score"),
        "margin": t.user_attrs.get("margin"),
        "kl": t.values[1],
        "refusals": t.user_attrs.get("refusals"),
        "prompts": t.user_attrs.get("prompts"),
        "parameters": dict(t.params),
        "reference": t.user_attrs.get("reference"),
        "plan": t.user_attrs.get("plan"),
    }


# ------------------------------------------------------------------ the front and the choice


def pareto(records: list[dict[str, Any]], key: str = "refusal_rate") -> list[dict[str, Any]]:
    """The records (search trials, sweep variants: anything with a refusal figure `key` and a KL) no
    other record beats on both (lower is better), by `key` then KL, ties in the given order. Search
    trials are compared by their refusal objective (`key="objective"`)."""
    front = [
        p
        for p in records
        if not any(
            q[key] <= p[key] and q["kl"] <= p["kl"] and (q[key] < p[key] or q["kl"] < p["kl"])
            for q in records
        )
    ]
    return sorted(front, key=lambda p: (p[key], p["kl"]))


def _objective(record: dict[str, Any]) -> float:
    """The refusal objective of a record (records of studies older than the objective: the rate)."""
    value = record.get("objective")
    return record["refusal_rate"] if value is None else value


def record_rank(record: dict[str, Any]) -> int:
    """The directions a trial's plan removes at each layer (the plan writes its rank only when > 1)."""
    return int((record.get("plan") or {}).get("rank", 1))


def choose(records: list[dict[str, Any]], search: Search) -> dict[str, Any]:
    """The trial to write: `search.trial` when given (a complete trial), else the front's trial with the
    fewest refusals among those with KL <= `search.kl_max` (ties: the lower KL, then the earlier trial).

    A trial removing several directions (rank > 1) is chosen only where it earns its KL: where the
    choice among the rank-1 trials alone (their own front) refuses at a rate above the rank > 1 trial's
    Wilson upper bound at `search.confidence` (selection's rule, docs/DESIGN.md 2.3); else the rank-1
    choice is written."""
    if search.trial is not None:
        found = [r for r in records if r["trial"] == search.trial]
        if not found:
            raise AbliterateError(
                f"trial {search.trial} is not a complete trial of this study: "
                f"choose from {sorted(r['trial'] for r in records)}"
            )
        return found[0]
    chosen = _choose_on_front(records, search)
    single = [r for r in records if record_rank(r) == 1]
    if record_rank(chosen) == 1 or not single:
        return chosen
    try:
        one = _choose_on_front(single, search)
    except AbliterateError:
        return chosen  # no rank-1 trial within the KL bound
    upper = wilson_bounds(chosen["refusals"], chosen["prompts"], search.confidence)[1]
    return chosen if one["refusals"] / max(one["prompts"], 1) > upper else one


def _choose_on_front(records: list[dict[str, Any]], search: Search) -> dict[str, Any]:
    front = search_front(records)
    allowed = [r for r in front if r["kl"] <= search.kl_max]
    if not allowed:
        least = min(front, key=lambda r: r["kl"])
        raise AbliterateError(
            f"no trial on the front has a KL of at most {search.kl_max:g}: the lowest is {least['kl']:.4g} "
            f"(trial {least['trial']}); raise --kl-max, run more trials, or name one with --trial"
        )
    return min(allowed, key=lambda r: (_objective(r), r["kl"], r["trial"]))


def search_front(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The front of a study's trials: refusal objective against KL."""
    return pareto([{**r, "objective": _objective(r)} for r in records], key="objective")


FRONT_KEYS = (
    "trial",
    "refusal_rate",
    "refusal_score",
    "margin",
    "objective",
    "kl",
    "refusals",
    "prompts",
    "parameters",
    "reference",
)


def front_entry(record: dict[str, Any], confidence: float | None = None) -> dict[str, Any]:
    """A trial as the search's result shows it: number, objectives, parameters, reference; with
    `confidence`, the Wilson bounds of its refusal rate."""
    entry = {k: record.get(k) for k in FRONT_KEYS}
    if confidence is not None and record.get("prompts"):
        entry["refusal_bounds"] = list(wilson_bounds(record["refusals"], record["prompts"], confidence))
    return entry


@dataclass
class Decision:
    """A study's complete trials read for the user: the front, `run`'s automatic choice (trial 0 of a new
    study) and the trial to write (None, with the reason, when no trial qualifies)."""

    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    reference: dict[str, Any] | None
    chosen: dict[str, Any] | None
    reason: str | None = None
    confirmation: dict[str, Any] | None = None  # `confirm_choice`'s record

    def chosen_plan(self, search: Search) -> AblationPlan:
        """The chosen trial's plan, its origin recording the objectives, the bound and the front."""
        if self.chosen is None:
            raise AbliterateError(f"no trial to write: {self.reason}")
        chosen = self.chosen
        recorded = dict(chosen["plan"])
        origin = dict(recorded.get("origin") or {})
        origin["search"] = {
            **origin.get("search", {}),
            "objectives": {
                k: chosen.get(k)
                for k in ("refusal_rate", "refusal_score", "objective", "kl", "refusals", "prompts")
            },
            "refusal_bounds": list(wilson_bounds(chosen["refusals"], chosen["prompts"], search.confidence)),
            "confidence": search.confidence,
            "kl_max": search.kl_max,
            "pareto": [r["trial"] for r in self.front],
            "confirmation": self.confirmation,
        }
        return AblationPlan.from_dict({**recorded, "origin": origin}, f"trial {chosen['trial']}'s plan")


def decide(
    records: list[dict[str, Any]], search: Search, confirmation: dict[str, Any] | None = None
) -> Decision:
    """The front of the complete trials, run's automatic choice among them, and the trial to write:
    the confirmation's trial when it confirmed another (`confirm_choice`), none when it failed and
    the search refuses to write an unconfirmed trial."""
    reference = next((r for r in records if r.get("reference") == "run"), None)
    try:
        chosen, reason = choose(records, search), None
    except AbliterateError as exc:
        chosen, reason = None, str(exc)
    if confirmation and chosen is not None:
        if confirmation.get("written") is None:
            chosen, reason = None, confirmation["warning"]
        elif confirmation["written"] != chosen["trial"]:
            chosen = next(r for r in records if r["trial"] == confirmation["written"])
    return Decision(records, search_front(records), reference, chosen, reason, confirmation)


# ------------------------------------------------------------------ the confirmation


def confirm_choice(
    records: list[dict[str, Any]],
    search: Search,
    scorer: TrialScorer,
    make_edit: Callable[[AblationPlan], Any],
) -> dict[str, Any] | None:
    """The chosen trial and run's choice scored on prompts the study never scored (`scorer`'s): the
    chosen trial holds when it refuses there at most its study's Wilson upper bound. When it does
    not, a loud warning, and (`search.on_confirm_failure`) `stronger`: the front's stronger trials
    (higher KL), scored in turn, the first that holds is written; `keep`: the choice is written;
    `refuse`: nothing is. None when there is no choice to confirm."""
    try:
        chosen = choose(records, search)
    except AbliterateError:
        return None
    reference = next((r for r in records if r.get("reference") == "run"), None)

    def scored(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        scores = scorer.score([make_edit(AblationPlan.from_dict(r["plan"])) for r in batch])
        out = []
        for r, sc in zip(batch, scores, strict=True):
            bound = wilson_bounds(r["refusals"], r["prompts"], search.confidence)[1]
            out.append(
                {
                    "trial": r["trial"],
                    "refusals": sc.refusals,
                    "prompts": sc.prompts,
                    "refusal_rate": sc.refusal_rate,
                    "refusal_score": sc.refusal_score,
                    "margin": sc.margin,
                    "kl": sc.kl,
                    "study_refusal_rate": r["refusal_rate"],
                    "study_upper_bound": bound,
                    "holds": sc.refusal_rate <= bound,
                }
            )
        return out

    batch = [chosen] + ([reference] if reference is not None and reference is not chosen else [])
    first = scored(batch)
    record: dict[str, Any] = {
        "prompts": {"harmful": len(scorer.harmful), "harmless": len(scorer.harmless)},
        "confidence": search.confidence,
        "chosen": first[0],
        "reference": first[-1] if reference is not None else None,
        "tried": [],
        "chose": chosen["trial"],
        "written": chosen["trial"],
        "warning": None,
    }
    if first[0]["holds"]:
        return record
    c = first[0]
    warning = (
        f"trial {c['trial']} refused {c['refusals']} of {c['prompts']} confirmation prompts "
        f"({c['refusal_rate']:.3f}), more than the {search.confidence:.0%} upper bound "
        f"{c['study_upper_bound']:.3f} of its {chosen['refusals']} of {chosen['prompts']} in the study"
    )
    if search.on_confirm_failure == "refuse":
        record["written"] = None
        record["warning"] = warning + ": nothing written (on_confirm_failure refuse)"
        return record
    if search.on_confirm_failure == "stronger":
        stronger = sorted(
            (r for r in search_front(records) if r["kl"] > chosen["kl"]), key=lambda r: (r["kl"], r["trial"])
        )
        for r in stronger:
            (tried,) = scored([r])
            record["tried"].append(tried)
            if tried["holds"]:
                record["written"] = r["trial"]
                over = (
                    f", beyond --kl-max {search.kl_max:g}: lower it again or name a trial with --trial"
                    if r["kl"] > search.kl_max
                    else ""
                )
                record["warning"] = (
                    f"{warning}; writing the next stronger trial of the front that holds: trial {r['trial']} "
                    f"({tried['refusals']} of {tried['prompts']} there, study KL {r['kl']:.3g}{over})"
                )
                return record
        record["warning"] = f"{warning}; no stronger trial of the front holds either: writing it anyway"
        return record
    record["warning"] = warning + ": writing it anyway (on_confirm_failure keep)"
    return record


def study_summary(
    result: dict[str, Any], decision: Decision, search: Search, selected_position: int | None
) -> dict[str, Any]:
    """What a search reports (`run_study`'s result read with `decide`): the study, this run's trials
    and timing, the unmodified model's score, the front, run's choice and the chosen trial."""
    reference, chosen, level = decision.reference, decision.chosen, search.confidence
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
        "reference": front_entry(reference, level) if reference else None,
        "pareto": [front_entry(r, level) for r in decision.front],
        "chosen": {**front_entry(chosen, level), "plan": chosen["plan"]} if chosen else None,
        "chosen_reason": decision.reason,
        "kl_max": search.kl_max,
        "confidence": level,
        "confirmation": decision.confirmation,
        "refusal_tokens": result.get("refusal_tokens"),
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
    done = len(complete_trials(study))  # this process holds the study's lock: only its tells add to it
    while done < trials:
        apply_threads()  # load that arrived since the last trials is seen (threads.RECHECK_S)
        wanted = min(parallel, trials - done)
        asked, plans, edits = [], [], []
        for _ in range(wanted):
            t = study.ask()
            params = suggest(t, space)
            write_pending(study)  # the drawn parameters, committed before the trial is scored
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
            recorded = plan.to_dict()
            t.set_user_attr("plan", recorded)
            t.set_user_attr("refusals", score.refusals)
            t.set_user_attr("prompts", score.prompts)
            t.set_user_attr("refusal_rate", score.refusal_rate)
            t.set_user_attr("refusal_score", score.refusal_score)
            t.set_user_attr("margin", score.margin)
            t.set_user_attr("seconds", score.seconds)
            study.tell(t, [score.objective, score.kl])
            done += 1
            result = TrialResult(t.number, params, recorded, score, t.user_attrs.get("reference"))
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
    confirm: tuple[Sequence[str], Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Open (or resume) the study of this model, directions, held-out prompts, scoring and space in
    `root`/search.db and run it until it holds `search.trials` complete trials. The held-out prompts
    are rendered by `template` and scored with `evaluation`'s refusal markers, `runtime.batch_size`
    prompts a pass, on `runtime`'s device and dtype (`stream`: layer-streamed). `experts`: the
    router_bias candidates, most refusal-specific first. `on_start` sees the study's name and space
    once this process holds the study's lock, before the first trial. Returns the study's name, the
    space, this run's new trials and timing, the unmodified model's score and every complete trial
    (`trial_record`), and with `confirm` (harmful, harmless prompts the study never scores) the
    confirmation of its choice (`confirm_choice`, on the same loaded model)."""
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
        with study_errors(Path(root) / STUDY_FILE):
            stored = study.user_attrs.get("signature")
            if stored is None:
                study.set_user_attr("signature", signature)
        if stored is not None and stored != signature:
            changed = sorted(k for k in signature if stored.get(k) != signature[k])
            raise AbliterateError(
                f"study {name} in {study_storage(root)} was made by another search ({', '.join(changed)} differ): "
                "its scores would not compare; name another --study, or leave --study out"
            )
        with study_errors(Path(root) / STUDY_FILE):
            before = len(complete_trials(study))
        forward, tokenizer = model_forward(model_dir, runtime.dtype, runtime.device, stream, progress)
        scorer = TrialScorer(
            forward, tokenizer, harmful, harmless, search, evaluation, template, runtime, progress
        )
        storage, fp8 = storage_dtypes(inputs.inventory), fp8_blocks(inputs.inventory)

        def make_edit(plan: AblationPlan) -> PlanEdit:
            return PlanEdit(resolve_plan(plan, inputs), inputs.directions, profile, storage, fp8)

        with study_errors(Path(root) / STUDY_FILE, filesystem=False):
            done = run_search(study, space, scorer, make_edit, search, on_trial)
            records = [trial_record(t) for t in complete_trials(study)]
        confirmation = None
        if confirm is not None and confirm[0] and confirm[1]:
            confirming = TrialScorer(
                forward,
                tokenizer,
                confirm[0],
                confirm[1],
                search,
                evaluation,
                template,
                runtime,
                progress,
                refusal_tokens=scorer.refusal_tokens,
            )
            confirmation = confirm_choice(records, search, confirming, make_edit)
            if confirmation is not None:
                confirmation["baseline"] = asdict(confirming.baseline)
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
        "refusal_tokens": {
            "ids": scorer.refusal_tokens,
            "texts": [tokenizer.decode([i]) for i in scorer.refusal_tokens or []],
            "source": scorer.refusal_tokens_source,
        },
        "weight_reads": forward.weight_reads,
        "trials": records,
        "confirmation": confirmation,
    }
