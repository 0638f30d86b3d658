"""Per-shard ablation as a mapped, cached Prefect task.

One task run per shard; the task runner of the `ablate` flow bounds how many run at once
(threads by default, Dask workers when asked). A task receives paths and the plan, never
tensors: each worker process reads the inventory (headers) and the directions file once and
keeps them (`_inputs` is cached per process), so the directions and plan are shipped once.

The cache key is the engine's own shard key (plan, directions content, input shard identity,
engine version) plus the output path: a rerun with the same settings shows every shard as
cached, and a killed run resumes (finished shards are cached and the engine skips them too).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from prefect import task

from abliterate.edit.ablate import ablate_shard, load_inputs
from abliterate.edit.matching import AblationInputs
from abliterate.edit.output import ShardResult, shard_key
from abliterate.edit.plan import AblationPlan
from abliterate_tasks.caching import code_hash, make_key


@lru_cache(maxsize=4)
def _cached_inputs(model_dir: str, directions_path: str, force: bool, _identity: tuple) -> AblationInputs:
    return load_inputs(model_dir, directions_path, force)


def _inputs(model_dir: str, directions_path: str, force: bool) -> AblationInputs:
    # Keyed by the files' sizes and modification times too, so a process never reuses inputs of
    # a rewritten checkpoint or directions file; stat calls only, since this runs twice per shard.
    files = sorted(Path(model_dir).iterdir()) + [Path(directions_path)]
    identity = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    return _cached_inputs(model_dir, directions_path, force, identity)


def _shard_key(_context, p) -> str:
    inputs = _inputs(p["model_dir"], p["directions_path"], p["force"])
    key = shard_key(p["plan"], inputs.directions, inputs.inventory, p["shard"])
    return make_key("ablate", code_hash(), key, p["out_dir"])


@task(name="ablate-shard", cache_key_fn=_shard_key, persist_result=True, task_run_name="ablate-shard-{shard}")
def ablate_shard_task(
    shard: str, model_dir: str, directions_path: str, plan: AblationPlan, out_dir: str, force: bool = False
) -> ShardResult:
    return ablate_shard(plan, _inputs(model_dir, directions_path, force), shard, out_dir)
