"""The shard byte engine: one input shard rewritten with its matched tensors edited.

Shapes and dtypes never change, so an output shard is the input shard with some byte ranges
rewritten: the header is copied verbatim and every tensor stays at its offset. Unedited ranges
are copied by the kernel (copy_file_range); each matched tensor is read in chunks of independent
vectors (plain reads, which the kernel reads ahead of), edited in float32, rounded once to its
own dtype and written. While a tensor is edited, the disk reads what follows it (an advice, no
thread). Memory stays at one chunk in float32 (a whole writer [H, in] in float32: its columns,
the vectors edited, are not contiguous on disk) and one small piece per stored dtype.

The bytes depend only on the input shard, the matches and their vectors: never on chunk sizes,
threads or timing. `ENGINE_VERSION` is part of every shard key; bump it when they change.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from abliterate.edit.matching import Match
from abliterate.edit.orthogonalize import edit_for
from abliterate.errors import AbliterateError
from abliterate.weights.dtypes import TORCH_DTYPES

ENGINE_VERSION = 1  # part of every shard key: bump when the bytes an edit produces change
CHUNK_BYTES = 64 << 20  # storage bytes edited at once; fixed so results never depend on memory
PIECE = 1 << 21  # elements widened or rounded at once (elementwise: any size gives the same bytes)
READ_AHEAD = 64 << 20  # bytes after each edited tensor the disk is asked to read while it is edited


def write_shard(src: Path, dst: Path, edits: Sequence[tuple[Match, torch.Tensor]]) -> int:
    """Write `dst`: the shard `src` with each matched tensor edited along its unit vector; returns
    the size. `edits` in file order (by offset), each with the float32 vector [H] that edits it."""
    with open(src, "rb") as fin, open(dst, "wb", buffering=0) as fout:
        size = os.fstat(fin.fileno()).st_size
        position = 0
        for m, r in edits:
            _read_ahead(fin.fileno(), m.tensor.end)  # what follows is read from the disk while this is edited
            _copy_range(fin.fileno(), fout.fileno(), position, m.tensor.start - position)
            _edit_tensor(fin.fileno(), fout.fileno(), m, r)
            position = m.tensor.end
        _copy_range(fin.fileno(), fout.fileno(), position, size - position)
        os.fsync(fout.fileno())
    return size


def _read_ahead(src: int, offset: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(src, offset, READ_AHEAD, os.POSIX_FADV_WILLNEED)


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy src[offset:offset+count] to dst's current position: in the kernel where it can."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, min(count, 1 << 30), offset)
        except (OSError, AttributeError):  # another filesystem, old kernel, other OS
            n = os.write(dst, os.pread(src, min(count, 1 << 26), offset))
        if n == 0:
            raise AbliterateError(f"unexpected end of input while copying at byte {offset}")
        offset += n
        count -= n


def _edit_tensor(src: int, dst: int, m: Match, r: torch.Tensor) -> None:
    """Read, edit in float32, round once, write: chunk by chunk of independent vectors."""
    dtype = TORCH_DTYPES[m.tensor.dtype]
    for _, work in edited_chunks(src, m, r):
        _write_rounded(dst, work, dtype)


def edited_chunks(src: int, m: Match, r: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """One matched tensor's edit exactly as `write_shard` writes it, chunk by chunk of independent
    vectors: (the chunk's absolute byte offset in the shard, its edited float32 values shaped as
    the chunk), before rounding (`rounded_pieces` gives the stored bytes). `src`: the input shard,
    open for reading. The float32 buffer is reused: use each chunk before asking for the next.
    Validation recomputes every edit through this very function."""
    t = m.tensor
    if t.nbytes == 0:
        return
    dtype = TORCH_DTYPES[t.dtype]
    axis = t.residual_axis
    # Slices along axis 0 hold independent vectors unless axis 0 is the residual axis itself.
    rows = t.shape[0] if axis != 0 and len(t.shape) > 1 else 1
    row_numel = math.prod(t.shape) // rows
    row_bytes = t.nbytes // rows
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    edit = edit_for(m.method, m.side)  # a router correction bias (side "shift"): values added
    for first in range(0, rows, step):
        count = min(step, rows - first)
        offset = t.start + first * row_bytes
        shape = (count, *t.shape[1:]) if rows > 1 else t.shape
        work = _read_float32(src, offset, count * row_numel, dtype).view(shape)
        edit(work, r, m.scale, axis)
        yield offset, work


class _Scratch(threading.local):
    """Per-thread buffers reused from tensor to tensor (a fresh allocation faults in every page:
    a third of the edit time). The float32 one grows to the largest chunk edited, and stays; the
    pieces, one per stored dtype, hold what is read before widening and written after rounding."""

    def __init__(self) -> None:
        self.work = torch.empty(0, dtype=torch.float32)
        self.pieces: dict[torch.dtype, torch.Tensor] = {}

    def float32(self, numel: int) -> torch.Tensor:
        if self.work.numel() < numel:
            self.work = torch.empty(0, dtype=torch.float32)  # free the old one first
            self.work = torch.empty(numel, dtype=torch.float32)
        return self.work[:numel]

    def piece(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if dtype not in self.pieces:
            self.pieces[dtype] = torch.empty(PIECE, dtype=dtype)
        return self.pieces[dtype][:numel]


_SCRATCH = _Scratch()


def _read_float32(src: int, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Read stored values and widen them to float32, a piece at a time (plain reads: the kernel
    reads ahead of them, where a memory map of a file not in the page cache faults page by page)."""
    work = _SCRATCH.float32(numel)
    size = torch.empty((), dtype=dtype).element_size()
    for first in range(0, numel, PIECE):
        count = min(PIECE, numel - first)
        part = work[first : first + count]
        stored = part if dtype == torch.float32 else _SCRATCH.piece(dtype, count)
        _read_exactly(src, stored, offset + first * size)
        if stored is not part:
            part.copy_(stored)
    return work


def _read_exactly(src: int, into: torch.Tensor, offset: int) -> None:
    view = memoryview(into.view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(src, [view[done:]], offset + done)
        if n == 0:
            raise AbliterateError(f"unexpected end of input while reading at byte {offset + done}")
        done += n


def _write_rounded(dst: int, work: torch.Tensor, dtype: torch.dtype) -> None:
    """Round to `dtype` and write, a piece at a time (rounding is per element: pieces change nothing)."""
    for view in rounded_pieces(work, dtype):
        written = 0
        while written < len(view):
            written += os.write(dst, view[written:])


def rounded_pieces(work: torch.Tensor, dtype: torch.dtype) -> Iterator[memoryview]:
    """`work` rounded once to `dtype`, as the bytes stored, a piece at a time (the buffer is reused)."""
    flat = work.view(-1)
    for first in range(0, flat.numel(), PIECE):
        part = flat[first : first + PIECE]
        if dtype != torch.float32:
            part = _SCRATCH.piece(dtype, part.numel()).copy_(part)
        yield memoryview(part.view(torch.uint8).numpy())
