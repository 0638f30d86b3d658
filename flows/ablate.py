"""The `ablate` flow: per-shard ablation mapped over a task runner of the caller's choice.

Threads on this machine by default; a Dask cluster (prefect-dask) when `dask_address` names a
scheduler, or a local cluster of processes when `dask_workers` is set. Shards are independent;
every worker must see the input, directions and output paths (shared storage on a cluster).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from abliterate.edit.ablate import load_inputs
from abliterate.edit.output import finalize_output, output_directory, prepare_output
from abliterate.edit.plan import AblationPlan
from abliterate_tasks.ablate import ablate_shard_task


def task_runner(workers: int = 2, dask_address: str | None = None, dask_workers: int | None = None):
    """Threads, or Dask: an existing scheduler (`tcp://host:8786`) or a local cluster of processes."""
    if dask_address or dask_workers:
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True}
        )
    return ThreadPoolTaskRunner(max_workers=max(1, workers))


@flow(name="ablate", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def ablate_flow(
    model_dir: str,
    directions_path: str,
    out: str,
    plan: AblationPlan,
    overwrite: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Write OUT: MODEL_DIR with `plan` (resolved against this model and directions file by
    `matching.default_plan` or `matching.resolve_plan`) applied shard by shard, one task per
    shard; returns the manifest."""
    inputs = load_inputs(model_dir, directions_path, force)
    resolved = plan
    with output_directory(inputs, out) as locked_out:  # no other run writes it while the shards are mapped
        prepared = prepare_output(inputs, resolved, locked_out, overwrite)
        for warning in prepared.warnings:  # e.g. input subfolders that are not copied
            print(f"warning: {warning}")
        complete = all((prepared.out_dir / s).is_file() for s in inputs.inventory.shards)
        futures = ablate_shard_task.with_options(refresh_cache=not complete).map(
            inputs.inventory.shards,
            unmapped(str(Path(model_dir).resolve())),
            unmapped(str(Path(directions_path).resolve())),
            unmapped(resolved),
            unmapped(str(prepared.out_dir)),
            unmapped(force),
        )
        return finalize_output(inputs, resolved, prepared, [f.result() for f in futures])
