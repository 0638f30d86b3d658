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
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from abliterate.edit.engine import ENGINE_VERSION
from abliterate.edit.matching import AblationInputs
from abliterate.edit.model_card import write_model_card
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import Directions
from abliterate.measure.directions import library_versions
from abliterate.paths import (
    describe_special,
    is_locked,
    is_temporary_of,
    locked,
    ours_to_delete,
    output_outside,
    write_fix,
)
from abliterate.vocabulary import MANIFEST_FILE, MODEL_CARD_FILE
from abliterate.weights.checkpoint import Inventory, fingerprint, read_header
from abliterate.weights.fp8 import partners as fp8_partners
from abliterate.weights.hub import hub_origin

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
    unchanged: list[str] = field(default_factory=list)  # edited tensors whose every byte stayed as it was

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
    """Identity of the numbers a run uses: direction, means and subspaces, byte for byte."""
    digest = hashlib.sha256()
    for name in ("direction", "harmful_mean", "harmless_mean"):
        tensor = getattr(directions, name)
        if tensor is not None:
            digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    digest.update(b"single" if directions.single else b"rows")
    for method, basis in sorted(directions.subspaces.items()):  # none in a rank-1 file: its digest as before
        digest.update(f"subspace.{method}".encode() + basis.contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_key(plan: AblationPlan, directions: Directions, inventory: Inventory) -> str:
    text = f"{ENGINE_VERSION}|{plan.sha256()}|{directions_digest(directions)}|{inventory.fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def shard_key(plan: AblationPlan, directions: Directions, inventory: Inventory, shard: str) -> str:
    """Cache key of one output shard: plan, directions, the input shard's header, size and mtime."""
    path = inventory.model_dir / shard
    header = read_header(path)
    stamp = f"{shard}|{header.size}|{header.header_sha256}|{path.stat().st_mtime_ns}"
    # An FP8 weight and its scale in two shards: each shard's bytes depend on the other's (fp8.py)
    for other in fp8_partners(inventory, shard):
        info = (inventory.model_dir / other).stat()
        stamp += f"|{other}|{info.st_size}|{info.st_mtime_ns}"
    text = f"{ENGINE_VERSION}|{plan.sha256()}|{directions_digest(directions)}|{stamp}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---------------------------------------------------------------- output directory


def output_names(inputs: AblationInputs, copied: list[Path] | list[str]) -> list[str]:
    """Every name an ablation writes directly in its output directory (besides its records)."""
    return [*inputs.inventory.shards, *(Path(c).name for c in copied), MODEL_CARD_FILE, MANIFEST_FILE]


def _protected(inputs: AblationInputs) -> list[Path]:
    """Inputs that may lie inside an output directory and must never be replaced or deleted."""
    return [Path(inputs.directions.path)] if inputs.directions.path else []


def check_output(inputs: AblationInputs, out_dir: str | Path) -> tuple[Path, list[Path], list[str]]:
    """Everything about an output directory that can be checked before writing: its place (never
    equal to, inside or around the input), that it is no file, that the input's files can all be
    copied (no dangling link, no FIFO), and that no input lies where the output writes.
    Returns (resolved path, files to copy, warnings)."""
    model_dir = inputs.inventory.model_dir.resolve()
    out = output_outside(out_dir, [model_dir])
    if out.exists() and not out.is_dir():
        raise AbliterateError(f"output {out} exists and is not a directory")
    to_copy, skipped = files_to_copy(model_dir, set(inputs.inventory.shards))
    if (out / STATE_DIR).is_symlink():
        raise AbliterateError(
            f"{out / STATE_DIR} is a symbolic link (to {os.readlink(out / STATE_DIR)}): the run's records would be "
            "written through it, outside the output; remove the link or choose another directory"
        )
    for source in _protected(inputs):
        for name in [*output_names(inputs, to_copy), STATE_DIR]:
            target = out / name
            if target.absolute() == source.absolute() or target.resolve() == source.resolve():
                raise AbliterateError(
                    f"the directions file {source} lies at {target}, which the ablation writes: move it out of "
                    "the output directory or choose another output"
                )
    return out, to_copy, skipped


@contextmanager
def output_directory(inputs: AblationInputs, out_dir: str | Path) -> Iterator[Path]:
    """The checked output directory, created if missing and locked for the block: a second run
    into the same directory stops at once with a one-line error. A directory this call created
    is removed again when the block fails before writing anything into it."""
    out, _, _ = check_output(inputs, out_dir)
    created = not out.exists()
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    try:
        with locked(out, "output"):
            yield out
    except BaseException:
        if created:
            with suppress(OSError):
                out.rmdir()  # only when still empty
        raise


def precheck_output(out_dir: str | Path, overwrite: bool = False) -> Path:
    """The checks on an output directory that need neither the plan nor the directions, for a
    flow to run before it measures anything: not a file, not being written by another run, and
    (without `overwrite`) empty or holding an earlier abliterate output."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise AbliterateError(f"output {out} exists and is not a directory")
    if not out.is_dir():
        return out
    if is_locked(out):
        raise AbliterateError(
            f"output {out} is being written by another abliterate run right now: wait for it to finish, or choose "
            "another directory"
        )
    present = sorted(p.name for p in out.iterdir())
    if present and not overwrite and not _recorded_run(out):
        raise AbliterateError(
            f"output {out} is not empty: it holds other files ({', '.join(present[:3])}); pass --overwrite to "
            "replace its contents, or choose an empty directory"
        )
    return out


def prepare_output(
    inputs: AblationInputs, plan: AblationPlan, out_dir: str | Path, overwrite: bool = False
) -> PreparedOutput:
    """Safety checks, then the output directory with every non-weight file copied verbatim.

    Refuses an output equal to, inside, or containing the input; a non-empty directory unless
    it holds a partial or complete output of this very run (resumed) or `overwrite` is set.
    `overwrite` deletes only files an earlier abliterate run recorded as its own (its shards,
    copied files and manifest) and never an input (the directions file): the user's own files
    stay, with a warning; a directory holding weight files the checkpoint lacks is refused.
    Run it inside `output_directory` so that no other run writes the same directory.
    """
    out, to_copy, warnings = check_output(inputs, out_dir)
    key = run_key(plan, inputs.directions, inputs.inventory)
    shards = set(inputs.inventory.shards)
    names = output_names(inputs, to_copy)
    resumed = False
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present:
        previous = _recorded_run(out)
        if previous.get("run_key") == key:
            resumed = True
        elif not overwrite:
            what = (
                "an output of a different plan, directions or input"
                if previous.get("run_key")
                else f"other files ({', '.join(present[:3])})"
            )
            raise AbliterateError(
                f"output {out} is not empty: it holds {what}; pass --overwrite to replace its contents, "
                "or choose an empty directory"
            )
        else:
            recorded = set(previous.get("files") or [])
            foreign = [n for n in present if n in names and n not in recorded]
            if foreign:
                raise AbliterateError(
                    f"output {out} holds {', '.join(foreign[:3])}, which this run writes but no abliterate run "
                    "recorded as its own: --overwrite replaces only files an earlier abliterate run wrote; move them "
                    "away or choose another directory"
                )
            stray = [
                n
                for n in present
                if n.endswith(WEIGHT_SUFFIXES)
                and n not in shards
                and n not in recorded
                and not _is_protected(out / n, inputs)
            ]
            if stray:
                raise AbliterateError(
                    f"output {out} holds weight files that are not this checkpoint's ({', '.join(stray[:3])}); "
                    "--overwrite deletes only what an earlier abliterate run wrote: remove them or choose another "
                    "directory"
                )
            # An earlier run's files this run does not write again: ours to delete (inputs never are).
            for path in ours_to_delete(out, sorted(recorded - set(names)), _protected(inputs)):
                with writing(path):
                    path.unlink()
            if (out / STATE_DIR).is_dir():
                _clear_records(out)
            kept = [
                n
                for n in present
                if n not in recorded and n not in names and n != STATE_DIR and not is_temporary_of(n, names)
            ]
            if kept:
                shown = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
                warnings.append(
                    f"--overwrite keeps the files of {out} that no abliterate run wrote ({shown})"
                )
    state = out / STATE_DIR
    with writing(out):
        state.mkdir(parents=True, exist_ok=True)
        for stale in [p for p in out.iterdir() if is_temporary_of(p.name, names)]:
            stale.unlink()  # temporary files of a killed run
        _clear_temporaries(state)
    write_json_atomic(state / "run.json", {"run_key": key, "plan": plan.to_dict(), "files": names})

    copied = []
    for path in to_copy:
        with replacing(out / path.name) as tmp:
            shutil.copyfile(path, tmp)
        copied.append(path.name)
    return PreparedOutput(out, key, resumed, copied, warnings)


def _is_protected(path: Path, inputs: AblationInputs) -> bool:
    return any(path.absolute() == p.absolute() or path.resolve() == p.resolve() for p in _protected(inputs))


def files_to_copy(model_dir: Path, shards: set[str]) -> tuple[list[Path], list[str]]:
    """The input's non-weight files that an output gets verbatim (config, tokenizer, index, code),
    and a warning for each thing left out: subfolders, and weight files outside the shards (they
    would carry the direction). An input that is itself an ablation output keeps its manifest in
    the new one (`input_manifest`), so the file is not copied. A dangling link, a FIFO or another
    special file among them is an error that names it."""
    copy, skipped = [], []
    for path in sorted(model_dir.iterdir()):
        if path.name in shards or path.name in (MANIFEST_FILE, MODEL_CARD_FILE) or path.name.startswith("."):
            continue  # the output's own manifest and model card replace the input's (model_card.py)
        special = describe_special(path)
        if special not in (None, "a directory"):
            raise AbliterateError(
                f"{path} in the input checkpoint is {special}, not a regular file: restore it or remove it from "
                f"{model_dir}"
            )
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
            f"cannot write {target}: {exc.strerror or exc}; {write_fix(exc, ' (finished shards are kept)')}"
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


def _recorded_run(out: Path) -> dict[str, Any]:
    """What an earlier run recorded about itself in `out`: its run key and the files it wrote
    (empty when nothing readable is there). The manifest of a finished run, or the record of an
    unfinished one."""
    for path in (out / STATE_DIR / "run.json", out / MANIFEST_FILE):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or not isinstance(record.get("run_key"), str):
            continue
        files = record.get("files")
        if not isinstance(files, list):  # an output of an older version: its shards and manifest
            shards = record.get("shards") if isinstance(record.get("shards"), dict) else {}
            files = [*shards, MANIFEST_FILE] if path.name == MANIFEST_FILE else []
        return {"run_key": record["run_key"], "files": [f for f in files if isinstance(f, str)]}
    return {}


def _recorded_run_key(out: Path) -> str | None:
    return _recorded_run(out).get("run_key")


def _clear_temporaries(state: Path) -> None:
    for stale in state.glob(".*.tmp-*"):
        if is_temporary_of(stale.name, [stale.name.split(".tmp-")[0][1:]]):
            stale.unlink()


def _clear_records(out: Path) -> None:
    """Delete the records a run keeps in `<out>/.abliterate/` (its own names only), then the folder
    if nothing else is in it."""
    state = out / STATE_DIR
    if not state.is_dir() or state.is_symlink():
        return
    for path in state.iterdir():
        if path.is_file() and (path.name == "run.json" or path.name.endswith(".safetensors.json")):
            path.unlink()
    _clear_temporaries(state)
    with suppress(OSError):
        state.rmdir()


def write_json_atomic(path: Path, data: Any, sort_keys: bool = False) -> None:
    with replacing(path) as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=sort_keys)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------- done records


def record_shard(out: Path, result: ShardResult) -> None:
    """The done record of a shard just written to `<out>/<shard>`: a rerun of the same key skips it."""
    stat = (out / result.shard).stat()
    record = {
        "key": result.key,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "result": result.to_dict(),
    }
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
            names = {e["name"] for e in edited}
            same = [n for n in manifest.get("unchanged", []) if n in names]
            return ShardResult(shard, key, edited, entry["size"], unchanged=same)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def unchanged_tensors(
    src: Path, dst: Path, matches: list[Any], first: int = 4096, block: int = 1 << 20
) -> list[str]:
    """Names of the matched tensors whose bytes in `dst` equal those in `src`: an edit that rounded
    away entirely. Each tensor's first `first` bytes decide almost always (an edit changes most
    values); only when they agree is the rest compared, a block at a time."""
    same = []
    with open(src, "rb", buffering=0) as a, open(dst, "rb", buffering=0) as b:
        for m in matches:
            t = m.tensor
            position, size = t.start, min(first, t.nbytes)
            while size and os.pread(a.fileno(), size, position) == os.pread(b.fileno(), size, position):
                position += size
                size = min(block, t.end - position)
            if not size:
                same.append(t.name)
    return same


# ---------------------------------------------------------------- manifest# ---------------------------------------------------------------- manifest


def finalize_output(
    inputs: AblationInputs, plan: AblationPlan, prepared: PreparedOutput, results: list[ShardResult]
) -> dict[str, Any]:
    """Check every shard is complete, write `abliteration.json` (atomically, last), drop the done records."""
    out = prepared.out_dir
    by_shard = {r.shard: r for r in results}
    missing = [s for s in inputs.inventory.shards if s not in by_shard or not (out / s).is_file()]
    if missing:
        raise AbliterateError(
            f"output {out} lacks shard {missing[0]} ({len(missing)} missing): rerun to finish"
        )
    ordered = [by_shard[s] for s in inputs.inventory.shards]
    edited = [e for r in ordered for e in r.edited]
    _check_something_changed(inputs, ordered, edited)
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
        "input": {
            "path": str(inputs.inventory.model_dir.resolve()),
            "fingerprint": inputs.inventory.fingerprint,
            "hub": hub_origin(inputs.inventory.model_dir),
        },  # repository and commit of a Hub snapshot
        # Headers are copied verbatim, so the layout fingerprint equals the input's; what the bytes
        # hold is identified by `run_key` (engine version, plan, directions content, input).
        "output": {"path": str(out), "fingerprint": fingerprint(out)},
        "plan": plan.to_dict(),
        "directions": {
            "path": str(Path(directions.path).resolve()) if directions.path else None,
            "sha256": directions.sha256() if directions.path else None,
            "content_sha256": directions_digest(directions),
            "single": directions.single,
            "metadata": sorted_json(directions.metadata),
        },
        "edited": edited,
        "counts": dict(sorted(counts.items())),
        "shards": {r.shard: {"key": r.key, "size": r.size} for r in ordered},
        "unchanged": [name for r in ordered for name in r.unchanged],
        "files": output_names(inputs, prepared.copied),
    }
    previous = inputs.inventory.model_dir / MANIFEST_FILE
    if previous.is_file():
        try:
            manifest["input_manifest"] = json.loads(previous.read_text())
        except (OSError, ValueError) as exc:
            raise AbliterateError(
                f"{previous} (the input's own manifest: the input is an earlier ablation's output) is unreadable "
                f"({exc}): restore it or delete it from the input"
            ) from exc
    write_model_card(out, manifest)  # README.md: how it was made (a flow adds its checks later)
    write_json_atomic(out / MANIFEST_FILE, manifest)
    _clear_records(out)
    return manifest


def _check_something_changed(
    inputs: AblationInputs, results: list[ShardResult], edited: list[dict[str, Any]]
) -> None:
    """A plan that asks for a change (a scale above 0) and changed no byte of any tensor it edits is
    an error, never a success: every edit rounded away (a scale too small for the storage dtype). A
    plan whose scales are all 0 asked for no change; an input that is itself an ablation output may
    have no direction left to remove (a warning)."""
    asked = [e["name"] for e in edited if float(e.get("scale") or 0.0) != 0.0 or e.get("side") == "shift"]
    same = {name for r in results for name in r.unchanged}
    if not asked or any(name not in same for name in asked):
        return
    message = (
        f"the plan edits {len(asked)} tensors with a scale above 0 but every byte of them stayed as it was: each "
        "edit is below the storage dtype's precision"
    )
    if (inputs.inventory.model_dir / MANIFEST_FILE).is_file():
        inputs.warnings.append(
            message + " (the input is an earlier ablation's output: the direction may be gone)"
        )
        return
    raise AbliterateError(
        message + "; raise --scale (or check the directions file); the output is left unfinished"
    )


def sorted_json(value: Any) -> Any:
    """`value` with every mapping's keys in sorted order, so that its JSON text never depends on the
    order a reader happened to return them in (safetensors returns file metadata in hash order)."""
    if isinstance(value, dict):
        return {k: sorted_json(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [sorted_json(v) for v in value]
    return value
