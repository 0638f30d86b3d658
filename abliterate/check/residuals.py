"""Projection residuals of the edited tensors, NaN/Inf in the changed ones, and their tolerances.

Every changed tensor is scanned for NaN/Inf, and every edited tensor's projection residual along
its residual axis is computed (`|r^T W'| / |W|` for writers, `|W' r| / |W|` for routers and the
embedding; per expert for fused expert tensors, worst expert reported; with a rank-k plan's basis
Q [k, H], `|Q W'|_F / |W|` and `|W' Q^T|_F / |W|`), streamed in row chunks. A
router correction bias the plan shifts (role `router_bias`) must hold exactly the input plus the
planned values, added in float32 and rounded once, as the engine computes them.

Residual tolerance. Storing W' in a dtype with unit roundoff u moves each element by at most
u|W'_ij|, so |r^T dW'| <= |dW'|_F <= u |W'|_F <= u |W|_F (a projection never grows W): the
rounding alone gives a residual of at most u. The engine computes in float32, whose dot
products over H terms add at most about H * 2^-24 (the classic gamma_n bound). So
`tolerance = TOLERANCE_FACTOR * (u + H * 2^-24)`, with TOLERANCE_FACTOR = 2 as headroom for an
engine that rounds twice. A rank-k basis Q: |Q dW'|_F <= |dW'|_F still (orthonormal rows), and the
float32 edit computes k dot products (each off by H 2^-24 relative, sqrt(k) of them together) and a
k-term sum: at most k H 2^-24, so `tolerance = TOLERANCE_FACTOR * (u + k H 2^-24)`. Measured worst residuals (benchmarks/bench_validate.py, the demo
model) stay far inside: bf16 writers 0.35 u at hidden 8 (few elements per tensor, so little
averaging), 0.04 u at hidden 512, 0.07 u on the demo model (hidden 64); typical rounding
errors cancel to about u / sqrt(3H). fp32 routers stay below 2^-24 (1/20 of their tolerance
at hidden 8). A miss is far above: a wrong direction leaves residuals of order 1/sqrt(H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate.check.structure import MAX_NAMED, Checks, OutputTensor, where
from abliterate.edit.matching import direction_for
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.weights import fp8
from abliterate.weights.checkpoint import Inventory, TensorInfo, count_nonfinite
from abliterate.weights.dtypes import TORCH_DTYPES

UNIT_ROUNDOFF = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}
FLOAT32_UNIT = 2.0**-24
TOLERANCE_FACTOR = 2.0
# Methods and scale whose edits zero the projection exactly (up to rounding); the others are
# reported, never failed (a norm-preserving edit or a scale < 1 leaves a residual by design).
EXACT_METHODS = ("plain", "projected")
CHUNK_ELEMENTS = 1 << 22  # elements of one tensor held at a time for NaN/residual checks


def residual_tolerance(dtype: str, hidden_size: int, rank: int = 1) -> float | None:
    """Largest acceptable projection residual of a tensor stored in `dtype` (None: not a float), edited
    along one direction or a basis of `rank` (see the module docstring)."""
    if dtype not in UNIT_ROUNDOFF:
        return None
    return TOLERANCE_FACTOR * (UNIT_ROUNDOFF[dtype] + rank * hidden_size * FLOAT32_UNIT)


@dataclass
class WorstResidual:
    tensor: str
    residual: float
    tolerance: float | None
    enforced: bool  # plain/projected edit at scale 1: the tolerance applies
    expert: int | None = None
    checked: int = 0  # edited tensors of this role whose residual was computed


def check_numbers(
    original_dir: Path,
    ablated_dir: Path,
    inventory: Inventory,
    output: dict[str, OutputTensor],
    changed: list[str],
    edited: dict[str, dict],
    directions: Any,
    plan: AblationPlan | None,
    checks: Checks,
    progress: bool,
) -> tuple[dict[str, WorstResidual], list[str]]:
    """NaN/Inf scan of every changed tensor; residual of every edited one against the direction used."""
    residuals = plan is not None and directions is not None
    hidden, rank = None, 1
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
                r = vectors[layer]  # [H], or a basis [k, H] of a rank-k plan
                hidden, rank = int(r.shape[-1]), (1 if r.dim() == 1 else int(r.shape[0]))
            src = _handle(handles, original_dir / t.shard)
            dst = _handle(handles, ablated_dir / t.shard)
            fp8_tolerance = None
            if name in inventory.fp8 and entry is not None:  # in dequantized space, against the FP8 bound
                result, fp8_tolerance = _fp8_numbers(original_dir, ablated_dir, inventory, output, t, r)
            else:
                result = _tensor_numbers(src, dst, t, output[name].start, r)
            damaged = _input_nonfinite(original_dir, inventory, t) if result.nonfinite else 0
            for expert, count in result.nonfinite:
                place = f"{name} ({where(t, expert)})"
                nan_inf.append(place)
                checks.fail(
                    f"tensor {place} holds {count} NaN/Inf values after ablation"
                    + (
                        f", and the input's holds {damaged} already: the input checkpoint is damaged, not the "
                        f"ablation; re-download {t.shard} (abliterate ablate refuses such input)"
                        if damaged
                        else ""
                    )
                )
            if entry is not None and entry.get("side") == "shift":
                _check_shift(src, dst, t, output[name].start, entry, plan, checks)
                continue
            if result.residual is None or entry is None:
                continue
            enforced = entry.get("method") in EXACT_METHODS and float(entry.get("scale", 1.0)) == 1.0
            tolerance = (
                residual_tolerance(t.dtype, hidden or 0, rank) if fp8_tolerance is None else fp8_tolerance
            )
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
                    f"tensor {name} ({where(t, result.worst_expert)}): projection residual {result.residual:.3g} "
                    f"exceeds the tolerance {tolerance:.3g} for {t.dtype}: the direction was not removed"
                )
    finally:
        for handle in handles.values():
            handle.close()
    return worst, nan_inf


def _check_shift(
    src: Any, dst: Any, t: TensorInfo, out_start: int, entry: dict, plan: AblationPlan | None, checks: Checks
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
            checks.fail(f"tensor {t.name} ({where(t)}): the plan shifts expert {expert}, which it lacks")
            return
        values[expert] = value
    old = _read_rows(src, t.start, t, 0, t.shape[0])
    new = _read_rows(dst, out_start, t, 0, t.shape[0])
    expected = (old.float() + values).to(old.dtype)
    wrong = (new != expected).nonzero().flatten().tolist()
    if wrong:
        checks.fail(
            f"tensor {t.name} ({where(t)}): the correction bias of experts {wrong[:MAX_NAMED]} is not the input plus "
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
        bad = count_nonfinite(new)
        if bad and t.fused_experts:
            nonfinite.append((row0, bad))
        bad_total += bad
        if r is None or t.dtype not in UNIT_ROUNDOFF or bad:
            continue
        new = new.double()
        old = _read_rows(src, t.start, t, row0, row1)  # its norm summed in float64, no copy
        axis = t.residual_axis
        if t.fused_experts:  # one expert [H, I] or [2I, H]: its own residual, the worst is reported
            expert_res = _norm(_along(new[0], r, axis - 1)) / max(_norm(old[0]), 1e-300)
            if expert_res > worst:
                worst, worst_expert = expert_res, row0
        elif axis == 0:
            part = r[..., row0:row1] @ new.reshape(row1 - row0, -1)
            acc = part if acc is None else acc + part
            den_sq += _norm(old) ** 2
        else:
            num_sq += _norm(_along(new, r, axis)) ** 2
            den_sq += _norm(old) ** 2
    if bad_total and not t.fused_experts:
        nonfinite.append((None, bad_total))
    if r is None or t.dtype not in UNIT_ROUNDOFF or bad_total:
        return _TensorNumbers(nonfinite, None, None)
    if t.fused_experts:
        return _TensorNumbers(nonfinite, worst, worst_expert)
    if acc is not None:
        num_sq = _norm(acc) ** 2
    return _TensorNumbers(nonfinite, math.sqrt(num_sq) / max(math.sqrt(den_sq), 1e-300), None)


def _fp8_numbers(
    original_dir: Path,
    ablated_dir: Path,
    inventory: Inventory,
    output: dict[str, OutputTensor],
    t: TensorInfo,
    r: torch.Tensor | None,
) -> tuple[_TensorNumbers, float | None]:
    """An FP8 weight, dequantized (input and output, each with its own scales) in float64: NaN/Inf and
    the projection residual as for any tensor, and its tolerance: 2 (|W'_q - W'|_F / |W|_F + H 2^-24),
    where |W'_q - W'|_F is bounded from the INPUT alone (`fp8.requantization_bound`: the exact edit
    W' of a plain or projected edit at scale 1 has |W'|_F <= |W|_F, and its fresh block scales
    |S'|_F <= sqrt(bm bn) |W'|_F / 448), never from the output's scales (a damaged scale would widen
    its own bound); the float32 edit adds H 2^-24 as for any dtype, and the factor 2 is the usual
    headroom. Memory: the tensor in float32 twice and its output once in float64."""
    scale_name, block = inventory.fp8[t.name]
    s = inventory.tensors[scale_name]
    old = fp8.dequantize(
        fp8.read_tensor(original_dir / t.shard, t), fp8.read_tensor(original_dir / s.shard, s), block
    )
    out_t = replace(t, start=output[t.name].start, end=output[t.name].start + t.nbytes)
    out_s = replace(s, start=output[scale_name].start, end=output[scale_name].start + s.nbytes)
    new_scale = fp8.read_tensor(ablated_dir / s.shard, out_s)
    new = fp8.dequantize(fp8.read_tensor(ablated_dir / t.shard, out_t), new_scale, block)
    bad = count_nonfinite(new) + count_nonfinite(new_scale)
    if bad:
        return _TensorNumbers([(None, bad)], None, None), None
    if r is None or t.residual_axis is None:
        return _TensorNumbers([], None, None), None
    new = new.double()  # the residual in float64; the input's norm summed in float64 from float32
    axis = t.residual_axis
    experts = [(e, old[e], new[e]) for e in range(t.shape[0])] if t.fused_experts else [(None, old, new)]
    worst, worst_expert, tolerance = -1.0, None, 0.0
    for expert, w, w_new in experts:
        a = axis - 1 if t.fused_experts else axis
        w_norm = _norm(w)  # once: a pass over the tensor in float64
        residual = _norm(_along(w_new, r, a)) / max(w_norm, 1e-300)
        bound = fp8.requantization_bound(w_norm, tuple(w.shape), block)
        tol = TOLERANCE_FACTOR * (bound / max(w_norm, 1e-300) + r.numel() * FLOAT32_UNIT)
        if residual - tol > worst - tolerance:
            worst, worst_expert, tolerance = residual, expert, tol
    return _TensorNumbers([], worst, worst_expert), tolerance


def _input_nonfinite(original_dir: Path, inventory: Inventory, t: TensorInfo) -> int:
    """How many NaN/Inf values the INPUT's tensor holds (an FP8 weight dequantized with its scales):
    validation names the input's own damage, it does not blame the edit for it (the failure path only)."""
    values = fp8.read_tensor(original_dir / t.shard, t)
    if t.name in inventory.fp8:
        s = inventory.tensors[inventory.fp8[t.name][0]]
        values = fp8.dequantize(values, fp8.read_tensor(original_dir / s.shard, s), inventory.fp8[t.name][1])
    return count_nonfinite(values)


def _along(x: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    """r^T v for every vector v of x along `axis` (a basis Q [k, H]: Q v, its k components)."""
    return torch.tensordot(x, r, dims=([axis], [r.dim() - 1]))


def _norm(x: torch.Tensor) -> float:
    """|x|_F summed in float64 (a float32 or bf16 tensor is widened element by element, never copied)."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))
