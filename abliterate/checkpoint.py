"""Weight inventory from safetensors headers only: never a byte of tensor data is read.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header
(name -> dtype, shape, data_offsets relative to the end of the header), then the data.
The inventory lists every tensor with its shard, dtype, shape, absolute byte range and
role, and checks that the index and the shards agree.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from abliterate.errors import AbliterateError
from abliterate.profiles import PROFILES, Profile, extend_profile, profile_for_model_type, quantization_marker

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: str  # safetensors dtype string: BF16, F32, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the shard file
    end: int
    role: str | None = None  # None: no rule of the profile matched
    layer: int | None = None
    expert: int | None = None
    residual_axis: int | None = None
    fused_experts: bool = False

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    name: str
    size: int
    header_size: int
    header_sha256: str
    metadata: dict[str, str]
    tensors: dict[str, dict]  # raw header entries in file order


@dataclass
class Inventory:
    model_dir: Path
    shards: list[str]  # file names, in index order
    tensors: dict[str, TensorInfo]  # in shard order, then header (data offset) order
    fingerprint: str
    family: str | None
    quantization: dict[str, str] = field(default_factory=dict)  # tensor name -> kind, first few
    shard_metadata: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def by_shard(self, shard: str) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.shard == shard]

    def role_counts(self, layers: set[int] | None = None, include_unlayered: bool = True) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for t in self.tensors.values():
            if t.role is None:
                continue
            if t.layer is None:
                if include_unlayered:
                    counts[t.role] += 1
            elif layers is None or t.layer in layers:
                counts[t.role] += _expert_count(t)
        return dict(sorted(counts.items()))

    def unclassified(self) -> list[str]:
        return [t.name for t in self.tensors.values() if t.role is None]

    def to_json(self) -> dict:
        return {
            "model_dir": str(self.model_dir),
            "fingerprint": self.fingerprint,
            "family": self.family,
            "shards": self.shards,
            "quantization": self.quantization,
            "tensors": [dict(asdict(t), shape=list(t.shape)) for t in self.tensors.values()],
        }


def _expert_count(t: TensorInfo) -> int:
    """A fused expert tensor counts once per expert, so both on-disk layouts give equal counts."""
    return t.shape[0] if t.fused_experts else 1


def read_header(path: Path) -> ShardHeader:
    """Parse one safetensors header and check it against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise AbliterateError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download it")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_BYTES or 8 + header_size > size:
                raise AbliterateError(
                    f"{path} has a corrupt or truncated header (declares {header_size} header bytes, "
                    f"file has {size}); re-download this shard"
                )
            raw = handle.read(header_size)
    except OSError as exc:
        raise AbliterateError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        header = json.loads(raw, object_pairs_hook=_object_pairs_no_duplicates(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AbliterateError(f"{path} has a corrupt header (invalid JSON: {exc}); re-download this shard") from exc
    if not isinstance(header, dict):
        raise AbliterateError(f"{path} has a corrupt header (not a JSON object); re-download this shard")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_size
    ends = []
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
        except (KeyError, TypeError, ValueError) as exc:
            raise AbliterateError(f"{path}: header entry for {name!r} is malformed ({entry!r})") from exc
        expected = DTYPE_BYTES.get(dtype)
        numel = 1
        for dim in shape:
            numel *= dim
        if expected is not None and end - begin != numel * expected:
            raise AbliterateError(
                f"{path}: tensor {name!r} ({dtype} {shape}) spans {end - begin} bytes, expected {numel * expected}; "
                "the header is corrupt"
            )
        if not 0 <= begin <= end <= data_size:
            raise AbliterateError(
                f"{path}: tensor {name!r} lies at bytes {begin}..{end} of the data but the file holds only "
                f"{data_size} data bytes: the shard is truncated; re-download it"
            )
        ends.append(end)
    return ShardHeader(
        name=path.name,
        size=size,
        header_size=header_size,
        header_sha256=hashlib.sha256(raw).hexdigest(),
        metadata=metadata,
        tensors=dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])),
    )


def _object_pairs_no_duplicates(path: Path):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise AbliterateError(f"{path} names {key!r} twice; the file is corrupt: re-download it")
            seen.add(key)
        return dict(pairs)

    return hook


def read_index(model_dir: Path) -> tuple[dict[str, str], bytes] | None:
    """weight_map (tensor -> shard file) of a sharded checkpoint, or None for a single file."""
    path = model_dir / INDEX_FILE
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        index = json.loads(raw, object_pairs_hook=_object_pairs_no_duplicates(path))
    except json.JSONDecodeError as exc:
        raise AbliterateError(f"{path} is not valid JSON ({exc}); restore it from the model's source") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise AbliterateError(f"{path} has no `weight_map`; restore it from the model's source")
    return weight_map, raw


def shard_names(model_dir: Path) -> tuple[list[str], dict[str, str] | None, bytes]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AbliterateError(f"model directory {model_dir} does not exist")
    indexed = read_index(model_dir)
    if indexed is None:
        if not (model_dir / SINGLE_FILE).is_file():
            found = sorted(p.name for p in model_dir.glob("*.safetensors"))
            hint = f" (found {', '.join(found[:5])} without {INDEX_FILE})" if found else ""
            raise AbliterateError(
                f"{model_dir} holds neither {INDEX_FILE} nor {SINGLE_FILE}{hint}: "
                "point to a Hugging Face checkpoint in safetensors format"
            )
        return [SINGLE_FILE], None, b""
    weight_map, raw = indexed
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [s for s in shards if not (model_dir / s).is_file()]
    if missing:
        raise AbliterateError(
            f"shard {missing[0]} named in {model_dir / INDEX_FILE} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; download the complete checkpoint"
        )
    return sorted(shards), weight_map, raw


