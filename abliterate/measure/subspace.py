"""What a refusal subspace needs at each residual position, and its orthonormal bases.

A difference of means is one direction; a model may refuse along several. At each position the
measurement keeps, besides the means, up to `config.Measurement.subspace_rank` candidate directions
per method of `vocabulary.SUBSPACE_METHODS`, found from the harmful prompts' activations x_j at the
measured token (h = the harmless mean there):

- `pca`: the principal components of the differences d_j = x_j - h after the mean direction
  u = normalize(mean_j d_j) is projected out (d_j - (d_j . u) u, whose mean is then zero: centred);
- `clusters`: k-means (k = the rank; k-means++ seeded with `KMEANS_SEED`, Lloyd's iterations until no
  prompt changes cluster) of the x_j; each cluster's mean minus h, the largest cluster first;
- `categories`: each category's mean minus h, the largest category first, when the harmful prompts
  carry a `category` (`abliterate.measure.prompts`).

`orthonormal_bases` turns them into the directions file's [P, K, H] bases: row 0 the unit direction
(whatever the direction method made of the means; `projected` also takes the harmless mean's
component out of every candidate), then each candidate's part orthogonal to the rows
before it (Gram-Schmidt twice, float64), a candidate already in their span skipped. Per-prompt
activations are kept for one position at a time by the layer-streamed measurement (the bases of a
position are found as soon as its layer has seen every prompt), for every position by the in-memory
one (one token per prompt and position, as its statistics). Rows are put in prompt order first, so
both give the same candidates to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from abliterate import config
from abliterate.errors import AbliterateError
from abliterate.measure.prompts import describe_prompt
from abliterate.vocabulary import SUBSPACE_METHODS

KMEANS_SEED = 0
KMEANS_MAX_ITERATIONS = 300
# A candidate whose part orthogonal to the rows before it is below this share of its own norm adds
# no direction: float64 residue of a vector in their span (float32 activations: 1e-7 relative at most).
INDEPENDENT = 1e-6


def prompt_categories(prompts: Sequence[str]) -> list[str] | None:
    """Each harmful prompt's category, or None when no prompt has one; a set where only some have one
    is refused (a mean over part of a set would be mistaken for the category's)."""
    categories = [getattr(p, "category", None) for p in prompts]
    missing = [p for p, c in zip(prompts, categories, strict=True) if c is None]
    if len(missing) == len(categories):
        return None
    if missing:
        raise AbliterateError(
            f"{len(missing)} of {len(categories)} harmful prompts have no category "
            f"(the first: {describe_prompt(missing[0], repr(str(missing[0])[:60]))}): give every prompt a "
            "`category` or none"
        )
    return categories  # type: ignore[return-value]


def kmeans(x: torch.Tensor, k: int, seed: int = KMEANS_SEED) -> torch.Tensor:
    """Cluster label [N] of each row of x [N, H] (float64): k-means++ seeding from a generator seeded
    with `seed`, then Lloyd's iterations until no row changes cluster. Deterministic for equal input;
    an emptied cluster keeps its centre."""
    n = x.shape[0]
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(n, (1,), generator=generator))]]
    nearest = ((x - centres[0]) ** 2).sum(-1)
    while len(centres) < k and float(nearest.sum()) > 0:
        pick = int(torch.multinomial(nearest / nearest.sum(), 1, generator=generator))
        centres.append(x[pick])
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(-1))
    centre = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(KMEANS_MAX_ITERATIONS):
        distance = torch.stack(
            [((x - c) ** 2).sum(-1) for c in centre], dim=1
        )  # [N, k], one centre at a time
        new = distance.argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(len(centre)):
            members = labels == c
            if members.any():
                centre[c] = x[members].mean(0)
    return labels


def _by_size(groups: dict[Any, torch.Tensor], x: torch.Tensor) -> list[tuple[Any, int, torch.Tensor]]:
    """(key, size, mean) of each non-empty group of rows (boolean masks), the largest first, then by key."""
    out = [(key, int(mask.sum()), x[mask].mean(0)) for key, mask in groups.items() if mask.any()]
    return sorted(out, key=lambda item: (-item[1], str(item[0])))


