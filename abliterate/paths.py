"""The path guard: every path the tool writes, deletes or locks goes through here.

Rules, the same for every command and flow:
- an output (directory or file) is never equal to, inside, or around an input (the checkpoint,
  the directions file, an ablated model being validated): `output_outside`;
- a name taken from data (a shard named in an index, a sweep variant's name) is a plain file
  name that stays inside its folder: `plain_name`, `child`;
- only files the tool wrote itself are ever deleted: the output's records list them
  (`abliterate/edit/output.py`), `ours_to_delete` drops every input from such a list, and temporary
  files are recognised only by the exact names `replacing` gives them (`is_temporary_of`);
- one run writes an output directory at a time: `locked` holds an exclusive lock on it; and
  shared stores (MLflow's SQLite file) are first initialised under a lock file (`file_lock`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from huggingface_hub import constants as hub_constants

from abliterate.errors import AbliterateError

# `.<name>.tmp-<pid>` or `.<name>.tmp-<pid>-<thread id>`: the names `output.replacing` writes.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-\d+(?:-\d+)?")


def output_outside(
    out: str | Path, inputs: Iterable[str | Path], what: str = "output", place: str = "directory"
) -> Path:
    """The resolved `out`, refused when it equals, lies inside, or contains any of `inputs`.

    An input directory (a checkpoint) must not hold the output; an input file (a directions
    file) must not be the output; an output directory must not hold an input checkpoint.
    Inputs that are files may lie inside an output directory: they are never deleted (see
    `ours_to_delete`). Files are resolved, not only folders: no file of an input directory may
    be a link into the output (writing the output would change the input through it), and no
    output lies in the Hugging Face cache (`hub_cache`: downloaded inputs live there)."""
    resolved = resolve(out, what)
    for given in inputs:
        source = resolve(given, "input")
        if resolved == source or source in resolved.parents:
            kind = "the input checkpoint" if source.is_dir() else "the input"
            raise AbliterateError(f"{what} {resolved} is inside {kind} {source}: choose a {place} outside it")
        if resolved in source.parents and source.is_dir():
            raise AbliterateError(
                f"{what} {resolved} contains the input checkpoint {source}: choose another {place}"
            )
        if source.is_dir():
            for entry, target in linked_entries(Path(given)):
                if target == resolved or resolved in target.parents or target in resolved.parents:
                    raise AbliterateError(
                        f"input file {entry} is a link to {target}, where the {what} {resolved} writes: writing it "
                        f"would change the input; choose a {place} outside {target.parent}"
                    )
    cache = hub_cache()
    if cache is not None and (resolved == cache or cache in resolved.parents):
        raise AbliterateError(
            f"{what} {resolved} is inside the Hugging Face cache {cache}, which holds downloaded inputs: "
            f"choose a {place} outside it"
        )
    return resolved


def resolve(path: str | Path, what: str) -> Path:
    """`path` with every link resolved; a link loop (or a path too long) is one line naming it."""
    try:
        return Path(path).resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop on Python < 3.13
        reason = getattr(exc, "strerror", None) or "a loop of symbolic links"
        raise AbliterateError(
            f"{what} {path} cannot be resolved ({reason}): fix or remove the link"
        ) from None


def linked_entries(folder: Path) -> list[tuple[Path, Path]]:
    """(entry, resolved target) of every symbolic link directly in `folder` (a checkpoint, or a
    snapshot folder of the Hugging Face cache, whose files are links to its blobs)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    out = []
    for entry in entries:
        if entry.is_symlink():
            try:
                out.append((entry, entry.resolve(strict=False)))
            except (RuntimeError, OSError):
                continue  # a loop: the input's own checks name it
    return out


def hub_cache() -> Path | None:
    """The Hugging Face hub cache folder (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub), resolved."""
    try:
        return Path(hub_constants.HF_HUB_CACHE).expanduser().resolve()
    except (RuntimeError, OSError):
        return None


def output_file(
    path: str | Path, inputs: Iterable[str | Path], flag: str = "--out", report_keys: Iterable[str] = ()
) -> Path:
    """A report file the command writes (`validate --report`, `evaluate --report`): not a directory, not
    inside any input, its folder existing; checked before any work. An existing file is replaced only
    when it is a report the tool wrote (a JSON object holding every one of `report_keys`): never an
    input given elsewhere (the directions file, a prompt file), a FIFO or the user's own file."""
    resolved = output_outside(path, inputs, f"{flag} file", "file")
    special = describe_special(resolved)
    if special == "a directory":
        raise AbliterateError(f"{flag} {path} is a directory: give a file name for the JSON report")
    if not resolved.parent.is_dir():
        raise AbliterateError(
            f"{flag} {path}: folder {resolved.parent} does not exist; create it or choose another"
        )
    if special != "missing" and not _is_report(resolved, set(report_keys)):
        what = f"is {special}" if special else "exists and is not a report abliterate wrote"
        raise AbliterateError(
            f"{flag} {path} {what}: writing the report would replace it; choose a new file name (an earlier "
            "report of the same command is replaced)"
        )
    return resolved