def build_inventory(model_dir: str | Path, profile: Profile | None = None) -> Inventory:
    """Read every shard header, cross-check the index, classify each tensor's role."""
    model_dir = Path(model_dir)
    shards, weight_map, index_bytes = shard_names(model_dir)
    if profile is None:
        profile = profile_for_model_type(read_config(model_dir, required=False).get("model_type"))
    headers = [read_header(model_dir / s) for s in shards]

    first_seen: dict[str, str] = {}
    for header in headers:
        for name in header.tensors:
            if name in first_seen:
                raise AbliterateError(
                    f"tensor {name!r} is stored twice: in {first_seen[name]} and {header.name}; "
                    "the checkpoint is inconsistent: remove the stray shard or re-download"
                )
            first_seen[name] = header.name

    tensors: dict[str, TensorInfo] = {}
    quantization: dict[str, str] = {}
    for header in headers:
        for name, entry in header.tensors.items():
            if weight_map is not None and weight_map.get(name) != header.name:
                where = weight_map.get(name)
                raise AbliterateError(
                    f"tensor {name!r} is in {header.name} but {INDEX_FILE} "
                    + (f"places it in {where}" if where else "does not list it")
                    + "; the index and the shards disagree: re-download the checkpoint"
                )
            base = 8 + header.header_size
            start, end = entry["data_offsets"]
            info = TensorInfo(name, header.name, entry["dtype"], tuple(entry["shape"]), base + start, base + end)
            kind = quantization_marker(name, info.dtype)
            if kind:
                quantization.setdefault(name, kind)
            if profile is not None:
                matched = profile.classify(name)
                if matched:
                    rule, layer, expert = matched
                    info = replace(
                        info,
                        role=rule.role,
                        layer=layer,
                        expert=expert,
                        residual_axis=rule.residual_axis,
                        fused_experts=rule.fused_experts,
                    )
            tensors[name] = info
    if weight_map is not None:
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise AbliterateError(
                f"tensor {absent[0]!r} is listed in {INDEX_FILE} under {weight_map[absent[0]]} but that shard "
                f"does not hold it ({len(absent)} such tensors); the shard is incomplete: re-download it"
            )
    return Inventory(
        model_dir=model_dir,
        shards=shards,
        tensors=tensors,
        fingerprint=_fingerprint(index_bytes, headers),
        family=profile.family if profile else None,
        quantization=quantization,
        shard_metadata={h.name: h.metadata for h in headers},
    )


def _fingerprint(index_bytes: bytes, headers: list[ShardHeader]) -> str:
    """Identity of a checkpoint's layout: index bytes, shard names and sizes, header hashes.

    It survives copying (no paths, no times) but not rewriting a shard with another layout.
    Two checkpoints with the same headers and different tensor bytes share it: caches that
    must see data changes add `shard_stamp`.
    """
    digest = hashlib.sha256(index_bytes)
    for h in headers:
        digest.update(f"{h.name}\0{h.size}\0{h.header_sha256}\n".encode())
    return digest.hexdigest()[:32]


def fingerprint(model_dir: str | Path) -> str:
    """The checkpoint fingerprint, from headers only (cheap even for 47 shards of 5 GB)."""
    model_dir = Path(model_dir)
    shards, _, index_bytes = shard_names(model_dir)
    return _fingerprint(index_bytes, [read_header(model_dir / s) for s in shards])


def shard_stamp(model_dir: str | Path) -> str:
    """Fingerprint plus each shard's modification time: changes whenever a shard is rewritten."""
    model_dir = Path(model_dir)
    shards, _, _ = shard_names(model_dir)
    stamp = ";".join(f"{s}:{(model_dir / s).stat().st_mtime_ns}" for s in shards)
    return hashlib.sha256(f"{fingerprint(model_dir)}|{stamp}".encode()).hexdigest()[:32]


def read_config(model_dir: str | Path, required: bool = True) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        if required:
            raise AbliterateError(
                f"{path} is missing: a Hugging Face checkpoint needs its config.json (copy it from the model's source)"
            )
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AbliterateError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AbliterateError(f"{path} is not a JSON object")
    return config


def choose_profile(
    model_dir: str | Path, family: str | None = None, mappings: list[str] | tuple[str, ...] = ()
) -> Profile | None:
    """The role rules for a checkpoint: `family`'s (the user's --family) or those its config's
    model_type selects, plus the user's REGEX=ROLE `mappings` (--map), which need a base family."""
    if family is not None and family not in PROFILES:
        raise AbliterateError(f"unknown family {family!r}: choose from {known_families()}")
    model_type = read_config(model_dir, required=False).get("model_type")
    base = PROFILES[family] if family else profile_for_model_type(model_type)
    if not mappings:
        return base
    if base is None:
        raise AbliterateError(
            f"--map adds rules to a family's: model_type {model_type!r} is not a known family, so pass "
            f"--family NAME too (the family whose layers, experts and MTP config keys the model uses: {known_families()})"
        )
    return extend_profile(base, mappings)


def known_families() -> str:
    return ", ".join(f"{p.family} ({'/'.join(p.model_types)})" for p in PROFILES.values())



def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """Streaming sha256 of a file (bounded memory for multi-GB shards)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output_location(model_dir: str | Path, out_dir: str | Path) -> Path:
    """The resolved output path, refused when it is, lies inside, or contains the input checkpoint."""
    model_dir, out = Path(model_dir).resolve(), Path(out_dir).resolve()
    if out == model_dir or model_dir in out.parents:
        raise AbliterateError(f"output {out} is inside the input checkpoint {model_dir}: choose a directory outside it")
    if out in model_dir.parents:
        raise AbliterateError(f"output {out} contains the input checkpoint {model_dir}: choose another directory")
    return out
