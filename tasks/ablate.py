"""Per-shard ablation as a mapped, cached Prefect task.

One task run per shard; the task runner of the `ablate` flow bounds how many run at once
(threads by default, Dask workers when asked). A task receives paths and the plan, never
tensors: each worker process reads the inventory (headers) and the directions file once and
keeps them (`load_inputs` reads once per process and file identity), so the directions are
never shipped.

The cache key is the engine's own shard key (plan, directions content, input shard identity,
engine version) plus the output path: a rerun with the same settings shows every shard as
cached, and a killed run resumes (finished shards are cached and the engine skips them too).
"""

from __future__ import annotations

from prefect import task

from abliterate.edit.ablate import ablate_shard, load_inputs
from abliterate.edit.output import ShardResult, shard_key
from abliterate.edit.plan import AblationPlan
from abliterate.inference.threads import apply_threads
from abliterate_tasks.caching import code_hash, make_key


def _shard_key(_context, p) -> str:
    inputs = load_inputs(p["model_dir"], p["directions_path"], p["force"])
    key = shard_key(p["plan"], inputs.directions, inputs.inventory, p["shard"])
    return make_key("ablate", code_hash(), key, p["out_dir"])


@task(name="ablate-shard", cache_key_fn=_shard_key, persist_result=True, task_run_name="ablate-shard-{shard}")
def ablate_shard_task(
    shard: str,
    model_dir: str,
    directions_path: str,
    plan: AblationPlan,
    out_dir: str,
    force: bool = False,
    edit_threads: int = 1,
) -> ShardResult:
    apply_threads()  # this process's choice (the command's), else the default setting
    inputs = load_inputs(model_dir, directions_path, force)
    return ablate_shard(plan, inputs, shard, out_dir, workers=edit_threads)
