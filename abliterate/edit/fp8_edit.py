"""The edit of an FP8 weight: dequantize in float32, edit as the engine edits, requantize, write.

`abliterate/weights/fp8.py` knows the format (scales, blocks, dequantization, quantization); this
module applies a match's edit through it. The shard engine writes every other tensor; the FP8
weights and the scales of a shard are then overwritten in the shard it wrote (`rewrite_shard`).
Validation recomputes each FP8 edit through `requantized_edit`, the very function the ablation
writes with.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from abliterate.edit.matching import Match
from abliterate.edit.orthogonalize import edit_for
from abliterate.errors import AbliterateError
from abliterate.weights.fp8 import dequantize, quantize, read_tensor


def rewrite_shard(model_dir: Path, shard: str, dst: Path, edits: list[tuple[Match, torch.Tensor]]) -> None:
    """Overwrite, in the already written shard `dst`, the FP8 weights and scales of `shard` that
    `edits` change: each edit a match with `scales` and its vector [H].

    A weight and its scale may sit in different shards, and shards are written independently: the
    task of each shard reads the weight and its scale from the input, wherever they are, and
    computes the same deterministic requantization (dequantize in float32, edit as the engine does,
    fresh per-block scales); it then writes the part its shard holds. Memory: one tensor in float32.
    """
    with open(dst, "r+b", buffering=0) as out:
        for m, r in edits:
            weight, (scale_info, _) = m.tensor, m.scales
            new_q, new_scale = requantized_edit(model_dir, m, r)
            if weight.shard == shard:
                _write_at(out.fileno(), new_q.view(torch.uint8), weight.start, weight.nbytes)
            if scale_info.shard == shard:
                _write_at(out.fileno(), new_scale, scale_info.start, scale_info.nbytes)
        os.fsync(out.fileno())


def requantized_edit(model_dir: Path, m: Match, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, scale in its stored dtype and shape) of the match `m` edited along `r`: what the
    ablation writes, and what validation recomputes. Deterministic."""
    weight, (scale_info, block) = m.tensor, m.scales
    q = read_tensor(model_dir / weight.shard, weight)
    scale = read_tensor(model_dir / scale_info.shard, scale_info)
    work = dequantize(q, scale, block)
    edit_for(m.method, m.side)(work, r, m.scale, weight.residual_axis)
    new_q, new_scale = quantize(work, block, scale.dtype)
    return new_q, new_scale.to(scale.dtype).reshape(scale.shape)


def _write_at(fd: int, x: torch.Tensor, offset: int, nbytes: int) -> None:
    view = memoryview(x.contiguous().view(torch.uint8).numpy()).cast("B")
    if len(view) != nbytes:
        raise AbliterateError(f"an FP8 tensor of {len(view)} bytes does not fill its {nbytes}-byte range")
    done = 0
    while done < nbytes:
        done += os.pwrite(fd, view[done:], offset + done)
