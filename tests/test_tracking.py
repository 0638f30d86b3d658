"""MLflow as a place to compare runs: experiment names, descriptions, run names, metric groups, plots
sized for the UI; and a CLI run seen through the Prefect and MLflow APIs (its logs, names and metrics)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fixtures import ROOT
from mlflow.tracking import MlflowClient

from abliterate.config import Ablation
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.vocabulary import DEFAULT_TARGETS
from abliterate_flows import plots, runtime, tracking

# ------------------------------------------------------------------ names


def write_config(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **fields}))
    return folder


def test_experiment_is_named_after_the_model_not_its_folder(tmp_path):
    snapshot = write_config(tmp_path / "hub" / "models--zai-org--GLM-4.5-Air" / "snapshots" / "abc123")
    assert tracking.model_title(snapshot) == "zai-org/GLM-4.5-Air"  # the Hub id of a cached snapshot
    saved = write_config(tmp_path / "a" / "model", _name_or_path="Qwen/Qwen3-8B")
    assert tracking.model_title(saved) == "Qwen/Qwen3-8B"  # the name config.json was saved under
    local = write_config(tmp_path / "b" / "model", _name_or_path="/home/me/checkpoints/my-llama/")
    assert tracking.model_title(local) == "my-llama"  # a folder on another machine: its last part
    plain = write_config(tmp_path / "c" / "llama-3-8b")
    assert tracking.model_title(plain) == "llama-3-8b"
    generic = write_config(tmp_path / "mistral" / "checkpoint")
    assert tracking.model_title(generic) == "mistral-checkpoint"  # a folder name that says nothing
    assert tracking.experiment_name(DEMO_MODEL_DIR) == "abliterate/demo-model"


def test_run_names_say_what_differs():
    default = Ablation()
    assert tracking.run_name(
        "run", *tracking.describe(default), tracking.position_label("auto", 3), "demo-model"
    ) == ("run · layers all · scale 1.0 · plain · position 3 (auto) · demo-model")
    varied = Ablation(
        layers="0-3",
        scale=0.8,
        ablation_method="norm_preserving",
        targets=["attn_out"],
        mtp="skip",
        biases=True,
    )
    assert tracking.describe(varied) == [
        "layers 0-3",
        "scale 0.8",
        "norm_preserving",
        "targets attn_out",
        "mtp skip",
        "biases",
    ]
    assert list(default.targets) == list(DEFAULT_TARGETS)
    assert tracking.position_label("auto", None) == "position auto"
    assert tracking.position_label("5", 3) == "position 5"
    assert tracking.position_label("own", 3) == "own positions"
    assert len(tracking.run_name("x" * 400)) == tracking.MAX_RUN_NAME


def test_evaluation_figures_are_grouped_before_and_after():
    figures = {"refusal_rate_harmful": 0.0, "kl_harmless": 4.3e-7, "baseline_refusal_rate_harmful": 1.0}
    assert tracking.evaluation_metrics(figures) == {
        "after/refusal_rate_harmful": 0.0,
        "after/kl_harmless": 4.3e-7,
        "before/refusal_rate_harmful": 1.0,
    }


@pytest.mark.slow  # a new SQLite store runs every MLflow migration: 2 s quiet, 15-30 s on a busy machine
def test_experiment_description_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ABLITERATE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(runtime.tracking_uri())
    text = tracking.experiment_description(DEMO_MODEL_DIR)
    with tracking.tracked_run("abliterate/demo-model", "first", description=text) as run:
        run.rename("first, renamed")
    experiment = client.get_experiment_by_name("abliterate/demo-model")
    assert experiment.tags[tracking.DESCRIPTION_TAG] == text and "after/refusal_rate_harmful" in text
    assert client.get_run(run.run_id).info.run_name == "first, renamed"
    client.set_experiment_tag(experiment.experiment_id, tracking.DESCRIPTION_TAG, "the user's own words")
    with tracking.tracked_run("abliterate/demo-model", "second", description=text):
        pass
    assert (
        client.get_experiment(experiment.experiment_id).tags[tracking.DESCRIPTION_TAG]
        == "the user's own words"
    )


# ------------------------------------------------------------------ plots at MLflow's display size


def test_plots_fit_mlflows_viewer_and_the_front_axis_fits_the_data():
    trials = [{"trial": i, "kl": 10 ** (-7 + i / 10), "refusal_rate": 1 - i / 20} for i in range(20)]
    figures = [
        plots.search_front(trials, trials[-3:], trials[0], trials[-1], kl_max=0.01),
        plots.candidate_scores(
            [{"position": i, "refusal_score": -i, "kl": 1e-3 * i} for i in range(6)], 3, 0.1
        ),
        plots.refusal_vs_kl([{"name": "a", "kl": 1e-6, "refusal_rate": 0.0, "on_front": True}]),
        plots.expert_routing([1, 2], [[0.1, 0.2], [0.3, 0.4]], [[0.2, 0.1], [0.4, 0.3]]),
    ]
    try:
        for figure in figures:
            width = figure.get_size_inches()[0] * figure.dpi
            assert width <= plots.WIDTH * plots.DPI, width
            sizes = [
                t.get_fontsize() for ax in figure.axes for t in ax.get_xticklabels() + ax.get_yticklabels()
            ]
            assert min(sizes) >= plots.SMALL
        plane = figures[0].axes[0]
        low, high = plane.get_xlim()
        # the trials span 1e-7 .. 10^-5.1: the axis ends a quarter decade beyond, not at the 0.01 bound
        assert high == pytest.approx(10 ** (-5.1 + 0.25), rel=1e-9)
        assert low == pytest.approx(10 ** (-7 - 0.25), rel=1e-9)
        assert any("off the axis" in t.get_text() for t in plane.get_legend().get_texts())
    finally:
        for figure in figures:
            plots.close(figure)


# ------------------------------------------------------------------ a CLI run through both APIs


@pytest.mark.slow
def test_cli_run_logs_reach_prefect_and_names_reach_mlflow(tmp_path):
    """`abliterate run` on the demo model against a Prefect server: its flow run's logs are in the server
    (the UI's log tab) while the console holds only the stage lines; MLflow shows the model-named,
    described experiment, a run named after its settings and the key metrics under their groups."""
    from test_deployments import SERVER_START_S, free_port, get_json, wait_for

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "project"
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "ABLITERATE_HOME": str(home),
    }
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_LOGGING_LEVEL"):
        env.pop(key, None)
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: get_json(f"{api}/health"), SERVER_START_S, "the Prefect server", [server])
        out = tmp_path / "out"
        command = [str(bin_dir / "abliterate"), "run", str(DEMO_MODEL_DIR), "--out", str(out)]
        done = subprocess.run(
            [*command, "--layers", "0-3", "--scale", "0.8", "--json"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        summary = json.loads(done.stdout)
        # the console: stage lines only, none of Prefect's own log lines
        console = [line for line in done.stderr.splitlines() if line.strip()]
        assert any(line.split()[0] == "measurement" for line in console), console
        assert not [line for line in console if " | INFO " in line or " | WARNING " in line], console

        logs = httpx.post(
            f"{api}/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [summary["prefect.flow_run_id"]]}}, "limit": 200},
            timeout=30,
        ).json()
        messages = [entry["message"] for entry in logs]
        assert any("Finished in state Completed" in m for m in messages), messages[:20]
        assert any(entry["task_run_id"] for entry in logs)  # the task runs' logs too, not only the flow's

        client = MlflowClient(f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
        run = client.get_run(summary["mlflow_run_id"])
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.name == "abliterate/demo-model"
        assert "demo-model" in experiment.tags[tracking.DESCRIPTION_TAG]
        position = summary["selected_position"]
        assert (
            run.info.run_name
            == f"run · layers 0-3 · scale 0.8 · plain · position {position} (auto) · demo-model"
        )
        metrics = run.data.metrics
        assert metrics["after/kl_harmless"] == summary["evaluation"]["kl_harmless"]
        assert (
            metrics["before/refusal_rate_harmful"] == summary["evaluation"]["baseline_refusal_rate_harmful"]
        )
        assert all("/" in key for key in metrics), [key for key in metrics if "/" not in key]
        groups = sorted({key.split("/")[0] for key in metrics})  # MLflow's chart sections, in its order
        assert groups[:2] == ["after", "before"], groups
        assert {key.split("/")[0] for key in metrics} >= {
            "after",
            "before",
            "selection",
            "validation",
            "duration",
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_readme_names_what_the_ui_shows():
    """The README's words for MLflow's UI are the ones MLflow 3.17's UI shows (its bundle's strings)."""
    bundle = ROOT / ".venv"
    scripts = list(bundle.glob("lib/python*/site-packages/mlflow/server/js/build/static/js/*.js"))
    if not scripts:
        pytest.skip("MLflow's UI bundle is not installed in .venv")
    shown = {
        m
        for path in scripts
        for m in re.findall(r'defaultMessage:"([^"]+)"', path.read_text(errors="replace"))
    }
    readme = (ROOT / "README.md").read_text()
    toggle = re.search(r"the \*([^*|]+) \| ([^*]+)\* toggle[^*]+\*([^*]+)\*", readme)
    assert toggle, "the README names MLflow's GenAI / Model training toggle"
    for label in toggle.groups():
        assert label.strip() in shown, label
