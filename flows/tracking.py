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
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from abliterate.paths import file_lock
from abliterate.weights.hub import hub_origin, model_name
from abliterate_flows.runtime import artifact_root, tracking_uri

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = 900  # log_batch accepts at most 1000 metrics per call
# MLflow 3's UI shows an experiment as "GenAI apps & agents" (traces, evaluations) or "Machine learning"
# (runs, metrics, charts). Its kind selector stores the choice in this experiment tag (values in the UI's
# ExperimentKind enum: custom_model_development, genai_development, ...). These are training-style runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_name(model_dir: str | Path) -> str:
    """`abliterate/<model name>`: the folder's name, or the Hub repository's for a cached snapshot."""
    return f"abliterate/{model_name(model_dir)}"


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


def experiment_id(c: MlflowClient, name: str) -> str:
    """The experiment `name`, created if missing, marked as a machine-learning experiment (an existing
    one gets the kind tag only if it has none: a kind the user chose in the UI stays). Two runs that
    create the same experiment at once both get it."""
    uri = tracking_uri()
    with _store_lock(uri):
        found = c.get_experiment_by_name(name)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:
                c.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return found.experiment_id
        # A local store keeps artifacts under ./mlruns; a real server decides for itself.
        location = artifact_root() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
        try:
            return c.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
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
    experiment: str, run_name: str, tags: Mapping[str, Any] | None = None, parent: Tracker | None = None
) -> Iterator[Tracker]:
    """Create a run, yield its Tracker, end it FINISHED or FAILED."""
    c = client()
    all_tags = dict(tags or {})
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    run = c.create_run(
        experiment_id(c, experiment), run_name=run_name, tags={k: str(v) for k, v in all_tags.items()}
    )
    tracker = Tracker(c, run.info.run_id)
    try:
        yield tracker
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()


def source_tags(source: str, model_dir: str) -> dict[str, str]:
    """MLflow tags naming where the model came from: as typed, and the Hub repository and commit of a
    cached snapshot."""
    tags = {"model_source": source}
    origin = hub_origin(model_dir)
    if origin:
        tags.update({"hub.repo_id": origin["repo_id"], "hub.commit": origin["commit"]})
    return tags
