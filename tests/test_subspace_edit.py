"""A refusal subspace removed from the weights (issue 25): the directions file's `subspace.<method>`
tensors, the plan's `rank` and `subspace`, the rank-k edit W - s Q^T (Q W) (readers W - s (W Q^T) Q)
in the shard engine (bf16 and FP8), at inference time (PlanEdit) and in validation's recomputation.

The directions files here are real files written by `save_directions`: random directions and means,
and at each position orthonormal rows from a float64 QR whose row 0 is the unit direction (what
measurement writes, whatever method found the other rows)."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from fixtures import assert_error, cli
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import accumulation_length, logits_rtol
from safetensors import safe_open

from abliterate.check.validate import validate_output
from abliterate.config import Ablation, Prompts
from abliterate.demo import DATA_DIR, DEMO_MODEL_DIR, TWO_CATEGORY_MODEL_DIR
from abliterate.edit.ablate import ablate_checkpoint, load_inputs
from abliterate.edit.matching import configured_plan, direction_for
from abliterate.edit.orthogonalize import (
    NOISE,
    norm_preserving_,
    project_out_,
    projected_basis,
    projected_direction,
)
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import load_directions, save_directions
from abliterate.pipeline import PromptSets, check_subspace
from abliterate.weights import fp8 as fp8_format
from abliterate.weights.checkpoint import build_inventory
from abliterate.weights.synthetic import GlmLayout, convert_to_fp8, write_glm_layout

U = 2.0**-24  # float32 unit roundoff


def orthonormal_rows(first: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """[k, H] float32: row 0 the unit `first` (as stored, float32), rows 1.. random, orthonormalised in
    float64 (QR, signs fixed so row 0 is +first)."""
    h = first.numel()
    rows = torch.cat([first.float().double()[None], torch.randn(k - 1, h, generator=generator).double()])
    q, r = torch.linalg.qr(rows.T)
    return (q * r.diagonal().sign()).T.float()


def subspace_file(
    model_dir: Path, path: Path, ranks: dict[str, int], seed: int = 3, selected: int = 1
) -> Path:
    """A directions file for `model_dir` with a subspace of each method's rank in `ranks`."""
    config = json.loads((model_dir / "config.json").read_text())
    positions, hidden = config["num_hidden_layers"] + 1, config["hidden_size"]
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(positions, hidden, generator=gen)
    subspaces = {
        method: torch.stack([orthonormal_rows(direction[p], k, gen) for p in range(positions)])
        for method, k in ranks.items()
    }
    return save_directions(
        path,
        direction,
        {
            "fingerprint": build_inventory(model_dir).fingerprint,
            "selected_position": selected,
            "subspace": {m: {"provenance": "random orthonormal rows (test)"} for m in ranks},
        },
        harmful_mean=torch.randn(positions, hidden, generator=gen),
        harmless_mean=torch.randn(positions, hidden, generator=gen) + 2,
        subspaces=subspaces,
    )


def read(model_dir: Path, name: str) -> torch.Tensor:
    shard = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(model_dir / shard), "pt") as f:
        return f.get_tensor(name)


# ---------------------------------------------------------------- the math


