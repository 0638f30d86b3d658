"""The shard byte engine: one input shard rewritten with its matched tensors edited, in one pass.

Shapes and dtypes never change, so an output shard is the input shard with some byte ranges
rewritten: the header is copied verbatim and every tensor stays at its offset. Unedited ranges
are copied by the kernel (copy_file_range); each matched tensor is read in chunks of independent
vectors (plain reads, which the kernel reads ahead of), edited in float32, rounded once to its
own dtype and written at its offset. While a tensor is edited, the disk reads what follows it (an
advice, no thread). Memory stays at one chunk in float32 (a whole writer [H, in] in float32: its
columns, the vectors edited, are not contiguous on disk) and one small piece per stored dtype.

FP8 weights (a match with `scales`) are edited in the same pass (`fp8_edit.requantized_edit`:
dequantized, edited in float32, requantized with fresh block scales): the weight's range and its
scale tensor's range are written from the result, never copied first. A scale tensor may sit in
another shard than its weight: each shard holding either recomputes the same deterministic
requantization and writes its part, so every input byte is read once and every output byte
written once (a weight whose scale is elsewhere is computed once where both shards' tasks run in
this process: the weight's task hands its fresh scales to the scale's, `fp8_edit._SharedScales`;
else by both).

Edited tensors may be handed to a pool of threads (`edit_pool`, shared by every shard of a run):
each tensor is read and written at its own offsets, so the tensors of one shard are edited at
once where cores are free, and the last shard of a run does not leave a core idle.

The bytes depend only on the input shard, the matches and their vectors: never on chunk sizes,
threads or timing. `ENGINE_VERSION` is part of every shard key; bump it when they change.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from abliterate.edit.fp8_edit import requantized_edit
from abliterate.edit.matching import Match
from abliterate.edit.orthogonalize import edit_for
from abliterate.errors import AbliterateError
from abliterate.inference.threads import apply_threads
from abliterate.weights.checkpoint import refuse_nonfinite
from abliterate.weights.dtypes import TORCH_DTYPES

ENGINE_VERSION = 1  # part of every shard key: bump when the bytes an edit produces change
CHUNK_BYTES = 64 << 20  # storage bytes edited at once; fixed so results never depend on memory
PIECE = 1 << 21  # elements widened or rounded at once (elementwise: any size gives the same bytes)
READ_AHEAD = 64 << 20  # bytes after each edited tensor the disk is asked to read while it is edited
# Bytes per write call. One write of tens of MiB lets the kernel back the new page cache with large
# folios, and where free memory is fragmented it compacts memory for them in the writing thread: a
# 50 MiB write measured 10x dearer (0.13 against 0.013 CPU s on ext4, Linux 6.18) where 1 MiB writes
# stayed at the plain copy's cost.
WRITE_BYTES = 1 << 20


def write_shard(
    src: Path,
    dst: Path,
    edits: Sequence[tuple[Match, torch.Tensor]],
    model_dir: Path | None = None,
    pool: Executor | None = None,
) -> int:
    """Write `dst`: the shard `src` with each matched tensor edited along its vector; returns the size.

    `edits`: each match with the float32 vector [H] (or basis [k, H] of a rank-k plan) that edits it:
    the tensors of this shard, and
    the FP8 weights of other shards whose scale tensor this shard holds (`m.scales`; only the
    scale is written here). `model_dir`: the checkpoint's folder, where the tensors' `shard` names
    are (default: src's folder); an FP8 weight and its scale are read from it wherever they are.
    `pool` (`edit_pool`): the tensors are edited there, all of them handed over at once, while this
    thread copies the unedited ranges; None: here, in file order (the scales of weights stored
    elsewhere last)."""
    model_dir = src.parent if model_dir is None else model_dir
    here = Path(src)
    work, written = [], []
    for m, r in edits:
        t = m.tensor
        own = model_dir / t.shard == here
        ranges = [(t.start, t.end)] if own else []
        if m.scales is not None and model_dir / m.scales[0].shard == here:
            ranges.append((m.scales[0].start, m.scales[0].end))
        if not ranges:
            raise AbliterateError(f"tensor {t.name} is not stored in {src.name}: it cannot be edited there")
        written.extend(ranges)
        work.append((t.start if own else math.inf, m, r))  # a scale whose weight is elsewhere: last
    work.sort(key=lambda item: item[0])
    with open(src, "rb") as fin, open(dst, "wb", buffering=0) as fout:
        size = os.fstat(fin.fileno()).st_size
        gaps = _gaps(written, size)

        def edit(anchor: float, m: Match, r: torch.Tensor) -> None:
            if anchor != math.inf:
                _read_ahead(fin.fileno(), m.tensor.end)  # what follows is read from the disk meanwhile
            if m.scales is None:
                _edit_tensor(fin.fileno(), fout.fileno(), m, r)
            else:
                _requantize_tensor(model_dir, here, fout.fileno(), m, r)

        if pool is None:
            for anchor, m, r in work:
                while gaps and gaps[0][0] < anchor:  # the unedited bytes before this tensor
                    start, end = gaps.pop(0)
                    _copy_range(fin.fileno(), fout.fileno(), start, end - start)
                edit(anchor, m, r)
        else:
            pending = [pool.submit(edit, *item) for item in work]
            try:
                while gaps:
                    start, end = gaps.pop(0)
                    _copy_range(fin.fileno(), fout.fileno(), start, end - start)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
            finally:
                wait(pending)  # the files stay open until every tensor handed over is written or failed
            for future in pending:
                future.result()  # the first failure
        for start, end in gaps:
            _copy_range(fin.fileno(), fout.fileno(), start, end - start)
        os.fsync(fout.fileno())
    return size


@functools.cache
def edit_pool(workers: int) -> ThreadPoolExecutor | None:
    """This process's pool of `workers` threads that edit tensors for `write_shard` (kept for the
    process: idle threads cost nothing), each with its share of torch's threads; None for 1 worker.
    Its tensors never wait on a shard, so shards that wait on it cannot deadlock it."""
    if workers <= 1:
        return None
    return ThreadPoolExecutor(
        workers, thread_name_prefix="abliterate-edit", initializer=apply_threads, initargs=(None, workers)
    )


def _gaps(written: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The byte ranges of [0, size) outside the `written` ones (disjoint: distinct tensors)."""
    gaps, position = [], 0
    for start, end in sorted(written):
        if start < position:
            raise AbliterateError(f"edited byte ranges overlap at byte {start}: a tensor is matched twice")
        if start > position:
            gaps.append((position, start))
        position = end
    if position < size:
        gaps.append((position, size))
    return gaps


