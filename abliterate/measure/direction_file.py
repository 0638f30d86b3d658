"""The directions file: `directions.safetensors`, the contract between measurement and ablation.

Tensors (float32): `direction` [P, H] (P = L+1 residual positions, or [H] for one direction
for all layers), and, when measured by us, `harmful_mean` and `harmless_mean` [P, H].
Optional subspaces: `subspace.<method>` [P, K, H] (method one of `vocabulary.SUBSPACE_METHODS`): at
each position K orthonormal rows, row 0 the unit `direction` there (rank 1 is the direction itself);
a position whose direction is zero holds zero rows. Metadata `subspace`: {method: {"rank": K,
"provenance": how they were found, ...}}.
Metadata: safetensors allows only str -> str, so every value is JSON-encoded.
A hand-written file holding only `direction` is accepted (then only the hidden size can be
checked against a model).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from abliterate.errors import AbliterateError
from abliterate.paths import file_identity, input_file, write_bytes_atomic
from abliterate.vocabulary import SUBSPACE_METHODS
from abliterate.weights.checkpoint import file_sha256


@dataclass
class Directions:
    direction: torch.Tensor  # [P, H] float32; one row per residual position
    harmful_mean: torch.Tensor | None = None
    harmless_mean: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    single: bool = False  # the file held one [H] direction meant for every layer
    subspaces: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> [P, K, H] float32

    @property
    def hidden_size(self) -> int:
        return int(self.direction.shape[1])

    @property
    def num_positions(self) -> int:
        return int(self.direction.shape[0])

    @property
    def selected_position(self) -> int | None:
        value = self.metadata.get("selected_position")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AbliterateError(
                f"{self._where()} records selected_position {value!r}, not a residual position number: "
                "fix the file's metadata or pass an explicit direction position"
            )
        return value

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.get("fingerprint")

    def _position(self, position: int | float | None) -> int | float:
        """The row a position names: 0 in a single-direction file, the selected position for None."""
        if self.single:
            return 0
        if position is None:
            position = self.selected_position
            if position is None:
                raise AbliterateError(
                    f"{self._where()} records no selected position: pass an explicit direction position"
                )
        return position

    def vector(self, position: int | None = None) -> torch.Tensor:
        """Unit direction (float32, [H]) at a residual position (a fraction: between two, `_between`); the
        only row of a single-direction file."""
        position = self._position(position)
        if not 0 <= position <= self.num_positions - 1:
            raise AbliterateError(
                f"direction position {position} is out of range: {self._where()} holds positions "
                f"0..{self.num_positions - 1}"
            )
        if not float(position).is_integer():
            return self._between(float(position))
        position = int(position)
        # In float64: a float32 norm of large entries overflows to inf, and row / inf would be a zero
        # vector that edits nothing while the run reports success.
        row = self.direction[position].double()
        norm = float(row.norm())
        if norm == 0.0:
            raise AbliterateError(
                f"the direction at position {position} in {self._where()} is a zero vector: "
                "choose another position or re-measure"
            )
        if not math.isfinite(norm):
            raise AbliterateError(
                f"the direction at position {position} in {self._where()} has norm {norm}: re-measure"
            )
        return (row / norm).float()

    def basis(self, position: int | float | None, rank: int, method: str) -> torch.Tensor:
        """[rank, H] float32, orthonormal rows: the first `rank` directions of the `method` subspace at
        a residual position (row 0 the unit direction). Rank 1 is `vector(position)[None]` whatever the
        method, so a rank-1 edit is the single-direction edit."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise AbliterateError(
                f"rank {rank!r} is invalid: give the number of directions to remove, 1 or more"
            )
        if rank == 1:
            return self.vector(position)[None]
        held = self.subspaces.get(method)
        if held is None or rank > held.shape[1]:
            holds = ", ".join(f"{m} rank {int(q.shape[1])}" for m, q in sorted(self.subspaces.items()))
            raise AbliterateError(
                f"rank {rank} needs {rank} `{method}` directions per position, but {self._where()} holds "
                f"{holds or 'one direction per position (no subspace)'}: measure more with "
                f"`abliterate measure --subspace-rank {rank}`, or choose --rank and --subspace within what it holds"
            )
        position = self._position(position)
        if not float(position).is_integer():
            raise AbliterateError(
                f"direction position {position} lies between two positions: a subspace (rank {rank}) is "
                "measured at whole positions only; give a whole position or rank 1"
            )
        self.vector(position)  # the range, and a zero direction, are checked as for one direction
        return held[int(position), :rank].contiguous()

    def _between(self, position: float) -> torch.Tensor:
        """The unit direction at a fraction between two positions p < position < p + 1: the unit rows
        mixed, normalize((p + 1 - position) r_p + (position - p) r_{p+1}), in float64. A zero row
        contributes nothing (the other one is used)."""
        low = math.floor(position)
        weight = position - low
        mixed = torch.zeros(self.hidden_size, dtype=torch.float64)
        for row, share in ((low, 1.0 - weight), (low + 1, weight)):
            vector = self.direction[row].double()
            norm = float(vector.norm())
            if not math.isfinite(norm):
                raise AbliterateError(
                    f"the direction at position {row} in {self._where()} has norm {norm}: re-measure"
                )
            if norm > 0:
                mixed += share * vector / norm
        norm = float(mixed.norm())
        if not norm > 1e-6:
            raise AbliterateError(
                f"there is no direction at position {position} in {self._where()}: positions {low} and {low + 1} "
                "are zero or opposite: choose another position"
            )
        return (mixed / norm).float()

    def sha256(self) -> str:
        if self.path is None:
            raise ValueError("directions not read from a file have no file hash")
        return _file_sha256(self.path, file_identity(self.path))

    def _where(self) -> str:
        return str(self.path) if self.path else "the directions"


