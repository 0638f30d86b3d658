"""Cache keys built from content, never from paths alone.

A key is a task name, a hash of the code the tasks run and content fingerprints of the
task's inputs (checkpoint stamps, prompt hashes, settings). Equal keys mean equal results,
so a rerun with other ablation settings reuses the inventory, the measurement and the
directions.

The code hash covers the whole source of the packages the tasks run (every `.py` file under
`abliterate/` and `tasks/`), not a hand-picked list of modules per task: a task calls into
streaming, chat rendering, refusal markers, plan and directions-file code it does not name,
and a list that misses one returns stale results after that module changes. One hash for
every task over-invalidates (any edit reruns every stage), which costs a rerun; a stale
cache costs a wrong result. Package data is left out on purpose: the prompt sets and the
demo model reach tasks as inputs (prompt lists, model directories) that the keys hash by
content already. The versions of the libraries that compute the results (torch,
transformers, safetensors, numpy) are part of the hash too.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

#: Libraries whose version changes numbers or rendering (forward passes, chat templates, I/O).
RESULT_LIBRARIES = ("torch", "transformers", "safetensors", "numpy")


def package_roots() -> tuple[Path, ...]:
    """The installed locations of the packages the tasks run: `abliterate/` and `tasks/`."""
    roots = []
    for name in ("abliterate", "abliterate_tasks"):
        spec = find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {name!r} is not importable; cannot hash its source")
        roots.extend(Path(p).resolve() for p in spec.submodule_search_locations)
    return tuple(roots)


def source_hash(roots: tuple[Path, ...]) -> str:
    """SHA-256 of every `.py` file under `roots`: relative path (with the root's name) and bytes.

    Paths are part of the hash, so adding, removing or renaming a module changes it too;
    `__pycache__` is skipped. Files are read as bytes: the hash sees exactly what is on disk.
    """
    digest = hashlib.sha256()
    for root in roots:
        root = Path(root)
        files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.relative_to(root).parts)
        for path in files:
            data = path.read_bytes()
            name = (Path(root.name) / path.relative_to(root)).as_posix()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in RESULT_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@cache
def code_hash(roots: tuple[Path, ...] | None = None) -> str:
    """The code part of every task key: the packages' source and the result libraries' versions.

    Computed once per process (the source does not change under a running flow; a worker
    started after an edit hashes the new source). `roots` defaults to the installed packages.
    """
    source = source_hash(package_roots() if roots is None else tuple(roots))
    payload = json.dumps({"source": source, "libraries": _library_versions()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_key(task: str, code: str, *parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return f"{task}-{code}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}"