def random_basis(k: int, h: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return orthonormal_rows(torch.randn(h, generator=gen), k, gen)


# (shape builder from H, residual axis): writers [H, n], rows [n, H] (routers, embeddings), a bias [H],
# fused experts [E, H, n] and [E, n, H]
LAYOUTS = [
    (lambda h, n: (h, n), 0),
    (lambda h, n: (n, h), 1),
    (lambda h, n: (h,), 0),
    (lambda h, n: (3, h, n), 1),
    (lambda h, n: (2, n, h), 2),
]


def dense(w: torch.Tensor, q: torch.Tensor, scale: float, axis: int) -> torch.Tensor:
    """(I - s Q^T Q) applied to every vector along `axis`, in float64 with the same float32 Q."""
    q64 = q.double()
    projector = torch.eye(q.shape[1], dtype=torch.float64) - scale * q64.T @ q64
    return torch.movedim(torch.tensordot(projector, w.double(), dims=([1], [axis])), 0, axis)


def rank_k_error(w: torch.Tensor, k: int, scale: float, axis: int) -> torch.Tensor:
    """Bound on |fl(v') - v'| per vector v along `axis`, v' = v - s Q^T (Q v), |Q_j| = 1: each of the
    k components s Q_j^T (Q_j v) is within (H + k + 3) u |v| (the H-term dot product, the k-term sum,
    the product by s and the subtraction), and v' itself rounds once (u |v'| <= u (1 + |s|) |v|)."""
    h = w.shape[axis]
    return U * (1 + abs(scale) + abs(scale) * k * (h + k + 3)) * w.double().norm(dim=axis)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 5),
    extra=st.integers(0, 12),
    n=st.integers(1, 7),
    layout=st.sampled_from(range(len(LAYOUTS))),
    scale=st.sampled_from([1.0, 0.5, 2.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_rank_k_edit_is_the_dense_formula(k, extra, n, layout, scale, seed):
    """project_out_ with a basis Q [k, H] is (I - s Q^T Q) W on every vector along the residual axis,
    within float32's bound, for every k, shape and axis; norm-preserving rescales each vector to its
    length."""
    h = k + 1 + extra
    shape, axis = LAYOUTS[layout][0](h, n), LAYOUTS[layout][1]
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    q = random_basis(k, h, seed)
    expected = dense(w, q, scale, axis)
    out = project_out_(w.clone(), q, scale, axis)
    bound = rank_k_error(w, k, scale, axis)
    assert bool(((out.double() - expected).norm(dim=axis) <= bound).all())

    kept = norm_preserving_(w.clone(), q, scale, axis)
    target = expected * (w.double().norm(dim=axis, keepdim=True) / expected.norm(dim=axis, keepdim=True))
    # the direction of fl(v') is off by at most 2 |fl(v') - v'| / |v'|; the norms (H u each), their
    # ratio and the product (2 u) scale it (as tests/test_orthogonalize.py)
    np_bound = w.double().norm(dim=axis) * (2 * bound / expected.norm(dim=axis) + (2 * h + 2) * U)
    # a vector left near float32 noise (|v'| <= NOISE |v|: zeroed on purpose, tests/test_orthogonalize.py)
    # is left out; with random weights it is about 1e-5 sqrt(H) likely per vector
    away = expected.norm(dim=axis) > 10 * NOISE * w.double().norm(dim=axis)
    assert bool(((kept.double() - target).norm(dim=axis) <= np_bound)[away].all())


@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(range(len(LAYOUTS))),
    scale=st.sampled_from([1.0, 0.5, 2.0]),
    seed=st.integers(0, 999),
)
def test_rank_one_basis_is_the_vector_edit(layout, scale, seed):
    """A rank-1 plan edits with the [H] vector itself (`direction_for`), so its bytes are today's; the
    [1, H] basis gives the same numbers within float32 rounding."""
    h = 12
    shape, axis = LAYOUTS[layout][0](h, 5), LAYOUTS[layout][1]
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    r = random_basis(1, h, seed)[0]
    by_vector = project_out_(w.clone(), r, scale, axis)
    by_basis = project_out_(w.clone(), r[None], scale, axis)
    assert bool(
        ((by_vector.double() - by_basis.double()).norm(dim=axis) <= 2 * rank_k_error(w, 1, scale, axis)).all()
    )


def test_projected_basis_removes_the_harmless_mean_from_every_row():
    h, k = 24, 3
    q = random_basis(k, h, 5)
    mean = torch.randn(h, generator=torch.Generator().manual_seed(6)) + 1
    p = projected_basis(q, mean)
    unit_mean = mean.double() / mean.double().norm()
    assert p.shape == (k, h) and p.dtype == torch.float32
    # orthonormal rows (float64 QR rounded to float32: 2u + u^2 per Gram entry), orthogonal to the mean
    assert float((p.double() @ p.double().T - torch.eye(k, dtype=torch.float64)).abs().max()) <= 2 * (
        2 * U + U * U
    )
    assert float((p.double() @ unit_mean).abs().max()) <= 4 * h * U
    # row 0 is the one direction's projected edit; the span is Q's rows less their mean component
    torch.testing.assert_close(p[0], projected_direction(q[0], mean), rtol=0, atol=4 * U)
    q_less = q.double() - torch.outer(q.double() @ unit_mean, unit_mean)
    assert float((q_less - (q_less @ p.double().T) @ p.double()).abs().max()) <= 8 * h * U
    assert torch.equal(projected_basis(q[0], mean), projected_direction(q[0], mean))  # a vector: as before
    # a subspace that holds the harmless mean has nothing left along it: one line, never a silent rank drop
    holding = torch.stack([q[0], q[1], (q[0] + q[1]) / 2**0.5])
    with pytest.raises(AbliterateError, match="holds the harmless mean"):
        projected_basis(q[:2], q[0] + q[1])
    with pytest.raises(AbliterateError, match="lower rank"):
        projected_basis(holding, mean)


# ---------------------------------------------------------------- the directions file


def test_file_round_trips_subspaces_and_basis(tmp_path):
    model = write_glm_layout(tmp_path / "m", GlmLayout(num_layers=2, hidden_size=16, n_routed_experts=4), 2)
    path = subspace_file(model, tmp_path / "d.safetensors", {"pca": 3, "clusters": 2})
    d = load_directions(path)
    assert sorted(d.subspaces) == ["clusters", "pca"] and d.subspaces["pca"].shape == (3, 3, 16)
    assert d.metadata["subspace"]["pca"] == {"provenance": "random orthonormal rows (test)", "rank": 3}
    q = d.basis(1, 3, "pca")
    assert q.shape == (3, 16) and q.dtype == torch.float32
    torch.testing.assert_close(q[0], d.vector(1), rtol=0, atol=6 * U)
    assert torch.equal(d.basis(2, 1, "categories"), d.vector(2)[None])  # rank 1: the direction, any method
    assert torch.equal(d.basis(None, 2, "clusters"), d.subspaces["clusters"][1, :2])  # the selected position
    # identical contents give identical bytes
    again = subspace_file(model, tmp_path / "e.safetensors", {"pca": 3, "clusters": 2})
    assert path.read_bytes() == again.read_bytes()
    for rank, method, fragment in [
        (4, "pca", "pca rank 3"),
        (2, "categories", "clusters rank 2, pca rank 3"),
    ]:
        with pytest.raises(AbliterateError, match=fragment) as info:
            d.basis(1, rank, method)
        assert "--subspace-rank" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(AbliterateError, match="whole position"):
        d.basis(1.5, 2, "pca")


def test_rank_one_file_is_unchanged_byte_for_byte(tmp_path):
    """A file written without subspaces is the file written before subspaces existed."""
    from test_search_plan import directions_for

    model = write_glm_layout(tmp_path / "m", GlmLayout(num_layers=2, hidden_size=16, n_routed_experts=4), 2)
    path = directions_for(model, tmp_path / "d.safetensors")
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["direction", "harmful_mean", "harmless_mean"]
        assert "subspace" not in (f.metadata() or {})
    assert load_directions(path).subspaces == {}


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda q: q[:, :, :-1], "expected [3, K, 16]"),
        (lambda q: q * 1.001, "not orthonormal"),
        (lambda q: torch.cat([-q[:, :1], q[:, 1:]], dim=1), "row 0 at position 0 is not the unit"),
        (
            lambda q: q.masked_fill(
                torch.zeros_like(q, dtype=torch.bool).index_fill_(0, torch.tensor([2]), True), float("nan")
            ),
            "NaN or Inf at positions [2]",
        ),
    ],
)
def test_bad_subspaces_are_one_line(tmp_path, damage, fragment):
    model = write_glm_layout(tmp_path / "m", GlmLayout(num_layers=2, hidden_size=16, n_routed_experts=4), 2)
    good = load_directions(subspace_file(model, tmp_path / "d.safetensors", {"pca": 2}))
    with pytest.raises(AbliterateError) as info:  # refused on writing ...
        save_directions(
            tmp_path / "bad.safetensors", good.direction, {}, subspaces={"pca": damage(good.subspaces["pca"])}
        )
    assert fragment in str(info.value) and "\n" not in str(info.value)
    # ... and on reading a file written by someone else
    from abliterate.measure.direction_file import _serialize

    raw = {"direction": good.direction, "subspace.pca": damage(good.subspaces["pca"])}
    (tmp_path / "other.safetensors").write_bytes(
        _serialize(raw, {"subspace": json.dumps({"pca": {"rank": 2}})})
    )
    with pytest.raises(AbliterateError) as info:
        load_directions(tmp_path / "other.safetensors")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_subspace_metadata_must_describe_the_tensors(tmp_path):
    from abliterate.measure.direction_file import _serialize

    model = write_glm_layout(tmp_path / "m", GlmLayout(num_layers=2, hidden_size=16, n_routed_experts=4), 2)
    good = load_directions(subspace_file(model, tmp_path / "d.safetensors", {"pca": 2}))
    raw = {"direction": good.direction, "subspace.pca": good.subspaces["pca"]}
    for meta, fragment in [
        ({"subspace": json.dumps({"pca": {"rank": 3}})}, "gives no rank 2"),
        ({"subspace": json.dumps({"pca": {"rank": 2}, "clusters": {"rank": 2}})}, "does not describe"),
        ({}, "does not describe"),
    ]:
        (tmp_path / "x.safetensors").write_bytes(_serialize(raw, meta))
        with pytest.raises(AbliterateError, match=fragment):
            load_directions(tmp_path / "x.safetensors")
    (tmp_path / "x.safetensors").write_bytes(
        _serialize({**raw, "subspace.kmeans": good.subspaces["pca"]}, {})
    )
    with pytest.raises(AbliterateError, match="unknown method 'kmeans'"):
        load_directions(tmp_path / "x.safetensors")


