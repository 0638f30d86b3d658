"""The directions file: `directions.safetensors`, the contract between measurement and ablation.

Tensors (float32): `direction` [P, H] (P = L+1 residual positions, or [H] for one direction
for all layers), and, when measured by us, `harmful_mean` and `harmless_mean` [P, H].
Metadata: safetensors allows only str -> str, so every value is JSON-encoded.
A hand-written file holding only `direction` is accepted (then only the hidden size can be
checked against a model).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from abliterate.checkpoint import file_sha256
from abliterate.errors import AbliterateError

DIRECTIONS_FILE = "directions.safetensors"


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
        """Unit direction (float32, [H]) at a residual position; the only row of a single-direction file."""
        if self.single:
            position = 0
        elif position is None:
            position = self.selected_position
            if position is None:
                raise AbliterateError(
                    f"{self._where()} records no selected position: pass an explicit direction position"
                )
        if not 0 <= position < self.num_positions:
            raise AbliterateError(
                f"direction position {position} is out of range: {self._where()} holds positions "
                f"0..{self.num_positions - 1}"
            )
        row = self.direction[position].float()
        norm = float(row.norm())
        if norm == 0.0:
            raise AbliterateError(
                f"the direction at position {position} in {self._where()} is a zero vector: "
                "choose another position or re-measure"
            )
        return row / norm

    def sha256(self) -> str:
        if self.path is None:
            raise ValueError("directions not read from a file have no file hash")
        stat = self.path.stat()
        return _file_sha256(self.path, stat.st_size, stat.st_mtime_ns, stat.st_ino)

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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=encoded)
    os.replace(tmp, path)
    return path


def load_directions(path: str | Path, hidden_size: int | None = None) -> Directions:
    """The checked contents of a directions file, read once per process (a rewritten file is read again)."""
    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"directions file {path} does not exist: run `abliterate measure` first")
    stat = path.stat()
    directions = _read_directions(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if hidden_size is not None and directions.hidden_size != hidden_size:
        raise AbliterateError(
            f"{path} has directions of size {directions.hidden_size} but the model's hidden size is {hidden_size}: "
            "this directions file was measured on another model"
        )
    return directions


@lru_cache(maxsize=8)
def _file_sha256(path: Path, _size: int, _mtime_ns: int, _inode: int) -> str:
    return file_sha256(path)


@lru_cache(maxsize=8)
def _read_directions(path: Path, _size: int, _mtime_ns: int, _inode: int) -> Directions:
    """Keyed by the file's identity, so callers along one run share one read; never mutate the result."""
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
    metadata = {key: _decode(value) for key, value in raw_meta.items()}
    means = {}
    for name in ("harmful_mean", "harmless_mean"):
        if name in tensors:
            means[name] = tensors[name].float()
            if means[name].shape != direction.shape:
                raise AbliterateError(
                    f"`{name}` in {path} has shape {list(means[name].shape)}, `direction` {list(direction.shape)}: they must match"
                )
    return Directions(direction=direction, metadata=metadata, path=path, single=single, **means)


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # a hand-written file may hold plain strings
