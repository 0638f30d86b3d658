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
from fixtures import ROOT
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Bounds for a cold, busy machine: a first `prefect server start` runs every database migration, and
# on 2 shared cores that alone can take minutes. Generous on purpose: they bound a hang, they do not
# measure speed.
SERVER_START_S = 300
SERVE_REGISTER_S = 300
FLOW_RUN_S = 900
HTTP_TIMEOUT_S = 30  # one request; a loaded server answers slowly, not never
RETRY_STATUS = {502, 503, 504}  # "Service Unavailable" and the like while the server is busy or starting


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
        except httpx.HTTPError:  # connection refused, timeouts: not up yet or busy
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def get_json(url: str):
    """The JSON body of a 200 answer, None for any other status (not there yet, or busy)."""
    response = httpx.get(url, timeout=HTTP_TIMEOUT_S)
    return response.json() if response.status_code == 200 else None


def post_json(url: str, payload: dict, timeout: float = 120):
    """POST, retrying transient failures (503 and friends, connection errors) until `timeout`."""
    last = None

    def attempt():
        nonlocal last
        response = httpx.post(url, json=payload, timeout=HTTP_TIMEOUT_S)
        last = response
        if response.status_code in RETRY_STATUS:
            return None
        return response

    try:
        return wait_for(attempt, timeout, f"POST {url}")
    except AssertionError:
        raise AssertionError(
            f"POST {url} kept failing: {last.status_code if last else 'no answer'} "
            f"{last.text[:500] if last else ''}"
        ) from None


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
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = None
    try:
        wait_for(lambda: get_json(f"{api}/health"), SERVER_START_S, "the Prefect server", [server])
        served = subprocess.Popen(
            [sys.executable, str(ROOT / "deployments" / "serve.py")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def deployment_id():
            found = get_json(f"{api}/deployments/name/abliterate/demo")
            return found["id"] if found else None

        deployment = wait_for(deployment_id, SERVE_REGISTER_S, "the served deployment", [server, served])
        out = tmp_path / "out"
        # A retried POST (after a timeout) must not start a second run: Prefect returns the run that
        # carries the same idempotency key.
        key = f"test-{port}-{time.time_ns()}"
        response = post_json(
            f"{api}/deployments/{deployment}/create_flow_run",
            {
                "parameters": {
                    "out": str(out),
                    "ablation": {"layers": "1-4"},
                    "evaluation": {"evaluate": False},
                },
                "idempotency_key": key,
            },  # the flow's parameters are the configuration's sections
        )
        run = response.json()
        assert "id" in run, run

        def finished():
            found = get_json(f"{api}/flow_runs/{run['id']}")
            state = (found or {}).get("state") or {}
            return state if state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = wait_for(finished, FLOW_RUN_S, "the flow run", [server, served])
        if state["type"] != "COMPLETED":
            served.terminate()
            raise AssertionError(
                f"flow run ended {state['type']}:\n{served.communicate(timeout=30)[0][-6000:]}"
            )
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
