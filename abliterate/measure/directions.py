"""Refusal directions from measured means, their quality statistics, and the directions file.

`mean_diff`: r_i = normalize(mean_harmful_i - mean_harmless_i).
`projected` (the default): the same difference with its component along
normalize(mean_harmless_i) removed first, so ablating r_i leaves the harmless mean's own
direction untouched. On the demo model this matters: ablating a `mean_diff` direction at
any position changes harmless first-token distributions by KL 0.19-1.0 and makes the model
refuse harmless requests, while the `projected` ones stay under KL 0.08 and remove the
refusals (see tests/test_selection.py).

Statistics per residual position i:
- `mean_diff_norm`: |mean_harmful_i - mean_harmless_i| (how far apart the two sets are);
- `snr`: that norm over the pooled spread, sqrt((trace Var_harmful_i + trace Var_harmless_i) / 2):
  the mean difference in units of the typical distance of one prompt from its set's mean;
- `cos_prev`, `cos_next`: cosine of r_i with r_{i-1} and r_{i+1} (how stable the direction is);
- `cos_selected`: cosine of r_i with the selected direction.
A position whose two means coincide (e.g. position 0, when every prompt ends in the same
generation-prompt token, so the embeddings are equal) gets a zero direction and zero stats.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from abliterate import __version__
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import save_directions
from abliterate.measure.means import Measurement
from abliterate.measure.subspace import orthonormal_bases
from abliterate.paths import write_text_atomic
from abliterate.vocabulary import DIRECTION_METHODS, DIRECTIONS_FILE, DIRECTIONS_JSON

# Differences below this (relative to the means' size) are float noise, not a direction.
_ZERO_RELATIVE = 1e-9


@dataclass
class DirectionSet:
    direction: torch.Tensor  # [P, H] float64 unit rows (zero rows where undefined)
    harmful_mean: torch.Tensor  # [P, H] float64
    harmless_mean: torch.Tensor  # [P, H] float64
    method: str
    mean_diff_norm: torch.Tensor  # [P]
    snr: torch.Tensor  # [P]
    # method -> [P, K, H] float64 orthonormal rows, row 0 = `direction` (abliterate.measure.subspace)
    subspaces: dict[str, torch.Tensor] = field(default_factory=dict)
    # method -> {"rank", "provenance", "found": directions found at each position, ...}
    subspace_info: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def num_positions(self) -> int:
        return int(self.direction.shape[0])

    @property
    def defined(self) -> list[int]:
        """Positions with a non-zero direction."""
        return [i for i in range(self.num_positions) if float(self.direction[i].norm()) > 0]

    def cosines_with(self, position: int) -> torch.Tensor:
        """[P] cosine of every position's direction with the one at `position` (rows are unit or zero)."""
        return self.direction @ self.direction[position]

    def neighbour_cosines(self) -> tuple[list[float | None], list[float | None]]:
        """(cos with previous position, cos with next position); None where there is no neighbour."""
        pairs = (self.direction[1:] * self.direction[:-1]).sum(dim=-1).tolist()
        return [None, *pairs], [*pairs, None]

    def stats(self, selected_position: int | None = None) -> dict[str, list[float | None]]:
        """Per-position statistics as JSON-ready lists (index = residual position)."""
        cos_prev, cos_next = self.neighbour_cosines()
        out: dict[str, list[float | None]] = {
            "mean_diff_norm": self.mean_diff_norm.tolist(),
            "snr": self.snr.tolist(),
            "cos_prev": cos_prev,
            "cos_next": cos_next,
        }
        if selected_position is not None:
            out["cos_selected"] = self.cosines_with(selected_position).tolist()
        return out


