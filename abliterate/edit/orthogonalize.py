"""The weight edits of docs/DESIGN.md ("2.4 Weight edits"), on float32 tensors, in place.

Every edited tensor is a stack of vectors in residual space: the vectors lie along its
residual axis (the profile's `residual_axis`, the axis of length hidden). Removing the
direction r (unit) with scale s from each such vector v, v' = v - s r (r^T v), is at once
- the writer rule W' = W - s r (r^T W) for W [H, in] (residual axis 0: columns),
- the reader rule W' = W - s (W r) r^T for a router W [E, H] (residual axis 1: rows),
- the embedding rule on rows of [V, H], and the bias rule for a writer's bias [H];
- for a fused expert tensor [E, H, I] (axis 1) the writer rule on each expert's [H, I].
The norm-preserving variant rescales each vector back to its original length. One edit is no
projection: `shift_` adds values to a router's correction bias (which experts are chosen).

A subspace (rank k > 1) is a basis Q [k, H] of orthonormal rows in place of r: v' = v - s Q^T (Q v),
i.e. W' = W - s Q^T (Q W) for writers and W' = W - s (W Q^T) Q for readers, the same rules with the
k directions removed at once. The edits take r [H] or Q [k, H]; an [H] r runs exactly the rank-1
code (a rank-1 edit's bytes never depend on the subspace code).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from abliterate.errors import AbliterateError

NOISE = 1e-5  # relative size of float32 rounding noise left by a projection of an H-vector


def project_out_(w: torch.Tensor, r: torch.Tensor, scale: float, residual_axis: int) -> torch.Tensor:
    """In place: v <- v - scale * r (r^T v) for every vector v of `w` along `residual_axis`; with a
    basis r = Q [k, H] (orthonormal rows), v <- v - scale * Q^T (Q v)."""
    _check(w, r, residual_axis)
    if scale == 0.0:
        return w
    if residual_axis == w.dim() - 1:  # rows: routers, embeddings, biases
        rows = w.view(-1, w.shape[-1])
        if r.dim() == 1:
            rows.addr_(rows @ r, r, alpha=-scale)
        else:  # [N, H] - s (W Q^T) Q
            rows.addmm_(rows @ r.T, r, alpha=-scale)
    elif residual_axis == 0:  # columns: writers [H, in]
        cols = w.view(w.shape[0], -1)
        if r.dim() == 1:
            cols.addr_(r, r @ cols, alpha=-scale)
        else:  # [H, in] - s Q^T (Q W)
            cols.addmm_(r.T, r @ cols, alpha=-scale)
    else:  # a middle axis (fused experts [E, H, I]): each leading slice on its own
        for part in w:
            project_out_(part, r, scale, residual_axis - 1)
    return w


def norm_preserving_(w: torch.Tensor, r: torch.Tensor, scale: float, residual_axis: int) -> torch.Tensor:
    """In place: v <- |v| * normalize(v - scale * r (r^T v)).

    A vector (anti)parallel to r with scale 1 leaves only float32 noise; rescaling that noise to
    |v| would write a random vector, so a remainder under NOISE * |v| becomes zero instead.
    """
    _check(w, r, residual_axis)
    if scale == 0.0:
        return w
    before = torch.linalg.vector_norm(w, dim=residual_axis, keepdim=True)
    project_out_(w, r, scale, residual_axis)
    after = torch.linalg.vector_norm(w, dim=residual_axis, keepdim=True)
    w.mul_(torch.where(after > NOISE * before, before / after.clamp_min(torch.finfo(w.dtype).tiny), 0.0))
    return w


def shift_(
    w: torch.Tensor, values: torch.Tensor, scale: float = 1.0, residual_axis: int | None = None
) -> torch.Tensor:
    """In place: w <- w + scale * values (a router correction bias [E] and the values the plan adds;
    `residual_axis` is unused: the bias lives off the residual stream)."""
    if w.dtype != torch.float32 or values.dtype != torch.float32 or w.shape != values.shape:
        raise ValueError(
            f"a shift adds float32 values of the tensor's shape {list(w.shape)}, got {list(values.shape)}"
        )
    return w.add_(values, alpha=scale)


def edit_for(method: str, side: str) -> Callable[[torch.Tensor, torch.Tensor, float, int], torch.Tensor]:
    """The in-place edit of a matched tensor: `shift_` for a router bias shift, the norm-preserving
    edit where the method asks for it (never for readers: norms are kept along writer columns),
    else the plain projection."""
    if side == "shift":
        return shift_
    if method == "norm_preserving" and side != "reader":
        return norm_preserving_
    return project_out_


def projected_basis(q: torch.Tensor, harmless_mean: torch.Tensor, where: str = "") -> torch.Tensor:
    """The projected method for a basis Q [k, H]: each row made orthogonal to normalize(harmless_mean),
    then the rows re-orthonormalised in order (Gram-Schmidt as a QR in float64, signs kept so row 0 is
    `projected_direction` of row 0). A subspace that holds the harmless mean has a row left at
    nothing: refused, as for one direction."""
    if q.dim() == 1:
        return projected_direction(q, harmless_mean, where)
    q64, m64 = q.double(), harmless_mean.double().flatten()
    m_norm = float(m64.norm())
    if not math.isfinite(m_norm):
        raise AbliterateError(f"the harmless mean{where} holds NaN or Inf: re-measure")
    if m_norm > 0:
        m64 = m64 / m_norm
        q64 = q64 - torch.outer(q64 @ m64, m64)
    basis, upper = torch.linalg.qr(q64.T)  # q64^T = basis @ upper: basis's columns span the rows in order
    diagonal = upper.diagonal()
    if not bool((diagonal.abs() > 1e-6).all()):
        raise AbliterateError(
            f"the subspace{where} holds the harmless mean: after projecting it out, {int((diagonal.abs() > 1e-6).sum())} "
            f"of its {q.shape[0]} directions are left independent; use a lower rank or the plain method"
        )
    return (basis * diagonal.sign()).T.contiguous().float()


def projected_direction(r: torch.Tensor, harmless_mean: torch.Tensor, where: str = "") -> torch.Tensor:
    """Unit r made orthogonal to normalize(harmless_mean), so ablation leaves the harmless mean alone."""
    r64, m64 = r.double().flatten(), harmless_mean.double().flatten()
    m_norm = float(m64.norm())
    if not math.isfinite(m_norm):  # never a silent fallback to the plain edit
        raise AbliterateError(f"the harmless mean{where} holds NaN or Inf: re-measure")
    if m_norm > 0:
        m64 = m64 / m_norm
        r64 = r64 - (r64 @ m64) * m64
    norm = float(r64.norm())
    if not norm > 1e-6:
        raise AbliterateError(
            f"the direction{where} is parallel to the harmless mean: nothing is left after projecting; "
            "use the plain method"
        )
    return (r64 / norm).float()


def _check(w: torch.Tensor, r: torch.Tensor, residual_axis: int) -> None:
    if w.dtype != torch.float32 or r.dtype != torch.float32:
        raise TypeError(f"edits run in float32, got weight {w.dtype} and direction {r.dtype}")
    if not w.is_contiguous():
        raise ValueError("the weight must be contiguous (it is edited through views)")
    if r.dim() not in (1, 2):
        raise ValueError(f"edits take a direction [H] or a basis [k, H], got shape {list(r.shape)}")
    if not 0 <= residual_axis < w.dim() or w.shape[residual_axis] != r.shape[-1]:
        raise ValueError(f"weight shape {list(w.shape)} has no axis {residual_axis} of length {r.shape[-1]}")