# ---------------------------------------------------------------- the plan


def test_plan_writes_rank_only_above_one():
    base = {"layers": [0, 1], "scale": {"0": 1.0, "1": 1.0}, "num_layers": 2}
    one = AblationPlan.from_dict(base)
    assert "rank" not in one.to_dict() and "subspace" not in one.to_dict()
    same = AblationPlan.from_dict({**base, "rank": 1, "subspace": "clusters"})
    assert same == one and same.sha256() == one.sha256() and same.to_dict() == one.to_dict()
    two = AblationPlan.from_dict({**base, "rank": 2, "subspace": "clusters"})
    assert two.to_dict()["rank"] == 2 and two.to_dict()["subspace"] == "clusters"
    assert AblationPlan.from_yaml(two.to_yaml()) == two and two.sha256() != one.sha256()
    for change, fragment in [
        ({"rank": 0}, "`rank` is 0"),
        ({"rank": True}, "`rank` is True"),
        ({"rank": "2"}, "`rank` is '2'"),
        ({"rank": 2, "subspace": "kmeans"}, "unknown subspace 'kmeans'"),
    ]:
        with pytest.raises(AbliterateError, match=fragment):
            AblationPlan.from_dict({**base, **change})


# ---------------------------------------------------------------- through the CLI, bf16 and FP8


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    root = tmp_path_factory.mktemp("subspace")
    layout = GlmLayout(
        num_layers=3, n_routed_experts=4, num_experts_per_tok=2, hidden_size=16, num_nextn_predict_layers=1
    )
    src = write_glm_layout(root / "src", layout, num_shards=3)
    fp8 = convert_to_fp8(src, root / "fp8", (16, 16))
    return {
        "bf16": (src, subspace_file(src, root / "d.safetensors", {"pca": 3, "clusters": 2})),
        "fp8": (fp8, subspace_file(fp8, root / "d8.safetensors", {"pca": 3, "clusters": 2})),
    }


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_rank_two_plan_ablated_through_the_cli_validates(glm, kind, capsys, tmp_path):
    """`abliterate ablate --rank 2 --subspace pca` removes both directions from every targeted weight
    (validation recomputes every edit and holds every residual |Q W'| to its bound), where the rank-1
    run leaves the second direction in."""
    src, directions = glm[kind]
    out, single = tmp_path / "out", tmp_path / "single"
    code, err = cli(
        capsys,
        "ablate",
        src,
        "--directions",
        directions,
        "--out",
        out,
        "--rank",
        "2",
        "--subspace",
        "pca",
        "--quiet",
    )
    assert code == 0, err
    manifest = json.loads((out / "abliteration.json").read_text())
    assert manifest["plan"]["rank"] == 2 and manifest["plan"]["subspace"] == "pca"
    assert (
        "the first 2 orthonormal rows of the directions file's `pca` subspace"
        in (out / "README.md").read_text()
    )
    report = validate_output(src, out, progress=False)
    assert report.ok, report.failures
    assert report.worst_residual["attn_out"].enforced and report.worst_residual["router"].enforced
    assert cli(capsys, "validate", src, out, "--quiet")[0] == 0

    code, err = cli(capsys, "ablate", src, "--directions", directions, "--out", single, "--quiet")
    assert code == 0, err
    assert "rank" not in json.loads((single / "abliteration.json").read_text())["plan"]
    assert validate_output(src, single, progress=False).ok
    # the residual of each direction in one attention output (FP8: dequantized, the requantized edit),
    # |Q W'|_F / |W|_F as validation computes it, against the bound validation holds it to
    q = load_directions(directions).basis(1, 2, "pca").double()
    name = "model.layers.0.self_attn.o_proj.weight"
    inventory = build_inventory(src)

    def weight(d: Path) -> torch.Tensor:
        if name not in inventory.fp8:
            return read(d, name).double()
        scale_name, block = inventory.fp8[name]
        return fp8_format.dequantize(read(d, name), read(d, scale_name), block).double()

    assert (name in inventory.fp8) == (kind == "fp8")
    w = weight(src)
    worst = report.worst_residual["attn_out"]
    residual = (q @ weight(out)).norm(dim=1) / w.norm()
    left = (q @ weight(single)).norm(dim=1) / w.norm()
    assert float(residual.norm()) <= worst.residual * (1 + 1e-9) <= worst.tolerance
    # the rank-1 run removes the first and leaves the second, far above what the rank-2 run leaves in any
    # attention output (FP8's bound, from the input's requantization, is loose: 0.125 here)
    assert float(left[0]) <= worst.tolerance and float(left[1]) > 10 * worst.residual