def _requantize_tensor(model_dir: Path, here: Path, dst: int, m: Match, r: torch.Tensor) -> None:
    """An FP8 weight's edit (`fp8_edit.requantized_edit`), written where this shard holds its parts:
    the weight, its scale tensor, or both."""
    weight, scale = m.tensor, m.scales[0]
    own_weight = model_dir / weight.shard == here
    q, new_scale = requantized_edit(model_dir, m, r, _SCRATCH, scales_only=not own_weight, share=True)
    if own_weight:
        _write_at(dst, q, weight.start, weight.nbytes)
    if model_dir / scale.shard == here:
        _write_at(dst, new_scale, scale.start, scale.nbytes)


def _write_at(dst: int, x: torch.Tensor, offset: int, nbytes: int) -> None:
    view = memoryview(x.contiguous().view(torch.uint8).numpy()).cast("B")
    if len(view) != nbytes:
        raise AbliterateError(f"an edited tensor of {len(view)} bytes does not fill its {nbytes}-byte range")
    _write_all(dst, view, offset)


def _write_all(dst: int, view: memoryview, offset: int) -> None:
    """Write `view` at `offset`, `WRITE_BYTES` per call."""
    done = 0
    while done < len(view):
        done += os.pwrite(dst, view[done : done + WRITE_BYTES], offset + done)


def _read_ahead(src: int, offset: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(src, offset, READ_AHEAD, os.POSIX_FADV_WILLNEED)


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy src[offset:offset+count] to the same offset of dst: in the kernel where it can."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, min(count, 1 << 30), offset, offset)
        except (OSError, AttributeError):  # another filesystem, old kernel, other OS
            n = os.pwrite(dst, os.pread(src, min(count, 1 << 26), offset), offset)
        if n == 0:
            raise AbliterateError(f"unexpected end of input while copying at byte {offset}")
        offset += n
        count -= n


def _edit_tensor(src: int, dst: int, m: Match, r: torch.Tensor) -> None:
    """Read, edit in float32, round once, write: chunk by chunk of independent vectors."""
    dtype = TORCH_DTYPES[m.tensor.dtype]
    for offset, work in edited_chunks(src, m, r):
        _write_rounded(dst, work, dtype, offset)


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
        refuse_nonfinite(work, t, first * row_numel)  # the input's damage, named before it is spread
        edit(work, r, m.scale, axis)
        yield offset, work


class _Scratch(threading.local):
    """Per-thread buffers reused from tensor to tensor (a fresh allocation faults in every page:
    a third of the edit time). The float32 one grows to the largest chunk edited, and stays (an FP8
    weight is edited in it a slice of whole vectors at a time: `fp8_edit.SLICE`), as does the byte
    one (an FP8 weight's bytes, read, then requantized into); the pieces, one per stored dtype, hold
    what is read before widening and written after rounding."""

    def __init__(self) -> None:
        self.work = torch.empty(0, dtype=torch.float32)
        self.raw = torch.empty(0, dtype=torch.uint8)
        self.pieces: dict[torch.dtype, torch.Tensor] = {}

    def float32(self, numel: int) -> torch.Tensor:
        if self.work.numel() < numel:
            self.work = torch.empty(0, dtype=torch.float32)  # free the old one first
            self.work = torch.empty(numel, dtype=torch.float32)
        return self.work[:numel]

    def bytes(self, numel: int) -> torch.Tensor:
        """A uint8 buffer (an FP8 weight's bytes, read and then requantized into)."""
        if self.raw.numel() < numel:
            self.raw = torch.empty(0, dtype=torch.uint8)
            self.raw = torch.empty(numel, dtype=torch.uint8)
        return self.raw[:numel]

    def piece(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if dtype not in self.pieces:
            self.pieces[dtype] = torch.empty(PIECE, dtype=dtype)
        return self.pieces[dtype][:numel]


_SCRATCH = _Scratch()


def scratch() -> _Scratch:
    """This thread's reusable buffers, which the engine edits in (validation recomputes FP8 edits in
    them too): a result held in them is valid until the next edit on the thread."""
    return _SCRATCH


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


def _write_rounded(dst: int, work: torch.Tensor, dtype: torch.dtype, offset: int) -> None:
    """Round to `dtype` and write at `offset`, a piece at a time (rounding is per element: pieces
    change nothing)."""
    for view in rounded_pieces(work, dtype):
        _write_all(dst, view, offset)
        offset += len(view)


def rounded_pieces(work: torch.Tensor, dtype: torch.dtype) -> Iterator[memoryview]:
    """`work` rounded once to `dtype`, as the bytes stored, a piece at a time (the buffer is reused)."""
    flat = work.view(-1)
    for first in range(0, flat.numel(), PIECE):
        part = flat[first : first + PIECE]
        if dtype != torch.float32:
            part = _SCRATCH.piece(dtype, part.numel()).copy_(part)
        yield memoryview(part.view(torch.uint8).numpy())