def _unit_sign(v: torch.Tensor) -> torch.Tensor:
    """A principal component's sign fixed: its entry of largest magnitude positive (first such entry)."""
    return v if float(v[int(v.abs().argmax())]) >= 0 else -v


def position_candidates(
    rows: torch.Tensor, harmless_mean: torch.Tensor, categories: Sequence[str] | None, rank: int
) -> dict[str, torch.Tensor]:
    """Candidate directions [M, H] (float64) per method at one position: `rows` [N, H] the harmful
    prompts' activations in prompt order, `harmless_mean` [H]. Categories only when given."""
    x = rows.to(torch.float64)
    h = harmless_mean.to(torch.float64)
    d = x - h
    mean = d.mean(0)
    norm = float(mean.norm())
    projected = d - (d @ (mean / norm)).unsqueeze(1) * (mean / norm) if norm > 0 else d
    out: dict[str, torch.Tensor] = {}
    _, values, vt = torch.linalg.svd(projected, full_matrices=False)
    # A component under INDEPENDENT of the differences' size is rounding, not a direction (fewer
    # prompts than the rank leave such components).
    floor = INDEPENDENT * float(d.norm())
    kept = [_unit_sign(vt[i]) for i in range(min(rank, len(values))) if float(values[i]) > floor]
    out["pca"] = torch.stack(kept) if kept else torch.zeros(0, x.shape[1], dtype=torch.float64)
    labels = kmeans(x, rank)
    clusters = _by_size({c: labels == c for c in range(int(labels.max()) + 1)}, x)
    out["clusters"] = torch.stack([centre - h for _, _, centre in clusters])
    if categories is not None:
        names = sorted(set(categories))
        groups = {name: torch.tensor([c == name for c in categories]) for name in names}
        out["categories"] = torch.stack([m - h for _, _, m in _by_size(groups, x)])
    return out