def test_rank_one_plan_writes_todays_bytes_from_a_subspace_file(glm, capsys, tmp_path):
    """A file with subspaces at rank 1 writes exactly what the same direction without subspaces writes,
    and the plan records no rank."""
    src, directions = glm["bf16"]
    d = load_directions(directions)
    plain = save_directions(
        tmp_path / "plain.safetensors",
        d.direction,
        {k: v for k, v in d.metadata.items() if k != "subspace"},
        d.harmful_mean,
        d.harmless_mean,
    )
    for path, out in [(directions, tmp_path / "a"), (plain, tmp_path / "b")]:
        code, err = cli(
            capsys, "ablate", src, "--directions", path, "--out", out, "--subspace", "clusters", "--quiet"
        )
        assert code == 0, err
    for shard in build_inventory(src).shards:
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    plans = [json.loads((tmp_path / o / "abliteration.json").read_text())["plan"] for o in ("a", "b")]
    assert plans[0] == plans[1] and "rank" not in plans[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["--rank", "4"],
            ["rank 4 needs 4 `pca` directions", "clusters rank 2, pca rank 3", "--subspace-rank 4"],
        ),
        (["--rank", "3", "--subspace", "categories"], ["`categories` directions", "--subspace-rank 3"]),
        (["--rank", "0"], ["--rank (ablation.rank)", "use auto or a number of directions >= 1"]),
        (["--rank", "two"], ["--rank (ablation.rank)", "use auto or a number of directions >= 1"]),
    ],
)
def test_bad_rank_is_one_line_before_any_work(glm, capsys, tmp_path, args, fragments):
    src, directions = glm["bf16"]
    out = tmp_path / "out"
    assert_error(
        cli(capsys, "ablate", src, "--directions", directions, "--out", out, *args), "ablate", *fragments
    )
    assert not out.exists()


