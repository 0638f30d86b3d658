"""The per-shard ablation engine: matched tensors projected, everything else copied byte for byte.

Shapes and dtypes never change, so each output shard is the input shard with some byte ranges
rewritten: the header is copied verbatim and every tensor stays at its offset. Unedited ranges
are copied by the kernel (copy_file_range); each matched tensor is read from a memory map in
chunks of independent vectors, edited in float32, rounded once to its own dtype and written.
Memory stays at one chunk in float32 (a whole writer [H, in] in float32: its columns, the
vectors edited, are not contiguous on disk).

Steps, each a plain function so a flow can map the middle one over shards:
`load_inputs` -> `resolve_plan` -> `prepare_output` -> `ablate_shard` per shard -> `finalize_output`.
`ablate_checkpoint` runs them in sequence for the CLI.

Resume: a shard is complete when `<out>/<shard>` exists and a done record in `<out>/.abliterate/`
(or the manifest of a finished run) names the same shard key: plan, directions content, input
shard identity and engine version. A rerun skips such shards and finishes the rest; the result
is bit-identical to an uninterrupted run because each shard depends only on its own inputs.
The manifest `abliteration.json` is written last: its presence marks a complete output.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate.checkpoint import (
    Inventory,
    TensorInfo,
    build_inventory,
    check_output_location,
    fingerprint,
    read_header,
)
from abliterate.direction_file import Directions, load_directions
from abliterate.directions import library_versions
from abliterate.errors import AbliterateError
from abliterate.orthogonalize import norm_preserving_, project_out_, projected_direction
from abliterate.plan import AblationPlan, build_plan
from abliterate.profiles import Profile
from abliterate.structure import Structure, detect_structure

MANIFEST_FILE = "abliteration.json"
STATE_DIR = ".abliterate"  # done records while a run is incomplete; removed when it finishes
ENGINE_VERSION = 1  # part of every shard key: bump when the bytes an edit produces change
CHUNK_BYTES = 64 << 20  # storage bytes edited at once; fixed so results never depend on memory
PIECE = 1 << 21  # elements widened or rounded at once (elementwise: any size gives the same bytes)
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}  # edited in float32
# Files in a model directory that hold weights: never copied (they would carry the direction).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


@dataclass(frozen=True)
class Match:
    """One tensor the plan edits, with everything needed to edit it and to record it."""

    tensor: TensorInfo
    scale: float
    direction_position: int
    side: str  # "writer" | "reader" | "embed"
    method: str  # the method applied: routers are always edited plainly

    @property
    def experts(self) -> int:
        return self.tensor.shape[0] if self.tensor.fused_experts else 1

    def to_dict(self) -> dict[str, Any]:
        t = self.tensor
        return {
            "name": t.name,
            "shard": t.shard,
            "role": t.role,
            "layer": t.layer,
            "expert": t.expert,
            "fused_experts": t.fused_experts,
            "scale": self.scale,
            "direction_position": self.direction_position,
            "side": self.side,
            "residual_axis": t.residual_axis,
            "method": self.method,
        }


@dataclass
class AblationInputs:
    inventory: Inventory
    structure: Structure
    directions: Directions
    warnings: list[str] = field(default_factory=list)


@dataclass
class ShardResult:
    shard: str
    key: str
    edited: list[dict[str, Any]]  # Match.to_dict() of every rewritten tensor, in file order
    size: int
    skipped: bool = False  # found complete from an earlier run
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedOutput:
    out_dir: Path
    run_key: str
    resumed: bool  # the directory held a partial or complete output of the same run
    copied: list[str]
    warnings: list[str]


# ---------------------------------------------------------------- inputs and plan


def load_inputs(
    model_dir: str | Path, directions_path: str | Path, force: bool = False, profile: Profile | None = None
) -> AblationInputs:
    """Inventory, structure and directions, cross-checked; refuses quantized checkpoints.

    `profile`: role rules for a model whose config.json names no known family (see `choose_profile`).
    """
    inventory = build_inventory(model_dir, profile)
    if inventory.quantization:
        name, kind = next(iter(inventory.quantization.items()))
        raise AbliterateError(
            f"{inventory.model_dir} is quantized ({kind}, e.g. tensor {name}): its weights are not plain matrices, "
            "so projecting them would be wrong; ablate the unquantized (bf16/fp16/fp32) checkpoint and quantize after"
        )
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
            raise AbliterateError(message + ": measure this model, or pass --force if the weights are the same")
        warnings.append(message + " (--force)")
    if not directions.single and directions.num_positions != structure.num_layers + 1:
        raise AbliterateError(
            f"{directions_path} holds {directions.num_positions} residual positions but the model has "
            f"{structure.num_layers} decoder layers (positions 0..{structure.num_layers}): measured on another model"
        )
    return AblationInputs(inventory, structure, directions, warnings)


def default_plan(inputs: AblationInputs, **specs: Any) -> AblationPlan:
    """`build_plan` for this model and directions file (specs as in `abliterate.plan.build_plan`)."""
    s = inputs.structure
    return resolve_plan(build_plan(s.num_layers, s.mtp_layers, **specs), inputs)


def resolve_plan(plan: AblationPlan, inputs: AblationInputs) -> AblationPlan:
    """Check `plan` against the model and directions; fill in the selected position."""
    s, directions = inputs.structure, inputs.directions
    if plan.num_layers != s.num_layers:
        raise AbliterateError(f"the plan was made for {plan.num_layers} decoder layers, the model has {s.num_layers}")
    bad = [i for i in plan.layers if i >= s.num_layers and i not in s.mtp_layers]
    if bad:
        raise AbliterateError(
            f"the plan targets layer {bad[0]}, which the model lacks (decoder layers 0..{s.num_layers - 1}, "
            f"MTP layers {s.mtp_layers or 'none'})"
        )
    if directions.single:
        if plan.direction_position not in ("selected", 0):
            raise AbliterateError(
                f"{directions.path} holds one direction for every layer: direction position "
                f"{plan.direction_position!r} cannot apply; use `selected`"
            )
        plan = _replace(plan, selected_position=0)
    elif plan.direction_position == "selected":
        if directions.selected_position is None:
            raise AbliterateError(
                f"{directions.path} records no selected position: pass --direction-layer N (a residual position) "
                "or `own`"
            )
        plan = _replace(plan, selected_position=directions.selected_position)
    if plan.direction_position == "own" and not directions.single:
        plan = _drop_zero_directions(plan, inputs)
    if plan.method == "projected" and directions.harmless_mean is None:
        raise AbliterateError(
            f"the projected method needs the harmless means, but {directions.path} holds only `direction`: "
            "use a directions file written by `abliterate measure`, or the plain method"
        )
    layers: list[int | None] = list(plan.layers) + ([None] if "embed" in plan.targets else [])
    for layer in layers:
        direction_for(plan, directions, layer)  # every vector the run will use must exist and be non-zero
    return plan


def _drop_zero_directions(plan: AblationPlan, inputs: AblationInputs) -> AblationPlan:
    """Under `own`, a layer whose position has no direction (e.g. position 0 when every prompt ends
    in the same token) has nothing to remove: it leaves the plan, with a warning."""
    direction = inputs.directions.direction
    zero = [i for i in plan.layers if i < len(direction) and float(direction[i].norm()) == 0.0]
    if not zero:
        return plan
    inputs.warnings.append(f"layers {zero} have a zero direction at their own position: they stay unedited")
    keep = [(i, s) for i, s in zip(plan.layers, plan.scales, strict=True) if i not in zero]
    return _replace(plan, layers=[i for i, _ in keep], scale={str(i): s for i, s in keep})


def _replace(plan: AblationPlan, **changes: Any) -> AblationPlan:
    return AblationPlan.from_dict({**plan.to_dict(), **changes})


def direction_for(plan: AblationPlan, directions: Directions, layer: int | None) -> torch.Tensor:
    """The unit float32 vector [H] that edits tensors of `layer` (None: the embedding)."""
    position = 0 if directions.single else plan.position_for(layer)
    r = directions.vector(position)
    if plan.method == "projected":
        mean_position = 0 if layer is None else layer
        if directions.harmless_mean is None or mean_position >= directions.num_positions:
            raise AbliterateError(f"no harmless mean at position {mean_position} for the projected method")
        r = projected_direction(r, directions.harmless_mean[mean_position], f" for layer {layer}")
    return r


def plan_matches(plan: AblationPlan, inventory: Inventory, structure: Structure | None = None) -> list[Match]:
    """Every tensor the plan edits, in inventory order (shard, then offset). Layers match exactly."""
    roles = set(plan.roles())
    layers = set(plan.layers)
    matches = []
    for t in inventory.tensors.values():
        if t.role not in roles:
            continue
        # The embedding is the one edited tensor outside a layer. The MTP layer's own embedding is
        # not: it reaches the MTP residual stream only through enorm and eh_proj.
        if (t.layer is None) != (t.role == "embed") or (t.layer is not None and t.layer not in layers):
            continue
        if t.residual_axis is None:
            raise AbliterateError(f"{t.name} has role {t.role} but its profile gives no residual axis")
        if structure is not None and t.shape[t.residual_axis] != structure.hidden_size:
            raise AbliterateError(
                f"{t.name} has shape {list(t.shape)}: axis {t.residual_axis} should be the hidden size "
                f"{structure.hidden_size}"
            )
        if t.dtype not in TORCH_DTYPES:
            raise AbliterateError(f"{t.name} is stored as {t.dtype}; only {', '.join(TORCH_DTYPES)} can be edited")
        side = "reader" if t.role == "router" else "embed" if t.role == "embed" else "writer"
        # norm preservation is defined for matrix columns: routers and biases get the plain edit
        plain_only = side == "reader" or t.role.endswith("_bias")
        method = "plain" if plain_only and plan.method == "norm_preserving" else plan.method
        matches.append(Match(t, plan.scale_for(t.layer), plan.position_for(t.layer), side, method))
    if not matches:
        raise AbliterateError(
            f"the plan matches no tensor: roles {', '.join(plan.roles())} do not exist in layers {plan.layer_spec} of "
            f"{inventory.model_dir}; choose other --targets or --layers (see `abliterate inventory`)"
        )
    return matches


def role_counts(matches: list[Match]) -> dict[str, int]:
    """Edited tensors per role; a fused expert tensor counts once per expert."""
    counts: Counter[str] = Counter()
    for m in matches:
        counts[m.tensor.role] += m.experts
    return dict(sorted(counts.items()))


def describe_matches(plan: AblationPlan, matches: list[Match]) -> str:
    """The dry-run listing: the plan, every matched tensor, counts per role and per layer."""
    lines = ["# ablation plan", plan.to_yaml().rstrip(), "", "# matched tensors: shard, name, role, layer, scale, position"]
    for m in matches:
        t = m.tensor
        lines.append(f"{t.shard}\t{t.name}\t{t.role}\t{t.layer}\t{m.scale:g}\t{m.direction_position}")
    lines += ["", "# per role (fused expert tensors count once per expert)"]
    lines += [f"{role}\t{n}" for role, n in role_counts(matches).items()]
    per_layer: dict[Any, Counter[str]] = defaultdict(Counter)
    for m in matches:
        per_layer[m.tensor.layer][m.tensor.role] += m.experts
    lines += ["", "# per layer"]
    for layer in sorted(per_layer, key=lambda i: -1 if i is None else i):
        label = "embed" if layer is None else str(layer)
        lines.append(f"{label}\t" + " ".join(f"{r}={n}" for r, n in sorted(per_layer[layer].items())))
    lines.append(f"# total: {len(matches)} tensors, {sum(m.tensor.nbytes for m in matches)} bytes rewritten")
    return "\n".join(lines)


# ---------------------------------------------------------------- keys


def directions_digest(directions: Directions) -> str:
    """Identity of the numbers a run uses: direction and means, byte for byte."""
    digest = hashlib.sha256()
    for name in ("direction", "harmful_mean", "harmless_mean"):
        tensor = getattr(directions, name)
        if tensor is not None:
            digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    digest.update(b"single" if directions.single else b"rows")
    return digest.hexdigest()


def run_key(plan: AblationPlan, directions: Directions, inventory: Inventory) -> str:
    text = f"{ENGINE_VERSION}|{plan.sha256()}|{directions_digest(directions)}|{inventory.fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def shard_key(plan: AblationPlan, directions: Directions, inventory: Inventory, shard: str) -> str:
    """Cache key of one output shard: plan, directions, the input shard's header, size and mtime."""
    path = inventory.model_dir / shard
    header = read_header(path)
    stamp = f"{shard}|{header.size}|{header.header_sha256}|{path.stat().st_mtime_ns}"
    text = f"{ENGINE_VERSION}|{plan.sha256()}|{directions_digest(directions)}|{stamp}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---------------------------------------------------------------- output directory


