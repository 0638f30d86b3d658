"""The edit of an FP8 weight: dequantize in float32, edit as the engine edits, requantize.

`abliterate/weights/fp8.py` knows the format (scales, blocks, vectorised dequantization and
quantization); this module applies a match's edit through it. The shard engine
(`engine.write_shard`) writes the result in its one pass over a shard: each FP8 weight the shard
holds, and each scale tensor it holds (of its own weights or of weights stored in another shard).
Validation recomputes each FP8 edit through `requantized_edit`, the very function the ablation
writes with.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import torch

from abliterate.edit.matching import Match
from abliterate.edit.orthogonalize import edit_for
from abliterate.errors import AbliterateError
from abliterate.paths import file_identity
from abliterate.weights.checkpoint import Inventory, TensorInfo, refuse_nonfinite
from abliterate.weights.fp8 import (
    E4M3,
    E4M3_MAX,
    block_scales,
    dequantize,
    has_nan_bytes,
    quantize_,
    read_tensor,
)

# Elements of one slice of whole vectors (columns of a writer, rows of a reader) edited at once (16 MiB
# in float32). Each slice costs a few dozen small torch calls whose Python part holds the GIL: with two
# edit threads, slices of 512 Ki elements (in a core's L2) ran at 0.55x one thread's speed each, slices
# of 4 Mi at 0.96x, and alone no slower (a [4096, 12288] weight, 2 cores). The bytes never depend on it.
SLICE = 1 << 22


class Buffers(Protocol):
    """Reusable memory (the engine's per-thread scratch): a fresh allocation faults in every page."""

    def float32(self, numel: int) -> torch.Tensor: ...

    def bytes(self, numel: int) -> torch.Tensor: ...


def requantized_edit(
    model_dir: Path,
    m: Match,
    r: torch.Tensor,
    buffers: Buffers | None = None,
    scales_only: bool = False,
    share: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(FP8 weight, scale in its stored dtype and shape) of the match `m` edited along `r` (a vector
    [H], or a basis [k, H] of a rank-k plan: `orthogonalize.project_out_`): what the
    ablation writes, and what validation recomputes. Deterministic: the same inputs give the same
    bytes, in whichever shard's task it runs.

    The weight and its scale are read from `model_dir`, wherever they are stored; the weight is
    dequantized in float32 (`fp8.dequantize`), edited as the engine edits any tensor
    (`orthogonalize.edit_for`), and requantized with fresh block scales (`fp8.quantize_`).
    `scales_only`: the scales alone (the weight None), for a shard that holds the scale of a weight
    stored in another. `buffers`: memory to reuse; the FP8 weight returned is then a view of it (use
    it before the next call). `share` (the engine's shard tasks): the fresh scales of a weight whose
    scale tensor another shard holds are handed to that shard's task in this process (`_SHARED`)
    instead of being computed twice.

    The edit runs slice by slice of whole vectors (`SLICE` elements: columns of a writer, rows of a
    reader, whole blocks of the scale grid): each slice's codes are dequantized into the cache,
    edited by `edit_for` (each vector is edited on its own: a slice of vectors is edited as the
    whole tensor would be), requantized, and written over its codes. Memory: the tensor's FP8 bytes
    and one slice in float32."""
    if not share:
        return _requantized_edit(model_dir, m, r, buffers, scales_only)
    return _SHARED.run(
        model_dir, m, r, scales_only, lambda only: _requantized_edit(model_dir, m, r, buffers, only)
    )


def _requantized_edit(
    model_dir: Path, m: Match, r: torch.Tensor, buffers: Buffers | None, scales_only: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    weight, (scale_info, block) = m.tensor, m.scales
    raw = read_tensor(
        model_dir / weight.shard, weight, None if buffers is None else buffers.bytes(weight.nbytes)
    )
    scale = read_tensor(model_dir / scale_info.shard, scale_info)
    refuse_nonfinite(scale, scale_info, what="FP8 scale")
    shape, axis = weight.shape, weight.residual_axis - (len(weight.shape) - 2)  # the matrix's axis
    lead, out, cols = math.prod(shape[:-2]), shape[-2], shape[-1]
    if axis < 0 or raw.numel() == 0:  # the residual axis a leading one (no FP8 match has it), or empty
        return _whole_tensor_edit(model_dir, m, r, raw, scale, buffers, scales_only)
    edit = edit_for(m.method, m.side)
    codes = raw.view(torch.uint8).view(lead, out, cols)
    grid = scale.to(torch.float32).reshape(lead, -(-out // block[0]), -(-cols // block[1]))
    new_scale = torch.empty(grid.shape, dtype=torch.float32)
    # a value is NaN or Inf only for a NaN byte, or a product q * scale past float32's range
    overflows = grid.numel() > 0 and float(grid.abs().max()) * E4M3_MAX >= torch.finfo(torch.float32).max
    across = block[1 - axis]  # the block's side along the axis the slices cut
    step = max(1, SLICE // (across * (out, cols)[axis])) * across
    largest = (out if axis == 0 else min(step, out)) * (min(step, cols) if axis == 0 else cols)
    piece = torch.empty(largest, dtype=torch.uint8)
    work = torch.empty(largest, dtype=torch.float32) if buffers is None else buffers.float32(largest)
    for e in range(lead):
        for first in range(0, (cols, out)[axis], step):
            end = min((cols, out)[axis], first + step)
            cells = slice(first // across, -(-end // across))
            stored = codes[e, :, first:end] if axis == 0 else codes[e, first:end]
            cell_scale = grid[e, :, cells] if axis == 0 else grid[e, cells]
            part = piece[: stored.numel()].view(stored.shape).copy_(stored)
            values = dequantize(part, cell_scale, block, work[: stored.numel()])
            if has_nan_bytes(part) or (overflows and not math.isfinite(float(values.sum()))):
                _refuse_nonfinite_input(model_dir, weight, scale, block)
            edit(values, r, m.scale, axis)
            target = new_scale[e, :, cells] if axis == 0 else new_scale[e, cells]
            if scales_only:
                target.copy_(block_scales(values, block, scale.dtype).view(target.shape))
                continue
            q, fresh = quantize_(values, block, scale.dtype, out=part.view(E4M3))  # its codes are read
            target.copy_(fresh.view(target.shape))
            stored.copy_(q.view(torch.uint8))  # the input's bytes of this slice are read: reused
    new = new_scale.to(scale.dtype).reshape(scale.shape)
    return (None if scales_only else raw.view(E4M3)), new


class _SharedEdits:
    """FP8 edits whose weight and scale tensor lie in different shards, computed once in this process
    (the shard tasks are threads) and handed from the first of the two shard tasks to the other: the
    first to come computes the whole requantization (weight and scales) and keeps the other's part,
    the second waits for it if it is under way and takes its part. A weight's bytes kept for a task
    that has not run yet (its shard is later in the run) count against `BUDGET`: above it the oldest
    are dropped and that task computes again. Bytes never depend on who computed them
    (`requantized_edit` is deterministic); a key holds every input of the computation. At most `KEEP`
    parts kept (for tasks that never come: their shard was complete from an earlier run, or another
    process ablates it)."""

    KEEP = 256
    # bytes of requantized weights kept for weight tasks that have not run yet: about one of GLM-4.5-Air's
    # largest FP8 weights (o_proj, 48 MiB), so memory stays within a tensor of the ablation's own
    BUDGET = 64 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, _Handed] = OrderedDict()

    @staticmethod
    def key(model_dir: Path, m: Match, r: torch.Tensor) -> tuple:
        t, s = m.tensor, m.scales[0]
        vector = hashlib.sha256(r.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()
        return (
            file_identity(Path(model_dir) / t.shard),  # a shard rewritten in place is another input
            file_identity(Path(model_dir) / s.shard),
            t.name,
            t.start,
            s.name,
            s.start,
            m.method,
            m.side,
            float(m.scale),
            t.residual_axis,
            tuple(m.scales[1]),
            tuple(r.shape),
            vector,
        )

    def run(self, model_dir: Path, m: Match, r: torch.Tensor, scales_only: bool, compute):
        """`compute(scales_only)` -> (weight or None, scale): this task's part, computed once."""
        if m.scales[0].shard == m.tensor.shard:  # one task writes both: nothing to hand over
            return compute(scales_only)
        key = self.key(model_dir, m, r)
        with self._lock:
            entry = self._entries.get(key)
            first = entry is None
            if first:
                entry = self._entries[key] = _Handed()
        if not first:
            entry.done.wait()
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            if scales_only and entry.scale is not None:
                return None, entry.scale
            if not scales_only and entry.weight is not None:
                return entry.weight, entry.scale
            return compute(scales_only)  # the first task failed, or its weight was dropped
        try:
            weight, scale = compute(False)  # the whole edit: the other task's part too
            if (
                scales_only
            ):  # the weight's task comes later: its bytes are kept for it (a copy: buffers are reused)
                entry.weight, entry.scale = weight.clone(), scale
            else:
                entry.scale = scale.clone()
        finally:  # a failure hands over nothing: the other task computes for itself
            with self._lock:
                entry.done.set()
                self._trim()
        return (None if scales_only else weight), scale

    def _trim(self) -> None:
        """Drop the oldest finished parts: weights above `BUDGET` bytes, any above `KEEP` (under the lock)."""
        held = sum(e.weight.numel() for e in self._entries.values() if e.weight is not None)
        for key, e in list(self._entries.items()):
            if not e.done.is_set():
                continue
            if len(self._entries) > self.KEEP or (held > self.BUDGET and e.weight is not None):
                del self._entries[key]
                held -= 0 if e.weight is None else e.weight.numel()


class _Handed:
    """One shared FP8 edit: set once computed (`weight` kept only for a weight task still to come)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.weight: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None


_SHARED = _SharedEdits()


def _refuse_nonfinite_input(model_dir: Path, weight: TensorInfo, scale: torch.Tensor, block) -> None:
    """One line naming the first NaN or Inf of the dequantized input weight (NaN bytes 0x7f, 0xff, or
    an overflowing product), read again whole from the input (an error path: one float32 tensor)."""
    values = dequantize(read_tensor(model_dir / weight.shard, weight), scale, block)
    refuse_nonfinite(values, weight, what="FP8 weight")


def _whole_tensor_edit(
    model_dir: Path,
    m: Match,
    r: torch.Tensor,
    raw: torch.Tensor,
    scale: torch.Tensor,
    buffers: Buffers | None,
    scales_only: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The edit of the whole tensor in float32 at once: where no slice holds whole vectors."""
    weight, block = m.tensor, m.scales[1]
    work = dequantize(
        raw, scale, block, None if buffers is None else buffers.float32(math.prod(weight.shape))
    )
    refuse_nonfinite(work, weight, what="FP8 weight")  # NaN bytes (0x7f, 0xff) of the input
    edit_for(m.method, m.side)(work, r, m.scale, weight.residual_axis)
    if scales_only:
        return None, block_scales(work, block, scale.dtype).to(scale.dtype).reshape(scale.shape)
    new_q, new_scale = quantize_(work, block, scale.dtype, out=raw)  # the input's bytes are read: reused
    return new_q, new_scale.to(scale.dtype).reshape(scale.shape)


_LARGEST_FINITE_SCALE = torch.finfo(torch.float32).max / E4M3_MAX  # a scale above: 448 x scale overflows


def check_input_scales(inventory: Inventory) -> None:
    """Every FP8 scale of the input finite, before any work (a NaN or Inf scale is the input's damage:
    refused naming the tensor, never written and then blamed on the edit by validation). Scales are
    small (one value per block of 128 x 128 weights in GLM-4.5-Air-FP8): one read each."""
    scales = sorted(
        (inventory.tensors[name] for name, _ in inventory.fp8.values()), key=lambda t: (t.shard, t.start)
    )
    for s in scales:  # in file order: the disk reads forward through each shard
        values = read_tensor(inventory.model_dir / s.shard, s)
        refuse_nonfinite(values, s, what="FP8 scale")
        huge = values.float().abs() > _LARGEST_FINITE_SCALE
        if bool(huge.any()):  # finite, but times e4m3's largest value the dequantized weight overflows
            raise AbliterateError(
                f"FP8 scale {s.name} in the input shard {s.shard} holds {int(huge.sum())} value(s) above "
                f"{_LARGEST_FINITE_SCALE:.3g} (the largest {float(values.float().abs().max()):.3g}): times e4m3's "
                f"largest value {E4M3_MAX:g} they overflow float32, no real scale does; the input checkpoint is "
                f"damaged: re-download {s.shard} and rerun"
            )
