"""Output validation: is the ablated checkpoint the input with exactly the planned edits?

All in bounded memory (a few chunks of one tensor at a time), in three parts:
- `abliterate.check.structure`: shards, index, headers, non-weight files, the bytes of every
  tensor hashed on both sides, and the changed set against the manifest and the plan;
- `abliterate.check.residuals`: NaN/Inf in every changed tensor, the projection residual of every
  edited one against its tolerance, router bias shifts;
- `abliterate.check.recompute`: every edited tensor recomputed from the input by the engine's own
  edit and compared with the output's bytes.
`validate_output` runs them and gathers the ValidationReport.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from abliterate.check.recompute import recompute_edits
from abliterate.check.residuals import TOLERANCE_FACTOR, WorstResidual, check_numbers
from abliterate.check.structure import (
    Checks,
    changed_tensors,
    check_fingerprints,
    compare_files,
    compare_headers,
    compare_index,
    compare_with_plan,
    fp8_scales,
    planned_edits,
    read_manifest,
    read_output_headers,
    read_plan,
)
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import file_sha256, load_directions
from abliterate.weights.checkpoint import Inventory, build_inventory
from abliterate.weights.profiles import Profile

# Keys every `ValidationReport.to_json` holds: an existing --report file is replaced only when it has them
# (a report written earlier, never an input such as the directions file: `paths.output_file`).
REPORT_KEYS = ("ok", "original", "ablated", "failures")


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
    checks = Checks()

    manifest = read_manifest(ablated_dir, checks)
    if manifest is not None:
        check_fingerprints(manifest, inventory, ablated_dir, checks)
    index = compare_index(original_dir, ablated_dir, checks)
    output, absent_shards = read_output_headers(inventory, ablated_dir, checks)
    pairs, uncompared = compare_headers(inventory, output, absent_shards, checks)

    bar = tqdm(
        total=2 * sum(t.nbytes for t, _ in pairs),
        desc="validate: hashing",
        unit="B",
        unit_scale=True,
        disable=not progress,
    )
    changed = changed_tensors(original_dir, ablated_dir, pairs, bar)
    bar.close()

    edited = planned_edits(manifest, inventory, checks)
    plan = read_plan(manifest, checks)
    directions = _manifest_directions(manifest, directions_path, checks) if edited else None
    recompute = plan is not None and directions is not None
    compare_with_plan(inventory, changed, edited, uncompared, plan, checks, recompute)
    worst, nan_inf = check_numbers(
        original_dir, ablated_dir, inventory, output, changed, edited, directions, plan, checks, progress
    )
    recomputed = (
        recompute_edits(
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
    files = compare_files(original_dir, ablated_dir, inventory, checks, manifest)

    by_role, by_layer, unclassified = _count_changes(inventory, changed, edited)
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
        changed_by_role=by_role,
        changed_by_layer=by_layer,
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


def _count_changes(
    inventory: Inventory, changed: list[str], edited: dict[str, dict]
) -> tuple[dict[str, int], dict[str, dict[str, int]], list[str]]:
    """Changed tensors by role and by layer (a fused expert tensor counts once per expert), and the
    changed tensors no role claims; an edited FP8 weight's fresh scales count with their weight."""
    by_role: Counter[str] = Counter()
    by_layer: dict[str, Counter[str]] = defaultdict(Counter)
    unclassified = []
    scales = fp8_scales(inventory, edited)
    for name in changed:
        t = inventory.tensors[name]
        if name in scales:
            continue
        if t.role is None:
            unclassified.append(name)
            continue
        n = t.shape[0] if t.fused_experts else 1
        by_role[t.role] += n
        by_layer["unlayered" if t.layer is None else str(t.layer)][t.role] += n
    layers = {k: dict(sorted(v.items())) for k, v in sorted(by_layer.items(), key=_layer_key)}
    return dict(sorted(by_role.items())), layers, unclassified


def _manifest_directions(manifest: dict | None, directions_path: str | Path | None, checks: Checks) -> Any:
    """The directions the ablation read: `directions_path`, else the file the manifest names, checked
    against the manifest's sha256 (None, with a warning or failure, when there are none to use)."""
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


def _layer_key(item: tuple[str, Any]) -> tuple[int, int]:
    return (1, 0) if item[0] == "unlayered" else (0, int(item[0]))
