"""The product end to end: the real `abliterate` flow on the demo model, MLflow runs, caching, sweep."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from numerics import (
    accumulation_length,
    assert_directions_agree,
    evaluation_bounds,
    longest_prompt,
    position_rtol,
)

from abliterate.config import Ablation, Evaluation, Prompts, Runtime, Template
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.edit.plan import AblationPlan
from abliterate.measure.direction_file import load_directions
from abliterate.measure.prompts import load_prompts

pytestmark = pytest.mark.slow
DEMO_PROMPTS = Prompts(prompt_set="demo")  # a copy of the demo model is not the demo model: name its prompts
NO_EVALUATION = Evaluation(evaluate=False)
TASKS = (
    "weight-inventory",
    "structure-detection",
    "activation-measurement",
    "direction-computation",
    "ablate-shard",
    "output-validation",
    "baseline-behaviour",
    "behavioural-evaluation",
)


def task_states(flow_run_id) -> dict[str, list[str]]:
    """Task name -> state names of the task runs of a flow run and of its subflow runs (`ablate`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id, *(child.id for child in children)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        runs = [r for r in runs if r.id not in {c.parent_task_run_id for c in children}]  # subflow stand-ins
    states: dict[str, list[str]] = {}
    for run in runs:
        name = next((t for t in TASKS if run.name.startswith(t)), run.name)
        states.setdefault(name, []).append(run.state.name)
    return states


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


@pytest.fixture(scope="module")
def first_run(prefect_env, tmp_path_factory):
    from abliterate_flows.main import abliterate_flow

    out = tmp_path_factory.mktemp("flow") / "demo-abliterated"
    state = abliterate_flow(
        model=str(DEMO_MODEL_DIR), out=str(out), return_state=True
    )  # the demo prompt set: auto
    return state, out


def test_demo_flow_removes_refusals_and_tracks_everything(first_run):
    from abliterate_flows.runtime import tracking_uri

    state, out = first_run
    summary = state.result()
    ev = summary["evaluation"]
    assert ev["baseline_refusal_rate_harmful"] >= 0.95
    assert ev["refusal_rate_harmful"] < 0.10
    assert ev["kl_harmless"] < 0.05
    assert summary["validation_ok"]
    assert (out / "abliteration.json").is_file()

    client = MlflowClient(tracking_uri())
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # no stray runs: every run of the experiment belongs to a flow run
    every = client.search_runs([run.info.experiment_id])
    assert all("prefect.flow_run_id" in r.data.tags for r in every), [r.info.run_name for r in every]
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert run.data.tags["output_path"] == str(out)
    params = run.data.params
    for key in (
        "model_fingerprint",
        "prompts.harmful.sha256",
        "prompts.harmless.n",
        "plan.layers",
        "plan.method",
        "plan.targets",
        "plan.mtp",
        "selected_position",
        "directions_sha256",
    ):
        assert key in params, key
    metrics = run.data.metrics
    for key in (  # grouped by prefix: one chart section per group in MLflow's UI
        "after/refusal_rate_harmful",
        "before/refusal_rate_harmful",
        "after/kl_harmless",
        "edit/matched.attn_out",
        "edit/matched.expert_down",
        "edit/matched.router",
        "validation/ok",
        "duration/measurement",
        "duration/ablation",
        "selection/position",
    ):
        assert key in metrics, key
    assert all("/" in key for key in metrics), [key for key in metrics if "/" not in key]
    # per-position series: step = residual position 0..L
    num_positions = load_directions(summary_directions(client, run)).num_positions
    history = client.get_metric_history(run.info.run_id, "directions/norm")
    assert sorted(m.step for m in history) == list(range(num_positions))
    assert client.get_metric_history(run.info.run_id, "selection/candidate_kl")
    artifacts = artifact_paths(client, run.info.run_id)
    for name in (
        "directions.safetensors",
        "plan.yaml",
        "inventory.json",
        "structure.json",
        "validation.json",
        "abliteration.json",
        "evaluation.json",
        "plots/direction_strength.png",
        "plots/direction_cosine.png",
        "plots/candidate_scores.png",
    ):
        assert name in artifacts, name


def summary_directions(client: MlflowClient, run) -> str:
    """The directions file the run logged, downloaded."""
    return client.download_artifacts(run.info.run_id, "directions.safetensors")


def test_rerun_with_other_layers_reuses_measurement(first_run, tmp_path):
    from abliterate_flows.main import abliterate_flow

    state, _ = first_run
    other = abliterate_flow(
        model=str(DEMO_MODEL_DIR),
        out=str(tmp_path / "late"),
        ablation=Ablation(layers="2-4"),
        evaluation=Evaluation(evaluate=False),
        return_state=True,
    )
    states = task_states(other.state_details.flow_run_id)
    for name in (
        "weight-inventory",
        "structure-detection",
        "activation-measurement",
        "direction-computation",
    ):
        assert states[name] == ["Cached"], (name, states)
    assert set(states["ablate-shard"]) == {"Completed"} and len(states["ablate-shard"]) == 3, states
    assert other.result()["plan"]["layers"][:3] == [2, 3, 4]

    again = abliterate_flow(
        model=str(DEMO_MODEL_DIR),
        out=str(tmp_path / "late"),
        ablation={"layers": "2-4"},
        evaluation={"evaluate": False},
        return_state=True,
    )  # plain mappings, as the Prefect UI sends them
    states = task_states(again.state_details.flow_run_id)
    assert all(s == ["Cached"] or set(s) == {"Cached"} for s in states.values()), states


def test_streamed_run_matches_the_in_memory_run_and_dask_ablation_the_threads(first_run, tmp_path):
    """With a memory budget below the model's size every stage streams: the run measures layer by layer,
    chooses the direction automatically (every candidate in one pass over the weights) and evaluates
    before and after, with the same choice, directions and first-token figures as the in-memory run
    (within the float32 bounds of tests/numerics.py). Shards ablated on a local Dask cluster of two
    processes are bit-identical to the thread runner's."""
    from abliterate_flows.ablate import ablate_flow, task_runner
    from abliterate_flows.main import abliterate_flow

    state, out = first_run
    summary = state.result()
    streamed = abliterate_flow(
        model=str(DEMO_MODEL_DIR),
        out=str(tmp_path / "streamed"),
        runtime=Runtime(memory_budget="300KiB"),
        return_state=True,
    ).result()
    assert streamed["validation_ok"] and streamed["selected_position"] == summary["selected_position"]
    memory_ev, streamed_ev = summary["evaluation"], streamed["evaluation"]
    assert (
        "refusal_rate_harmful" in memory_ev and "refusal_rate_harmful" not in streamed_ev
    )  # no full replies
    harmful_test, harmless_test = (
        load_prompts(prompt_file("demo", kind, "test")) for kind in ("harmful", "harmless")
    )
    for name, bound in evaluation_bounds(DEMO_MODEL_DIR, out, harmful_test, harmless_test).items():
        assert abs(memory_ev[name] - streamed_ev[name]) <= bound, (
            name,
            memory_ev[name],
            streamed_ev[name],
            bound,
        )
    assert streamed_ev["baseline_first_token_refusal_rate_harmful"] >= 0.95
    assert streamed_ev["first_token_refusal_rate_harmful"] < 0.10
    manifest = json.loads((out / "abliteration.json").read_text())
    streamed_manifest = json.loads((tmp_path / "streamed" / "abliteration.json").read_text())
    a = load_directions(manifest["directions"]["path"])
    b = load_directions(streamed_manifest["directions"]["path"])
    # Two float32 evaluations of the same layers: the rounding bound of tests/numerics.py, with n from
    # the demo model and its longest training prompt (the measured ones are a subset).
    template = a.metadata["template"]
    settings = Template(
        chat_template_kwargs=template["chat_template_kwargs"], system_prompt=template["system_prompt"]
    )
    prompts = [
        p for kind in ("harmful", "harmless") for p in load_prompts(prompt_file("demo", kind, "train"))
    ]
    n = accumulation_length(DEMO_MODEL_DIR, longest_prompt(DEMO_MODEL_DIR, prompts, settings))
    count = max(a.metadata["n_harmful"], a.metadata["n_harmless"])
    assert_directions_agree(b, a, position_rtol(a.num_positions, n, count))

    plan = AblationPlan.from_dict(manifest["plan"])
    directions_path = manifest["directions"]["path"]
    threads = ablate_flow.with_options(task_runner=task_runner(Runtime(workers=2)))(
        str(DEMO_MODEL_DIR), directions_path, str(tmp_path / "threads"), plan
    )
    dask = ablate_flow.with_options(task_runner=task_runner(Runtime(dask_workers=2)))(
        str(DEMO_MODEL_DIR), directions_path, str(tmp_path / "dask"), plan
    )
    assert threads["counts"] == dask["counts"]
    for shard in sorted(p.name for p in (tmp_path / "threads").glob("*.safetensors")):
        assert (tmp_path / "threads" / shard).read_bytes() == (tmp_path / "dask" / shard).read_bytes(), shard


def test_sweep_runs_variants_as_nested_runs_on_one_measurement(first_run, tmp_path):
    from abliterate_flows.runtime import tracking_uri
    from abliterate_flows.sweep import sweep_flow

    variants = [{"name": "all", "layers": "all"}, {"name": "half", "layers": "all", "scale": "0.5"}]
    state = sweep_flow(model=str(DEMO_MODEL_DIR), out=str(tmp_path), variants=variants, return_state=True)
    result = state.result()
    states = task_states(state.state_details.flow_run_id)
    assert states["activation-measurement"] == ["Cached"] and states["direction-computation"] == ["Cached"]
    by_name = {p["name"]: p for p in result["variants"]}
    assert set(by_name) == {"all", "half"}
    # removing the whole direction refuses no more than removing half of it
    assert by_name["all"]["refusal_rate"] < 0.10
    assert by_name["all"]["refusal_rate"] <= by_name["half"]["refusal_rate"]
    assert result["front"] and set(result["front"]) <= {"all", "half"}
    assert (tmp_path / "all" / "abliteration.json").is_file() and (
        tmp_path / "half" / "abliteration.json"
    ).is_file()

    client = MlflowClient(tracking_uri())
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(c.data.tags["variant"] for c in children) == ["all", "half"]
    for child in children:
        assert {"after/refusal_rate_harmful", "after/kl_harmless"} <= set(child.data.metrics)
        assert child.info.run_name.startswith(f"sweep/{child.data.tags['variant']} · ")
    assert {"variants.json", "plots/refusal_vs_kl.png"} <= artifact_paths(client, parent.info.run_id)


def test_project_folder_may_hold_the_model_but_results_never_go_into_it(first_run, tmp_path, monkeypatch):
    """Like `abliterate demo` from a checkout, whose folder holds the demo model: fine. A project
    folder inside the model would put results/ and mlruns/ into the input: refused."""
    import shutil

    from abliterate_flows.main import abliterate_flow

    model = tmp_path / "home" / "models" / "demo"
    shutil.copytree(DEMO_MODEL_DIR, model)
    monkeypatch.setenv("ABLITERATE_HOME", str(tmp_path / "home"))
    state = abliterate_flow(
        model=str(model),
        out=str(tmp_path / "home" / "out"),
        prompts=DEMO_PROMPTS,
        evaluation=NO_EVALUATION,
        ablation={"scale": 1.0},
        return_state=True,
    )
    assert state.result()["validation_ok"]
    monkeypatch.setenv("ABLITERATE_HOME", str(model / "inside"))
    state = abliterate_flow(
        model=str(model),
        out=str(tmp_path / "out2"),
        prompts=DEMO_PROMPTS,
        evaluation=NO_EVALUATION,
        return_state=True,
    )
    assert state.is_failed() and "inside the input checkpoint" in str(state.message)
    assert not (model / "inside").exists()
