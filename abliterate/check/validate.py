"""Output validation: is the ablated checkpoint the input with exactly the planned edits?

Checks, all in bounded memory (a few chunks of one tensor at a time):
- structure: shard files, index, every safetensors header (names, dtypes, shapes, shard
  assignment) and every non-weight file (config, tokenizer, ...) against the input;
- bytes: each tensor's byte range is hashed by streaming on both sides (two threads);
- plan: the changed tensors, grouped by role and layer, against the manifest's list of edited
  tensors (an unplanned change and a planned tensor left unchanged both fail);
- numbers: every changed tensor is scanned for NaN/Inf, and every edited tensor's projection
  residual along its residual axis is computed (`|r^T W'| / |W|` for writers, `|W' r| / |W|`
  for routers and the embedding; per expert for fused expert tensors, worst expert reported);
  a router correction bias the plan shifts (role `router_bias`) must hold exactly the input plus
  the planned values, added in float32 and rounded once, as the engine computes them.

Residual tolerance. Storing W' in a dtype with unit roundoff u moves each element by at most
u|W'_ij|, so |r^T dW'| <= |dW'|_F <= u |W'|_F <= u |W|_F (a projection never grows W): the
rounding alone gives a residual of at most u. The engine computes in float32, whose dot
products over H terms add at most about H * 2^-24 (the classic gamma_n bound). So
`tolerance = TOLERANCE_FACTOR * (u + H * 2^-24)`, with TOLERANCE_FACTOR = 2 as headroom for an
engine that rounds twice. Measured worst residuals (benchmarks/bench_validate.py, the demo
model) stay far inside: bf16 writers 0.35 u at hidden 8 (few elements per tensor, so little
averaging), 0.04 u at hidden 512, 0.07 u on the demo model (hidden 64); typical rounding
errors cancel to about u / sqrt(3H). fp32 routers stay below 2^-24 (1/20 of their tolerance
at hidden 8). A miss is far above: a wrong direction leaves residuals of order 1/sqrt(H).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate.edit.engine import TORCH_DTYPES, edited_chunks, rounded_pieces
from abliterate.edit.matching import direction_for, plan_matches, vector_for
from abliterate.edit.orthogonalize import NOISE
from abliterate.edit.output import WEIGHT_SUFFIXES, files_to_copy
from abliterate.edit.plan import AblationPlan, format_layers
from abliterate.errors import AbliterateError
from abliterate.vocabulary import INDEX_FILE, MANIFEST_FILE
from abliterate.weights import fp8
from abliterate.weights.checkpoint import Inventory, TensorInfo, build_inventory, read_header
from abliterate.weights.profiles import Profile

UNIT_ROUNDOFF = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}
FLOAT32_UNIT = 2.0**-24
TOLERANCE_FACTOR = 2.0
# Methods and scale whose edits zero the projection exactly (up to rounding); the others are
# reported, never failed (a norm-preserving edit or a scale < 1 leaves a residual by design).
EXACT_METHODS = ("plain", "projected")
HASH_CHUNK = 1 << 24  # bytes read per call when hashing
CHUNK_ELEMENTS = 1 << 22  # elements of one tensor held at a time for NaN/residual checks
MAX_NAMED = 5  # names quoted in one failure line that stands for many tensors


def residual_tolerance(dtype: str, hidden_size: int) -> float | None:
    """Largest acceptable projection residual of a tensor stored in `dtype` (None: not a float)."""
    if dtype not in UNIT_ROUNDOFF:
        return None
    return TOLERANCE_FACTOR * (UNIT_ROUNDOFF[dtype] + hidden_size * FLOAT32_UNIT)


@dataclass
class WorstResidual:
    tensor: str
    residual: float
    tolerance: float | None
    enforced: bool  # plain/projected edit at scale 1: the tolerance applies
    expert: int | None = None
    checked: int = 0  # edited tensors of this role whose residual was computed


@dataclass
class ValidationReport:
    ok: bool
    original: str
    ablated: str
    complete: bool  # the manifest (written last) is present
    failures: list[str]
    warnings: list[str]
    tensors: int  # in the original
    compared: int  # tensors whose bytes were compared
    changed: int  # tensors whose bytes differ
    changed_by_role: dict[str, int]  # fused expert tensors count once per expert
    changed_by_layer: dict[str, dict[str, int]]  # "layer" (or "unlayered") -> role -> count
    expected_by_role: dict[str, int]  # the manifest's counts
    worst_residual: dict[str, WorstResidual]
    nan_inf: list[str]
    files: dict[str, list[str]]  # non-weight files: missing, changed, extra
    index: dict[str, Any]  # identical (bool), differences (list)
    bytes_hashed: int
    seconds: float
    tolerance_factor: float = TOLERANCE_FACTOR
    changed_unclassified: list[str] = field(default_factory=list)
    # edited tensors recomputed from the input: identical, within_rounding, differs (empty: not recomputed)
    recomputed: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Every field but the wall time, so that identical inputs give an identical report file."""
        data = asdict(self)
        del data["seconds"]
        return data

    def summary(self, max_failures: int = 20) -> str:
        lines = [
            f"{'OK' if self.ok else 'FAILED'}: {self.ablated} against {self.original}",
            f"tensors: {self.tensors} in the original, {self.compared} compared byte by byte, "
            f"{self.changed} changed ({self.bytes_hashed / 1e9:.2f} GB hashed in {self.seconds:.1f} s)",
        ]
        if self.recomputed:
            r = self.recomputed
            lines.append(
                f"edited tensors recomputed from the input: {r.get('identical', 0)} identical, "
                f"{r.get('within_rounding', 0)} within float32 rounding, {r.get('differs', 0)} differ"
            )
        roles = sorted(set(self.changed_by_role) | set(self.expected_by_role))
        if roles:
            lines.append(
                f"{'role':<22} {'changed':>8} {'planned':>8} {'worst residual':>15} {'tolerance':>10}"
            )
        for role in roles:
            worst = self.worst_residual.get(role)
            res = f"{worst.residual:.3g}" if worst else "-"
            tol = (
                f"{worst.tolerance:.3g}" if worst and worst.tolerance is not None and worst.enforced else "-"
            )
            lines.append(
                f"{role:<22} {self.changed_by_role.get(role, 0):>8} {self.expected_by_role.get(role, 0):>8} "
                f"{res:>15} {tol:>10}"
            )
        for name, kind in (("warnings", self.warnings), ("failures", self.failures)):
            if kind:
                lines.append(f"{name} ({len(kind)}):")
                lines += [f"  - {line}" for line in kind[:max_failures]]
                if len(kind) > max_failures:
                    lines.append(f"  ... and {len(kind) - max_failures} more (see --json)")
        return "\n".join(lines)


