"""`abliterate search` end to end: the flow through the CLI (the study, nested MLflow runs, the front, the
chosen trial written, validated and evaluated), a rerun that continues the study, and the deployment
that the Prefect UI starts with parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import ROOT
from mlflow.tracking import MlflowClient

from abliterate.cli import main
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.measure.prompts import load_prompts, split_prompts
from abliterate.vocabulary import MANIFEST_FILE

SMALL = [
    "--max-prompts",
    "8",
    "--reply-tokens",
    "4",
    "--batch-size",
    "8",
    "--max-new-tokens",
    "8",
    "--startup-trials",
    "2",
]


def runs_of(home: Path, study: str):
    client = MlflowClient(f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, filter_string=f"tags.`search.study` = '{study}'")


def test_search_through_the_cli_writes_the_choice_and_a_rerun_continues(prefect_env, tmp_path, capsys):
    """Also: the choice confirmed on the validation prompts the study never scored, reported in the JSON,
    MLflow and the manifest; with the user's own training files and no test file, the evaluation's test
    prompts are the confirmation slice of those files (listed), not the project's test set."""
    out = tmp_path / "chosen"
    train = {kind: str(prompt_file("demo", kind, "train")) for kind in ("harmful", "harmless")}
    argv = [
        "search",
        str(DEMO_MODEL_DIR),
        "--harmful",
        train["harmful"],
        "--harmless",
        train["harmless"],
        "--trials",
        "3",
        "--components",
        "default,router_bias",
        "--router-experts",
        "4",
        *SMALL,
        "--out",
        str(out),
        "--json",
        "--quiet",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trials_complete"] == result["new_trials"] == 3 and result["resumed_from"] == 0
    assert result["reference"]["trial"] == 0 and result["reference"]["parameters"]["method"] == "plain"
    assert result["pareto"] and {"trial", "refusal_rate", "kl", "parameters"} <= set(result["pareto"][0])
    chosen = result["chosen"]
    assert chosen["kl"] <= 0.01
    # on the front, or a rank-1 trial written instead of a front trial of higher rank that did not earn its KL
    assert chosen["trial"] in [p["trial"] for p in result["pareto"]] or "rank" not in chosen["plan"]
    # the demo model stops refusing: run's choice already refuses none of the held-out prompts, so the choice neither
    assert chosen["refusal_rate"] == 0.0 and chosen["kl"] <= result["reference"]["kl"]
    assert result["validation_ok"] and result["evaluation"]["refusal_rate_harmful"] < 0.1

    confirmation = result["confirmation"]
    assert confirmation["chosen"]["trial"] == chosen["trial"] and confirmation["reference"]["trial"] == 0
    for kind in ("harmful", "harmless"):
        validation, _ = split_prompts(load_prompts(train[kind]), 0.25, 0)
        confirm, _ = split_prompts(validation, 0.25, 0)
        tested = result["evaluation_prompts"][kind]
        assert tested["source"].startswith(f"the confirmation slice of {train[kind]}")
        assert tested["prompts"] == confirm and confirmation["prompts"][kind] == len(confirm)
    assert confirmation["chosen"]["prompts"] == len(result["evaluation_prompts"]["harmful"]["prompts"])

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    origin = manifest["plan"]["origin"]["search"]
    assert origin["confirmation"] == confirmation
    assert origin["study"] == result["study"] and origin["trial"] == chosen["trial"]
    assert origin["parameters"] == chosen["parameters"] and origin["objectives"]["kl"] == chosen["kl"]
    assert set(manifest["plan"]["role_scales"]) <= {
        "attn_out",
        "mlp_down",
        "expert_down",
        "shared_expert_down",
        "router",
    }

    client, runs = runs_of(prefect_env, result["study"])
    parent = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["search.trial"]) for r in trials) == [0, 1, 2]
    for run in trials:
        assert {"search-trial/refusal_rate", "search-trial/kl"} <= set(
            run.data.metrics
        ) and "direction_position" in run.data.params
        assert "kernel.attn_out" in run.data.params
    artifacts = {
        a.path
        for folder in ("", "plots", "search", "experts")
        for a in client.list_artifacts(parent.info.run_id, folder or None)
    }
    assert {
        "plots/search_front.png",
        "plots/expert_routing.png",
        "search/front.json",
        "search/trials.json",
        "experts/routing.json",
        "abliteration.json",
        "validation.json",
        "evaluation.json",
        "search/confirmation.json",
        "search/evaluation_prompts.json",
    } <= artifacts
    assert parent.data.metrics["search/front_size"] == len(result["pareto"])
    assert parent.data.metrics["search/confirm.chosen_refusal_rate"] == confirmation["chosen"]["refusal_rate"]
    assert parent.data.metrics["search/confirm.reference_kl"] == confirmation["reference"]["kl"]

    # the same search with more trials continues the study: two new trials, nested under the new parent;
    # it writes trial 0, run's default plan, evaluated the same way (the same confirmation slice)
    assert (
        main(
            [
                "search",
                str(DEMO_MODEL_DIR),
                "--harmful",
                train["harmful"],
                "--harmless",
                train["harmless"],
                "--trials",
                "5",
                "--components",
                "default,router_bias",
                "--router-experts",
                "4",
                *SMALL,
                "--trial",
                "0",
                "--out",
                str(tmp_path / "default"),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    again = json.loads(capsys.readouterr().out)
    assert again["study"] == result["study"] and again["resumed_from"] == 3 and again["new_trials"] == 2
    assert again["trials_complete"] == 5 and again["chosen"]["trial"] == 0
    assert again["evaluation_prompts"] == result["evaluation_prompts"]
    # the written choice refuses no more held-out prompts than run's default plan
    assert result["evaluation"]["refusal_rate_harmful"] <= again["evaluation"]["refusal_rate_harmful"]
    _, runs = runs_of(prefect_env, result["study"])
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == again["mlflow_run_id"]]
    assert sorted(int(r.data.tags["search.trial"]) for r in nested) == [3, 4]


def test_the_deployment_offers_the_search_settings_as_parameters():
    """What the Prefect UI shows as the form of `abliterate-search/demo-search`: every Search setting."""
    from abliterate_flows.search import search_flow

    deployment = search_flow.to_deployment(name="check", parameters={"model": str(DEMO_MODEL_DIR)})
    schema = deployment._parameter_openapi_schema.model_dump()
    assert {"model", "out", "search", "prompts", "evaluation", "runtime"} <= set(schema["properties"])
    search = schema["definitions"]["Search"]["properties"]
    assert {"trials", "kl_max", "trial", "components", "methods", "reply_tokens"} <= set(search)


@pytest.mark.slow
def test_served_search_deployment_runs_with_parameters(tmp_path):
    """A Prefect server, deployments/serve.py serving the flows, a search run started through the REST API
    (as the UI's Run button does) with its own parameters, and its front in MLflow."""
    from test_deployments import (
        FLOW_RUN_S,
        SERVE_REGISTER_S,
        SERVER_START_S,
        free_port,
        get_json,
        post_json,
        wait_for,
    )

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
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_RESULTS_PERSIST_BY_DEFAULT"):
        env.pop(key, None)
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
        found = wait_for(
            lambda: get_json(f"{api}/deployments/name/abliterate-search/demo-search"),
            SERVE_REGISTER_S,
            "the served search deployment",
            [server, served],
        )
        assert found["parameters"]["search"]["trials"] == 50  # the default the form starts from
        parameters = {
            "out": str(tmp_path / "out"),
            "overwrite": True,
            "search": {"trials": 2, "max_prompts": 6, "reply_tokens": 3, "startup_trials": 1},
            "evaluation": {"evaluate": False},
            "runtime": {"batch_size": 8},
        }
        response = post_json(
            f"{api}/deployments/{found['id']}/create_flow_run",
            {"parameters": parameters, "idempotency_key": f"search-{port}-{time.time_ns()}"},
        )
        run = response.json()

        def finished():
            state = (get_json(f"{api}/flow_runs/{run['id']}") or {}).get("state") or {}
            return state if state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = wait_for(finished, FLOW_RUN_S, "the search flow run", [server, served])
        if state["type"] != "COMPLETED":
            served.terminate()
            raise AssertionError(
                f"search ended {state['type']}:\n{served.communicate(timeout=30)[0][-6000:]}"
            )
        assert (tmp_path / "out" / MANIFEST_FILE).is_file()
        client = MlflowClient(f"sqlite:///{tmp_path / 'project' / 'mlruns' / 'mlflow.db'}")
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`prefect.flow_run_id` = '{run['id']}'",
        )
        assert len(runs) == 1 and runs[0].data.params["search.trials"] == "2"
        assert runs[0].data.metrics["search/trials_complete"] == 2
        assert "plots/search_front.png" in {
            a.path for a in client.list_artifacts(runs[0].info.run_id, "plots")
        }
    finally:
        for proc in (served, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
