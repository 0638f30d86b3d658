"""Process set-up for flows: Prefect's temporary server (start-up bound, notice, failures as one line)
and the MLflow experiment the runs land in. No flow runs here: the plain functions, quickly."""

from __future__ import annotations

import argparse
import io
import os
import socket
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from abliterate import cli
from abliterate.errors import AbliterateError
from abliterate_flows import runtime, tracking


def test_configure_bounds_the_server_start_generously_and_the_user_wins(restored_environment, tmp_path):
    os.environ["ABLITERATE_HOME"] = str(tmp_path)
    os.environ.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    runtime.configure()
    assert int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 300
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "42"
    runtime.configure()
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "42"


def test_notice_once_and_only_for_a_temporary_server(monkeypatch):
    monkeypatch.setattr(runtime, "_announced", False)
    monkeypatch.setattr(runtime, "uses_temporary_server", lambda: False)
    out = io.StringIO()
    assert not runtime.announce_prefect_server(out) and out.getvalue() == ""
    monkeypatch.setattr(runtime, "uses_temporary_server", lambda: True)
    assert runtime.announce_prefect_server(out)
    assert not runtime.announce_prefect_server(out)  # once per process
    line = out.getvalue()
    assert line.count("\n") == 1 and "temporary Prefect server" in line and "PREFECT_API_URL" in line


def test_uses_temporary_server_follows_prefect_settings():
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert not runtime.uses_temporary_server()
    with temporary_settings(
        updates={PREFECT_SERVER_EPHEMERAL_ENABLED: True}, restore_defaults={PREFECT_API_URL}
    ):
        assert runtime.uses_temporary_server()


@pytest.mark.slow  # imports Prefect's server and starts (then stops) its process
def test_start_up_timeout_of_the_real_temporary_server_becomes_one_line():
    """Prefect's own SubprocessASGIServer, given no time to come up, raises what users saw."""
    from prefect.server.api.server import SubprocessASGIServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = SubprocessASGIServer(port=port)  # its own instance: never the session's server
    try:
        with pytest.raises(RuntimeError, match="ephemeral Prefect API server") as caught:
            server.start(timeout=0.05)
    finally:
        server.stop()
    error = runtime.server_start_error(caught.value)
    assert isinstance(error, AbliterateError)
    text = str(error)
    assert "\n" not in text and "did not start" in text
    assert "prefect server start" in text and "PREFECT_API_URL=http://127.0.0.1:4200/api" in text


def test_unreachable_api_url_and_unrelated_errors(monkeypatch):
    monkeypatch.setattr(
        runtime, "_temporary_server", False
    )  # the user's PREFECT_API_URL, not the temporary server
    try:
        try:
            raise ConnectionRefusedError("[Errno 111] Connection refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("Failed to reach API at http://127.0.0.1:4999/api/") from inner
    except RuntimeError as exc:
        error = runtime.server_start_error(exc)
    assert isinstance(error, AbliterateError) and "does not answer" in str(error)
    assert runtime.server_start_error(RuntimeError("something else")) is None
    assert runtime.server_start_error(ValueError("bad")) is None
    assert runtime.server_start_error(AbliterateError("already one line")) is None


def test_cli_prints_a_server_failure_as_one_line(monkeypatch, capsys):
    def fail(_args):
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    class Parser:
        def parse_args(self, _argv):
            return argparse.Namespace(command="demo", func=fail)

    monkeypatch.setattr(cli, "build_parser", Parser)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("abliterate demo: error: Prefect's temporary server did not start")
    assert err.count("\n") == 1
    monkeypatch.setattr(Parser, "parse_args", lambda _self, _argv: argparse.Namespace(command="x", func=bad))
    with pytest.raises(KeyError):  # anything else keeps its traceback
        cli.main(["x"])


def bad(_args):
    raise KeyError("unrelated")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One temporary SQLite store for the module (creating one runs every MLflow migration)."""
    home = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ABLITERATE_HOME", str(home))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        yield MlflowClient(runtime.tracking_uri())


@pytest.mark.slow  # a new SQLite store runs every MLflow migration: 2 s quiet, 15-30 s on a busy machine
def test_experiment_is_a_machine_learning_experiment(store):
    """MLflow 3's UI kind: custom_model_development ("Machine learning": runs, metrics, charts), not
    GenAI (traces, evaluations)."""
    with tracking.tracked_run("abliterate/model", "run-1") as tracker:
        tracker.metrics({"x": 1.0})
    experiment = store.get_experiment_by_name("abliterate/model")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.EXPERIMENT_KIND_TAG == "mlflow.experimentKind"
    old = store.create_experiment("abliterate/old")  # made before the tag existed
    assert tracking.experiment_id(store, "abliterate/old") == old
    assert store.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


class Experiments:
    """The MlflowClient calls experiment_id() makes, in memory."""

    def __init__(self):
        self.by_name: dict[str, SimpleNamespace] = {}

    def get_experiment_by_name(self, name):
        return self.by_name.get(name)

    def create_experiment(self, name, artifact_location=None, tags=None):
        self.by_name[name] = SimpleNamespace(experiment_id=str(len(self.by_name)), tags=dict(tags or {}))
        return self.by_name[name].experiment_id

    def set_experiment_tag(self, experiment_id, key, value):
        next(e for e in self.by_name.values() if e.experiment_id == experiment_id).tags[key] = value


def test_experiment_kind_on_new_and_old_experiments_unless_the_user_chose_one(monkeypatch, tmp_path):
    monkeypatch.setenv("ABLITERATE_HOME", str(tmp_path))  # the store's lock file goes beside its path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = Experiments()
    new = tracking.experiment_id(client, "abliterate/new")
    old = client.create_experiment("abliterate/old")  # made before the tag existed
    chosen = client.create_experiment(
        "abliterate/chosen", tags={"mlflow.experimentKind": "genai_development"}
    )
    assert [
        tracking.experiment_id(client, n) for n in ("abliterate/new", "abliterate/old", "abliterate/chosen")
    ] == [
        new,
        old,
        chosen,
    ]
    kinds = {name: e.tags.get("mlflow.experimentKind") for name, e in client.by_name.items()}
    assert kinds == {
        "abliterate/new": "custom_model_development",
        "abliterate/old": "custom_model_development",
        "abliterate/chosen": "genai_development",
    }


def test_experiment_ui_path_asks_for_machine_learning_mode():
    assert tracking.experiment_ui_path("7") == "#/experiments/7/runs?workflowType=machine_learning"


def test_unreachable_temporary_server_is_named_as_such(monkeypatch):
    """The same error when the flows run on Prefect's temporary server (which sets PREFECT_API_URL to
    itself): that server went away mid-run; the user's PREFECT_API_URL is not blamed."""
    monkeypatch.setattr(runtime, "_temporary_server", True)
    error = runtime.server_start_error(RuntimeError("Failed to reach API at http://127.0.0.1:4999/api/"))
    assert isinstance(error, AbliterateError)
    assert "temporary server stopped answering" in str(error) and "rerun the same command" in str(error)