def save_directions(
    path: str | Path,
    direction: torch.Tensor,
    metadata: dict[str, Any],
    harmful_mean: torch.Tensor | None = None,
    harmless_mean: torch.Tensor | None = None,
    subspaces: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write atomically (temp name, then rename) so a crash never leaves a half-written file.

    `subspaces`: method -> [P, K, H] orthonormal rows (checked as the reader checks them); their
    metadata `subspace` entry gets each method's rank (its provenance is the caller's to give)."""
    path = Path(path)
    tensors = {"direction": direction.detach().float().contiguous()}
    if harmful_mean is not None:
        tensors["harmful_mean"] = harmful_mean.detach().float().contiguous()
    if harmless_mean is not None:
        tensors["harmless_mean"] = harmless_mean.detach().float().contiguous()
    if subspaces:
        rows = tensors["direction"] if tensors["direction"].dim() == 2 else tensors["direction"][None]
        info = dict(metadata.get("subspace") or {})
        for method, basis in sorted(subspaces.items()):
            basis = basis.detach().float().contiguous()
            _check_subspace(method, basis, rows, str(path))
            tensors[f"subspace.{method}"] = basis
            info[method] = {**info.get(method, {}), "rank": int(basis.shape[1])}
        metadata = {**metadata, "subspace": info}
    _check_subspace_metadata(metadata, {m: int(q.shape[1]) for m, q in (subspaces or {}).items()}, str(path))
    encoded = {key: json.dumps(value, sort_keys=True) for key, value in metadata.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, _serialize(tensors, encoded))


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on its contents: metadata and tensors in sorted
    order (safetensors' own writer emits the metadata in hash order, different on every run)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    data, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        raw = tensor.numpy().astype("<f4", copy=False).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(data)


def load_directions(path: str | Path, hidden_size: int | None = None) -> Directions:
    """The checked contents of a directions file, read once per process (a rewritten file is read again)."""
    path = input_file(path, "directions file", "run `abliterate measure` first")
    directions = _read_directions(path, file_identity(path))
    if hidden_size is not None and directions.hidden_size != hidden_size:
        raise AbliterateError(
            f"{path} has directions of size {directions.hidden_size} but the model's hidden size is {hidden_size}: "
            "this directions file was measured on another model"
        )
    return directions


@lru_cache(maxsize=8)
def _file_sha256(path: Path, _identity: tuple | None) -> str:
    return file_sha256(path)


@lru_cache(maxsize=8)
def _read_directions(path: Path, _identity: tuple | None) -> Directions:
    """Keyed by the file's identity (`paths.file_identity`), so callers along one run share one read; never mutate the result."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            raw_meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in names}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise AbliterateError(f"{path} is not a readable safetensors file ({exc})") from exc
    if "direction" not in tensors:
        raise AbliterateError(
            f"{path} holds no `direction` tensor (found: {sorted(names) or 'nothing'}); "
            "a directions file needs a float `direction` tensor of shape [positions, hidden] or [hidden]"
        )
    direction = tensors["direction"]
    if not direction.is_floating_point():
        raise AbliterateError(f"`direction` in {path} has dtype {direction.dtype}; it must be floating point")
    single = direction.dim() == 1
    if single:
        direction = direction.unsqueeze(0)
    if direction.dim() != 2:
        raise AbliterateError(
            f"`direction` in {path} has shape {list(tensors['direction'].shape)}; expected [positions, hidden] or [hidden]"
        )
    direction = direction.float()
    if not torch.isfinite(direction).all():
        bad = sorted({int(i) for i in (~torch.isfinite(direction)).nonzero()[:, 0]})
        raise AbliterateError(f"`direction` in {path} holds NaN or Inf at positions {bad}: re-measure")
    metadata = {key: _decode(raw_meta[key]) for key in sorted(raw_meta)}  # safetensors returns hash order
    means = {}
    for name in ("harmful_mean", "harmless_mean"):
        if name in tensors:
            if not tensors[name].is_floating_point():
                raise AbliterateError(
                    f"`{name}` in {path} has dtype {tensors[name].dtype}; it must be floating point"
                )
            means[name] = tensors[name].float()
            if means[name].shape != direction.shape:
                raise AbliterateError(
                    f"`{name}` in {path} has shape {list(means[name].shape)}, `direction` {list(direction.shape)}: they must match"
                )
            if not torch.isfinite(means[name]).all():
                bad = sorted({int(i) for i in (~torch.isfinite(means[name])).nonzero()[:, 0]})
                raise AbliterateError(f"`{name}` in {path} holds NaN or Inf at positions {bad}: re-measure")
    subspaces = {}
    for name in sorted(names):
        if name.startswith("subspace."):
            method = name.removeprefix("subspace.")
            subspaces[method] = _check_subspace(method, tensors[name], direction, str(path))
    _check_subspace_metadata(metadata, {m: int(q.shape[1]) for m, q in subspaces.items()}, str(path))
    return Directions(
        direction=direction, metadata=metadata, path=path, single=single, subspaces=subspaces, **means
    )


