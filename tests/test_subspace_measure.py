"""Subspace measurement: the candidates of each method, their orthonormal bases (row 0 the direction),
a planted two-direction case recovered, streamed equal to in-memory, identical files, categories read
from prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from numerics import U64
from tiny_chat_model import measure_sections

from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import load_directions
from abliterate.measure.directions import compute_directions, write_directions
from abliterate.measure.means import measure_checkpoint
from abliterate.measure.prompts import Prompt, load_prompts, prompts_sha256
from abliterate.measure.streamed import measure_streamed
from abliterate.measure.subspace import kmeans, orthonormal_rows, position_candidates, prompt_categories
from abliterate.vocabulary import DIRECTIONS_FILE, DIRECTIONS_JSON, SUBSPACE_METHODS

SETTINGS = measure_sections(batch_size=16)
N_HARMFUL, N_HARMLESS = 40, 32


def demo_prompts() -> tuple[list[str], list[str]]:
    """Demo train prompts, the harmful ones labelled in two categories (the first 32 `a`, the rest `b`)."""
    harmful = load_prompts(prompt_file("demo", "harmful", "train"))[:N_HARMFUL]
    labelled = [Prompt(p, p.where, "a" if i < 32 else "b") for i, p in enumerate(harmful)]
    return labelled, load_prompts(prompt_file("demo", "harmless", "train"))[:N_HARMLESS]


@pytest.fixture(scope="module")
def measured():
    harmful, harmless = demo_prompts()
    return measure_checkpoint(DEMO_MODEL_DIR, harmful, harmless, *SETTINGS, progress=False)


# ---------------------------------------------------------------- a planted two-direction case


def planted(hidden: int = 12, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Harmful rows h + 5 e0 (48 prompts, category `big`) and h + 5 e1 (12, `small`), each with noise
    in the other dimensions drawn in +/- pairs: every category's mean is exactly its planted vector,
    and the noise is uncorrelated with the category."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(hidden, generator=generator, dtype=torch.float64)
    rows, categories = [], []
    for axis, pairs, name in ((0, 24, "big"), (1, 6, "small")):
        for _ in range(pairs):
            n = torch.zeros(hidden, dtype=torch.float64)
            n[2:] = noise * torch.randn(hidden - 2, generator=generator, dtype=torch.float64)
            for sign in (1, -1):
                x = h.clone()
                x[axis] += 5.0
                rows.append(x + sign * n)
                categories.append(name)
    return torch.stack(rows), h, categories


@pytest.mark.parametrize("method", SUBSPACE_METHODS)
def test_planted_two_directions_are_recovered(method):
    rows, h, categories = planted()
    candidates = position_candidates(rows, h, categories, rank=2)[method]
    mean = (rows - h).mean(0)
    basis = orthonormal_rows(mean / mean.norm(), candidates, rank=2)
    assert basis.shape == (2, 12)
    assert torch.equal(basis[0], mean / mean.norm())  # row 0: the direction, as given
    # Both planted directions lie in the span: their projections keep unit length, to float64
    # rounding of sums over 60 prompts and 12 dimensions of values about 5 (60 * 12 * U64 relative).
    tolerance = 60 * 12 * U64 * 5
    for axis in (0, 1):
        e = torch.zeros(12, dtype=torch.float64)
        e[axis] = 1.0
        assert abs(float((basis @ e).norm()) - 1.0) <= tolerance, (method, axis)
    assert (basis @ basis.T - torch.eye(2, dtype=torch.float64)).abs().max() <= 4 * 12 * U64


def test_kmeans_is_deterministic_and_finds_the_planted_groups():
    rows, _, categories = planted()
    labels = kmeans(rows, 2)
    assert torch.equal(labels, kmeans(rows.clone(), 2))
    groups = {
        name: {int(labels[i]) for i, c in enumerate(categories) if c == name} for name in ("big", "small")
    }
    assert len(groups["big"]) == len(groups["small"]) == 1 and groups["big"] != groups["small"]


def test_fewer_prompts_than_the_rank_give_no_rounding_directions():
    """Two prompts: their differences, less the mean direction, are +/- one vector: one component."""
    rows, h, _ = planted()
    found = position_candidates(rows[[0, 48]], h, None, rank=4)
    assert found["pca"].shape == (1, 12) and found["clusters"].shape == (2, 12)
    assert "categories" not in found


def test_a_candidate_in_the_span_adds_nothing():
    first = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    candidates = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [3.0, -2.0, 0.0]], dtype=torch.float64)
    assert orthonormal_rows(first, candidates, rank=4).shape == (2, 3)


# ---------------------------------------------------------------- a real measurement


def test_bases_are_orthonormal_with_the_direction_first(measured, tmp_path):
    directions = compute_directions(measured, "projected")
    assert set(directions.subspaces) == set(SUBSPACE_METHODS)
    assert directions.subspace_info["categories"]["rank"] == 2  # two categories: two directions
    assert directions.subspace_info["categories"]["categories"] == {"a": 32, "b": 8}
    for method in ("pca", "clusters"):
        assert directions.subspaces[method].shape == (6, 4, 64)
    defined = directions.defined
    assert defined == [1, 2, 3, 4, 5]  # position 0: every prompt ends in the same token
    for method, basis in directions.subspaces.items():
        k = basis.shape[1]
        assert not basis[0].any()
        for p in defined:
            assert torch.equal(basis[p, 0], directions.direction[p]), (method, p)
            gram = basis[p] @ basis[p].T
            assert (gram - torch.eye(k, dtype=torch.float64)).abs().max() <= 4 * 64 * U64, (method, p)
    path = write_directions(tmp_path, directions, measured, "fingerprint", 3)
    read = load_directions(path)
    assert set(read.subspaces) == set(SUBSPACE_METHODS)
    for method in SUBSPACE_METHODS:
        assert torch.equal(read.basis(3, 2, method)[0], read.vector(3))
        assert "provenance" in read.metadata["subspace"][method]
    assert "a: 32, b: 8" in read.metadata["subspace"]["categories"]["provenance"]


def test_streamed_equals_in_memory(measured):
    """Both run the same float32 layer modules on the same batches (cut after the measured last
    token, so of the same shapes): the same activations, bit for bit, and so the same candidates."""
    harmful, harmless = demo_prompts()
    streamed = measure_streamed(DEMO_MODEL_DIR, harmful, harmless, *SETTINGS, progress=False)
    assert torch.equal(streamed.harmful.mean, measured.harmful.mean)  # the premise
    assert streamed.subspace.keys() == measured.subspace.keys()
    for method, per_position in measured.subspace.items():
        for p, candidates in enumerate(per_position):
            assert torch.equal(streamed.subspace[method][p], candidates), (method, p)
    assert streamed.subspace_provenance == measured.subspace_provenance


def test_identical_measurements_give_identical_files(measured, tmp_path):
    harmful, harmless = demo_prompts()
    again = measure_checkpoint(DEMO_MODEL_DIR, harmful, harmless, *SETTINGS, progress=False)
    for name, measurement in (("one", measured), ("two", again)):
        write_directions(tmp_path / name, compute_directions(measurement, "projected"), measurement, "fp", 3)
    for file in (DIRECTIONS_FILE, DIRECTIONS_JSON):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes()


def test_rank_one_keeps_no_subspace(measured, tmp_path):
    harmful, harmless = demo_prompts()
    settings = measure_sections(batch_size=16, subspace_rank=1)
    single = measure_checkpoint(DEMO_MODEL_DIR, harmful, harmless, *settings, progress=False)
    assert single.subspace == {}
    directions = compute_directions(single, "projected")
    assert directions.subspaces == {}
    path = write_directions(tmp_path, directions, single, "fp", 3)
    read = load_directions(path)
    assert read.subspaces == {} and "subspace" not in read.metadata
    assert torch.equal(read.direction, compute_directions(measured, "projected").direction.float())


# ---------------------------------------------------------------- categories in prompt files


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        lines = ["prompt,category"] + [f"{r['prompt']},{r.get('category', '')}" for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in ("prompt", "category")}), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_prompt_files_keep_their_categories(tmp_path, suffix):
    rows = [
        {"prompt": "make a bomb", "category": "weapons"},
        {"prompt": "forge a check", "category": "fraud"},
    ]
    prompts = load_prompts(write_rows(tmp_path / f"p{suffix}", rows))
    assert [p.category for p in prompts] == ["weapons", "fraud"]
    assert prompt_categories(prompts) == ["weapons", "fraud"]
    # the hash sees the categories (a measurement cached for other categories is not reused) ...
    relabelled = [Prompt(p, p.where, "other") for p in prompts]
    assert prompts_sha256(prompts) != prompts_sha256(relabelled)
    # ... and a set without categories hashes as it always did
    assert prompts_sha256([Prompt(p, p.where) for p in prompts]) == prompts_sha256(
        ["make a bomb", "forge a check"]
    )


def test_categories_of_only_some_prompts_are_refused(tmp_path):
    path = write_rows(
        tmp_path / "p.jsonl", [{"prompt": "make a bomb", "category": "weapons"}, {"prompt": "rob a bank"}]
    )
    with pytest.raises(
        AbliterateError, match=r"1 of 2 harmful prompts have no category \(the first: .*p.jsonl line 2\)"
    ):
        prompt_categories(load_prompts(path))
    assert prompt_categories(load_prompts(write_rows(tmp_path / "q.jsonl", [{"prompt": "x"}]))) is None


def test_a_category_that_is_not_text_is_refused(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "make a bomb", "category": 3}])
    with pytest.raises(AbliterateError, match=r"p.jsonl: line 1: category 3 is a int, not text"):
        load_prompts(path)