def prepare_output(
    inputs: AblationInputs, plan: AblationPlan, out_dir: str | Path, overwrite: bool = False
) -> PreparedOutput:
    """Safety checks, then the output directory with every non-weight file copied verbatim.

    Refuses an output equal to, inside, or containing the input; a non-empty directory unless
    it holds a partial or complete output of this very run (resumed) or `overwrite` is set.
    `overwrite` empties an earlier abliterate output; in any other directory it deletes nothing
    (and refuses one holding weight files the checkpoint lacks).
    """
    model_dir = inputs.inventory.model_dir.resolve()
    out = check_output_location(model_dir, out_dir)
    if out.exists() and not out.is_dir():
        raise AbliterateError(f"output {out} exists and is not a directory")
    key = run_key(plan, inputs.directions, inputs.inventory)
    shards = set(inputs.inventory.shards)
    resumed, warnings = False, []
    if out.exists() and any(out.iterdir()):
        previous = _recorded_run_key(out)
        present = sorted(p.name for p in out.iterdir())
        if previous == key:
            resumed = True
        elif not overwrite:
            what = "an output of a different plan, directions or input" if previous else f"other files ({', '.join(present[:3])})"
            raise AbliterateError(
                f"output {out} is not empty: it holds {what}; pass --overwrite to replace its contents, "
                "or choose an empty directory"
            )
        elif previous:  # an earlier abliterate output: all of it is ours to replace
            _clear(out)
        else:  # someone else's files: overwrite ours, delete nothing
            stray = [n for n in present if n.endswith(WEIGHT_SUFFIXES) and n not in shards]
            if stray:
                raise AbliterateError(
                    f"output {out} holds weight files that are not this checkpoint's ({', '.join(stray[:3])}); "
                    "--overwrite deletes only earlier abliterate outputs: remove them or choose another directory"
                )
            kept = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            warnings.append(f"--overwrite keeps the files of {out} that the checkpoint does not have ({kept})")
    state = out / STATE_DIR
    with _writing(out):
        state.mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob(".*.tmp-*")) + list(state.glob(".*.tmp-*")):
            stale.unlink()  # temporary files of a killed run
    _write_json_atomic(state / "run.json", {"run_key": key, "plan": plan.to_dict()})

    to_copy, skipped = files_to_copy(model_dir, set(inputs.inventory.shards))
    warnings += skipped
    copied = []
    for path in to_copy:
        tmp = out / f".{path.name}.tmp-{os.getpid()}"
        with _writing(out / path.name):
            shutil.copyfile(path, tmp)
            os.replace(tmp, out / path.name)
        copied.append(path.name)
    return PreparedOutput(out, key, resumed, copied, warnings)


