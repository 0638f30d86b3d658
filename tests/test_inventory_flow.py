"""The inventory flow: real Prefect tasks with content-keyed caches, counts logged to MLflow."""

import shutil

from mlflow.tracking import MlflowClient

from abliterate.weights.checkpoint import shard_stamp


def test_inventory_flow_caches_and_logs(prefect_env, glm_air_layout, tmp_path):
    from abliterate_flows.inventory import inventory_flow
    from abliterate_flows.runtime import tracking_uri
    from abliterate_flows.tracking import experiment_name

    model = shutil.copytree(glm_air_layout, tmp_path / "GLM-4.5-Air-layout")
    first = inventory_flow(str(model), return_state=True)
    second = inventory_flow(str(model), return_state=True)
    assert first.result()["roles"]["expert_down"] == 5760
    assert second.result() == first.result()

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    states = {}
    for run in runs:
        if run.flow_run_id == second.state_details.flow_run_id:
            states[run.name.rsplit("-", 1)[0]] = run.state.name
    assert states == {"weight-inventory": "Cached", "structure-detection": "Cached"}

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(experiment_name(model))
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    latest = runs[0]
    assert latest.data.metrics["tensors/expert_down"] == 5760
    assert latest.data.metrics["tensors/mtp.expert_down"] == 128
    assert latest.data.params["family"] == "glm4_moe"
    assert latest.data.tags["prefect.flow_run_id"] == str(second.state_details.flow_run_id)
    artifacts = {a.path for a in client.list_artifacts(latest.info.run_id)}
    assert {"structure.json", "inventory.json"} <= artifacts

    # Rewriting a shard changes the cache key: the inventory runs again.
    before = shard_stamp(model)
    shard = model / "model-00002-of-00008.safetensors"
    shard.write_bytes(shard.read_bytes())
    assert shard_stamp(model) != before
