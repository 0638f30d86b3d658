"""MLflow tracking for flow runs, always through an explicit run id.

MLflow's "active run" is per thread, and Prefect runs mapped tasks on a thread pool, so
nothing here uses the fluent `mlflow.log_*` API: a `Tracker` holds a client and a run id,
and every call names the run. One experiment per model, named after it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from abliterate.config import Ablation
from abliterate.paths import file_lock
from abliterate.vocabulary import DEFAULT_TARGETS
from abliterate.weights.hub import hub_origin
from abliterate_flows.runtime import artifact_root, store_errors, tracking_uri

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = 900  # log_batch accepts at most 1000 metrics per call
# MLflow 3's UI shows an experiment as "GenAI apps & agents" (traces, evaluations) or "Machine learning"
# (runs, metrics, charts). Its kind selector stores the choice in this experiment tag (values in the UI's
# ExperimentKind enum: custom_model_development, genai_development, ...). These are training-style runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # the description MLflow's UI shows (and edits) on a page
MAX_RUN_NAME = 250  # longer names are cut by MLflow's UI anyway
SEP = " · "
# Folder names that say nothing about the model: the experiment takes the parent folder's name with them.
GENERIC_FOLDERS = {
    "model",
    "models",
    "checkpoint",
    "checkpoints",
    "weights",
    "hf",
    "original",
    "output",
    "out",
}

# Metric groups: MLflow's UI makes one chart section per prefix before the first `/` (a metric without
# one lands in no section once others have one), sections in alphabetical order. The groups, named so
# that order is the one a reader wants: the edited model's figures first (`after/`: refusal rates and the
# KL on the test prompts), the unedited model's (`before/`), then how the direction was chosen, the edit,
# its validation, and the costs.
EVAL = "after"  # the edited model on the test prompts: refusal rates, KL to the original, refusal score
BASELINE = "before"  # the unedited model on the same prompts
DIRECTIONS = "directions"  # per residual position (step): norm, SNR, cosine to the chosen one
EDIT = "edit"  # matched tensors per role
SELECTION = "selection"  # the direction: chosen position, candidates' refusal score and KL
SEARCH = "search"  # a search's study (the parent run)
TRIAL = "search-trial"  # a search trial's objectives on the held-out prompts (its nested run)
TENSORS = "tensors"  # the checkpoint's inventory
VALIDATION = "validation"  # changed tensors, failures, projection residuals per role
DURATION = "duration"  # seconds per stage


def metric(group: str, name: str) -> str:
    """`group/name`: the one way a metric gets its group."""
    return f"{group}/{name}"


def grouped(group: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """Every metric under `group/`: `search.front_size` (the older dotted group) -> `search/front_size`,
    `kl` -> `search-trial/kl`."""
    return {metric(group, key.removeprefix(f"{group}.")): value for key, value in metrics.items()}


def evaluation_metrics(figures: Mapping[str, float]) -> dict[str, float]:
    """An evaluation's figures (abliterate.check.evaluate METRICS) under their groups:
    `refusal_rate_harmful` -> `after/refusal_rate_harmful`, `baseline_refusal_rate_harmful` ->
    `before/refusal_rate_harmful`, so before and after share a name inside their groups."""
    out = {}
    for key, value in figures.items():
        if key.startswith("baseline_"):
            out[metric(BASELINE, key.removeprefix("baseline_"))] = value
        else:
            out[metric(EVAL, key)] = value
    return out


def _config_name(model_dir: Path) -> str | None:
    """`_name_or_path` of config.json when it names a model (a Hub id or a name), not a local folder."""
    try:
        value = json.loads((model_dir / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip().rstrip("/")
    if value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") > 1:
        name = Path(value).name  # a path on the machine that saved it: its last folder
        return name if name.lower() not in GENERIC_FOLDERS else None
    return value


def model_title(model_dir: str | Path) -> str:
    """The model's name for people: the Hub id of a cached snapshot (`org/name`), else the name
    config.json was saved under (`_name_or_path`, when it is a name and not a folder), else the folder's
    name, with its parent's in front when the folder is called `model`, `checkpoint` and the like
    (`abliterate/demo/model` -> `demo-model`)."""
    origin = hub_origin(model_dir)
    if origin:
        return origin["repo_id"]
    path = Path(model_dir).resolve()
    named = _config_name(path)
    if named:
        return named
    if path.name.lower() in GENERIC_FOLDERS and path.parent.name:
        return f"{path.parent.name}-{path.name}"
    return path.name


def experiment_name(model_dir: str | Path) -> str:
    """`abliterate/<model>`: one experiment per model (model_title: Hub id, saved name or folder)."""
    return f"abliterate/{model_title(model_dir)}"


def experiment_description(model_dir: str | Path) -> str:
    """What the experiment holds and how to read it: MLflow shows it above the runs (Markdown)."""
    return (
        f"Abliteration of **{model_title(model_dir)}** (`{model_dir}`): the refusal direction measured "
        "and projected out of the weights.\n\n"
        "- One run per `abliterate run` / `demo` (its name: command, model, layers, scale, ablation method, "
        "direction position), per `sweep` (a parent with one nested run per variant) and per `search` (a "
        "parent, named after its trials and chosen trial, with one nested run per trial).\n"
        f"- Key metrics: `{EVAL}/refusal_rate_harmful` and `{EVAL}/kl_harmless` (the edited model on the "
        f"test prompts), `{BASELINE}/...` (the same figures of the original), `{SELECTION}/...` (how the "
        f"direction was chosen), `{VALIDATION}/...`, `{DURATION}/...` (seconds per stage).\n"
        "- Compare runs: tick them in the runs table, then *Compare*; or the *Chart* view, one chart per "
        "metric grouped by these prefixes."
    )


def describe(ablation: Ablation) -> list[str]:
    """The settings that tell one ablation from another, for a run name: layers, scale, method, and the
    targets, MTP mode, biases and rank (with its subspace) where they differ from the defaults."""
    parts = [f"layers {ablation.layers}", f"scale {ablation.scale}", ablation.ablation_method]
    if list(ablation.targets) != list(DEFAULT_TARGETS):
        parts.append("targets " + ",".join(ablation.targets))
    if ablation.mtp != Ablation.model_fields["mtp"].default:
        parts.append(f"mtp {ablation.mtp}")
    if ablation.biases:
        parts.append("biases")
    if (ablation.fixed_rank or 1) > 1:
        parts.append(f"rank {ablation.rank} {ablation.subspace}")
    elif ablation.rank == "1":
        parts.append("rank 1")
    return parts


def run_name(*parts: Any) -> str:
    """`run · layers 0-3 · scale 0.8 · plain · position 3 (auto) · demo-model`: the command, what differs
    (first: MLflow's runs table shows a name's start), the model."""
    return SEP.join(str(p) for p in parts if p not in (None, ""))[:MAX_RUN_NAME]


def position_label(requested: str, chosen: int | None) -> str:
    """`position 3 (auto)` once the automatic choice is known; `position auto` before; `position 5`."""
    if requested == "auto":
        return f"position {chosen} (auto)" if chosen is not None else "position auto"
    return "own positions" if requested == "own" else f"position {requested}"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{"plan": {"scale": 1}} -> {"plan.scale": 1}; lists become JSON text."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    if isinstance(value, list | tuple):
        return {prefix: json.dumps(list(value))}
    return {prefix: value}


class Tracker:
    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten("", params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + BATCH])

    def series(self, name: str, values: Mapping[int, float]) -> None:
        """One metric over layers: step = layer index (or residual position)."""
        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, int(step)) for step, v in values.items() if v is not None]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + BATCH])

    def rename(self, name: str) -> None:
        """A run name that says more once it is known (the chosen position, the chosen trial)."""
        self.client.update_run(self.run_id, name=name[:MAX_RUN_NAME])

    def tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def json(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def table(self, rows: list[dict], artifact_file: str) -> None:
        if rows:
            columns = {key: [row.get(key) for row in rows] for key in rows[0]}
            self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


_initialised: set[str] = set()  # tracking URIs whose store this process has opened once
_first_open = threading.Lock()


def _store_lock(uri: str):
    """A lock file beside a local SQLite store (`mlflow.db.lock`): MLflow creates and migrates the
    schema the first time a process opens the store, and two processes doing that at once crash one
    of them (alembic: "ALTER TABLE ... duplicate column"). Other stores need no lock here."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(uri.removeprefix("sqlite:///"))
    return file_lock(db.with_name(db.name + ".lock"))