def _is_report(path: Path, keys: set[str]) -> bool:
    """Whether `path` is a regular file holding a JSON object with every key in `keys` (a report the tool
    wrote; at most 64 MiB is read)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode) or path.stat().st_size > 1 << 26:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(keys) and keys <= data.keys()


def folder_to_write(path: str | Path, flag: str) -> Path:
    """A folder the command creates or writes into, checked before any work: an existing entry is a
    folder, and the nearest existing parent too (a file there failed only when the first file was
    written, after the measurement)."""
    path = Path(path).absolute()
    for at in (path, *path.parents):
        special = describe_special(at)
        if special == "missing":
            continue
        if special is not None and special != "a directory":
            raise AbliterateError(f"{flag} {path}: {at} is {special}, not a folder: choose another path")
        if special is None:
            what = "is a file" if at == path else f"lies under the file {at}"
            raise AbliterateError(f"{flag} {path} {what}, not a folder: choose another path")
        return path
    return path


SQLITE_MAGIC = b"SQLite format 3\0"


def check_sqlite_file(path: Path, what: str) -> Path:
    """An SQLite database the tool opens (the study database, the MLflow store), refused in one line
    when it is no SQLite file (a folder, a link to nothing, garbage): what SQLAlchemy reports as a
    traceback, or MLflow only after the temporary server has started. A missing file is created later."""
    special = describe_special(path)
    if special == "missing":
        return path
    if special is not None:
        raise AbliterateError(
            f"{what} {path} is {special}, not a file: move it away (a new database is created) or "
            "set ABLITERATE_HOME to another folder"
        )
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise AbliterateError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if head and head != SQLITE_MAGIC:
        raise AbliterateError(
            f"{what} {path} is not an SQLite database (it starts with {head[:8]!r}): move it away "
            "(a new database is created) or restore it from a backup"
        )
    return path


def plain_name(name: object, what: str, where: str | Path) -> str:
    """`name` if it is a plain file name (no folder part, not `.`/`..`, no NUL): a name read from
    data may never lead outside its folder."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or Path(name).is_absolute()
    ):
        raise AbliterateError(
            f"{where}: {what} {name!r} is not a plain file name (it must not name a folder or lead outside "
            "its own folder): fix it"
        )
    return name


def child(folder: str | Path, name: str, what: str) -> Path:
    """`folder/name`, checked to stay inside `folder` (after resolving links)."""
    plain_name(name, what, folder)
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise AbliterateError(f"{what} {name!r} resolves to {path}, outside {root}: choose another name")
    return root / name