def test_rank_two_plan_between_positions_is_one_line(glm, capsys, tmp_path):
    src, directions = glm["bf16"]
    plan = configured_plan(load_inputs(src, directions), Ablation(rank=2), "auto").to_dict()
    (tmp_path / "plan.yaml").write_text(AblationPlan.from_dict({**plan, "direction_position": 1.5}).to_yaml())
    out = tmp_path / "out"
    assert_error(
        cli(
            capsys, "ablate", src, "--directions", directions, "--out", out, "--plan", tmp_path / "plan.yaml"
        ),
        "ablate",
        "direction position 1.5 lies between two positions",
        "rank 1",
    )
    assert not out.exists()


def test_rank_above_one_on_a_file_without_subspaces_is_one_line(glm, capsys, tmp_path):
    from test_search_plan import directions_for

    src, _ = glm["bf16"]
    path = directions_for(src, tmp_path / "plain.safetensors")
    out = tmp_path / "out"
    assert_error(
        cli(capsys, "ablate", src, "--directions", path, "--out", out, "--rank", "2"),
        "ablate",
        "one direction per position (no subspace)",
        "--subspace-rank 2",
    )
    assert not out.exists()


def test_projected_and_norm_preserving_rank_two_validate(glm, tmp_path):
    """The projected variant removes the basis made orthogonal to each layer's harmless mean; norm
    preservation rescales the writers' columns; validation recomputes both exactly."""
    src, directions = glm["bf16"]
    inputs = load_inputs(src, directions)
    for method in ("projected", "norm_preserving"):
        ablation = Ablation(ablation_method=method, rank=2, subspace="clusters", scale="0.8")
        plan = configured_plan(inputs, ablation, "own")
        q = direction_for(plan, inputs.directions, 2)
        assert q.shape == (2, 16)
        if method == "projected":
            mean = inputs.directions.harmless_mean[2].double()
            assert float((q.double() @ mean).abs().max()) <= 4 * 16 * U * float(mean.norm())
        out = tmp_path / method
        ablate_checkpoint(src, directions, out, plan, progress=False, log=lambda _: None)
        report = validate_output(src, out, progress=False)
        assert report.ok, report.failures
        assert report.recomputed["identical"] > 0 and report.recomputed["differs"] == 0