def client() -> MlflowClient:
    """A client of the tracking store; the first one in a process opens (and, on a fresh machine,
    creates) the store under the store's lock, so concurrent runs never migrate it together."""
    uri = tracking_uri()
    if uri in _initialised:
        return MlflowClient(tracking_uri=uri)
    with _first_open, _store_lock(uri):
        c = MlflowClient(tracking_uri=uri)  # opens the store: creates or upgrades its schema
        c.search_experiments(max_results=1)
        _initialised.add(uri)
    return c


def experiment_id(c: MlflowClient, name: str, description: str | None = None) -> str:
    """The experiment `name`, created if missing, marked as a machine-learning experiment and described
    (an existing one gets the kind tag and the description only where it has none: what the user chose
    or wrote in the UI stays). Two runs that create the same experiment at once both get it."""
    uri = tracking_uri()
    wanted = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    if description:
        wanted[DESCRIPTION_TAG] = description
    with _store_lock(uri):
        found = c.get_experiment_by_name(name)
        if found is not None:
            for key, value in wanted.items():
                if key not in found.tags:
                    c.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        # A local store keeps artifacts under ./mlruns; a real server decides for itself.
        location = artifact_root() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
        try:
            return c.create_experiment(name, artifact_location=location, tags=wanted)
        except MlflowException as exc:  # a run on another machine created it first
            found = c.get_experiment_by_name(name)
            if found is None:
                raise
            del exc
            return found.experiment_id


