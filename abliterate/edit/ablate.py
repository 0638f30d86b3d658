"""Per-shard ablation, the pipeline stage: inputs, plan, output directory, shards, manifest.

Steps, each a plain function so a flow can map the middle one over shards:
`load_inputs` -> `resolve_plan` (matching) -> `prepare_output` (output) -> `ablate_shard` per
shard -> `finalize_output` (output). `ablate_checkpoint` runs them in sequence for the CLI.

Where the parts live: the plan and its specs in `plan.py`; the plan against a model (resolution,
matched tensors, direction vectors) in `matching.py`; the output directory, keys, resume records
and manifest in `output.py`; the bytes of one shard in `engine.py`, of its FP8 weights in
`fp8_edit.py`; the math in `orthogonalize.py`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from abliterate.config import Ablation, Runtime, Selection
from abliterate.edit.engine import edit_pool, write_shard
from abliterate.edit.fp8_edit import check_input_scales
from abliterate.edit.matching import (
    AblationInputs,
    Match,
    configured_plan,
    direction_for,
    plan_matches,
    resolve_plan,
    vector_for,
)
from abliterate.edit.output import (
    ShardResult,
    completed_shard,
    finalize_output,
    output_directory,
    prepare_output,
    record_shard,
    replacing,
    shard_key,
    unchanged_tensors,
)
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.inference.threads import apply_threads
from abliterate.measure.direction_file import load_directions
from abliterate.paths import file_identity, folder_identity
from abliterate.weights import fp8
from abliterate.weights.checkpoint import build_inventory, read_config
from abliterate.weights.profiles import Profile
from abliterate.weights.structure import detect_structure


def load_inputs(
    model_dir: str | Path, directions_path: str | Path, force: bool = False, profile: Profile | None = None
) -> AblationInputs:
    """Inventory, structure and directions, cross-checked; refuses quantized checkpoints.

    Read once per process: the CLI, the flow and each shard task of one ablation share one read, and
    a checkpoint or directions file rewritten since is read again (`paths.file_identity`). Each call
    gets its own list of warnings; the rest is shared and never mutated.
    `profile`: role rules for a model whose config.json names no known family (see `choose_profile`).
    """
    identity = (folder_identity(model_dir), file_identity(directions_path))
    inputs = _read_inputs(Path(model_dir), Path(directions_path), force, profile, identity)
    return dataclasses.replace(inputs, warnings=list(inputs.warnings))


@lru_cache(maxsize=4)
def _read_inputs(
    model_dir: Path, directions_path: Path, force: bool, profile: Profile | None, _identity: tuple
) -> AblationInputs:
    inventory = build_inventory(model_dir, profile)
    refused = fp8.uncovered(inventory.quantization, inventory.fp8)
    if refused:  # FP8 weights with their scales are edited (fp8_edit.py); every other quantization is refused
        fp8.format_from_config(
            read_config(inventory.model_dir, required=False), inventory.model_dir / "config.json"
        )  # names an unsupported method
        name, kind = next(iter(refused.items()))
        raise AbliterateError(
            f"{inventory.model_dir} is quantized ({kind}, e.g. tensor {name}): its weights are not plain matrices, "
            "so projecting them would be wrong; ablate the unquantized (bf16/fp16/fp32) checkpoint and quantize after "
            "(FP8 e4m3 with scales is edited when config.json's quantization_config declares it)"
        )
    check_input_scales(inventory)
    structure = detect_structure(inventory)
    directions = load_directions(directions_path, structure.hidden_size)
    warnings = list(structure.warnings)
    recorded = directions.fingerprint
    if recorded is None:
        warnings.append(
            f"{directions_path} carries no model fingerprint (hand-written?): only its hidden size "
            f"({directions.hidden_size}) could be checked against {inventory.model_dir}"
        )
    elif recorded != inventory.fingerprint:
        message = (
            f"{directions_path} was measured on a checkpoint with fingerprint {recorded}, but {inventory.model_dir} "
            f"has {inventory.fingerprint}"
        )
        if not force:
            raise AbliterateError(
                message + ": measure this model, or pass --force if the weights are the same"
            )
        warnings.append(message + " (--force)")
    if not directions.single and directions.num_positions != structure.num_layers + 1:
        raise AbliterateError(
            f"{directions_path} holds {directions.num_positions} residual positions but the model has "
            f"{structure.num_layers} decoder layers (positions 0..{structure.num_layers}): measured on another model"
        )
    return AblationInputs(inventory, structure, directions, warnings)


def ablate_shard(
    plan: AblationPlan,
    inputs: AblationInputs,
    shard: str,
    out_dir: str | Path,
    matches: list[Match] | None = None,
    workers: int = 1,
) -> ShardResult:
    """Write `<out_dir>/<shard>`: the input shard with the plan's tensors edited (atomic: temp + rename).

    Independent of every other shard: safe to run in parallel threads or processes. Skips the
    shard when an earlier run of the same key completed it. `prepare_output` must have run.
    `workers` > 1: the tensors are edited in this process's pool of that many threads
    (`engine.edit_pool`), which the shards running at once share: a shard's tensors are edited at
    once where cores are free.
    """
    out = Path(out_dir)
    began = time.perf_counter()
    key = shard_key(plan, inputs.directions, inputs.inventory, shard)
    done = completed_shard(out, shard, key)
    if done is not None:
        done.skipped = True
        return done
    if matches is None:
        matches = plan_matches(plan, inputs.inventory, inputs.structure)
    mine = sorted((m for m in matches if m.tensor.shard == shard), key=lambda m: m.tensor.start)
    # and the FP8 weights stored elsewhere whose scale tensor this shard holds (the engine writes the scale)
    scales_here = [
        m for m in matches if m.scales is not None and m.tensor.shard != shard == m.scales[0].shard
    ]
    vectors = {
        m.tensor.layer: direction_for(plan, inputs.directions, m.tensor.layer)
        for m in mine + scales_here
        if m.side != "shift"
    }
    edits = [
        (m, vector_for(plan, inputs.directions, m) if m.side == "shift" else vectors[m.tensor.layer])
        for m in mine + scales_here
    ]
    with replacing(out / shard) as tmp:
        size = write_shard(
            inputs.inventory.model_dir / shard, tmp, edits, inputs.inventory.model_dir, edit_pool(workers)
        )
        same = unchanged_tensors(inputs.inventory.model_dir / shard, tmp, mine)
    result = ShardResult(
        shard, key, [m.to_dict() for m in mine], size, seconds=time.perf_counter() - began, unchanged=same
    )
    record_shard(out, result)
    return result


def ablate_checkpoint(
    model_dir: str | Path,
    directions_path: str | Path,
    out_dir: str | Path,
    plan: AblationPlan | None = None,
    overwrite: bool = False,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    inputs: AblationInputs | None = None,
) -> dict[str, Any]:
    """Ablate a whole checkpoint shard by shard; returns the manifest. `plan` None: the plan of the
    default settings; `workers` None: the default number of threads (both from abliterate/config.py).

    `inputs`: the result of `load_inputs(model_dir, directions_path, force)` when the caller has it.
    """
    inputs = inputs or load_inputs(model_dir, directions_path, force)
    if plan is None:
        plan = configured_plan(inputs, Ablation(), Selection().direction_position)
    else:
        plan = resolve_plan(plan, inputs)
    workers = Runtime().workers if workers is None else workers
    matches = plan_matches(plan, inputs.inventory, inputs.structure)
    with output_directory(inputs, out_dir) as out:  # locked: no other run writes it meanwhile
        prepared = prepare_output(inputs, plan, out, overwrite)
        for warning in inputs.warnings + prepared.warnings:
            log(f"warning: {warning}")
        sizes = {s: (inputs.inventory.model_dir / s).stat().st_size for s in inputs.inventory.shards}
        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="ablate", disable=not progress)

        def one(shard: str) -> ShardResult:
            apply_threads(share=workers)  # each worker thread its part of this process's torch threads
            result = ablate_shard(plan, inputs, shard, prepared.out_dir, matches, workers)
            bar.update(sizes[shard])
            return result

        try:
            if workers > 1:
                with ThreadPoolExecutor(workers) as pool:
                    results = list(pool.map(one, inputs.inventory.shards))
            else:
                results = [one(s) for s in inputs.inventory.shards]
        finally:
            bar.close()
        skipped = sum(r.skipped for r in results)
        if skipped:
            log(f"{skipped} of {len(results)} shards were already complete from an earlier run of this plan")
        noted = len(inputs.warnings)
        manifest = finalize_output(inputs, plan, prepared, results)
        for warning in inputs.warnings[noted:]:
            log(f"warning: {warning}")
        return manifest