def files_to_copy(model_dir: Path, shards: set[str]) -> tuple[list[Path], list[str]]:
    """The input's non-weight files that an output gets verbatim (config, tokenizer, index, code),
    and a warning for each thing left out: subfolders, and weight files outside the shards (they
    would carry the direction). An input that is itself an ablation output keeps its manifest in
    the new one (`input_manifest`), so the file is not copied."""
    copy, skipped = [], []
    for path in sorted(model_dir.iterdir()):
        if path.name in shards or path.name == MANIFEST_FILE or path.name.startswith("."):
            continue
        if path.is_dir():
            skipped.append(f"subdirectory {path.name}/ of the input is not copied")
        elif path.name.endswith(WEIGHT_SUFFIXES):
            skipped.append(f"{path.name} holds weights outside the checkpoint's shards: not copied")
        else:
            copy.append(path)
    return copy, skipped


@contextmanager
def _writing(target: Path) -> Iterator[None]:
    """A failed write to the output (disk full, read-only, permissions) becomes one clear error."""
    try:
        yield
    except OSError as exc:
        raise AbliterateError(
            f"cannot write {target}: {exc.strerror or exc}; free space or fix the permissions, then rerun the "
            "same command (finished shards are kept)"
        ) from exc


def _recorded_run_key(out: Path) -> str | None:
    for path, read in ((out / STATE_DIR / "run.json", "run_key"), (out / MANIFEST_FILE, "run_key")):
        try:
            return json.loads(path.read_text())[read]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _clear(out: Path) -> None:
    for path in out.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with _writing(path):
        try:
            with open(tmp, "w") as handle:
                json.dump(data, handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- one shard


def ablate_shard(
    plan: AblationPlan,
    inputs: AblationInputs,
    shard: str,
    out_dir: str | Path,
    matches: list[Match] | None = None,
) -> ShardResult:
    """Write `<out_dir>/<shard>`: the input shard with the plan's tensors edited (atomic: temp + rename).

    Independent of every other shard: safe to run in parallel threads or processes. Skips the
    shard when an earlier run of the same key completed it. `prepare_output` must have run.
    """
    out = Path(out_dir)
    began = time.perf_counter()
    key = shard_key(plan, inputs.directions, inputs.inventory, shard)
    done = _completed(out, shard, key)
    if done is not None:
        done.skipped = True
        return done
    if matches is None:
        matches = plan_matches(plan, inputs.inventory, inputs.structure)
    mine = sorted((m for m in matches if m.tensor.shard == shard), key=lambda m: m.tensor.start)
    vectors = {m.tensor.layer: direction_for(plan, inputs.directions, m.tensor.layer) for m in mine}
    src = inputs.inventory.model_dir / shard
    tmp = out / f".{shard}.tmp-{os.getpid()}-{threading.get_ident()}"
    with _writing(out / shard):
        try:
            with open(src, "rb") as fin, open(tmp, "wb", buffering=0) as fout:
                size = os.fstat(fin.fileno()).st_size
                # Copy-on-write mapping: writable for torch.frombuffer, never written to.
                mapped = mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_COPY)
                try:
                    position = 0
                    for m in mine:
                        _copy_range(fin.fileno(), fout.fileno(), position, m.tensor.start - position)
                        _edit_tensor(mapped, fout.fileno(), m, vectors[m.tensor.layer])
                        position = m.tensor.end
                    _copy_range(fin.fileno(), fout.fileno(), position, size - position)
                finally:
                    _close(mapped)
                os.fsync(fout.fileno())
            os.replace(tmp, out / shard)
        finally:
            tmp.unlink(missing_ok=True)
    result = ShardResult(
        shard=shard,
        key=key,
        edited=[m.to_dict() for m in mine],
        size=size,
        seconds=time.perf_counter() - began,
    )
    stat = (out / shard).stat()
    record = {"key": key, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "result": result.to_dict()}
    _write_json_atomic(out / STATE_DIR / f"{shard}.json", record)
    return result


