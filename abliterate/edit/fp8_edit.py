"""The edit of an FP8 weight: dequantize in float32, edit as the engine edits, requantize.

`abliterate/weights/fp8.py` knows the format (scales, blocks, vectorised dequantization and
quantization); this module applies a match's edit through it. The shard engine
(`engine.write_shard`) writes the result in its one pass over a shard: each FP8 weight the shard
holds, and each scale tensor it holds (of its own weights or of weights stored in another shard).
Validation recomputes each FP8 edit through `requantized_edit`, the very function the ablation
writes with.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch

from abliterate.edit.matching import Match
from abliterate.edit.orthogonalize import edit_for
from abliterate.weights.fp8 import block_scales, dequantize, quantize_, read_tensor


class Buffers(Protocol):
    """Reusable memory (the engine's per-thread scratch): a fresh allocation faults in every page."""

    def float32(self, numel: int) -> torch.Tensor: ...

    def bytes(self, numel: int) -> torch.Tensor: ...


def requantized_edit(
    model_dir: Path, m: Match, r: torch.Tensor, buffers: Buffers | None = None, scales_only: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(FP8 weight, scale in its stored dtype and shape) of the match `m` edited along `r`: what the
    ablation writes, and what validation recomputes. Deterministic: the same inputs give the same
    bytes, in whichever shard's task it runs.

    The weight and its scale are read from `model_dir`, wherever they are stored; the weight is
    dequantized in float32 (`fp8.dequantize`), edited as the engine edits any tensor
    (`orthogonalize.edit_for`), and requantized with fresh block scales (`fp8.quantize_`).
    `scales_only`: the scales alone (the weight None), for a shard that holds the scale of a weight
    stored in another. `buffers`: memory to reuse; the FP8 weight returned is then a view of it (use
    it before the next call). Memory: the tensor in float32 and its FP8 bytes."""
    weight, (scale_info, block) = m.tensor, m.scales
    raw = read_tensor(
        model_dir / weight.shard, weight, None if buffers is None else buffers.bytes(weight.nbytes)
    )
    scale = read_tensor(model_dir / scale_info.shard, scale_info)
    work = dequantize(
        raw, scale, block, None if buffers is None else buffers.float32(math.prod(weight.shape))
    )
    edit_for(m.method, m.side)(work, r, m.scale, weight.residual_axis)
    if scales_only:
        return None, block_scales(work, block, scale.dtype).to(scale.dtype).reshape(scale.shape)
    new_q, new_scale = quantize_(work, block, scale.dtype, out=raw)  # the input's bytes are read: reused
    return new_q, new_scale.to(scale.dtype).reshape(scale.shape)