def category_counts(categories: Sequence[str]) -> dict[str, int]:
    """Prompts per category, the largest first (the order of the categories' candidates)."""
    counts: dict[str, int] = {}
    for c in categories:
        counts[c] = counts.get(c, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def subspace_collector(
    measurement: config.Measurement, harmful: Sequence[str], num_positions: int, hidden_size: int
) -> SubspaceCollector | None:
    """The collector of a measurement that keeps subspaces (`subspace_rank` above 1), else None."""
    if measurement.subspace_rank < 2:
        return None
    return SubspaceCollector(
        num_positions, hidden_size, measurement.subspace_rank, prompt_categories(harmful)
    )


class SubspaceCollector:
    """Harmful activations per position (in prompt order) until a position's candidates are found.

    `add(position, rows, indices)`: rows [B, H] of the prompts numbered `indices`; `finish(position,
    harmless_mean)`: the candidates of that position, its rows then freed."""

    def __init__(self, num_positions: int, hidden_size: int, rank: int, categories: Sequence[str] | None):
        self.rank = rank
        self.categories = categories
        self.hidden_size = hidden_size
        self.rows: dict[int, list[tuple[list[int], torch.Tensor]]] = {}
        self.candidates: dict[str, list[torch.Tensor | None]] = {
            m: [None] * num_positions for m in SUBSPACE_METHODS if m != "categories" or categories is not None
        }

    def add(self, position: int, rows: torch.Tensor, indices: Sequence[int]) -> None:
        self.rows.setdefault(position, []).append((list(indices), rows.detach().to("cpu", torch.float32)))

    def finish(self, position: int, harmless_mean: torch.Tensor) -> None:
        parts = self.rows.pop(position)
        indices = [i for ids, _ in parts for i in ids]
        rows = torch.cat([r for _, r in parts])[torch.tensor(indices).argsort()]
        for method, found in position_candidates(rows, harmless_mean, self.categories, self.rank).items():
            self.candidates[method][position] = found

    def result(self) -> dict[str, list[torch.Tensor]]:
        """Per method, each position's candidates [M, H] (float64)."""
        missing = [p for p, c in enumerate(next(iter(self.candidates.values()))) if c is None]
        if missing:
            raise AbliterateError(f"subspace candidates were not found at residual positions {missing}")
        return {m: list(c) for m, c in self.candidates.items()}  # type: ignore[misc]

    def attach(self, measurement: Any) -> None:
        """Put the candidates and their provenance into a finished `Measurement`."""
        measurement.subspace = self.result()
        measurement.subspace_provenance = self.provenance(measurement.harmful.count)

    def provenance(self, count: int) -> dict[str, dict[str, Any]]:
        """One line per method saying how its directions were found (and the categories' counts)."""
        after = "orthonormalised after row 0 (the unit direction), Gram-Schmidt in float64"
        out = {
            "pca": {
                "provenance": f"principal components of the {count} per-prompt differences (harmful activation "
                f"minus the harmless mean) with the mean direction projected out, {after}"
            },
            "clusters": {
                "provenance": f"k-means (k={self.rank}, k-means++ seed {KMEANS_SEED}, Lloyd to convergence) of the "
                f"{count} harmful activations; each cluster's mean minus the harmless mean, largest first, {after}"
            },
        }
        if self.categories is not None:
            counts = category_counts(self.categories)
            out["categories"] = {
                "provenance": f"per-category means of the harmful prompts minus the harmless mean "
                f"({', '.join(f'{c}: {n}' for c, n in counts.items())}), largest first, {after}",
                "categories": counts,
            }
        return out


def orthonormal_rows(first: torch.Tensor, candidates: torch.Tensor, rank: int) -> torch.Tensor:
    """[r, H] float64, r <= rank: `first` (a unit row) then each candidate's part orthogonal to the
    rows before it, normalised (classical Gram-Schmidt applied twice); a candidate within
    `INDEPENDENT` of their span adds nothing."""
    rows = [first.to(torch.float64)]
    for candidate in candidates.to(torch.float64):
        if len(rows) == rank:
            break
        size = float(candidate.norm())
        if size == 0:
            continue
        v = candidate
        for _ in range(2):
            q = torch.stack(rows)
            v = v - (q @ v) @ q
        if float(v.norm()) > INDEPENDENT * size:
            rows.append(v / v.norm())
    return torch.stack(rows)


def orthonormal_bases(
    direction: torch.Tensor,
    candidates: dict[str, list[torch.Tensor]],
    rank: int,
    orthogonal_to: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Per method, the [P, K, H] bases (float64) with row 0 = `direction` [P, H] (unit or zero rows)
    and the directions found at each position. `orthogonal_to` [P, H] (unit or zero rows): a direction
    every candidate loses its component along first, as the `projected` direction method does with the
    harmless mean (else the span of the category means, which holds the plain mean difference, would
    add the harmless mean's own direction back as a row). K is the fewest found at a position with a direction
    (every stored row is a real direction); a zero direction gives zero rows; a method with K = 1
    keeps nothing beyond the direction and is left out."""
    bases: dict[str, torch.Tensor] = {}
    found: dict[str, list[int]] = {}
    defined = [p for p in range(direction.shape[0]) if float(direction[p].norm()) > 0]
    for method, per_position in candidates.items():
        rows = {}
        for p in defined:
            found_here = per_position[p]
            if orthogonal_to is not None:
                found_here = found_here - (found_here @ orthogonal_to[p]).unsqueeze(1) * orthogonal_to[p]
            rows[p] = orthonormal_rows(direction[p], found_here, rank)
        counts = [len(rows[p]) if p in rows else 0 for p in range(direction.shape[0])]
        k = min((counts[p] for p in defined), default=1)
        if k < 2:
            continue
        basis = torch.zeros(direction.shape[0], k, direction.shape[1], dtype=torch.float64)
        for p, r in rows.items():
            basis[p] = r[:k]
        bases[method], found[method] = basis, counts
    return bases, found
