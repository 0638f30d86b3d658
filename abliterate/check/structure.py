"""The structural diff of an ablated checkpoint against its input, in bounded memory.

- the manifest: present (written last, so its absence means an unfinished output), made from this
  input (fingerprint), its edited list consistent with the input's own classification and with the
  plan;
- the structure: shard files, index, every safetensors header (names, dtypes, shapes, shard
  assignment, metadata);
- the bytes: each tensor's byte range hashed by streaming on both sides (two threads), and the
  changed set against the manifest's edited tensors (an unplanned change fails; a planned tensor
  left unchanged fails unless the recomputation, which knows whether the edit rounds away, runs);
- the non-weight files (config, tokenizer, ...): copied verbatim, nothing extra.

Every problem is a failure or a warning in `Checks`, never an exception.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from abliterate.edit.matching import plan_matches
from abliterate.edit.output import WEIGHT_SUFFIXES, files_to_copy
from abliterate.edit.plan import AblationPlan, format_layers
from abliterate.errors import AbliterateError
from abliterate.vocabulary import INDEX_FILE, MANIFEST_FILE, MODEL_CARD_FILE
from abliterate.weights.checkpoint import Inventory, TensorInfo, read_header

HASH_CHUNK = 1 << 24  # bytes read per call when hashing
MAX_NAMED = 5  # names quoted in one failure line that stands for many tensors


@dataclass(frozen=True)
class OutputTensor:
    """Where the output stores one tensor, from its shard's header."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class Checks:
    """Collects failures and warnings while the validation walks the output."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.warnings: list[str] = []

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def named(names: list[str]) -> str:
    """The first few names, and how many more: one failure line for many tensors."""
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


def where(t: TensorInfo, expert: int | None = None) -> str:
    """A tensor's place in the model for messages: role, layer, expert."""
    parts = [t.role or "unclassified"]
    expert = t.expert if expert is None else expert
    if t.layer is not None:
        parts.append(f"layer {t.layer}")
    if expert is not None:
        parts.append(f"expert {expert}")
    return ", ".join(parts)


# ---------------------------------------------------------------- manifest


def read_manifest(ablated_dir: Path, checks: Checks) -> dict[str, Any] | None:
    path = ablated_dir / MANIFEST_FILE
    if not path.is_file():
        checks.fail(
            f"the output is incomplete: {MANIFEST_FILE} (the manifest, written last) is missing from "
            f"{ablated_dir}; the ablation did not finish or this is not an `abliterate ablate` output: rerun it"
        )
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        checks.fail(f"{path} is not valid JSON ({exc}): the manifest is damaged; rerun the ablation")
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("edited"), list):
        checks.fail(f"{path} has no `edited` list: not an abliterate manifest; rerun the ablation")
        return None
    return manifest


def check_fingerprints(manifest: dict, inventory: Inventory, ablated_dir: Path, checks: Checks) -> None:
    recorded = (manifest.get("input") or {}).get("fingerprint")
    if recorded and recorded != inventory.fingerprint:
        checks.fail(
            f"the manifest records input fingerprint {recorded} but {inventory.model_dir} has "
            f"{inventory.fingerprint}: this output was made from another checkpoint"
        )