# ---------------------------------------------------------------- at inference time


@pytest.mark.parametrize(
    ("method", "fp8"), [("plain", False), ("projected", False), ("norm_preserving", True)]
)
def test_plan_edit_at_inference_equals_the_edited_checkpoint(method, fp8, tmp_path):
    """A rank-2 plan applied to the loaded model (writers' outputs, routers' inputs and the embedding
    projected by Q^T Q; norm-preserved and FP8 weights replaced) computes the logits of the checkpoint the
    engine edits with the same plan, within the float32 bound of tests/numerics.py; the rank-1 plan is
    far outside it."""
    from tiny_chat_model import build_tiny_chat_model, chat_batch, plan_edit

    from abliterate.edit.inference_edit import PlanEdit
    from abliterate.inference.loading import load_model

    src = build_tiny_chat_model(tmp_path / "tiny")
    if fp8:
        src = convert_to_fp8(src, tmp_path / "fp8", (16, 16))
    path = subspace_file(src, tmp_path / "d.safetensors", {"pca": 2})
    inputs = load_inputs(src, path)
    ablation = Ablation(ablation_method=method, rank=2, targets=["default", "embed"], scale="1,0.7,1")
    plan = configured_plan(inputs, ablation, "own")
    ablate_checkpoint(src, path, tmp_path / "out", plan, progress=False, log=lambda _: None)
    original, tokenizer = load_model(src)
    ablated, _ = load_model(tmp_path / "out")
    batch = chat_batch(tokenizer)

    def run(model, edit: PlanEdit | None = None) -> torch.Tensor:
        with edit.applied(model) if edit else nullcontext(), torch.inference_mode():
            return model(**batch).logits

    hooked = run(original, plan_edit(src, path, plan))
    edited = run(ablated)
    config = json.loads((src / "config.json").read_text())
    rtol = logits_rtol(
        config["num_hidden_layers"], accumulation_length(config, batch["input_ids"].shape[1]), 4
    )
    atol = rtol * float(edited.norm(dim=-1).max())
    torch.testing.assert_close(hooked, edited, rtol=0, atol=atol)
    rank_one = AblationPlan.from_dict(
        {k: v for k, v in plan.to_dict().items() if k not in ("rank", "subspace")}
    )
    hooked_one = run(original, plan_edit(src, path, rank_one))
    assert (hooked_one - edited).abs().max() > 10 * atol
    if method == "norm_preserving":  # the embedding's rows norm-preserved at inference too, at rank 1 as well
        ablate_checkpoint(src, path, tmp_path / "one", rank_one, progress=False, log=lambda _: None)
        torch.testing.assert_close(hooked_one, run(load_model(tmp_path / "one")[0]), rtol=0, atol=atol)
    assert torch.equal(run(original), original(**batch).logits)  # every hook and replaced tensor is gone