def compute_directions(measurement: Measurement, method: str) -> DirectionSet:
    """Directions at every residual position by `method` (`config.Measurement.direction_method`)."""
    if method not in DIRECTION_METHODS:
        raise AbliterateError(
            f"unknown direction method {method!r}; choose one of {', '.join(DIRECTION_METHODS)}"
        )
    harmful = measurement.harmful.mean.to(torch.float64)
    harmless = measurement.harmless.mean.to(torch.float64)
    diff = harmful - harmless
    diff_norm = diff.norm(dim=-1)
    unit_harmless = None
    if method == "projected":
        unit_harmless = _normalize(harmless, harmless.norm(dim=-1))
        diff = diff - (diff * unit_harmless).sum(dim=-1, keepdim=True) * unit_harmless
    scale = torch.maximum(harmful.norm(dim=-1), harmless.norm(dim=-1))
    norm = diff.norm(dim=-1)
    norm = torch.where(norm > _ZERO_RELATIVE * scale, norm, torch.zeros_like(norm))
    spread = ((measurement.harmful.variance.sum(-1) + measurement.harmless.variance.sum(-1)) / 2).sqrt()
    diff_norm = torch.where(norm > 0, diff_norm, torch.zeros_like(diff_norm))
    snr = torch.where(spread > 0, diff_norm / spread.clamp(min=1e-300), torch.zeros_like(diff_norm))
    direction = _normalize(diff, norm)
    subspaces, found = orthonormal_bases(
        direction, measurement.subspace, measurement.settings.subspace_rank, unit_harmless
    )
    info = {}
    for m, q in subspaces.items():
        info[m] = {**measurement.subspace_provenance.get(m, {}), "rank": int(q.shape[1]), "found": found[m]}
        if unit_harmless is not None:  # said in the one line: the rows are not the plain candidates
            info[m]["provenance"] = (
                info[m].get("provenance", "")
                + "; each candidate's component along the harmless mean removed "
                "first, as the projected direction's"
            )
    return DirectionSet(
        direction=direction,
        harmful_mean=harmful,
        harmless_mean=harmless,
        method=method,
        mean_diff_norm=diff_norm,
        snr=snr,
        subspaces=subspaces,
        subspace_info=info,
    )


def _normalize(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Rows divided by their norm; rows of norm zero stay zero."""
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where((norm > 0).unsqueeze(-1), x / safe.unsqueeze(-1), torch.zeros_like(x))


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "safetensors", "abliterate"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # a source checkout that is not installed
            out[name] = __version__ if name == "abliterate" else "unknown"
    return out


def directions_metadata(
    directions: DirectionSet,
    measurement: Measurement,
    fingerprint: str,
    selected_position: int | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata recorded in directions.safetensors (every value JSON-encodable).

    `position` is the token position measured (counted from the end of the prompt);
    `selected_position` the residual position of the direction to ablate.
    """
    template = measurement.template
    meta: dict[str, Any] = {
        "fingerprint": fingerprint,
        "harmful_sha256": measurement.harmful.sha256,
        "harmless_sha256": measurement.harmless.sha256,
        "n_harmful": measurement.harmful.count,
        "n_harmless": measurement.harmless.count,
        "position": measurement.settings.token_position,
        "template": {
            "system_prompt": template.system_prompt,
            "chat_template_kwargs": template.chat_template_kwargs,
        },
        "method": directions.method,
        "versions": library_versions(),
        "selected_position": selected_position,
        "num_layers": measurement.num_layers,
        "hidden_size": measurement.hidden_size,
        "measure_settings": measurement.record(),
        "stats": directions.stats(selected_position),
    }
    if directions.subspace_info:
        meta["subspace"] = directions.subspace_info
    meta.update(extra or {})
    return meta


def write_directions(
    out_dir: str | Path,
    directions: DirectionSet,
    measurement: Measurement,
    fingerprint: str,
    selected_position: int | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write OUT_DIR/directions.safetensors (through the shared writer) and a readable
    OUT_DIR/directions.json with the same metadata (stats, and candidate scores when `extra`
    holds a selection); returns the safetensors path.
    """
    out_dir = Path(out_dir)
    metadata = directions_metadata(directions, measurement, fingerprint, selected_position, extra)
    path = save_directions(
        out_dir / DIRECTIONS_FILE,
        directions.direction.float(),
        metadata,
        harmful_mean=directions.harmful_mean.float(),
        harmless_mean=directions.harmless_mean.float(),
        subspaces={m: q.float() for m, q in directions.subspaces.items()},
    )
    write_text_atomic(out_dir / DIRECTIONS_JSON, json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return path
