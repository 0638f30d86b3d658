"""Deployments for real: a Prefect server on loopback, `deployments/serve.py` serving the flows,
a run triggered with parameters through the REST API, and its MLflow run found afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: a process exited early:\n{proc.stdout.read()[-4000:]}")
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_served_deployment_runs_with_parameters(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "ABLITERATE_HOME": str(tmp_path / "project"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    env.pop("PREFECT_RESULTS_PERSIST_BY_DEFAULT", None)
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    served = None
    try:
        wait_for(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200, 120, "the Prefect server", [server])
        served = subprocess.Popen(
            [sys.executable, str(ROOT / "deployments" / "serve.py")],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

        def deployment_id():
            response = httpx.get(f"{api}/deployments/name/abliterate/demo", timeout=5)
            return response.json()["id"] if response.status_code == 200 else None

        deployment = wait_for(deployment_id, 120, "the served deployment", [server, served])
        out = tmp_path / "out"
        run = httpx.post(
            f"{api}/deployments/{deployment}/create_flow_run",
            json={"parameters": {"out": str(out), "layers": "1-4", "evaluate": False}},
            timeout=10,
        ).json()
        assert "id" in run, run

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=5).json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = wait_for(finished, 400, "the flow run", [server, served])
        if state["type"] != "COMPLETED":
            served.terminate()
            raise AssertionError(f"flow run ended {state['type']}:\n{served.communicate(timeout=30)[0][-6000:]}")
        assert (out / "abliteration.json").is_file()

        client = MlflowClient(f"sqlite:///{tmp_path / 'project' / 'mlruns' / 'mlflow.db'}")
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`prefect.flow_run_id` = '{run['id']}'",
        )
        assert len(runs) == 1
        assert runs[0].data.params["plan.layer_spec"] == "1-4"
        assert runs[0].info.status == "FINISHED"
    finally:
        for proc in (served, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