def test_validation_recomputes_rank_two_edits_within_rounding_and_catches_a_rank_one_edit(glm, tmp_path):
    """Validation recomputes each rank-2 edit: an output computed another way (exactly, in float64, then
    rounded once) lies within the derived float32 bound of the recomputation (a warning), while one
    tensor edited along the first direction only (what a rank-1 edit writes) fails."""
    from reliability.common import edit_tensor_bytes

    from abliterate.edit.matching import plan_matches

    src, directions = glm["bf16"]
    inputs = load_inputs(src, directions)
    plan = configured_plan(inputs, Ablation(rank=2), "auto")
    reference = tmp_path / "reference"
    ablate_checkpoint(src, directions, reference, plan, progress=False, log=lambda _: None)
    matches = [m for m in plan_matches(plan, inputs.inventory, inputs.structure) if m.scales is None]
    q = direction_for(plan, inputs.directions, 1)
    assert q.shape == (2, 16)

    exact = tmp_path / "exact"
    shutil.copytree(reference, exact)
    for m in matches:
        edit_tensor_bytes(
            exact, m.tensor.name, lambda w, m=m: dense(w, q, m.scale, m.tensor.residual_axis), source=src
        )
    report = validate_output(src, exact, progress=False)
    assert report.ok, report.failures
    assert report.recomputed["within_rounding"] > 0 and report.recomputed["differs"] == 0

    damaged = tmp_path / "damaged"
    shutil.copytree(reference, damaged)
    victim = next(m for m in matches if m.tensor.role == "attn_out")
    edit_tensor_bytes(
        damaged, victim.tensor.name, lambda w: dense(w, q[:1], 1.0, victim.tensor.residual_axis), source=src
    )
    report = validate_output(src, damaged, progress=False)
    assert not report.ok
    assert any(victim.tensor.name in f and "differs from the edit recomputed" in f for f in report.failures)
    assert any(victim.tensor.name in f and "projection residual" in f for f in report.failures)


def test_run_refuses_a_rank_above_what_measurement_keeps_before_any_work(glm, capsys, tmp_path):
    src, _ = glm["bf16"]
    out = tmp_path / "out"
    assert_error(
        cli(
            capsys,
            "run",
            src,
            "--out",
            out,
            "--rank",
            "3",
            "--subspace-rank",
            "2",
            "--work-dir",
            tmp_path / "w",
        ),
        "run",
        "--rank 3 removes 3 directions",
        "keeps 2 per subspace method (--subspace-rank)",
    )
    assert not out.exists() and not (tmp_path / "w").exists()


