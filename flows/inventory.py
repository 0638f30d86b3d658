"""The inventory flow: weight inventory -> structure detection, counts logged to MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from abliterate.weights.structure import Structure
from abliterate_flows.tracking import (
    TENSORS,
    Tracker,
    experiment_description,
    experiment_name,
    metric,
    model_title,
    run_name,
    tracked_run,
)
from abliterate_tasks.inventory import inventory_task, structure_task


def log_structure(tracker: Tracker, structure: Structure, inventory_json: dict) -> None:
    tracker.params(
        {
            "model_fingerprint": structure.fingerprint,
            "architecture": structure.architecture,
            "family": structure.family,
            "num_layers": structure.num_layers,
            "hidden_size": structure.hidden_size,
            "experts_per_layer": structure.experts_per_layer,
        }
    )
    tracker.metrics({metric(TENSORS, role): n for role, n in structure.roles.items()})
    tracker.metrics({metric(TENSORS, f"mtp.{role}"): n for role, n in structure.mtp_roles.items()})
    tracker.metrics({metric(TENSORS, "total"): structure.tensors, metric(TENSORS, "bytes"): structure.bytes})
    tracker.json(structure.to_json(), "structure.json")
    tracker.json(inventory_json, "inventory.json")


@flow(name="inventory", log_prints=True)
def inventory_flow(model_dir: str, family: str | None = None) -> dict:
    """Read a checkpoint's headers, classify every tensor, check it against config.json, log the counts."""
    model_dir = str(Path(model_dir).resolve())
    inventory = inventory_task(model_dir, family)
    structure = structure_task(inventory)
    tags = {"prefect.flow_run_id": flow_run.get_id(), "model_dir": model_dir}
    with tracked_run(
        experiment_name(model_dir),
        run_name("inventory", model_title(model_dir)),
        tags,
        description=experiment_description(model_dir),
    ) as tracker:
        log_structure(tracker, structure, inventory.to_json())
    return structure.to_json()
