"""Weight inventory from safetensors headers only: never a byte of tensor data is read.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header
(name -> dtype, shape, data_offsets relative to the end of the header), then the data.
The inventory lists every tensor with its shard, dtype, shape, absolute byte range and
role, and checks that the index and the shards agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from abliterate.errors import AbliterateError
from abliterate.paths import describe_special, output_outside, plain_name
from abliterate.vocabulary import INDEX_FILE, SINGLE_FILE
from abliterate.weights.dtypes import DTYPE_BITS
from abliterate.weights.fp8 import pair_scales
from abliterate.weights.profiles import (
    PROFILES,
    Profile,
    extend_profile,
    profile_for_model_type,
    quantization_marker,
)

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


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


def count_nonfinite(values: torch.Tensor) -> int:
    """How many NaN or Inf values `values` holds (any float dtype; float8 widened; 0 for integers). Cheap
    on the good path: one float32 sum (finite values whose sum overflows are counted element by element)."""
    if not values.is_floating_point() or values.numel() == 0:
        return 0
    flat = values.reshape(-1)
    if flat.element_size() == 1:  # float8: no sum of its own
        flat = flat.float()
    if math.isfinite(float(flat.sum(dtype=torch.float32))):
        return 0
    return int((~torch.isfinite(flat)).sum())


def refuse_nonfinite(values: torch.Tensor, t: TensorInfo, first: int = 0, what: str = "tensor") -> None:
    """One line naming the input tensor `t` when `values` (its elements from flat index `first`, any
    float dtype) hold NaN or Inf: a damaged input, refused where it is read, never blamed later on
    the edit (which would spread a NaN over a whole vector). Cheap on the good path (`count_nonfinite`)."""
    count = count_nonfinite(values)
    if not count:
        return
    flat = values.reshape(-1)
    at = first + int((~torch.isfinite(flat.float() if flat.element_size() == 1 else flat)).nonzero()[0, 0])
    where = [int(i) for i in torch.unravel_index(torch.tensor(at), t.shape)] if t.shape else []
    raise AbliterateError(
        f"{what} {t.name} in the input shard {t.shard} holds NaN or Inf ({count} value(s) of those read, "
        f"the first at element {where}): the input checkpoint is damaged (safetensors has no checksum); "
        f"re-download {t.shard} (compare its sha256 with the publisher's) and rerun"
    )


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
    # FP8 weight -> (its scale tensor, block), when config.json declares a supported FP8 format (fp8.py)
    fp8: dict[str, tuple[str, tuple[int, int]]] = field(default_factory=dict)

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
            "fp8": {w: {"scale": s, "block": list(b)} for w, (s, b) in self.fp8.items()},
            "tensors": [dict(asdict(t), shape=list(t.shape)) for t in self.tensors.values()],
        }


def _expert_count(t: TensorInfo) -> int:
    """A fused expert tensor counts once per expert, so both on-disk layouts give equal counts."""
    return t.shape[0] if t.fused_experts else 1


def read_header(path: Path) -> ShardHeader:
    """Parse one safetensors header and check it exactly as safetensors does before loading: JSON
    types (a dtype safetensors knows, a shape of whole numbers, two whole-number offsets, string
    metadata), each tensor's byte count against its dtype and shape, and the data area covered
    completely: sorted by offset, each tensor starts where the previous one ends and the last one
    ends at the end of the file (no gap, no overlap, no trailing bytes)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise AbliterateError(
                    f"{path} is truncated ({size} bytes): not a safetensors file; re-download it"
                )
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_BYTES or 8 + header_size > size:
                raise AbliterateError(
                    f"{path} has a corrupt or truncated header (declares {header_size} header bytes, "
                    f"file has {size}); re-download this shard"
                )
            raw = handle.read(header_size)
    except OSError as exc:
        raise AbliterateError(f"cannot read {path}: {exc.strerror}") from exc
    header = _strict_json(raw, path, "has a corrupt header (invalid JSON: {exc}); re-download this shard")
    if not isinstance(header, dict):
        raise AbliterateError(f"{path} has a corrupt header (not a JSON object); re-download this shard")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AbliterateError(
            f"{path}: header `__metadata__` must map names to strings, got {_short_json(metadata)}; "
            "the header is corrupt: re-download this shard"
        )
    data_size = size - 8 - header_size
    spans = []
    for name, entry in header.items():
        begin, end, dtype, shape = _header_entry(path, name, entry)
        bits = DTYPE_BITS[dtype]
        numel = math.prod(shape)
        if numel * bits % 8 or end - begin != numel * bits // 8:
            raise AbliterateError(
                f"{path}: tensor {name!r} ({dtype} {shape}) spans {end - begin} bytes, expected "
                f"{numel * bits / 8:g}; the header is corrupt: re-download this shard"
            )
        if end > data_size:
            raise AbliterateError(
                f"{path}: tensor {name!r} lies at bytes {begin}..{end} of the data but the file holds only "
                f"{data_size} data bytes: the shard is truncated; re-download it"
            )
        spans.append((begin, end, name))
    _check_coverage(path, sorted(spans), data_size)
    return ShardHeader(
        name=path.name,
        size=size,
        header_size=header_size,
        header_sha256=hashlib.sha256(raw).hexdigest(),
        metadata=metadata,
        tensors=dict(sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"]))),
    )


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _short_json(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry(path: Path, name: str, entry: object) -> tuple[int, int, str, list[int]]:
    """(begin, end, dtype, shape) of one header entry, each of the type safetensors requires."""
    fix = "the header is corrupt: re-download this shard"
    if not isinstance(entry, dict):
        raise AbliterateError(
            f"{path}: header entry for {name!r} is {_short_json(entry)}, not an object; {fix}"
        )
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise AbliterateError(f"{path}: header entry for {name!r} lacks `{key}`; {fix}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise AbliterateError(
            f"{path}: tensor {name!r} has `dtype` {_short_json(dtype)}, not one of safetensors' dtypes "
            f"({', '.join(DTYPE_BITS)}); {fix}"
        )
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise AbliterateError(
            f"{path}: tensor {name!r} has `shape` {_short_json(shape)}, not a list of whole numbers; {fix}"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets):
        raise AbliterateError(
            f"{path}: tensor {name!r} has `data_offsets` {_short_json(offsets)}, not two whole numbers "
            f"[begin, end]; {fix}"
        )
    begin, end = offsets
    if end < begin:
        raise AbliterateError(
            f"{path}: tensor {name!r} has `data_offsets` [{begin}, {end}] that run backwards; {fix}"
        )
    return begin, end, dtype, shape


def _check_coverage(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors sorted by offset must tile the data area exactly, as safetensors requires."""
    position, previous = 0, None
    for begin, end, name in spans:
        if begin != position:
            if begin < position:
                what = f"overlaps {previous!r} (which ends at byte {position})"
            else:
                what = f"leaves bytes {position}..{begin} unused" + (
                    f" after {previous!r}" if previous else ""
                )
            raise AbliterateError(
                f"{path}: tensor {name!r} starts at data byte {begin} and {what}: the header is corrupt and "
                "safetensors refuses to load it; re-download this shard"
            )
        position, previous = end, name
    if position != data_size:
        raise AbliterateError(
            f"{path}: the file holds {data_size - position} bytes after its last tensor (data ends at byte "
            f"{position} of {data_size}): safetensors refuses such a file; re-download this shard"
        )


def _strict_json(raw: bytes, path: Path, problem: str) -> object:
    """JSON of a header or index: duplicate keys and NaN/Infinity refused; any other failure is
    `path` + `problem` (formatted with the exception as `exc`)."""
    try:
        return json.loads(
            raw, object_pairs_hook=_object_pairs_no_duplicates(path), parse_constant=_no_constant
        )
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, AbliterateError):
            raise
        raise AbliterateError(f"{path} " + problem.format(exc=exc)) from exc


def _object_pairs_no_duplicates(path: Path):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise AbliterateError(
                    f"{path} names {key!r} twice (which value holds is ambiguous); the file is corrupt: "
                    + (
                        "fix it or copy it from the model's source"
                        if path.name == "config.json"
                        else "re-download it"
                    )
                )
            seen.add(key)
        return dict(pairs)

    return hook


def read_index(model_dir: Path) -> tuple[dict[str, str], bytes] | None:
    """weight_map (tensor -> shard file) of a sharded checkpoint, or None for a single file.

    Types are checked: `weight_map` maps tensor names to plain `.safetensors` file names of this
    folder (a name with a folder part could read or write outside it), `metadata` is an object."""
    path = model_dir / INDEX_FILE
    if not path.is_file():
        special = describe_special(path)
        if special not in (None, "missing"):
            raise AbliterateError(
                f"{path} is {special}, not a file: restore the index from the model's source"
            )
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AbliterateError(f"cannot read {path}: {exc.strerror}") from exc
    index = _strict_json(raw, path, "is not valid JSON ({exc}); restore it from the model's source")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise AbliterateError(f"{path} has no `weight_map`; restore it from the model's source")
    if not isinstance(index.get("metadata", {}), dict | None):
        raise AbliterateError(
            f"{path}: `metadata` is {_short_json(index['metadata'])}, not an object; restore the index from the "
            "model's source"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise AbliterateError(
                f"{path}: `weight_map` gives tensor {name!r} the shard {_short_json(shard)}, not a file name; "
                "restore the index from the model's source"
            )
        plain_name(shard, "the shard file name", f"{path} (`weight_map`, tensor {name!r})")
        if not shard.endswith(".safetensors"):
            raise AbliterateError(
                f"{path}: `weight_map` places tensor {name!r} in {shard!r}, not a .safetensors file; "
                "restore the index from the model's source"
            )
    return weight_map, raw


def shard_names(model_dir: Path) -> tuple[list[str], dict[str, str] | None, bytes]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        special = describe_special(model_dir)
        what = "does not exist" if special in (None, "missing") else f"is {special}, not a directory"
        raise AbliterateError(f"model directory {model_dir} {what}")
    indexed = read_index(model_dir)
    if indexed is None:
        if not (model_dir / SINGLE_FILE).is_file():
            special = describe_special(model_dir / SINGLE_FILE)
            if special not in (None, "missing"):
                raise AbliterateError(
                    f"{model_dir / SINGLE_FILE} is {special}, not a file: restore the weights from the model's source"
                )
            found = sorted(p.name for p in model_dir.glob("*.safetensors"))
            hint = f" (found {', '.join(found[:5])} without {INDEX_FILE})" if found else ""
            raise AbliterateError(
                f"{model_dir} holds neither {INDEX_FILE} nor {SINGLE_FILE}{hint}: "
                "point to a Hugging Face checkpoint in safetensors format"
            )
        return [SINGLE_FILE], None, b""
    weight_map, raw = indexed
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        special = describe_special(model_dir / shard)
        if special not in (None, "missing"):
            raise AbliterateError(
                f"shard {shard} named in {model_dir / INDEX_FILE} is {special}, not a file: "
                "restore it (re-download the checkpoint)"
            )
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
            info = TensorInfo(
                name, header.name, entry["dtype"], tuple(entry["shape"]), base + start, base + end
            )
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
        fp8=pair_scales(read_config(model_dir, required=False), tensors, Path(model_dir) / "config.json")
        if quantization
        else {},
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


# config.json keys this tool (or transformers, when it loads the model) reads as counts: whole
# numbers in a sane range; null means "absent". Layer counts are bounded so that a typo cannot
# make the tool loop over 10^18 layers.
CONFIG_COUNTS = {
    "num_hidden_layers": (1, 100_000),
    "hidden_size": (1, 1 << 24),
    "n_routed_experts": (0, 1 << 20),
    "num_experts": (0, 1 << 20),
    "num_local_experts": (0, 1 << 20),
    "n_shared_experts": (0, 1 << 20),
    "first_k_dense_replace": (0, 100_000),
    "num_nextn_predict_layers": (0, 1_000),
    "decoder_sparse_step": (0, 100_000),
    "num_experts_per_tok": (0, 1 << 20),
    "intermediate_size": (0, 1 << 30),
    "moe_intermediate_size": (0, 1 << 30),
    "num_attention_heads": (0, 1 << 20),
    "num_key_value_heads": (0, 1 << 20),
    "head_dim": (0, 1 << 24),
    "vocab_size": (0, 1 << 31),
    "max_position_embeddings": (0, 1 << 40),
}
CONFIG_BOOLS = ("tie_word_embeddings",)


def read_config(model_dir: str | Path, required: bool = True) -> dict:
    """config.json as a dict, its keys this tool reads checked for type and range (one line per
    problem: the file, the key, what it holds and what to do)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        special = describe_special(path)
        if special not in (None, "missing"):
            raise AbliterateError(
                f"{path} is {special}, not a file: copy config.json from the model's source"
            )
        if required:
            raise AbliterateError(
                f"{path} is missing: a Hugging Face checkpoint needs its config.json (copy it from the model's source)"
            )
        return {}
    try:  # a key given twice is refused (which value holds is ambiguous); NaN is left to the key's own check
        config = json.loads(path.read_bytes(), object_pairs_hook=_object_pairs_no_duplicates(path))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AbliterateError(
            f"{path} is not valid JSON ({exc}): copy config.json from the model's source"
        ) from exc
    except OSError as exc:
        raise AbliterateError(f"cannot read {path}: {exc.strerror}") from exc
    if not isinstance(config, dict):
        raise AbliterateError(f"{path} is not a JSON object: copy config.json from the model's source")
    check_config_types(config, path)
    return config


def check_config_types(config: dict, path: Path | str) -> None:
    fix = "fix it in config.json (or copy the file from the model's source)"
    for key, (low, high) in CONFIG_COUNTS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise AbliterateError(
                f"{path}: `{key}` is {_short_json(value)}; it must be a whole number in [{low}, {high}]: {fix}"
            )
    for key in CONFIG_BOOLS:
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            raise AbliterateError(f"{path}: `{key}` is {_short_json(value)}; it must be true or false: {fix}")
    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        raise AbliterateError(
            f"{path}: `model_type` is {_short_json(config['model_type'])}; it must be a string: {fix}"
        )
    architectures = config.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
    ):
        raise AbliterateError(
            f"{path}: `architectures` is {_short_json(architectures)}; it must be a list of names: {fix}"
        )
    only = config.get("mlp_only_layers")
    if only is not None and (not isinstance(only, list) or not all(_whole(i) for i in only)):
        raise AbliterateError(
            f"{path}: `mlp_only_layers` is {_short_json(only)}; it must be a list of layer numbers: {fix}"
        )


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
    """The resolved output path, refused when it is, lies inside, or contains the input checkpoint;
    and the checkpoint's own entries checked readable (`check_input_entries`), before any work."""
    out = output_outside(out_dir, [model_dir])
    check_input_entries(model_dir)
    return out


def check_input_entries(model_dir: str | Path) -> None:
    """Every entry directly in the checkpoint folder is a file, a folder or a link to one: a dangling
    link (an incomplete download into the Hugging Face cache) or a FIFO is named as what it is,
    before a loader reports it as something else (or blocks reading a FIFO)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        special = describe_special(path)
        if special not in (None, "a directory", "missing"):
            raise AbliterateError(
                f"{path} in the input checkpoint is {special}, not a regular file: restore it or remove it from "
                f"{folder}"
            )