def planned_edits(manifest: dict | None, inventory: Inventory, checks: Checks) -> dict[str, dict]:
    """The manifest's edited tensors by name, each checked against the input's own classification."""
    if manifest is None:
        return {}
    edited: dict[str, dict] = {}
    counts: Counter[str] = Counter()
    for entry in manifest["edited"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            checks.fail(f"manifest entry {entry!r} has no tensor name")
            continue
        t = inventory.tensors.get(name)
        if t is None:
            checks.fail(f"the manifest lists {name} as edited but the original has no such tensor")
            continue
        # Catches prefix matching defects: a tensor of layer 12 edited as if it were layer 1.
        if entry.get("role") != t.role or entry.get("layer") != t.layer:
            checks.fail(
                f"the manifest edits {name} as {entry.get('role')}, layer {entry.get('layer')}, but the "
                f"input classifies it as {where(t)}"
            )
        edited[name] = entry
        counts[t.role or "unclassified"] += t.shape[0] if t.fused_experts else 1
    recorded = {k: v for k, v in (manifest.get("counts") or {}).items() if v}
    if recorded and recorded != dict(counts):
        checks.fail(
            f"the manifest's counts {recorded} disagree with its edited list {dict(sorted(counts.items()))}"
        )
    return edited


def fp8_scales(inventory: Inventory, edited: dict[str, dict]) -> set[str]:
    """The scale tensors of edited FP8 weights (from the input's own pairing): requantization gives
    them fresh values, so they change with their weight."""
    return {inventory.fp8[name][0] for name in edited if name in inventory.fp8}


def read_plan(manifest: dict | None, checks: Checks) -> AblationPlan | None:
    if manifest is None:
        return None
    try:
        return AblationPlan.from_dict(manifest.get("plan"))
    except AbliterateError as exc:
        checks.fail(f"the manifest's plan is unreadable ({exc}): rerun the ablation")
        return None


def compare_with_plan(
    inventory: Inventory,
    changed: list[str],
    edited: dict[str, dict],
    uncompared: set[str],
    plan: AblationPlan | None,
    checks: Checks,
    recompute: bool = False,
) -> None:
    """Changed tensors against the manifest's edited list, and that list against the plan.

    The plan check uses the input's own classification (exact layer numbers), independently of
    how the engine matched names, and then the engine's matcher to find planned tensors the
    manifest leaves out. A planned tensor whose bytes are unchanged is left to the recomputation
    when it runs (`recompute`): an edit can round away entirely (a tiny scale), and only the
    recomputation knows whether it should have.
    """
    scales = fp8_scales(inventory, edited)
    for name in changed:
        if name not in edited and name not in scales:
            checks.fail(
                f"tensor {name} ({where(inventory.tensors[name])}) changed but the plan does not edit it"
            )
    changed_set = set(changed)
    for name, entry in edited.items():
        if name in changed_set or name in uncompared:
            continue
        if float(entry.get("scale", 1.0)) == 0.0 or recompute:  # scale 0 leaves the bytes as they are
            continue
        message = f"tensor {name} ({where(inventory.tensors[name])}) is planned for editing but its bytes are unchanged"
        if (inventory.model_dir / MANIFEST_FILE).is_file():
            # the input is itself an ablation output: the direction may be gone from it already
            checks.warn(message + " (the input was already ablated)")
        else:
            checks.fail(message)
    if plan is None:
        return
    roles, layers = set(plan.roles()), set(plan.edited_layers())
    for name in edited:
        t = inventory.tensors[name]
        if t.role not in roles:
            checks.fail(f"tensor {name} was edited as {t.role}, a role outside the plan's {sorted(roles)}")
        elif t.layer is not None and t.layer not in layers:
            checks.fail(
                f"tensor {name} of layer {t.layer} was edited but the plan's layers are {format_layers(layers)}"
            )
    for m in plan_matches(plan, inventory):
        if m.tensor.name not in edited:
            checks.fail(
                f"tensor {m.tensor.name} ({where(m.tensor)}) matches the plan but the manifest does not list it as edited"
            )


# ---------------------------------------------------------------- index, headers, shards


def compare_index(original_dir: Path, ablated_dir: Path, checks: Checks) -> dict[str, Any]:
    src, dst = original_dir / INDEX_FILE, ablated_dir / INDEX_FILE
    if not src.is_file():
        if dst.is_file():
            checks.warn(f"the output has {INDEX_FILE} but the original has none")
        return {"identical": not dst.is_file(), "differences": []}
    if not dst.is_file():
        checks.fail(f"{INDEX_FILE} is missing from the output: copy it from {original_dir}")
        return {"identical": False, "differences": ["missing"]}
    if src.read_bytes() == dst.read_bytes():
        return {"identical": True, "differences": []}
    differences: list[str] = []
    try:
        a, b = json.loads(src.read_text()), json.loads(dst.read_text())
        map_a, map_b = a.get("weight_map") or {}, b.get("weight_map") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        checks.fail(f"the output's {INDEX_FILE} is not a valid index ({exc}): copy it from {original_dir}")
        return {"identical": False, "differences": ["unreadable"]}
    for name, shard in map_a.items():
        if name not in map_b:
            differences.append(f"tensor {name} (in {shard}) is missing from the output's {INDEX_FILE}")
        elif map_b[name] != shard:
            differences.append(
                f"tensor {name} is in {shard} by the original's index, in {map_b[name]} by the output's"
            )
    differences += [
        f"tensor {name} is listed in the output's {INDEX_FILE} (in {shard}) but not in the original's"
        for name, shard in map_b.items()
        if name not in map_a
    ]
    if a.get("metadata") != b.get("metadata"):
        differences.append(
            f"index metadata differs: {a.get('metadata')} in the original, {b.get('metadata')} in the output"
        )
    for line in differences:
        checks.fail(line)
    if not differences:
        checks.warn(
            f"the output's {INDEX_FILE} holds the same entries as the original's, formatted differently"
        )
    return {"identical": False, "differences": differences}


def read_output_headers(
    inventory: Inventory, ablated_dir: Path, checks: Checks
) -> tuple[dict[str, OutputTensor], set[str]]:
    """Every tensor of the output's shards; shards that are missing or unreadable are failures."""
    output: dict[str, OutputTensor] = {}
    absent: set[str] = set()
    for shard in inventory.shards:
        path = ablated_dir / shard
        expected = [t.name for t in inventory.by_shard(shard)]
        if not path.is_file():
            checks.fail(
                f"shard {shard} is missing from the output: its {len(expected)} tensors are absent "
                f"({named(expected)})"
            )
            absent.add(shard)
            continue
        try:
            header = read_header(path)
        except AbliterateError as exc:
            checks.fail(
                f"output shard {shard} is unreadable, so its tensors ({named(expected)}) are too: {exc}"
            )
            absent.add(shard)
            continue
        base = 8 + header.header_size
        for name, entry in header.tensors.items():
            begin, end = entry["data_offsets"]
            if name in output:
                checks.fail(
                    f"tensor {name} is stored twice in the output: in {output[name].shard} and {shard}"
                )
                continue
            output[name] = OutputTensor(
                shard, entry["dtype"], tuple(entry["shape"]), base + begin, base + end
            )
        if header.metadata != inventory.shard_metadata.get(shard, {}):
            checks.fail(
                f"shard {shard}: header metadata {header.metadata} differs from the original's "
                f"{inventory.shard_metadata.get(shard, {})}"
            )
    return output, absent


def compare_headers(
    inventory: Inventory, output: dict[str, OutputTensor], absent_shards: set[str], checks: Checks
) -> tuple[list[tuple[TensorInfo, OutputTensor]], set[str]]:
    """Tensors whose bytes can be compared, and the names of those that cannot (already failed)."""
    pairs: list[tuple[TensorInfo, OutputTensor]] = []
    uncompared: set[str] = set()
    missing: list[TensorInfo] = []
    for name, t in inventory.tensors.items():
        if t.shard in absent_shards:
            uncompared.add(name)
            continue
        o = output.get(name)
        if o is None:
            missing.append(t)
            uncompared.add(name)
            continue
        problems = []
        if o.shard != t.shard:
            problems.append(f"moved from shard {t.shard} to {o.shard}")
        if o.dtype != t.dtype:
            problems.append(f"dtype {t.dtype} in the original, {o.dtype} in the output")
        if o.shape != t.shape:
            problems.append(f"shape {list(t.shape)} in the original, {list(o.shape)} in the output")
        if problems:
            checks.fail(f"tensor {name} ({where(t)}): " + "; ".join(problems))
            uncompared.add(name)
        else:
            pairs.append((t, o))
    extra = [n for n in output if n not in inventory.tensors]
    # A renamed tensor shows as one missing and one extra at the same place of the same shard.
    by_place = {(o.shard, o.start, o.end): n for n, o in output.items() if n in set(extra)}
    renamed = set()
    for t in missing:
        new = by_place.get((t.shard, t.start, t.end))
        if new is not None and output[new].dtype == t.dtype and output[new].shape == t.shape:
            checks.fail(f"tensor {t.name} ({where(t)}) is renamed to {new} in the output")
            renamed.add(new)
        else:
            checks.fail(f"tensor {t.name} ({where(t)}) is missing from the output shard {t.shard}")
    for name in extra:
        if name not in renamed:
            checks.fail(f"tensor {name} in output shard {output[name].shard} does not exist in the original")
    return pairs, uncompared


# ---------------------------------------------------------------- bytes


def _digests(path: Path, ranges: list[tuple[str, int, int]], bar: tqdm) -> dict[str, bytes]:
    """blake2b of each byte range, reading the file once in order; memory: one chunk."""
    out: dict[str, bytes] = {}
    buffer = memoryview(bytearray(HASH_CHUNK))
    with open(path, "rb", buffering=0) as handle:
        for name, start, end in sorted(ranges, key=lambda r: r[1]):
            digest = hashlib.blake2b(digest_size=32)
            handle.seek(start)
            left = end - start
            while left:
                n = handle.readinto(buffer[: min(left, HASH_CHUNK)])
                if not n:
                    raise AbliterateError(
                        f"{path} ended inside tensor {name}: the file changed while being read"
                    )
                digest.update(buffer[:n])
                left -= n
                bar.update(n)
            out[name] = digest.digest()
    return out


def changed_tensors(
    original_dir: Path, ablated_dir: Path, pairs: list[tuple[TensorInfo, OutputTensor]], bar: tqdm
) -> list[str]:
    """Names (in input order) of the compared tensors whose bytes differ; both sides hashed in parallel."""
    by_shard: dict[str, list[tuple[TensorInfo, OutputTensor]]] = defaultdict(list)
    for t, o in pairs:
        by_shard[t.shard].append((t, o))
    differing: set[str] = set()
    # hashlib and file reads release the GIL: two threads read and hash both sides at once.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for shard, items in by_shard.items():
            a = pool.submit(_digests, original_dir / shard, [(t.name, t.start, t.end) for t, _ in items], bar)
            b = pool.submit(_digests, ablated_dir / shard, [(t.name, o.start, o.end) for t, o in items], bar)
            da, db = a.result(), b.result()
            differing.update(name for name in da if da[name] != db[name])
    return [t.name for t, _ in pairs if t.name in differing]


# ---------------------------------------------------------------- non-weight files


def _file_digest(path: Path) -> bytes:
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as handle:
        while block := handle.read(HASH_CHUNK):
            digest.update(block)
    return digest.digest()


def _top_files(root: Path) -> set[str]:
    """Names of the regular files directly in `root`, hidden ones (temporaries, state) excluded."""
    return {p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")}


def compare_files(
    original_dir: Path, ablated_dir: Path, inventory: Inventory, checks: Checks, manifest: dict | None = None
) -> dict[str, list[str]]:
    """The files the engine copies (`files_to_copy`) must be there verbatim; nothing else may be,
    except the directions file the ablation read (it may lie in the output: a warning)."""
    to_copy, skipped = files_to_copy(original_dir, set(inventory.shards))
    for note in skipped:
        checks.warn(note)
    shards = set(inventory.shards) | {INDEX_FILE}  # the index is compared on its own
    src = {p.name for p in to_copy} - shards
    dst = _top_files(ablated_dir) - shards - {MANIFEST_FILE, MODEL_CARD_FILE}  # the output's own records
    # Other weight files (pytorch_model.bin, consolidated.safetensors, ...) would carry the direction.
    weights = sorted(f for f in _top_files(original_dir) - shards if f.endswith(WEIGHT_SUFFIXES))
    for f in weights:
        if f in dst:
            checks.fail(
                f"file {f} holds weights the ablation does not edit, copied unablated: delete it from the output"
            )
    dst -= set(weights)
    missing = sorted(src - dst)
    changed = sorted(
        f
        for f in src & dst
        if (original_dir / f).stat().st_size != (ablated_dir / f).stat().st_size
        or _file_digest(original_dir / f) != _file_digest(ablated_dir / f)
    )
    extra = sorted(dst - src)
    for f in missing:
        checks.fail(f"file {f} is missing from the output: copy it from {original_dir}")
    for f in changed:
        checks.fail(f"file {f} differs from the original's: non-weight files must be copied verbatim")
    recorded = ((manifest or {}).get("directions") or {}).get("path")
    directions = Path(recorded).resolve() if isinstance(recorded, str) and recorded else None
    for f in extra:
        if directions is not None and (ablated_dir / f).resolve() == directions:
            checks.warn(f"file {f} in the output is the directions file the ablation read (an input, kept)")
            continue
        (checks.fail if f.endswith(WEIGHT_SUFFIXES) else checks.warn)(
            f"file {f} is in the output but not in the original"
        )
    return {
        "missing": missing,
        "changed": changed,
        "extra": extra,
        "weights_not_copied": [f for f in weights if f not in dst],
    }