def experiment_ui_path(experiment: str) -> str:
    """The MLflow UI route of an experiment's runs table, in "Machine learning" mode. MLflow 3.17's UI
    picks GenAI or ML mode from a global toggle (browser local storage, default GenAI) unless the URL
    carries `workflowType`; append this to the UI's base URL (e.g. http://127.0.0.1:5000/)."""
    return f"#/experiments/{experiment}/runs?workflowType=machine_learning"


@contextmanager
def tracked_run(
    experiment: str,
    name: str,
    tags: Mapping[str, Any] | None = None,
    parent: Tracker | None = None,
    description: str | None = None,
) -> Iterator[Tracker]:
    """Create a run named `name` (run_name: what tells it from the others), yield its Tracker, end it
    FINISHED or FAILED. `description`: the experiment's, when this run creates it. A store that cannot
    be written (a full or read-only home), the Prefect server going away, a filesystem error a library
    wrapped: one line (`runtime.store_errors`), the flow's Failed state carries it."""
    with store_errors():
        c = client()
        all_tags = dict(tags or {})
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        run = c.create_run(
            experiment_id(c, experiment, description),
            run_name=name[:MAX_RUN_NAME],
            tags={k: str(v) for k, v in all_tags.items()},
        )
    tracker = Tracker(c, run.info.run_id)
    try:
        with store_errors():
            yield tracker
    except BaseException:
        with suppress(
            Exception
        ):  # a full disk fails this too: the error that ended the run is the one to see
            tracker.finish("FAILED")
        raise
    with store_errors():
        tracker.finish()


def source_tags(source: str, model_dir: str) -> dict[str, str]:
    """MLflow tags naming where the model came from: as typed, and the Hub repository and commit of a
    cached snapshot."""
    tags = {"model_source": source}
    origin = hub_origin(model_dir)
    if origin:
        tags.update({"hub.repo_id": origin["repo_id"], "hub.commit": origin["commit"]})
    return tags