# Stored subspace rows, orthonormalised in float64 and rounded to float32 (unit roundoff u = 2^-24
# per element): a Gram entry moves by at most 2u + u^2 from the identity (|q . delta| <= u |q|^2;
# computed here in float64); row 0 lies within 3u per element of the unit `direction` normalised
# here (the row's rounding, and the direction's own rounding before normalising, u each plus its
# norm's u). Twice each, as headroom.
ORTHONORMAL_TOLERANCE = 2 * (2 * 2.0**-24 + 2.0**-48)
ROW0_TOLERANCE = 2 * 3 * 2.0**-24


def _check_subspace(method: str, basis: torch.Tensor, direction: torch.Tensor, where: str) -> torch.Tensor:
    """A `subspace.<method>` tensor checked against `direction` [P, H]: [P, K, H], finite, at each
    position K orthonormal rows with row 0 the unit direction (or all zero where the direction is zero).
    Returns it in float32."""
    name = f"`subspace.{method}` in {where}"
    if method not in SUBSPACE_METHODS:
        raise AbliterateError(
            f"{where} holds a subspace of unknown method {method!r}: known methods are {', '.join(SUBSPACE_METHODS)}"
        )
    if not basis.is_floating_point():
        raise AbliterateError(f"{name} has dtype {basis.dtype}; it must be floating point")
    positions, hidden = direction.shape
    if basis.dim() != 3 or basis.shape[0] != positions or basis.shape[2] != hidden or basis.shape[1] < 1:
        raise AbliterateError(
            f"{name} has shape {list(basis.shape)}; expected [{positions}, K, {hidden}] "
            "(positions, directions kept, hidden) like `direction`"
        )
    basis = basis.float()
    if not torch.isfinite(basis).all():
        bad = sorted({int(i) for i in (~torch.isfinite(basis)).nonzero()[:, 0]})
        raise AbliterateError(f"{name} holds NaN or Inf at positions {bad}: re-measure")
    q = basis.double()
    rank = q.shape[1]
    gram = q @ q.transpose(1, 2)
    eye = torch.eye(rank, dtype=torch.float64)
    norms = direction.double().norm(dim=1)
    for position in range(positions):
        if float(norms[position]) == 0.0 and not bool(q[position].any()):
            continue  # nothing measured where the direction is zero
        off = float((gram[position] - eye).abs().max())
        if off > ORTHONORMAL_TOLERANCE:
            raise AbliterateError(
                f"{name}: the {rank} rows at position {position} are not orthonormal (Gram matrix off the "
                f"identity by {off:.3g}, tolerance {ORTHONORMAL_TOLERANCE:.3g}): re-measure"
            )
        unit = direction[position].double() / norms[position]
        apart = float((q[position, 0] - unit).abs().max()) if float(norms[position]) > 0 else math.inf
        if apart > ROW0_TOLERANCE:
            raise AbliterateError(
                f"{name}: row 0 at position {position} is not the unit `direction` there (apart by {apart:.3g}): "
                "re-measure"
            )
    return basis


def _check_subspace_metadata(metadata: dict[str, Any], ranks: dict[str, int], where: str) -> None:
    """The metadata's `subspace` entry names exactly the subspaces held, each with its rank."""
    info = metadata.get("subspace")
    if info is None and not ranks:
        return
    if not isinstance(info, dict) or set(info) != set(ranks):
        raise AbliterateError(
            f"{where}: metadata `subspace` ({info!r}) does not describe the subspaces held "
            f"({sorted(ranks) or 'none'}): re-measure"
        )
    for method, entry in info.items():
        if not isinstance(entry, dict) or entry.get("rank") != ranks[method]:
            raise AbliterateError(
                f"{where}: metadata `subspace.{method}` ({entry!r}) gives no rank {ranks[method]}, the rank held: "
                "re-measure"
            )


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # a hand-written file may hold plain strings