@dataclass(frozen=True)
class _OutputTensor:
    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class _Checks:
    """Collects failures and warnings while the validation walks the output."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.warnings: list[str] = []

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def validate_output(
    original_dir: str | Path,
    ablated_dir: str | Path,
    directions_path: str | Path | None = None,
    progress: bool = True,
    profile: Profile | None = None,
) -> ValidationReport:
    """Compare an ablated checkpoint with its input; see the module docstring for the checks.

    `profile`: the role rules the ablation used for a model of an unknown type (--family/--map).

    `directions_path` overrides the directions file named in the manifest (for an output moved
    from another machine). Raises AbliterateError only for bad input (an unreadable original,
    a missing output directory); everything wrong with the output is a failure in the report.
    """
    began = time.perf_counter()
    original_dir, ablated_dir = Path(original_dir), Path(ablated_dir)
    if not ablated_dir.is_dir():
        raise AbliterateError(f"ablated model directory {ablated_dir} does not exist")
    if original_dir.resolve() == ablated_dir.resolve():
        raise AbliterateError(f"{ablated_dir} is the original itself: give the ablation's output directory")
    inventory = build_inventory(original_dir, profile)
    checks = _Checks()

    manifest = _read_manifest(ablated_dir, checks)
    if manifest is not None:
        _check_fingerprints(manifest, inventory, ablated_dir, checks)
    index = _compare_index(original_dir, ablated_dir, checks)
    output, absent_shards = _read_output_headers(inventory, ablated_dir, checks)
    pairs, uncompared = _compare_headers(inventory, output, absent_shards, checks)

    bar = tqdm(
        total=2 * sum(t.nbytes for t, _ in pairs),
        desc="validate: hashing",
        unit="B",
        unit_scale=True,
        disable=not progress,
    )
    changed = _changed_tensors(original_dir, ablated_dir, pairs, bar)
    bar.close()

    edited = _planned_edits(manifest, inventory, checks)
    plan = _read_plan(manifest, checks)
    directions = _load_directions(manifest, directions_path, inventory, checks) if edited else None
    recompute = plan is not None and directions is not None
    _compare_with_plan(inventory, changed, edited, uncompared, plan, checks, recompute)
    worst, nan_inf = _check_numbers(
        original_dir, ablated_dir, inventory, output, changed, edited, directions, plan, checks, progress
    )
    recomputed = (
        _recompute_edits(
            original_dir,
            ablated_dir,
            inventory,
            output,
            uncompared,
            edited,
            plan,
            directions,
            checks,
            progress,
        )
        if recompute
        else {}
    )
    files = _compare_files(original_dir, ablated_dir, inventory, checks, manifest)

    by_role: Counter[str] = Counter()
    by_layer: dict[str, Counter[str]] = defaultdict(Counter)
    unclassified = []
    scales = _fp8_scales(inventory, edited)
    for name in changed:
        t = inventory.tensors[name]
        if name in scales:  # an edited FP8 weight's fresh scales
            continue
        if t.role is None:
            unclassified.append(name)
            continue
        n = t.shape[0] if t.fused_experts else 1
        by_role[t.role] += n
        by_layer["unlayered" if t.layer is None else str(t.layer)][t.role] += n
    return ValidationReport(
        ok=not checks.failures,
        original=str(original_dir),
        ablated=str(ablated_dir),
        complete=manifest is not None,
        failures=checks.failures,
        warnings=checks.warnings,
        tensors=len(inventory.tensors),
        compared=len(pairs),
        changed=len(changed),
        changed_by_role=dict(sorted(by_role.items())),
        changed_by_layer={k: dict(sorted(v.items())) for k, v in sorted(by_layer.items(), key=_layer_key)},
        expected_by_role=dict(sorted((manifest or {}).get("counts", {}).items())),
        worst_residual=dict(sorted(worst.items())),
        nan_inf=nan_inf,
        files=files,
        index=index,
        bytes_hashed=2 * sum(t.nbytes for t, _ in pairs),
        seconds=round(time.perf_counter() - began, 3),
        changed_unclassified=unclassified,
        recomputed=recomputed,
    )


def _layer_key(item: tuple[str, Any]) -> tuple[int, int]:
    return (1, 0) if item[0] == "unlayered" else (0, int(item[0]))


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


def _where(t: TensorInfo, expert: int | None = None) -> str:
    parts = [t.role or "unclassified"]
    expert = t.expert if expert is None else expert
    if t.layer is not None:
        parts.append(f"layer {t.layer}")
    if expert is not None:
        parts.append(f"expert {expert}")
    return ", ".join(parts)


# ---------------------------------------------------------------- manifest


def _read_manifest(ablated_dir: Path, checks: _Checks) -> dict[str, Any] | None:
    path = ablated_dir / MANIFEST_FILE
    if not path.is_file():
        checks.fail(
            f"the output is incomplete: {MANIFEST_FILE} (the manifest, written last) is missing from "
            f"{ablated_dir}; the ablation did not finish or this is not an `abliterate ablate` output: rerun it"
        )
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        checks.fail(f"{path} is not valid JSON ({exc}): the manifest is damaged; rerun the ablation")
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("edited"), list):
        checks.fail(f"{path} has no `edited` list: not an abliterate manifest; rerun the ablation")
        return None
    return manifest


def _check_fingerprints(manifest: dict, inventory: Inventory, ablated_dir: Path, checks: _Checks) -> None:
    recorded = (manifest.get("input") or {}).get("fingerprint")
    if recorded and recorded != inventory.fingerprint:
        checks.fail(
            f"the manifest records input fingerprint {recorded} but {inventory.model_dir} has "
            f"{inventory.fingerprint}: this output was made from another checkpoint"
        )


def _planned_edits(manifest: dict | None, inventory: Inventory, checks: _Checks) -> dict[str, dict]:
    """The manifest's edited tensors by name, each checked against the input's own classification."""
    if manifest is None:
        return {}
    edited: dict[str, dict] = {}
    counts: Counter[str] = Counter()
    for entry in manifest["edited"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            checks.fail(f"manifest entry {entry!r} has no tensor name")
            continue
        t = inventory.tensors.get(name)
        if t is None:
            checks.fail(f"the manifest lists {name} as edited but the original has no such tensor")
            continue
        # Catches prefix matching defects: a tensor of layer 12 edited as if it were layer 1.
        if entry.get("role") != t.role or entry.get("layer") != t.layer:
            checks.fail(
                f"the manifest edits {name} as {entry.get('role')}, layer {entry.get('layer')}, but the "
                f"input classifies it as {_where(t)}"
            )
        edited[name] = entry
        counts[t.role or "unclassified"] += t.shape[0] if t.fused_experts else 1
    recorded = {k: v for k, v in (manifest.get("counts") or {}).items() if v}
    if recorded and recorded != dict(counts):
        checks.fail(
            f"the manifest's counts {recorded} disagree with its edited list {dict(sorted(counts.items()))}"
        )
    return edited


def _fp8_scales(inventory: Inventory, edited: dict[str, dict]) -> set[str]:
    """The scale tensors of edited FP8 weights (from the input's own pairing): requantization gives
    them fresh values, so they change with their weight."""
    return {inventory.fp8[name][0] for name in edited if name in inventory.fp8}


def _read_plan(manifest: dict | None, checks: _Checks) -> AblationPlan | None:
    if manifest is None:
        return None
    try:
        return AblationPlan.from_dict(manifest.get("plan"))
    except AbliterateError as exc:
        checks.fail(f"the manifest's plan is unreadable ({exc}): rerun the ablation")
        return None


def _compare_with_plan(
    inventory: Inventory,
    changed: list[str],
    edited: dict[str, dict],
    uncompared: set[str],
    plan: AblationPlan | None,
    checks: _Checks,
    recompute: bool = False,
) -> None:
    """Changed tensors against the manifest's edited list, and that list against the plan.

    The plan check uses the input's own classification (exact layer numbers), independently of
    how the engine matched names, and then the engine's matcher to find planned tensors the
    manifest leaves out. A planned tensor whose bytes are unchanged is left to the recomputation
    when it runs (`recompute`): an edit can round away entirely (a tiny scale), and only the
    recomputation knows whether it should have.
    """
    scales = _fp8_scales(inventory, edited)
    for name in changed:
        if name not in edited and name not in scales:
            checks.fail(
                f"tensor {name} ({_where(inventory.tensors[name])}) changed but the plan does not edit it"
            )
    changed_set = set(changed)
    for name, entry in edited.items():
        if name in changed_set or name in uncompared:
            continue
        if float(entry.get("scale", 1.0)) == 0.0 or recompute:  # scale 0 leaves the bytes as they are
            continue
        message = f"tensor {name} ({_where(inventory.tensors[name])}) is planned for editing but its bytes are unchanged"
        if (inventory.model_dir / MANIFEST_FILE).is_file():
            # the input is itself an ablation output: the direction may be gone from it already
            checks.warn(message + " (the input was already ablated)")
        else:
            checks.fail(message)
    if plan is None:
        return
    roles, layers = set(plan.roles()), set(plan.edited_layers())
    for name in edited:
        t = inventory.tensors[name]
        if t.role not in roles:
            checks.fail(f"tensor {name} was edited as {t.role}, a role outside the plan's {sorted(roles)}")
        elif t.layer is not None and t.layer not in layers:
            checks.fail(
                f"tensor {name} of layer {t.layer} was edited but the plan's layers are {format_layers(layers)}"
            )
    for m in plan_matches(plan, inventory):
        if m.tensor.name not in edited:
            checks.fail(
                f"tensor {m.tensor.name} ({_where(m.tensor)}) matches the plan but the manifest does not list it as edited"
            )


# ---------------------------------------------------------------- structure: index, headers, shards


def _compare_index(original_dir: Path, ablated_dir: Path, checks: _Checks) -> dict[str, Any]:
    src, dst = original_dir / INDEX_FILE, ablated_dir / INDEX_FILE
    if not src.is_file():
        if dst.is_file():
            checks.warn(f"the output has {INDEX_FILE} but the original has none")
        return {"identical": not dst.is_file(), "differences": []}
    if not dst.is_file():
        checks.fail(f"{INDEX_FILE} is missing from the output: copy it from {original_dir}")
        return {"identical": False, "differences": ["missing"]}
    if src.read_bytes() == dst.read_bytes():
        return {"identical": True, "differences": []}
    differences: list[str] = []
    try:
        a, b = json.loads(src.read_text()), json.loads(dst.read_text())
        map_a, map_b = a.get("weight_map") or {}, b.get("weight_map") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        checks.fail(f"the output's {INDEX_FILE} is not a valid index ({exc}): copy it from {original_dir}")
        return {"identical": False, "differences": ["unreadable"]}
    for name, shard in map_a.items():
        if name not in map_b:
            differences.append(f"tensor {name} (in {shard}) is missing from the output's {INDEX_FILE}")
        elif map_b[name] != shard:
            differences.append(
                f"tensor {name} is in {shard} by the original's index, in {map_b[name]} by the output's"
            )
    differences += [
        f"tensor {name} is listed in the output's {INDEX_FILE} (in {shard}) but not in the original's"
        for name, shard in map_b.items()
        if name not in map_a
    ]
    if a.get("metadata") != b.get("metadata"):
        differences.append(
            f"index metadata differs: {a.get('metadata')} in the original, {b.get('metadata')} in the output"
        )
    for line in differences:
        checks.fail(line)
    if not differences:
        checks.warn(
            f"the output's {INDEX_FILE} holds the same entries as the original's, formatted differently"
        )
    return {"identical": False, "differences": differences}


def _read_output_headers(
    inventory: Inventory, ablated_dir: Path, checks: _Checks
) -> tuple[dict[str, _OutputTensor], set[str]]:
    """Every tensor of the output's shards; shards that are missing or unreadable are failures."""
    output: dict[str, _OutputTensor] = {}
    absent: set[str] = set()
    for shard in inventory.shards:
        path = ablated_dir / shard
        expected = [t.name for t in inventory.by_shard(shard)]
        if not path.is_file():
            checks.fail(
                f"shard {shard} is missing from the output: its {len(expected)} tensors are absent "
                f"({_named(expected)})"
            )
            absent.add(shard)
            continue
        try:
            header = read_header(path)
        except AbliterateError as exc:
            checks.fail(
                f"output shard {shard} is unreadable, so its tensors ({_named(expected)}) are too: {exc}"
            )
            absent.add(shard)
            continue
        base = 8 + header.header_size
        for name, entry in header.tensors.items():
            begin, end = entry["data_offsets"]
            if name in output:
                checks.fail(
                    f"tensor {name} is stored twice in the output: in {output[name].shard} and {shard}"
                )
                continue
            output[name] = _OutputTensor(
                shard, entry["dtype"], tuple(entry["shape"]), base + begin, base + end
            )
        if header.metadata != inventory.shard_metadata.get(shard, {}):
            checks.fail(
                f"shard {shard}: header metadata {header.metadata} differs from the original's "
                f"{inventory.shard_metadata.get(shard, {})}"
            )
    return output, absent


def _compare_headers(
    inventory: Inventory, output: dict[str, _OutputTensor], absent_shards: set[str], checks: _Checks
) -> tuple[list[tuple[TensorInfo, _OutputTensor]], set[str]]:
    """Tensors whose bytes can be compared, and the names of those that cannot (already failed)."""
    pairs: list[tuple[TensorInfo, _OutputTensor]] = []
    uncompared: set[str] = set()
    missing: list[TensorInfo] = []
    for name, t in inventory.tensors.items():
        if t.shard in absent_shards:
            uncompared.add(name)
            continue
        o = output.get(name)
        if o is None:
            missing.append(t)
            uncompared.add(name)
            continue
        problems = []
        if o.shard != t.shard:
            problems.append(f"moved from shard {t.shard} to {o.shard}")
        if o.dtype != t.dtype:
            problems.append(f"dtype {t.dtype} in the original, {o.dtype} in the output")
        if o.shape != t.shape:
            problems.append(f"shape {list(t.shape)} in the original, {list(o.shape)} in the output")
        if problems:
            checks.fail(f"tensor {name} ({_where(t)}): " + "; ".join(problems))
            uncompared.add(name)
        else:
            pairs.append((t, o))
    extra = [n for n in output if n not in inventory.tensors]
    # A renamed tensor shows as one missing and one extra at the same place of the same shard.
    by_place = {(o.shard, o.start, o.end): n for n, o in output.items() if n in set(extra)}
    renamed = set()
    for t in missing:
        new = by_place.get((t.shard, t.start, t.end))
        if new is not None and output[new].dtype == t.dtype and output[new].shape == t.shape:
            checks.fail(f"tensor {t.name} ({_where(t)}) is renamed to {new} in the output")
            renamed.add(new)
        else:
            checks.fail(f"tensor {t.name} ({_where(t)}) is missing from the output shard {t.shard}")
    for name in extra:
        if name not in renamed:
            checks.fail(f"tensor {name} in output shard {output[name].shard} does not exist in the original")
    return pairs, uncompared


# ---------------------------------------------------------------- bytes


def _digests(path: Path, ranges: list[tuple[str, int, int]], bar: tqdm) -> dict[str, bytes]:
    """blake2b of each byte range, reading the file once in order; memory: one chunk."""
    out: dict[str, bytes] = {}
    buffer = memoryview(bytearray(HASH_CHUNK))
    with open(path, "rb", buffering=0) as handle:
        for name, start, end in sorted(ranges, key=lambda r: r[1]):
            digest = hashlib.blake2b(digest_size=32)
            handle.seek(start)
            left = end - start
            while left:
                n = handle.readinto(buffer[: min(left, HASH_CHUNK)])
                if not n:
                    raise AbliterateError(
                        f"{path} ended inside tensor {name}: the file changed while being read"
                    )
                digest.update(buffer[:n])
                left -= n
                bar.update(n)
            out[name] = digest.digest()
    return out


def _changed_tensors(
    original_dir: Path, ablated_dir: Path, pairs: list[tuple[TensorInfo, _OutputTensor]], bar: tqdm
) -> list[str]:
    """Names (in input order) of the compared tensors whose bytes differ; both sides hashed in parallel."""
    by_shard: dict[str, list[tuple[TensorInfo, _OutputTensor]]] = defaultdict(list)
    for t, o in pairs:
        by_shard[t.shard].append((t, o))
    differing: set[str] = set()
    # hashlib and file reads release the GIL: two threads read and hash both sides at once.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for shard, items in by_shard.items():
            a = pool.submit(_digests, original_dir / shard, [(t.name, t.start, t.end) for t, _ in items], bar)
            b = pool.submit(_digests, ablated_dir / shard, [(t.name, o.start, o.end) for t, o in items], bar)
            da, db = a.result(), b.result()
            differing.update(name for name in da if da[name] != db[name])
    return [t.name for t, _ in pairs if t.name in differing]


# ---------------------------------------------------------------- numbers: NaN/Inf and residuals


def _load_directions(
    manifest: dict | None, directions_path: str | Path | None, inventory: Inventory, checks: _Checks
) -> Any:
    from abliterate.measure.direction_file import file_sha256, load_directions

    recorded = (manifest or {}).get("directions") or {}
    if directions_path is None:
        if not recorded.get("path"):
            checks.warn("the manifest names no directions file: projection residuals not computed")
            return None
        directions_path = Path(recorded["path"])
        if not directions_path.is_file():
            checks.warn(
                f"the directions file {directions_path} named in the manifest does not exist here: projection "
                "residuals not computed (pass --directions FILE)"
            )
            return None
    directions_path = Path(directions_path)
    if not directions_path.is_file():
        raise AbliterateError(f"directions file {directions_path} does not exist")
    if recorded.get("sha256") and file_sha256(directions_path) != recorded["sha256"]:
        checks.fail(
            f"directions file {directions_path} is not the one the ablation used (sha256 differs from the "
            f"manifest's {recorded['sha256'][:12]}...)"
        )
        return None
    return load_directions(directions_path)


def _check_numbers(
    original_dir: Path,
    ablated_dir: Path,
    inventory: Inventory,
    output: dict[str, _OutputTensor],
    changed: list[str],
    edited: dict[str, dict],
    directions: Any,
    plan: AblationPlan | None,
    checks: _Checks,
    progress: bool,
) -> tuple[dict[str, WorstResidual], list[str]]:
    """NaN/Inf scan of every changed tensor; residual of every edited one against the direction used."""
    residuals = plan is not None and directions is not None
    hidden = None
    worst: dict[str, WorstResidual] = {}
    nan_inf: list[str] = []
    vectors: dict[int | None, torch.Tensor] = {}
    handles: dict[tuple[Path, str], Any] = {}
    try:
        for name in tqdm(changed, desc="validate: residuals", unit="tensor", disable=not progress):
            t = inventory.tensors[name]
            if t.dtype not in TORCH_DTYPES:
                continue
            entry = edited.get(name)
            r = None
            if residuals and entry is not None and t.residual_axis is not None:
                layer = entry.get("layer")
                if layer not in vectors:
                    vectors[layer] = direction_for(plan, directions, layer).double()
                r = vectors[layer]
                hidden = int(r.numel())
            src = _handle(handles, original_dir / t.shard)
            dst = _handle(handles, ablated_dir / t.shard)
            fp8_tolerance = None
            if name in inventory.fp8 and entry is not None:  # in dequantized space, against the FP8 bound
                result, fp8_tolerance = _fp8_numbers(original_dir, ablated_dir, inventory, output, t, r)
            else:
                result = _tensor_numbers(src, dst, t, output[name].start, r)
            for expert, count in result.nonfinite:
                where = f"{name} ({_where(t, expert)})"
                nan_inf.append(where)
                checks.fail(f"tensor {where} holds {count} NaN/Inf values after ablation")
            if entry is not None and entry.get("side") == "shift":
                _check_shift(src, dst, t, output[name].start, entry, plan, checks)
                continue
            if result.residual is None or entry is None:
                continue
            enforced = entry.get("method") in EXACT_METHODS and float(entry.get("scale", 1.0)) == 1.0
            tolerance = residual_tolerance(t.dtype, hidden or 0) if fp8_tolerance is None else fp8_tolerance
            role = t.role or "unclassified"
            best = worst.get(role)
            checked = (best.checked if best else 0) + 1
            if best is None or result.residual > best.residual or (enforced and not best.enforced):
                worst[role] = WorstResidual(
                    name, result.residual, tolerance, enforced, result.worst_expert, checked
                )
            else:
                best.checked = checked
            if enforced and tolerance is not None and result.residual > tolerance:
                checks.fail(
                    f"tensor {name} ({_where(t, result.worst_expert)}): projection residual {result.residual:.3g} "
                    f"exceeds the tolerance {tolerance:.3g} for {t.dtype}: the direction was not removed"
                )
    finally:
        for handle in handles.values():
            handle.close()
    return worst, nan_inf


def _check_shift(
    src: Any, dst: Any, t: TensorInfo, out_start: int, entry: dict, plan: AblationPlan | None, checks: _Checks
) -> None:
    """A router correction bias the plan shifts: the output must be exactly the input plus the planned
    values, added in float32 and rounded once to the stored dtype (what the engine computes)."""
    shifts = (
        plan.router_shifts(t.layer)
        if plan is not None
        else {int(e): v for e, v in (entry.get("shift") or {}).items()}
    )
    values = torch.zeros(t.shape, dtype=torch.float32)
    for expert, value in shifts.items():
        if not 0 <= expert < values.numel():
            checks.fail(f"tensor {t.name} ({_where(t)}): the plan shifts expert {expert}, which it lacks")
            return
        values[expert] = value
    old = _read_rows(src, t.start, t, 0, t.shape[0])
    new = _read_rows(dst, out_start, t, 0, t.shape[0])
    expected = (old.float() + values).to(old.dtype)
    wrong = (new != expected).nonzero().flatten().tolist()
    if wrong:
        checks.fail(
            f"tensor {t.name} ({_where(t)}): the correction bias of experts {wrong[:MAX_NAMED]} is not the input plus "
            f"the planned shift {dict(sorted(shifts.items()))}"
        )


def _handle(handles: dict, path: Path) -> Any:
    key = (path.parent, path.name)
    if key not in handles:
        handles[key] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller's finally
    return handles[key]


@dataclass
class _TensorNumbers:
    nonfinite: list[tuple[int | None, int]]  # (expert or None, count of NaN/Inf)
    residual: float | None
    worst_expert: int | None


def _read_rows(handle: Any, start: int, t: TensorInfo, row0: int, row1: int) -> torch.Tensor:
    """Rows row0..row1 of a C-ordered tensor (one contiguous byte range), in its own dtype."""
    shape = t.shape or (1,)
    row_bytes = t.nbytes // shape[0] if shape[0] else 0
    handle.seek(start + row0 * row_bytes)
    buffer = bytearray((row1 - row0) * row_bytes)
    if handle.readinto(buffer) != len(buffer):
        raise AbliterateError(
            f"{handle.name} ended inside tensor {t.name}: the file changed while being read"
        )
    if not buffer:
        return torch.empty((0, *shape[1:]), dtype=TORCH_DTYPES[t.dtype])
    return torch.frombuffer(buffer, dtype=TORCH_DTYPES[t.dtype]).reshape((row1 - row0, *shape[1:]))


def _tensor_numbers(
    src: Any, dst: Any, t: TensorInfo, out_start: int, r: torch.Tensor | None
) -> _TensorNumbers:
    """Stream one tensor in row chunks (fused experts: whole experts) through the NaN and residual checks."""
    shape = t.shape or (1,)
    row_elements = max(1, math.prod(shape[1:]))
    step = 1 if t.fused_experts else max(1, CHUNK_ELEMENTS // row_elements)
    nonfinite: list[tuple[int | None, int]] = []
    bad_total = 0
    num_sq = den_sq = 0.0
    acc: torch.Tensor | None = None  # r^T W' accumulated over row chunks (residual axis 0)
    worst, worst_expert = -1.0, None
    for row0 in range(0, shape[0], step):
        row1 = min(shape[0], row0 + step)
        new = _read_rows(dst, out_start, t, row0, row1)
        bad = int((~torch.isfinite(new)).sum()) if new.is_floating_point() else 0
        if bad and t.fused_experts:
            nonfinite.append((row0, bad))
        bad_total += bad
        if r is None or t.dtype not in UNIT_ROUNDOFF or bad:
            continue
        new = new.double()
        old = _read_rows(src, t.start, t, row0, row1).double()
        axis = t.residual_axis
        if t.fused_experts:  # one expert [H, I] or [2I, H]: its own residual, the worst is reported
            expert_res = _norm(torch.tensordot(new[0], r, dims=([axis - 1], [0]))) / max(
                _norm(old[0]), 1e-300
            )
            if expert_res > worst:
                worst, worst_expert = expert_res, row0
        elif axis == 0:
            part = r[row0:row1] @ new.reshape(row1 - row0, -1)
            acc = part if acc is None else acc + part
            den_sq += float(old.pow(2).sum())
        else:
            num_sq += float(torch.tensordot(new, r, dims=([axis], [0])).pow(2).sum())
            den_sq += float(old.pow(2).sum())
    if bad_total and not t.fused_experts:
        nonfinite.append((None, bad_total))
    if r is None or t.dtype not in UNIT_ROUNDOFF or bad_total:
        return _TensorNumbers(nonfinite, None, None)
    if t.fused_experts:
        return _TensorNumbers(nonfinite, worst, worst_expert)
    if acc is not None:
        num_sq = float(acc.pow(2).sum())
    return _TensorNumbers(nonfinite, math.sqrt(num_sq) / max(math.sqrt(den_sq), 1e-300), None)


def _fp8_numbers(
    original_dir: Path,
    ablated_dir: Path,
    inventory: Inventory,
    output: dict[str, _OutputTensor],
    t: TensorInfo,
    r: torch.Tensor | None,
) -> tuple[_TensorNumbers, float | None]:
    """An FP8 weight, dequantized (input and output, each with its own scales) in float64: NaN/Inf and
    the projection residual as for any tensor, and its tolerance: 2 (|W'_q - W'|_F / |W|_F + H 2^-24),
    where |W'_q - W'|_F <= u_e4m3 |W'_q|_F + 2^-10 |S'|_F is what requantizing the exact edit W' with
    fresh block scales S' may move it (fp8.py), the float32 edit adds H 2^-24 as for any dtype, and
    the factor 2 is the usual headroom. Memory: the tensor, twice, in float64."""
    scale_name, block = inventory.fp8[t.name]
    s = inventory.tensors[scale_name]
    old = fp8.dequantize(
        fp8.read_tensor(original_dir / t.shard, t), fp8.read_tensor(original_dir / s.shard, s), block
    )
    out_t = replace(t, start=output[t.name].start, end=output[t.name].start + t.nbytes)
    out_s = replace(s, start=output[scale_name].start, end=output[scale_name].start + s.nbytes)
    new_scale = fp8.read_tensor(ablated_dir / s.shard, out_s)
    new = fp8.dequantize(fp8.read_tensor(ablated_dir / t.shard, out_t), new_scale, block).double()
    bad = int((~torch.isfinite(new)).sum()) + int((~torch.isfinite(new_scale)).sum())
    if bad:
        return _TensorNumbers([(None, bad)], None, None), None
    if r is None or t.residual_axis is None:
        return _TensorNumbers([], None, None), None
    old = old.double()
    axis = t.residual_axis
    experts = (
        [(e, old[e], new[e], new_scale[e]) for e in range(t.shape[0])]
        if t.fused_experts
        else [(None, old, new, new_scale)]
    )
    worst, worst_expert, tolerance = -1.0, None, 0.0
    for expert, w, w_new, sc in experts:
        a = axis - 1 if t.fused_experts else axis
        residual = _norm(torch.tensordot(w_new, r, dims=([a], [0]))) / max(_norm(w), 1e-300)
        bound = fp8.rounding_bound(_norm(w_new), fp8.broadcast_scale_norm(sc, tuple(w_new.shape), block))
        tol = TOLERANCE_FACTOR * (bound / max(_norm(w), 1e-300) + r.numel() * FLOAT32_UNIT)
        if residual - tol > worst - tolerance:
            worst, worst_expert, tolerance = residual, expert, tol
    return _TensorNumbers([], worst, worst_expert), tolerance


def _norm(x: torch.Tensor) -> float:
    return float(x.pow(2).sum().sqrt())


# ---------------------------------------------------------------- recomputation of every edit


def _recompute_edits(
    original_dir: Path,
    ablated_dir: Path,
    inventory: Inventory,
    output: dict[str, _OutputTensor],
    uncompared: set[str],
    edited: dict[str, dict],
    plan: AblationPlan,
    directions: Any,
    checks: _Checks,
    progress: bool,
) -> dict[str, int]:
    """Recompute every tensor the engine edits from the input, with the engine's own function
    (`engine.edited_chunks`, chunk by chunk: memory bounded like the ablation), and compare the
    stored bytes with the output's. The engine is deterministic, so they are identical; where they
    are not, every value must lie within the float32 rounding bound of the recomputation
    (`_outside_rounding`: another CPU's kernels may sum in another order), else the tensor fails.
    A damage that keeps a tensor orthogonal to the direction (zeroed, rescaled, moved along another
    direction) passes the projection residual; it fails here."""
    counts: Counter[str] = Counter()
    vectors: dict[Any, torch.Tensor] = {}
    fds: dict[Path, int] = {}
    matches = [
        m
        for m in plan_matches(plan, inventory)
        if getattr(m, "scales", None) is None
        and m.tensor.name in output
        and m.tensor.name not in uncompared
        and m.tensor.dtype in UNIT_ROUNDOFF
    ]
    try:
        for m in tqdm(matches, desc="validate: recompute", unit="tensor", disable=not progress):
            t = m.tensor
            key = ("shift", t.name) if m.side == "shift" else t.layer
            if key not in vectors:
                vectors[key] = vector_for(plan, directions, m)
            src = _fd(fds, original_dir / t.shard)
            dst = _fd(fds, ablated_dir / t.shard)
            verdict, outside, total, largest = _compare_recomputed(
                src, dst, m, vectors[key], output[t.name].start
            )
            counts[verdict] += 1
            if verdict == "within_rounding":
                checks.warn(
                    f"tensor {t.name} ({_where(t)}) differs from the edit recomputed from the input only within "
                    "float32 rounding (another machine's kernels?)"
                )
            elif verdict == "differs":
                unchanged = _same_bytes(src, dst, t, output[t.name].start)
                if unchanged and t.name in edited and (inventory.model_dir / MANIFEST_FILE).is_file():
                    checks.warn(
                        f"tensor {t.name} ({_where(t)}) is planned for editing but its bytes are unchanged "
                        "(the input was already ablated)"
                    )
                    continue
                if unchanged:
                    checks.fail(
                        f"tensor {t.name} ({_where(t)}) is planned for editing but its bytes are unchanged: the edit "
                        f"recomputed from the input changes {outside} of {total} values; rerun the ablation"
                    )
                else:
                    checks.fail(
                        f"tensor {t.name} ({_where(t)}) differs from the edit recomputed from the input: {outside} of "
                        f"{total} values outside the float32 rounding bound (largest difference {largest:.3g}): the "
                        "output is damaged; rerun the ablation"
                    )
        for m in plan_matches(plan, inventory):  # FP8 weights: recomputed with their scales (fp8.py)
            if m.scales is None or m.tensor.name not in output or m.tensor.name in uncompared:
                continue
            if m.tensor.layer not in vectors:
                vectors[m.tensor.layer] = vector_for(plan, directions, m)
            verdict = _compare_fp8(original_dir, ablated_dir, output, m, vectors[m.tensor.layer])
            counts[verdict] += 1
            t = m.tensor
            if verdict == "within_rounding":
                checks.warn(
                    f"tensor {t.name} ({_where(t)}) differs from the edit recomputed from the input by at most "
                    "one e4m3 step per value (another machine's kernels?)"
                )
            elif verdict == "differs":
                checks.fail(
                    f"FP8 tensor {t.name} ({_where(t)}) or its scales differ from the edit recomputed from the "
                    "input by more than one e4m3 step: the output is damaged; rerun the ablation"
                )
    finally:
        for fd in fds.values():
            os.close(fd)
    return {k: counts.get(k, 0) for k in ("identical", "within_rounding", "differs")}


def _compare_fp8(
    original_dir: Path, ablated_dir: Path, output: dict[str, _OutputTensor], m: Any, r: torch.Tensor
) -> str:
    """An FP8 weight and its scales against their requantized edit recomputed from the input: the
    same bytes (the requantization is deterministic), or at most one e4m3 step apart per value."""
    t, (s, block) = m.tensor, m.scales
    q, scale = fp8.requantized_edit(original_dir, m, r)
    out_q = fp8.read_tensor(
        ablated_dir / t.shard, replace(t, start=output[t.name].start, end=output[t.name].start + t.nbytes)
    )
    if s.name not in output:
        return "differs"
    out_s = fp8.read_tensor(
        ablated_dir / s.shard, replace(s, start=output[s.name].start, end=output[s.name].start + s.nbytes)
    )
    if torch.equal(q.view(torch.uint8), out_q.view(torch.uint8)) and torch.equal(scale, out_s):
        return "identical"
    new, ref = fp8.dequantize(out_q, out_s, block).double(), fp8.dequantize(q, scale, block).double()
    if not bool(torch.isfinite(new).all()):
        return "differs"
    return "within_rounding" if fp8.one_ulp_apart(new, ref, out_s, scale, block) else "differs"


def _fd(fds: dict[Path, int], path: Path) -> int:
    if path not in fds:
        fds[path] = os.open(path, os.O_RDONLY)
    return fds[path]


def _same_bytes(src: int, dst: int, t: TensorInfo, out_start: int) -> bool:
    """Whether the output holds the input's very bytes for `t` (read in pieces)."""
    for first in range(0, t.nbytes, HASH_CHUNK):
        n = min(HASH_CHUNK, t.nbytes - first)
        if os.pread(src, n, t.start + first) != os.pread(dst, n, out_start + first):
            return False
    return True


def _compare_recomputed(
    src: int, dst: int, m: Any, r: torch.Tensor, out_start: int
) -> tuple[str, int, int, float]:
    """(verdict, values outside the bound, values, largest difference) of one edited tensor."""
    t = m.tensor
    dtype = TORCH_DTYPES[t.dtype]
    identical, outside, largest = True, 0, 0.0
    for offset, work in edited_chunks(src, m, r):
        position = out_start + (offset - t.start)
        same = True
        for piece in rounded_pieces(work, dtype):
            stored = os.pread(dst, len(piece), position)
            same = same and stored == bytes(piece)
            position += len(piece)
        if same:
            continue
        identical = False
        n, d = _outside_rounding(src, dst, m, r, work, offset, out_start + (offset - t.start))
        outside, largest = outside + n, max(largest, d)
    total = math.prod(t.shape)
    if identical:
        return "identical", 0, total, 0.0
    return ("within_rounding" if outside == 0 else "differs"), outside, total, largest


def _outside_rounding(
    src: int, dst: int, m: Any, r: torch.Tensor, work: torch.Tensor, offset: int, out_offset: int
) -> tuple[int, float]:
    """How many values of one chunk lie outside the float32 rounding bound of the recomputation, and
    the largest difference. Each edited vector v (along the residual axis, length H, unit r, scale s)
    is x = v - s r (r^T v), computed in float32: the dot product errs by at most gamma |v| with
    gamma = (H + 4) 2^-24 (the H-term sum and the few roundings after it), so one evaluation of x_i
    errs by at most eps_i = gamma (|v_i| + s |r_i| |v|), two evaluations differ by at most 2 eps_i,
    and storing each in a dtype of unit roundoff u adds u |x_i|. The norm-preserving edit rescales x
    by |v| / |x|, which multiplies errors by that ratio and adds the ratio's own error; a vector the
    edit leaves at float32 noise (|x| near NOISE |v|) may be zeroed by one evaluation and not by the
    other. A bias shift adds a value: one float32 rounding. TOLERANCE_FACTOR 2 on top, as for the
    residuals."""
    t = m.tensor
    dtype = TORCH_DTYPES[t.dtype]
    size = work.numel() * torch.empty((), dtype=dtype).element_size()
    shape = work.shape
    v = torch.frombuffer(bytearray(os.pread(src, size, offset)), dtype=dtype).reshape(shape).double()
    a = torch.frombuffer(bytearray(os.pread(dst, size, out_offset)), dtype=dtype).reshape(shape).double()
    x = work.double()
    u, scale = UNIT_ROUNDOFF[t.dtype], abs(float(m.scale))
    if m.side == "shift":
        eps = FLOAT32_UNIT * (x.abs() + v.abs())
    else:
        axis = t.residual_axis
        gamma = (r.numel() + 4) * FLOAT32_UNIT
        along = [1] * x.dim()
        along[axis] = r.numel()
        ar = r.double().abs().view(along)
        vnorm = torch.linalg.vector_norm(v, dim=axis, keepdim=True)
        eps = gamma * (v.abs() + scale * ar * vnorm)
        if m.method == "norm_preserving" and m.side != "reader":
            xnorm = torch.linalg.vector_norm(x, dim=axis, keepdim=True)
            ratio = vnorm / xnorm.clamp_min(1e-300)
            eps = ratio * eps + x.abs() * gamma * (1 + scale) * ratio
            eps = torch.where(xnorm <= 2 * NOISE * vnorm, x.abs() + vnorm, eps)
    tolerance = TOLERANCE_FACTOR * (2 * eps + u * (a.abs() + x.abs()))
    difference = (a - x).abs()
    bad = ~(difference <= tolerance)  # NaN in the output counts as outside
    finite = difference[torch.isfinite(difference)]
    return int(bad.sum()), float(finite.max()) if finite.numel() else math.inf


# ---------------------------------------------------------------- non-weight files


def _file_digest(path: Path) -> bytes:
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as handle:
        while block := handle.read(HASH_CHUNK):
            digest.update(block)
    return digest.digest()


def _top_files(root: Path) -> set[str]:
    """Names of the regular files directly in `root`, hidden ones (temporaries, state) excluded."""
    return {p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")}


def _compare_files(
    original_dir: Path, ablated_dir: Path, inventory: Inventory, checks: _Checks, manifest: dict | None = None
) -> dict[str, list[str]]:
    """The files the engine copies (`files_to_copy`) must be there verbatim; nothing else may be,
    except the directions file the ablation read (it may lie in the output: a warning)."""
    to_copy, skipped = files_to_copy(original_dir, set(inventory.shards))
    for note in skipped:
        checks.warn(note)
    shards = set(inventory.shards) | {INDEX_FILE}  # the index is compared on its own
    src = {p.name for p in to_copy} - shards
    dst = _top_files(ablated_dir) - shards - {MANIFEST_FILE}
    # Other weight files (pytorch_model.bin, consolidated.safetensors, ...) would carry the direction.
    weights = sorted(f for f in _top_files(original_dir) - shards if f.endswith(WEIGHT_SUFFIXES))
    for f in weights:
        if f in dst:
            checks.fail(
                f"file {f} holds weights the ablation does not edit, copied unablated: delete it from the output"
            )
    dst -= set(weights)
    missing = sorted(src - dst)
    changed = sorted(
        f
        for f in src & dst
        if (original_dir / f).stat().st_size != (ablated_dir / f).stat().st_size
        or _file_digest(original_dir / f) != _file_digest(ablated_dir / f)
    )
    extra = sorted(dst - src)
    for f in missing:
        checks.fail(f"file {f} is missing from the output: copy it from {original_dir}")
    for f in changed:
        checks.fail(f"file {f} differs from the original's: non-weight files must be copied verbatim")
    recorded = ((manifest or {}).get("directions") or {}).get("path")
    directions = Path(recorded).resolve() if isinstance(recorded, str) and recorded else None
    for f in extra:
        if directions is not None and (ablated_dir / f).resolve() == directions:
            checks.warn(f"file {f} in the output is the directions file the ablation read (an input, kept)")
            continue
        (checks.fail if f.endswith(WEIGHT_SUFFIXES) else checks.warn)(
            f"file {f} is in the output but not in the original"
        )
    return {
        "missing": missing,
        "changed": changed,
        "extra": extra,
        "weights_not_copied": [f for f in weights if f not in dst],
    }