def test_layer_streamed_plan_edit_equals_the_edited_checkpoint(tmp_path):
    """Layer-streamed (the embedding through `PlanEdit.embedded`, each layer through `on_layer`), a
    rank-2 norm-preserving plan with the embedding gives the first-token log-probabilities of the
    checkpoint the engine edits, within the float32 bound of tests/numerics.py (log-probabilities move
    by at most twice the logits' bound); the unedited model is far outside it."""
    from tiny_chat_model import HARMFUL, HARMLESS, build_tiny_chat_model
    from transformers import AutoTokenizer

    from abliterate.config import Template
    from abliterate.edit.inference_edit import PlanEdit, storage_dtypes
    from abliterate.inference.loading import load_model, pad_token_id
    from abliterate.inference.runner import StreamedForward
    from abliterate.measure.chat import encode_prompts
    from abliterate.weights.profiles import GLM4_MOE

    src = build_tiny_chat_model(tmp_path / "tiny")
    path = subspace_file(src, tmp_path / "d.safetensors", {"clusters": 3})
    inputs = load_inputs(src, path)
    ablation = Ablation(
        ablation_method="norm_preserving", rank=3, subspace="clusters", targets=["default", "embed"]
    )
    plan = configured_plan(inputs, ablation, "own")
    ablate_checkpoint(src, path, tmp_path / "out", plan, progress=False, log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    encoded = encode_prompts(tokenizer, HARMFUL + HARMLESS, Template(), "prompt")
    pad = pad_token_id(tokenizer)
    edit = PlanEdit(plan, load_directions(path), GLM4_MOE, storage_dtypes(build_inventory(src)))

    def logprobs(model_dir: Path, edits) -> list[torch.Tensor]:
        forward = StreamedForward(model_dir, "float32", "cpu")
        return [lp for _, _, lp in forward.first_token_logprobs({"p": encoded}, edits, 8, pad)]

    unedited, hooked = logprobs(src, [None, edit])
    (edited,) = logprobs(tmp_path / "out", [None])
    config = json.loads((src / "config.json").read_text())
    longest = max(len(ids) for ids in encoded)
    rtol = logits_rtol(config["num_hidden_layers"], accumulation_length(config, longest), 4)
    # |logits| of the edited model, from one in-memory pass over the same prompts (every token's: a bound
    # for the first-token positions)
    model, _ = load_model(tmp_path / "out")
    with torch.inference_mode():
        norms = [float(model(input_ids=torch.tensor([ids])).logits.norm(dim=-1).max()) for ids in encoded]
    atol = 2 * rtol * max(norms)
    torch.testing.assert_close(hooked, edited, rtol=0, atol=atol)
    assert (unedited - edited).abs().max() > 10 * atol


def test_run_with_a_categories_rank_the_prompts_cannot_give_is_one_line_before_any_work(capsys, tmp_path):
    """`run --rank 2 --subspace categories` on prompts without categories fails with the cheap checks,
    before a server starts or anything is measured; the two-category prompt files pass the check."""
    out = tmp_path / "out"
    argv = ("run", DEMO_MODEL_DIR, "--out", out, "--rank", "2", "--subspace", "categories")
    assert_error(cli(capsys, *argv), "run", "carry 0 categories", "--subspace pca or clusters")
    assert not out.exists()
    files = {kind: str(DATA_DIR / "two_category" / f"{kind}_train.jsonl") for kind in ("harmful", "harmless")}
    prompts = PromptSets.load(str(TWO_CATEGORY_MODEL_DIR), Prompts(**files))
    check_subspace(Ablation(rank=2, subspace="categories"), prompts)
    with pytest.raises(AbliterateError, match="carry 2 categories"):
        check_subspace(Ablation(rank=3, subspace="categories"), prompts)