def _completed(out: Path, shard: str, key: str) -> ShardResult | None:
    """The result of an earlier run that finished this shard with the same key, if its file is intact."""
    path = out / shard
    if not path.is_file():
        return None
    stat = path.stat()
    try:
        record = json.loads((out / STATE_DIR / f"{shard}.json").read_text())
        if record["key"] == key and record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns:
            return ShardResult(**record["result"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:  # a finished run: its manifest lists every shard's key and edits
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        entry = manifest["shards"][shard]
        if entry["key"] == key and entry["size"] == stat.st_size:
            edited = [e for e in manifest["edited"] if e["shard"] == shard]
            return ShardResult(shard, key, edited, entry["size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy src[offset:offset+count] to dst's current position: in the kernel where it can."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, min(count, 1 << 30), offset)
        except (OSError, AttributeError):  # another filesystem, old kernel, other OS
            n = os.write(dst, os.pread(src, min(count, 1 << 26), offset))
        if n == 0:
            raise AbliterateError(f"unexpected end of input while copying at byte {offset}")
        offset += n
        count -= n


def _edit_tensor(mapped: mmap.mmap, dst: int, m: Match, r: torch.Tensor) -> None:
    """Read, edit in float32, round once, write: chunk by chunk of independent vectors."""
    t = m.tensor
    if t.nbytes == 0:
        return
    dtype = TORCH_DTYPES[t.dtype]
    axis = t.residual_axis
    # Slices along axis 0 hold independent vectors unless axis 0 is the residual axis itself.
    rows = t.shape[0] if axis != 0 and len(t.shape) > 1 else 1
    row_numel = math.prod(t.shape) // rows
    row_bytes = t.nbytes // rows
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    edit = norm_preserving_ if m.method == "norm_preserving" and m.side != "reader" else project_out_
    for first in range(0, rows, step):
        count = min(step, rows - first)
        offset = t.start + first * row_bytes
        shape = (count, *t.shape[1:]) if rows > 1 else t.shape
        work = _read_float32(mapped, offset, count * row_numel, dtype).view(shape)
        edit(work, r, m.scale, axis)
        _write_rounded(dst, work, dtype)


class _Scratch(threading.local):
    """Per-thread buffers reused from tensor to tensor (a fresh allocation faults in every page:
    a third of the edit time). The float32 one grows to the largest chunk edited, and stays."""

    def __init__(self) -> None:
        self.work = torch.empty(0, dtype=torch.float32)
        self.pieces: dict[torch.dtype, torch.Tensor] = {}

    def float32(self, numel: int) -> torch.Tensor:
        if self.work.numel() < numel:
            self.work = torch.empty(0, dtype=torch.float32)  # free the old one first
            self.work = torch.empty(numel, dtype=torch.float32)
        return self.work[:numel]

    def piece(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if dtype not in self.pieces:
            self.pieces[dtype] = torch.empty(PIECE, dtype=dtype)
        return self.pieces[dtype][:numel]


_SCRATCH = _Scratch()


def _read_float32(mapped: mmap.mmap, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Widen stored values to float32 a piece at a time, dropping each piece's pages."""
    work = _SCRATCH.float32(numel)
    size = torch.empty((), dtype=dtype).element_size()
    for first in range(0, numel, PIECE):
        count = min(PIECE, numel - first)
        stored = torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset + first * size)
        work[first : first + count].copy_(stored)
        del stored
        _release(mapped, offset + first * size, count * size)
    return work


def _write_rounded(dst: int, work: torch.Tensor, dtype: torch.dtype) -> None:
    """Round to `dtype` and write, a piece at a time (rounding is per element: pieces change nothing)."""
    flat = work.view(-1)
    for first in range(0, flat.numel(), PIECE):
        part = flat[first : first + PIECE]
        if dtype != torch.float32:
            part = _SCRATCH.piece(dtype, part.numel()).copy_(part)
        view = memoryview(part.view(torch.uint8).numpy())
        written = 0
        while written < len(view):
            written += os.write(dst, view[written:])


def _close(mapped: mmap.mmap) -> None:
    try:
        mapped.close()
    except BufferError:  # a tensor of an interrupted edit still views it: the GC unmaps it later
        pass


def _release(mapped: mmap.mmap, offset: int, length: int) -> None:
    """Drop the mapped pages just read, so resident memory stays at one chunk, not the shard."""
    if hasattr(mmap, "MADV_DONTNEED"):
        start = offset - offset % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, start, min(length + offset - start, len(mapped) - start))



# ---------------------------------------------------------------- manifest


def finalize_output(
    inputs: AblationInputs, plan: AblationPlan, prepared: PreparedOutput, results: list[ShardResult]
) -> dict[str, Any]:
    """Check every shard is complete, write `abliteration.json` (atomically, last), drop the done records."""
    out = prepared.out_dir
    by_shard = {r.shard: r for r in results}
    missing = [s for s in inputs.inventory.shards if s not in by_shard or not (out / s).is_file()]
    if missing:
        raise AbliterateError(f"output {out} lacks shard {missing[0]} ({len(missing)} missing): rerun to finish")
    ordered = [by_shard[s] for s in inputs.inventory.shards]
    edited = [e for r in ordered for e in r.edited]
    counts: Counter[str] = Counter()
    for e in edited:
        t = inputs.inventory.tensors[e["name"]]
        counts[e["role"]] += t.shape[0] if t.fused_experts else 1
    directions = inputs.directions
    manifest = {
        "format": 1,
        "tool": {"name": "abliterate", "version": library_versions().get("abliterate")},
        "versions": library_versions(),
        "run_key": prepared.run_key,
        "input": {"path": str(inputs.inventory.model_dir.resolve()), "fingerprint": inputs.inventory.fingerprint},
        # Headers are copied verbatim, so the layout fingerprint equals the input's; what the bytes
        # hold is identified by `run_key` (engine version, plan, directions content, input).
        "output": {"path": str(out), "fingerprint": fingerprint(out)},
        "plan": plan.to_dict(),
        "directions": {
            "path": str(Path(directions.path).resolve()) if directions.path else None,
            "sha256": directions.sha256() if directions.path else None,
            "content_sha256": directions_digest(directions),
            "single": directions.single,
            "metadata": directions.metadata,
        },
        "edited": edited,
        "counts": dict(sorted(counts.items())),
        "shards": {r.shard: {"key": r.key, "size": r.size} for r in ordered},
    }
    previous = inputs.inventory.model_dir / MANIFEST_FILE
    if previous.is_file():
        manifest["input_manifest"] = json.loads(previous.read_text())
    _write_json_atomic(out / MANIFEST_FILE, manifest)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest


# ---------------------------------------------------------------- the whole run


def ablate_checkpoint(
    model_dir: str | Path,
    directions_path: str | Path,
    out_dir: str | Path,
    plan: AblationPlan | None = None,
    overwrite: bool = False,
    force: bool = False,
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
    inputs: AblationInputs | None = None,
) -> dict[str, Any]:
    """Ablate a whole checkpoint shard by shard; returns the manifest. `plan` None: the default plan.

    `inputs`: the result of `load_inputs(model_dir, directions_path, force)` when the caller has it.
    """
    inputs = inputs or load_inputs(model_dir, directions_path, force)
    plan = default_plan(inputs) if plan is None else resolve_plan(plan, inputs)
    matches = plan_matches(plan, inputs.inventory, inputs.structure)
    prepared = prepare_output(inputs, plan, out_dir, overwrite)
    for warning in inputs.warnings + prepared.warnings:
        log(f"warning: {warning}")
    sizes = {s: (inputs.inventory.model_dir / s).stat().st_size for s in inputs.inventory.shards}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="ablate", disable=not progress)

    def one(shard: str) -> ShardResult:
        result = ablate_shard(plan, inputs, shard, prepared.out_dir, matches)
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
    return finalize_output(inputs, plan, prepared, results)

