"""Every edited tensor recomputed from the input through the engine's own edit, and compared.

The engine is deterministic, so the recomputed bytes equal the output's; where they do not, every
value must lie within the float32 rounding bound of the recomputation (another CPU's kernels may
sum in another order), else the tensor fails. FP8 weights are requantized with fresh block scales
as the engine does (`abliterate.edit.fp8_edit`) and may differ by at most one e4m3 step per value. A
damage that keeps a tensor orthogonal to the direction (zeroed, rescaled, moved along another
direction) passes the projection residual; it fails here.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate.check.residuals import FLOAT32_UNIT, TOLERANCE_FACTOR, UNIT_ROUNDOFF
from abliterate.check.structure import HASH_CHUNK, Checks, OutputTensor, where
from abliterate.edit.engine import edited_chunks, rounded_pieces, scratch
from abliterate.edit.fp8_edit import requantized_edit
from abliterate.edit.matching import plan_matches, vector_for
from abliterate.edit.orthogonalize import NOISE
from abliterate.edit.plan import AblationPlan
from abliterate.vocabulary import MANIFEST_FILE
from abliterate.weights import fp8
from abliterate.weights.checkpoint import Inventory, TensorInfo
from abliterate.weights.dtypes import TORCH_DTYPES


def recompute_edits(
    original_dir: Path,
    ablated_dir: Path,
    inventory: Inventory,
    output: dict[str, OutputTensor],
    uncompared: set[str],
    edited: dict[str, dict],
    plan: AblationPlan,
    directions: Any,
    checks: Checks,
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
                    f"tensor {t.name} ({where(t)}) differs from the edit recomputed from the input only within "
                    "float32 rounding (another machine's kernels?)"
                )
            elif verdict == "differs":
                unchanged = _same_bytes(src, dst, t, output[t.name].start)
                if unchanged and t.name in edited and (inventory.model_dir / MANIFEST_FILE).is_file():
                    checks.warn(
                        f"tensor {t.name} ({where(t)}) is planned for editing but its bytes are unchanged "
                        "(the input was already ablated)"
                    )
                    continue
                if unchanged:
                    checks.fail(
                        f"tensor {t.name} ({where(t)}) is planned for editing but its bytes are unchanged: the edit "
                        f"recomputed from the input changes {outside} of {total} values; rerun the ablation"
                    )
                else:
                    checks.fail(
                        f"tensor {t.name} ({where(t)}) differs from the edit recomputed from the input: {outside} of "
                        f"{total} values outside the float32 rounding bound (largest difference {largest:.3g}): the "
                        "output is damaged; rerun the ablation"
                    )
        for m in plan_matches(plan, inventory):  # FP8 weights: recomputed with their scales (fp8_edit.py)
            if m.scales is None or m.tensor.name not in output or m.tensor.name in uncompared:
                continue
            if m.tensor.layer not in vectors:
                vectors[m.tensor.layer] = vector_for(plan, directions, m)
            verdict = _compare_fp8(original_dir, ablated_dir, output, m, vectors[m.tensor.layer])
            counts[verdict] += 1
            t = m.tensor
            if verdict == "within_rounding":
                checks.warn(
                    f"tensor {t.name} ({where(t)}) differs from the edit recomputed from the input by at most "
                    "one e4m3 step per value (another machine's kernels?)"
                )
            elif verdict == "differs":
                checks.fail(
                    f"FP8 tensor {t.name} ({where(t)}) or its scales differ from the edit recomputed from the "
                    "input by more than one e4m3 step: the output is damaged; rerun the ablation"
                )
    finally:
        for fd in fds.values():
            os.close(fd)
    return {k: counts.get(k, 0) for k in ("identical", "within_rounding", "differs")}


def _compare_fp8(
    original_dir: Path, ablated_dir: Path, output: dict[str, OutputTensor], m: Any, r: torch.Tensor
) -> str:
    """An FP8 weight and its scales against their requantized edit recomputed from the input with
    the ablation's own function and buffers: the same bytes (the requantization is deterministic;
    compared a piece at a time, nothing read whole), or at most one e4m3 step apart per value."""
    t, (s, block) = m.tensor, m.scales
    if s.name not in output:
        return "differs"
    q, scale = requantized_edit(original_dir, m, r, scratch())
    if _stored_equal(ablated_dir / t.shard, output[t.name].start, q) and _stored_equal(
        ablated_dir / s.shard, output[s.name].start, scale
    ):
        return "identical"
    q = q.clone()  # a view of the engine's buffers, which reading the output does not touch: kept safe
    out_q = fp8.read_tensor(
        ablated_dir / t.shard, replace(t, start=output[t.name].start, end=output[t.name].start + t.nbytes)
    )
    out_s = fp8.read_tensor(
        ablated_dir / s.shard, replace(s, start=output[s.name].start, end=output[s.name].start + s.nbytes)
    )
    new, ref = fp8.dequantize(out_q, out_s, block).double(), fp8.dequantize(q, scale, block).double()
    if not bool(torch.isfinite(new).all()):
        return "differs"
    return "within_rounding" if fp8.one_ulp_apart(new, ref, out_s, scale, block) else "differs"


def _stored_equal(path: Path, start: int, x: torch.Tensor) -> bool:
    """Whether `path` holds the bytes of `x` at `start` (read a piece at a time)."""
    view = memoryview(x.contiguous().view(torch.uint8).numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        for first in range(0, len(view), HASH_CHUNK):
            piece = view[first : first + HASH_CHUNK]
            if os.pread(f.fileno(), len(piece), start + first) != piece:
                return False
    return True


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
    other. A bias shift adds a value: one float32 rounding. A rank-k basis Q [k, H] in place of r:
    x = v - s Q^T (Q v), each of the k dot products off by (H + 3) 2^-24 |v| and their k-term sum
    adding k 2^-24: eps_i = (H + k + 3) 2^-24 (|v_i| + s a_i |v|) with a_i = sum_j |Q_ji| (at k = 1,
    the bound above). TOLERANCE_FACTOR 2 on top, as for the residuals."""
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
        hidden, rank = r.shape[-1], (1 if r.dim() == 1 else r.shape[0])
        gamma = (hidden + rank + 3) * FLOAT32_UNIT
        along = [1] * x.dim()
        along[axis] = hidden
        ar = r.double().abs().reshape(-1, hidden).sum(dim=0).view(along)
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
