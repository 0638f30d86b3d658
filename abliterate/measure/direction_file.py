"""The directions file: `directions.safetensors`, the contract between measurement and ablation.

Tensors (float32): `direction` [P, H] (P = L+1 residual positions, or [H] for one direction
for all layers), and, when measured by us, `harmful_mean` and `harmless_mean` [P, H].
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
from abliterate.paths import file_identity, write_bytes_atomic
from abliterate.weights.checkpoint import file_sha256


@dataclass
class Directions:
    direction: torch.Tensor  # [P, H] float32; one row per residual position
    harmful_mean: torch.Tensor | None = None
    harmless_mean: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    single: bool = False  # the file held one [H] direction meant for every layer

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
        if isinstance(value, bool) or not isinstance(value, int):
            raise AbliterateError(
                f"{self._where()} records selected_position {value!r}, not a residual position number: "
                "fix the file's metadata or pass an explicit direction position"
            )
        return value

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.get("fingerprint")

    def vector(self, position: int | None = None) -> torch.Tensor:
        """Unit direction (float32, [H]) at a residual position (a fraction: between two, `_between`); the
        only row of a single-direction file."""
        if self.single:
            position = 0
        elif position is None:
            position = self.selected_position
            if position is None:
                raise AbliterateError(
                    f"{self._where()} records no selected position: pass an explicit direction position"
                )
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
) -> Path:
    """Write atomically (temp name, then rename) so a crash never leaves a half-written file."""
    path = Path(path)
    tensors = {"direction": direction.detach().float().contiguous()}
    if harmful_mean is not None:
        tensors["harmful_mean"] = harmful_mean.detach().float().contiguous()
    if harmless_mean is not None:
        tensors["harmless_mean"] = harmless_mean.detach().float().contiguous()
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
    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"directions file {path} does not exist: run `abliterate measure` first")
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
    return Directions(direction=direction, metadata=metadata, path=path, single=single, **means)


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # a hand-written file may hold plain strings
