"""Proof that a test left an input checkpoint untouched: every file's sha256 before and after.

    with unchanged(model_dir):
        main(["ablate", str(model_dir), ...])

Hashes every file under the directory (recursively, by relative path), so a new, removed or
rewritten file, a shard truncated in place or a stray temp file all fail the check, naming it.
File modes and mtimes are compared too: the ablation engine keys resumable shards on the
input's mtime, so touching an input is a change a user would notice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def snapshot(folder: str | Path) -> dict[str, tuple[str, int, int]]:
    """Relative path -> (sha256, mode, mtime_ns) of every file under `folder`."""
    root = Path(folder)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
            stat = path.stat()
            out[str(path.relative_to(root))] = (digest.hexdigest(), stat.st_mode, stat.st_mtime_ns)
    return out


def assert_same(folder: str | Path, before: dict[str, tuple[str, int, int]]) -> None:
    after = snapshot(folder)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
    assert not (added or removed or changed), (
        f"input checkpoint {folder} was modified: added {added}, removed {removed}, changed {changed}"
    )


@contextmanager
def unchanged(*folders: str | Path) -> Iterator[None]:
    """Assert that no file under any of `folders` is added, removed or altered inside the block."""
    before = {Path(f): snapshot(f) for f in folders}
    yield
    for folder, snap in before.items():
        assert_same(folder, snap)
