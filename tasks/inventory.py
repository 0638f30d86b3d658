"""Weight inventory and structure detection as cached Prefect tasks."""

from __future__ import annotations

from pathlib import Path

from prefect import task

import abliterate.weights.profiles
from abliterate.weights.checkpoint import Inventory, build_inventory, file_sha256, shard_stamp
from abliterate.weights.structure import Structure, detect_structure
from abliterate_tasks.caching import code_hash, make_key


def _config_hash(model_dir: Path) -> str | None:
    config = model_dir / "config.json"
    return file_sha256(config) if config.is_file() else None  # the task reports the missing file


def _inventory_key(_context, parameters) -> str:
    # Headers only: cheap, and changes whenever any shard is rewritten. The path and the config
    # count too: the inventory records where it lives, and model_type picks the role rules.
    model_dir = Path(parameters["model_dir"]).resolve()
    code = code_hash()
    return make_key(
        "inventory",
        code,
        str(model_dir),
        shard_stamp(model_dir),
        _config_hash(model_dir),
        parameters.get("family"),
    )


@task(name="weight-inventory", cache_key_fn=_inventory_key, persist_result=True)
def inventory_task(model_dir: str, family: str | None = None) -> Inventory:
    profile = abliterate.weights.profiles.PROFILES[family] if family else None
    return build_inventory(model_dir, profile)


def _structure_key(_context, parameters) -> str:
    inventory: Inventory = parameters["inventory"]
    return make_key(
        "structure",
        code_hash(),
        str(inventory.model_dir),
        inventory.fingerprint,
        inventory.family,
        _config_hash(inventory.model_dir),
    )


@task(name="structure-detection", cache_key_fn=_structure_key, persist_result=True)
def structure_task(inventory: Inventory) -> Structure:
    return detect_structure(inventory)
