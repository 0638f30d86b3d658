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

from abliterate.config import Runtime
from abliterate.edit.ablate import load_inputs
from abliterate.edit.output import finalize_output, output_directory, prepare_output
from abliterate.edit.plan import AblationPlan
from abliterate_tasks.ablate import ablate_shard_task


def edit_threads(runtime: Runtime) -> int:
    """The `ablate` flow's `edit_threads` for `runtime`: its `workers` threads, 1 on Dask (a process per
    worker, one thread each)."""
    return 1 if runtime.dask_address or runtime.dask_workers else runtime.workers


def task_runner(runtime: Runtime):
    """The runtime's `workers` threads, or Dask: an existing scheduler (`dask_address`,
    `tcp://host:8786`) or a local cluster of `dask_workers` processes."""
    if runtime.dask_address or runtime.dask_workers:
        from prefect_dask import DaskTaskRunner

        if runtime.dask_address:
            return DaskTaskRunner(address=runtime.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": runtime.dask_workers, "threads_per_worker": 1, "processes": True}
        )
    return ThreadPoolTaskRunner(max_workers=max(1, runtime.workers))


@flow(name="ablate", task_runner=task_runner(Runtime()), log_prints=True)
def ablate_flow(
    model_dir: str,
    directions_path: str,
    out: str,
    plan: AblationPlan,
    overwrite: bool = False,
    force: bool = False,
    edit_threads: int = 1,
) -> dict[str, Any]:
    """Write OUT: MODEL_DIR with `plan` (resolved against this model and directions file by
    `matching.configured_plan` or `matching.resolve_plan`) applied shard by shard, one task per
    shard; returns the manifest. `edit_threads`: threads of this process that edit the tensors of
    the shards its tasks write (`engine.edit_pool`: a shard's tensors edited at once where cores are
    free); 1: each task edits its own, as on a Dask worker of one thread. The inputs are read once per process (`load_inputs`): the caller's
    read is reused here, and by every shard task that runs in this process."""
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
            unmapped(edit_threads),
        )
        return finalize_output(inputs, resolved, prepared, [f.result() for f in futures])
