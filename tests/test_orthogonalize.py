"""The edit math against float64 references of the formulas in docs/DESIGN.md ("2.4 Weight edits")."""

import pytest
import torch

from abliterate.edit.orthogonalize import (
    edit_for,
    norm_preserving_,
    project_out_,
    projected_direction,
    shift_,
)
from abliterate.errors import AbliterateError

H = 16
# Tolerances are rounding-error bounds of the float32 arithmetic (Higham, "Accuracy and Stability of
# Numerical Algorithms", ch. 3), checked per edited vector against float64 references that use the same
# float32 r: u = 2^-24 is float32's unit roundoff, a length-H dot product is off by at most H u |r| |v|,
# every further operation rounds once (relative u).
U = 2.0**-24


def edit_error(w: torch.Tensor, scale: float, axis: int) -> torch.Tensor:
    """Bound on |fl(v') - v'| for every vector v of w along `axis`, v' = v - s r (r^T v), |r| = 1:
    r^T v (H u |v|), the product with s r_i and the subtraction (2 u), the rounding of v' itself
    (u |v'| <= u (1 + |s|) |v|): u (1 + |s| (H + 3)) |v|."""
    return U * (1 + abs(scale) * (H + 3)) * w.double().norm(dim=axis)


def norm_preserving_error(w: torch.Tensor, expected_projection: torch.Tensor, scale: float, axis: int):
    """Bound on |fl(w') - w'|, w' = |v| normalize(v'): the direction of fl(v') is off by at most
    2 |fl(v') - v'| / |v'|; |v| and |fl(v')| (H u each), their ratio and the product (2 u) scale it."""
    norm = w.double().norm(dim=axis)
    return norm * (2 * edit_error(w, scale, axis) / expected_projection.norm(dim=axis) + (2 * H + 2) * U)


def along(r: torch.Tensor, v: torch.Tensor, axis: int) -> torch.Tensor:
    """r^T v for every vector v along `axis`, in float64."""
    return torch.tensordot(v.double(), r.double(), dims=([axis], [0]))


def unit(seed: int = 0, n: int = H) -> torch.Tensor:
    r = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_writer_rule(scale):
    w, r = rand(H, 24), unit()
    expected = w.double() - scale * torch.outer(r.double(), r.double() @ w.double())
    out = project_out_(w.clone(), r, scale, residual_axis=0)
    bound = edit_error(w, scale, 0)
    assert bool(((out.double() - expected).norm(dim=0) <= bound).all())
    # what is left along r: (1 - s |r|^2) r^T v exactly (|r| is 1 only up to float32 rounding)
    left = (1 - scale * float(r.double() @ r.double())) * along(r, w, 0)
    assert bool(((along(r, out, 0) - left).abs() <= bound).all())
    if scale == 1.0:  # |1 - |r|^2| <= (H + 4) u for r = g / |g| in float32
        assert float(along(r, out, 0).norm() / w.double().norm()) <= (H + 4) * U + float(
            bound.norm() / w.norm()
        )


def test_scale_zero_is_identity():
    w, r = rand(H, 24), unit()
    assert torch.equal(project_out_(w.clone(), r, 0.0, 0), w)
    assert torch.equal(norm_preserving_(w.clone(), r, 0.0, 0), w)


def test_reader_and_embedding_rule_on_rows():
    w, r = rand(12, H), unit()
    expected = w.double() - torch.outer(w.double() @ r.double(), r.double())
    out = project_out_(w.clone(), r, 1.0, residual_axis=1)
    bound = edit_error(w, 1.0, 1)
    assert bool(((out.double() - expected).norm(dim=1) <= bound).all())
    assert float(along(r, out, 1).norm() / w.double().norm()) <= (H + 4) * U + float(bound.norm() / w.norm())


def test_bias_rule():
    b, r = rand(H), unit()
    out = project_out_(b.clone(), r, 1.0, residual_axis=0)
    expected = b.double() - r.double() * (r.double() @ b.double())
    assert float((out.double() - expected).norm()) <= float(edit_error(b, 1.0, 0))


def test_fused_experts_edit_each_expert_along_the_residual_axis():
    # Square experts (I == H): only the declared axis says which side is residual.
    w, r = rand(3, H, H), unit()
    out = project_out_(w.clone(), r, 1.0, residual_axis=1)
    for e in range(3):
        # the same code on the same numbers: bit for bit
        torch.testing.assert_close(out[e], project_out_(w[e].clone(), r, 1.0, 0), rtol=0, atol=0)
        left = (1 - float(r.double() @ r.double())) * along(r, w[e], 0)
        assert bool(((along(r, out[e], 0) - left).abs() <= edit_error(w[e], 1.0, 0)).all())
    wrong_axis = project_out_(w.clone(), r, 1.0, residual_axis=2)
    assert not torch.allclose(out, wrong_axis)


