"""The output directory of an ablation: its files, its keys, its resume records, its manifest.

An output is the input checkpoint's directory with every shard rewritten (by the engine) and
every non-weight file copied verbatim (`prepare_output`). Everything is written to a temporary
name beside its target and renamed (`replacing`), so a killed run never leaves a partial file
under a real name.

Resume: a shard is complete when `<out>/<shard>` exists and a done record in `<out>/.abliterate/`
(or the manifest of a finished run) names the same shard key: plan, directions content, input
shard identity and engine version. A rerun skips such shards and finishes the rest; the result
is bit-identical to an uninterrupted run because each shard depends only on its own inputs.
The manifest `abliteration.json` is written last (`finalize_output`): its presence marks a
complete output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from abliterate.checkpoint import Inventory, check_output_location, fingerprint, read_header
from abliterate.direction_file import Directions
from abliterate.directions import library_versions
from abliterate.engine import ENGINE_VERSION
from abliterate.errors import AbliterateError
from abliterate.matching import AblationInputs
from abliterate.plan import AblationPlan

MANIFEST_FILE = "abliteration.json"
STATE_DIR = ".abliterate"  # done records while a run is incomplete; removed when it finishes
# Files in a model directory that hold weights: never copied (they would carry the direction).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


@dataclass
class ShardResult:
    shard: str
    key: str
    edited: list[dict[str, Any]]  # Match.to_dict() of every rewritten tensor, in file order
    size: int
    skipped: bool = False  # found complete from an earlier run
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedOutput:
    out_dir: Path
    run_key: str
    resumed: bool  # the directory held a partial or complete output of the same run
    copied: list[str]
    warnings: list[str]


# ---------------------------------------------------------------- keys


def directions_digest(directions: Directions) -> str:
    """Identity of the numbers a run uses: direction and means, byte for byte."""
    digest = hashlib.sha256()
    for name in ("direction", "harmful_mean", "harmless_mean"):
        tensor = getattr(directions, name)
        if tensor is not None:
            digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    digest.update(b"single" if directions.single else b"rows")
    return digest.hexdigest()


def run_key(plan: AblationPlan, directions: Directions, inventory: Inventory) -> str:
    text = f"{ENGINE_VERSION}|{plan.sha256()}|{directions_digest(directions)}|{inventory.fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def shard_key(plan: AblationPlan, directions: Directions, inventory: Inventory, shard: str) -> str:
    """Cache key of one output shard: plan, directions, the input shard's header, size and mtime."""
    path = inventory.model_dir / shard
    header = read_header(path)
    stamp = f"{shard}|{header.size}|{header.header_sha256}|{path.stat().st_mtime_ns}"
    text = f"{ENGINE_VERSION}|{plan.sha256()}|{directions_digest(directions)}|{stamp}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---------------------------------------------------------------- output directory


def prepare_output(
    inputs: AblationInputs, plan: AblationPlan, out_dir: str | Path, overwrite: bool = False
) -> PreparedOutput:
    """Safety checks, then the output directory with every non-weight file copied verbatim.

    Refuses an output equal to, inside, or containing the input; a non-empty directory unless
    it holds a partial or complete output of this very run (resumed) or `overwrite` is set.
    `overwrite` empties an earlier abliterate output; in any other directory it deletes nothing
    (and refuses one holding weight files the checkpoint lacks).
    """
    model_dir = inputs.inventory.model_dir.resolve()
    out = check_output_location(model_dir, out_dir)
    if out.exists() and not out.is_dir():
        raise AbliterateError(f"output {out} exists and is not a directory")
    key = run_key(plan, inputs.directions, inputs.inventory)
    shards = set(inputs.inventory.shards)
    resumed, warnings = False, []
    if out.exists() and any(out.iterdir()):
        previous = _recorded_run_key(out)
        present = sorted(p.name for p in out.iterdir())
        if previous == key:
            resumed = True
        elif not overwrite:
            what = "an output of a different plan, directions or input" if previous else f"other files ({', '.join(present[:3])})"
            raise AbliterateError(
                f"output {out} is not empty: it holds {what}; pass --overwrite to replace its contents, "
                "or choose an empty directory"
            )
        elif previous:  # an earlier abliterate output: all of it is ours to replace
            _clear(out)
        else:  # someone else's files: overwrite ours, delete nothing
            stray = [n for n in present if n.endswith(WEIGHT_SUFFIXES) and n not in shards]
            if stray:
                raise AbliterateError(
                    f"output {out} holds weight files that are not this checkpoint's ({', '.join(stray[:3])}); "
                    "--overwrite deletes only earlier abliterate outputs: remove them or choose another directory"
                )
            kept = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            warnings.append(f"--overwrite keeps the files of {out} that the checkpoint does not have ({kept})")
    state = out / STATE_DIR
    with writing(out):
        state.mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob(".*.tmp-*")) + list(state.glob(".*.tmp-*")):
            stale.unlink()  # temporary files of a killed run
    write_json_atomic(state / "run.json", {"run_key": key, "plan": plan.to_dict()})

    to_copy, skipped = files_to_copy(model_dir, set(inputs.inventory.shards))
    warnings += skipped
    copied = []
    for path in to_copy:
        with replacing(out / path.name) as tmp:
            shutil.copyfile(path, tmp)
        copied.append(path.name)
    return PreparedOutput(out, key, resumed, copied, warnings)


