"""The edit math against float64 references of the formulas in docs/DESIGN.md ("2.4 Weight edits")."""

import pytest
import torch

from abliterate.errors import AbliterateError
from abliterate.orthogonalize import norm_preserving_, project_out_, projected_direction

H = 16


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
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(r @ out, (1 - scale) * (r @ w), rtol=0, atol=1e-5)
    if scale == 1.0:
        assert float((r @ out).norm() / w.norm()) < 1e-6


def test_scale_zero_is_identity():
    w, r = rand(H, 24), unit()
    assert torch.equal(project_out_(w.clone(), r, 0.0, 0), w)
    assert torch.equal(norm_preserving_(w.clone(), r, 0.0, 0), w)


def test_reader_and_embedding_rule_on_rows():
    w, r = rand(12, H), unit()
    expected = w.double() - torch.outer(w.double() @ r.double(), r.double())
    out = project_out_(w.clone(), r, 1.0, residual_axis=1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    assert float((out @ r).norm() / w.norm()) < 1e-6


def test_bias_rule():
    b, r = rand(H), unit()
    out = project_out_(b.clone(), r, 1.0, residual_axis=0)
    torch.testing.assert_close(out.double(), b.double() - r.double() * (r.double() @ b.double()), rtol=0, atol=1e-6)


def test_fused_experts_edit_each_expert_along_the_residual_axis():
    # Square experts (I == H): only the declared axis says which side is residual.
    w, r = rand(3, H, H), unit()
    out = project_out_(w.clone(), r, 1.0, residual_axis=1)
    for e in range(3):
        torch.testing.assert_close(out[e], project_out_(w[e].clone(), r, 1.0, 0), rtol=0, atol=0)
        assert float((r @ out[e]).norm()) < 1e-5
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
        torch.testing.assert_close(out[:, keep].norm(dim=0), w[:, keep].norm(dim=0), rtol=1e-6, atol=0)
    assert torch.equal(full[:, 0], torch.zeros(H)) and torch.equal(full[:, 1], torch.zeros(H))
    assert float((r @ full[:, keep]).abs().max()) < 1e-5
    # Half a step: each column's cosine with r lies strictly between the full edit's (0) and the input's.
    cos_in = (r @ w[:, keep]).abs() / w[:, keep].norm(dim=0)
    cos_half = (r @ half[:, keep]).abs() / half[:, keep].norm(dim=0)
    assert bool(((cos_half > 1e-4) & (cos_half < cos_in)).all())
    expected = w[:, keep].double() - 0.5 * torch.outer(r.double(), r.double() @ w[:, keep].double())
    expected = expected / expected.norm(dim=0) * w[:, keep].double().norm(dim=0)
    torch.testing.assert_close(half[:, keep].double(), expected, rtol=0, atol=1e-6)


def test_norm_preserving_rows_for_embeddings():
    w, r = rand(10, H), unit()
    out = norm_preserving_(w.clone(), r, 1.0, residual_axis=1)
    torch.testing.assert_close(out.norm(dim=1), w.norm(dim=1), rtol=1e-6, atol=0)
    assert float((out @ r).abs().max()) < 1e-5


def test_projected_direction():
    r, mean = unit(0), rand(H, seed=5) * 10
    p = projected_direction(r, mean)
    assert p.dtype == torch.float32
    assert abs(float(p.norm()) - 1) < 1e-6 and abs(float(p @ mean)) < 1e-4
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