def describe_special(path: Path) -> str | None:
    """What a directory entry is when it is not a regular file: a directory, a dangling symbolic
    link, a FIFO, a socket, a device; "missing" when nothing is there; None for a regular file (or
    a link to one)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"a loop of symbolic links (to {os.readlink(path)})"
            return f"a dangling symbolic link (to {os.readlink(path)})"
    mode = path.stat().st_mode
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return None


def input_file(path: str | Path, what: str, when_missing: str) -> Path:
    """`path` when it is a regular file (or a link to one), before anything opens it: a FIFO would
    block the read forever, and a directory or a loop of links is named as what it is, not as missing."""
    path = Path(path)
    special = describe_special(path)
    if special == "missing":
        raise AbliterateError(f"{what} {path} does not exist: {when_missing}")
    if special is not None:
        raise AbliterateError(f"{what} {path} is {special}, not a file: give the path of a file")
    return path


def is_temporary_of(entry: str, names: Iterable[str]) -> bool:
    """Whether `entry` is a temporary file `replacing` writes for one of `names`."""
    match = _TEMPORARY.fullmatch(entry)
    return bool(match) and match.group("name") in set(names)


def ours_to_delete(folder: Path, names: Iterable[object], protected: Iterable[str | Path]) -> list[Path]:
    """The entries of `folder` named in `names` (files the tool recorded as written by itself) that
    may be deleted: plain names only, regular files or links (never a folder), never a protected
    input (the directions file, the checkpoint's files)."""
    keep = {Path(p).absolute() for p in protected} | {Path(p).resolve() for p in protected}
    out = []
    for name in dict.fromkeys(names):
        try:
            plain_name(name, "a recorded output file", folder)
        except AbliterateError:
            continue  # a damaged record names nothing we may delete
        path = Path(folder).absolute() / str(name)
        if not path.is_symlink() and not path.is_file():
            continue  # gone already, or a folder: never ours to remove
        if path in keep or path.resolve() in keep:
            continue
        out.append(path)
    return out


@contextmanager
def locked(directory: str | Path, what: str = "output") -> Iterator[Path]:
    """Hold an exclusive lock on an existing directory for the block; another run (thread or
    process) asking for it gets a one-line error at once. The kernel drops the lock when the
    holder ends, even by SIGKILL, so a killed run never leaves a stale lock. On filesystems
    without directory locks (some network filesystems) the block runs unlocked."""
    path = Path(directory)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AbliterateError(
                f"{what} {path} is being written by another abliterate run right now: wait for it to finish, "
                "or choose another directory"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EBADF, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def is_locked(directory: str | Path) -> bool:
    """Whether another run holds `locked` on this directory now (False when it does not exist)."""
    try:
        with locked(directory):
            return False
    except AbliterateError:
        return True
    except OSError:
        return False


def holders(paths: Iterable[str | Path]) -> list[str]:
    """`process PID (command line)` of every other process that has one of `paths` open (Linux's
    /proc; empty elsewhere or where /proc is not readable): who holds a lock the tool waits for."""
    wanted = set()
    for path in paths:
        with suppress(OSError, RuntimeError):
            wanted.add(str(Path(path).resolve()))
    found = []
    try:
        processes = [p for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]
    except OSError:
        return []
    for proc in sorted(processes, key=lambda p: int(p.name)):
        try:
            fds = list((proc / "fd").iterdir())
            if not any(os.readlink(fd) in wanted for fd in fds if fd.is_symlink()):
                continue
            command = " ".join(
                (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
            )
        except OSError:
            continue
        found.append(f"process {proc.name} ({command[:120] or '?'})")
    return found


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Block until an exclusive lock on the file `path` (created if missing) is ours."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------ file identity


def file_identity(path: str | Path) -> tuple[str, int, int, int] | None:
    """(resolved path, size, modification time in ns, inode) of a file: what keys a per-process
    cache of what was read from it, so a file rewritten in place or replaced is read again. Stat
    calls only. None for a file that does not exist (its reader reports that)."""
    resolved = Path(path).resolve()
    try:
        info = resolved.stat()
    except OSError:
        return None
    return (str(resolved), info.st_size, info.st_mtime_ns, info.st_ino)


def folder_identity(folder: str | Path) -> tuple[tuple[str, int, int, int], ...]:
    """`file_identity` of every file directly in `folder` (a checkpoint: its index, shards, config),
    in name order; empty for a folder that does not exist."""
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return ()
    return tuple(i for e in entries if e.is_file() and (i := file_identity(e)) is not None)


# ------------------------------------------------------------------ filesystem errors as one line

_OS_ERROR_FIX = {
    errno.ELOOP: "a loop of symbolic links: fix or remove the link",
    errno.ENOSPC: "free space, then rerun the same command (finished work is kept)",
    errno.EDQUOT: "free space, then rerun the same command (finished work is kept)",
    errno.EROFS: "the filesystem is read-only: choose a writable place (ABLITERATE_HOME for the tool's home)",
    errno.EACCES: "fix the permissions or choose another place (ABLITERATE_HOME for the tool's home)",
    errno.EPERM: "fix the permissions or choose another place (ABLITERATE_HOME for the tool's home)",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
}


def write_fix(exc: OSError, kept: str = "") -> str:
    """What to do when writing an output failed: a path through a file, a loop or a missing folder is the
    path's fault (not space or permissions, which the other errors are)."""
    if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
        return _OS_ERROR_FIX[exc.errno]
    if exc.errno == errno.ENOENT:
        return "a folder of the path does not exist (or vanished): fix the path, then rerun the same command"
    return f"free space or fix the permissions, then rerun the same command{kept}"


def describe_os_error(exc: OSError) -> str:
    """An OSError no stage translated (the filesystem under the tool's home, a link loop): one line
    naming the path, what failed and what to do."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None) or "a file"
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _OS_ERROR_FIX.get(exc.errno or 0, "check the path and the filesystem, then rerun the same command")
    return f"cannot use {where}: {reason}; {fix}"


# ------------------------------------------------------------------ text files users write


def split_lines(text: str) -> list[str]:
    """The lines of a text file, split at line ends only (\\n, \\r\\n, \\r): `str.splitlines` also
    splits at a form feed, a vertical tab, U+2028/U+2029, U+0085 and \\x1c-\\x1e, which a prompt may
    hold (one prompt would become two)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


# ------------------------------------------------------------------ reports and records, written whole


def temporary_name(target: Path) -> Path:
    """`.<name>.tmp-<pid>-<thread>` beside `target`: the one temporary name (`is_temporary_of`)."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_bytes_atomic` of `text` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all: into a temporary file beside it, fsynced, then
    renamed (a full disk or a kill leaves the earlier file, or none, never an empty or partial one
    under the final name). A failure is one line naming the file and what to do."""
    target = Path(path)
    tmp = temporary_name(target)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with suppress(OSError):
            tmp.unlink()
        raise AbliterateError(f"cannot write {target}: {exc.strerror or exc}; {write_fix(exc)}") from exc
    finally:
        with suppress(OSError):
            tmp.unlink()
    return target