def test_norm_preserving_keeps_column_norms_and_honours_scale():
    w, r = rand(H, 32), unit()
    w[:, 0] = 3 * r  # a column along r: projected to zero, stays zero
    w[:, 1] = 0.0
    full = norm_preserving_(w.clone(), r, 1.0, 0)
    half = norm_preserving_(w.clone(), r, 0.5, 0)
    keep = slice(2, None)
    for out in (full, half):
        # norms: |v| and |fl(v')| (H u each), ratio, product and the test's own norm (H u): (3 H + 2) u
        torch.testing.assert_close(
            out[:, keep].double().norm(dim=0), w[:, keep].double().norm(dim=0), rtol=(3 * H + 2) * U, atol=0
        )
    assert torch.equal(full[:, 0], torch.zeros(H)) and torch.equal(full[:, 1], torch.zeros(H))
    full_projection = w[:, keep].double() - torch.outer(r.double(), r.double() @ w[:, keep].double())
    left = (1 - float(r.double() @ r.double())) * along(r, w[:, keep], 0)  # the exact remainder along r
    bound = norm_preserving_error(w[:, keep], full_projection, 1.0, 0)
    assert bool(
        (
            (
                along(r, full[:, keep], 0)
                - left * w[:, keep].double().norm(dim=0) / full_projection.norm(dim=0)
            ).abs()
            <= bound
        ).all()
    )
    # Half a step: each column's cosine with r lies strictly between the full edit's (0) and the input's.
    cos_in = (r @ w[:, keep]).abs() / w[:, keep].norm(dim=0)
    cos_half = (r @ half[:, keep]).abs() / half[:, keep].norm(dim=0)
    assert bool(((cos_half > 1e-4) & (cos_half < cos_in)).all())
    projection = w[:, keep].double() - 0.5 * torch.outer(r.double(), r.double() @ w[:, keep].double())
    expected = projection / projection.norm(dim=0) * w[:, keep].double().norm(dim=0)
    bound = norm_preserving_error(w[:, keep], projection, 0.5, 0)
    assert bool(((half[:, keep].double() - expected).norm(dim=0) <= bound).all())


def test_norm_preserving_rows_for_embeddings():
    w, r = rand(10, H), unit()
    out = norm_preserving_(w.clone(), r, 1.0, residual_axis=1)
    torch.testing.assert_close(out.double().norm(dim=1), w.double().norm(dim=1), rtol=(3 * H + 2) * U, atol=0)
    projection = w.double() - torch.outer(w.double() @ r.double(), r.double())
    left = (
        (1 - float(r.double() @ r.double()))
        * along(r, w, 1)
        * w.double().norm(dim=1)
        / projection.norm(dim=1)
    )
    assert bool(((along(r, out, 1) - left).abs() <= norm_preserving_error(w, projection, 1.0, 1)).all())


def test_projected_direction():
    r, mean = unit(0), rand(H, seed=5) * 10
    p = projected_direction(r, mean)
    assert p.dtype == torch.float32
    # computed in float64, rounded once to float32 (relative u per element): |p| = 1 and p^T mean = 0
    # up to u, plus float64 noise (H 2^-53, far below)
    assert abs(float(p.double().norm()) - 1) <= 2 * U
    assert abs(float(p.double() @ mean.double())) <= 2 * U * float(mean.double().norm())
    assert float(p @ r) > 0
    torch.testing.assert_close(projected_direction(r, torch.zeros(H)), r)
    with pytest.raises(AbliterateError, match="parallel to the harmless mean"):
        projected_direction(r, 4 * r)


def test_inputs_are_checked():
    r = unit()
    with pytest.raises(TypeError, match="float32"):
        project_out_(rand(H, 4).bfloat16(), r, 1.0, 0)
    with pytest.raises(ValueError, match="no axis 1 of length"):
        project_out_(rand(H, 4), r, 1.0, 1)
    with pytest.raises(ValueError, match="contiguous"):
        project_out_(rand(4, H).t(), r, 1.0, 0)


def test_edit_for_chooses_the_edit_of_each_match():
    """The engine and the FP8 edit pick their edit here: norms are kept only along writer vectors."""
    assert edit_for("norm_preserving", "writer") is norm_preserving_
    assert edit_for("norm_preserving", "embed") is norm_preserving_
    assert edit_for("norm_preserving", "reader") is project_out_
    assert edit_for("plain", "writer") is edit_for("projected", "writer") is project_out_
    assert edit_for("shift", "shift") is shift_