def files_to_copy(model_dir: Path, shards: set[str]) -> tuple[list[Path], list[str]]:
    """The input's non-weight files that an output gets verbatim (config, tokenizer, index, code),
    and a warning for each thing left out: subfolders, and weight files outside the shards (they
    would carry the direction). An input that is itself an ablation output keeps its manifest in
    the new one (`input_manifest`), so the file is not copied."""
    copy, skipped = [], []
    for path in sorted(model_dir.iterdir()):
        if path.name in shards or path.name == MANIFEST_FILE or path.name.startswith("."):
            continue
        if path.is_dir():
            skipped.append(f"subdirectory {path.name}/ of the input is not copied")
        elif path.name.endswith(WEIGHT_SUFFIXES):
            skipped.append(f"{path.name} holds weights outside the checkpoint's shards: not copied")
        else:
            copy.append(path)
    return copy, skipped


@contextmanager
def writing(target: Path) -> Iterator[None]:
    """A failed write to the output (disk full, read-only, permissions) becomes one clear error."""
    try:
        yield
    except OSError as exc:
        raise AbliterateError(
            f"cannot write {target}: {exc.strerror or exc}; free space or fix the permissions, then rerun the "
            "same command (finished shards are kept)"
        ) from exc


@contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` (`.<name>.tmp-<pid>-<thread>`) to write; renamed onto `target`
    when the block succeeds, deleted when it fails. A killed run leaves only such names, which
    `prepare_output` removes."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with writing(target):
        try:
            yield tmp
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _recorded_run_key(out: Path) -> str | None:
    for path, read in ((out / STATE_DIR / "run.json", "run_key"), (out / MANIFEST_FILE, "run_key")):
        try:
            return json.loads(path.read_text())[read]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _clear(out: Path) -> None:
    for path in out.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    with replacing(path) as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------- done records


def record_shard(out: Path, result: ShardResult) -> None:
    """The done record of a shard just written to `<out>/<shard>`: a rerun of the same key skips it."""
    stat = (out / result.shard).stat()
    record = {"key": result.key, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "result": result.to_dict()}
    write_json_atomic(out / STATE_DIR / f"{result.shard}.json", record)


def completed_shard(out: Path, shard: str, key: str) -> ShardResult | None:
    """The result of an earlier run that finished this shard with the same key, if its file is intact."""
    path = out / shard
    if not path.is_file():
        return None
    stat = path.stat()
    try:
        record = json.loads((out / STATE_DIR / f"{shard}.json").read_text())
        if record["key"] == key and record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns:
            return ShardResult(**record["result"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:  # a finished run: its manifest lists every shard's key and edits
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        entry = manifest["shards"][shard]
        if entry["key"] == key and entry["size"] == stat.st_size:
            edited = [e for e in manifest["edited"] if e["shard"] == shard]
            return ShardResult(shard, key, edited, entry["size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# ---------------------------------------------------------------- manifest


def finalize_output(
    inputs: AblationInputs, plan: AblationPlan, prepared: PreparedOutput, results: list[ShardResult]
) -> dict[str, Any]:
    """Check every shard is complete, write `abliteration.json` (atomically, last), drop the done records."""
    out = prepared.out_dir
    by_shard = {r.shard: r for r in results}
    missing = [s for s in inputs.inventory.shards if s not in by_shard or not (out / s).is_file()]
    if missing:
        raise AbliterateError(f"output {out} lacks shard {missing[0]} ({len(missing)} missing): rerun to finish")
    ordered = [by_shard[s] for s in inputs.inventory.shards]
    edited = [e for r in ordered for e in r.edited]
    counts: Counter[str] = Counter()
    for e in edited:
        t = inputs.inventory.tensors[e["name"]]
        counts[e["role"]] += t.shape[0] if t.fused_experts else 1
    directions = inputs.directions
    manifest = {
        "format": 1,
        "tool": {"name": "abliterate", "version": library_versions().get("abliterate")},
        "versions": library_versions(),
        "run_key": prepared.run_key,
        "input": {"path": str(inputs.inventory.model_dir.resolve()), "fingerprint": inputs.inventory.fingerprint},
        # Headers are copied verbatim, so the layout fingerprint equals the input's; what the bytes
        # hold is identified by `run_key` (engine version, plan, directions content, input).
        "output": {"path": str(out), "fingerprint": fingerprint(out)},
        "plan": plan.to_dict(),
        "directions": {
            "path": str(Path(directions.path).resolve()) if directions.path else None,
            "sha256": directions.sha256() if directions.path else None,
            "content_sha256": directions_digest(directions),
            "single": directions.single,
            "metadata": directions.metadata,
        },
        "edited": edited,
        "counts": dict(sorted(counts.items())),
        "shards": {r.shard: {"key": r.key, "size": r.size} for r in ordered},
    }
    previous = inputs.inventory.model_dir / MANIFEST_FILE
    if previous.is_file():
        manifest["input_manifest"] = json.loads(previous.read_text())
    write_json_atomic(out / MANIFEST_FILE, manifest)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest
