"""Per-shard ablation as a mapped, cached Prefect task.

One task run per shard; the flow's task runner bounds how many run at once. The cache key is
the engine's own shard key (plan, directions content, input shard identity, engine version)
plus the output path, so a rerun with the same settings shows every shard as cached, and a
killed run resumes: finished shards are cached (and the engine skips them too), the rest run.
"""

from __future__ import annotations

from prefect import task

from abliterate.ablate import AblationInputs, Match, ShardResult, ablate_shard, shard_key
from abliterate.plan import AblationPlan
from tasks.caching import make_key


def _shard_key(_context, p) -> str:
    inputs: AblationInputs = p["inputs"]
    key = shard_key(p["plan"], inputs.directions, inputs.inventory, p["shard"])
    return make_key("ablate", key, p["out_dir"])


@task(name="ablate-shard", cache_key_fn=_shard_key, persist_result=True, task_run_name="ablate-{shard}")
def ablate_shard_task(
    shard: str, plan: AblationPlan, inputs: AblationInputs, out_dir: str, matches: list[Match]
) -> ShardResult:
    return ablate_shard(plan, inputs, shard, out_dir, matches)
