"""FP8 (float8_e4m3fn) weights with scales: formats, block dequantization and requantization.

The one place that knows how an FP8 checkpoint stores a matrix. Two families, both read from
config.json's `quantization_config`:

| family | `quant_method` | weight | scale tensor | scale grid |
|---|---|---|---|---|
| transformers fine-grained FP8 (GLM-4.5-Air-FP8, DeepSeek) | `fp8` | `<m>.weight` F8_E4M3 [out, in] | `<m>.weight_scale_inv` F32 | [ceil(out/bm), ceil(in/bn)], `weight_block_size` [bm, bn] |
| compressed-tensors float8 (llm-compressor) | `compressed-tensors`, weights `type: float`, `num_bits: 8` | `<m>.weight` F8_E4M3 | `<m>.weight_scale` F32 | strategy `channel` [out, 1], `block` (`block_structure`), `tensor` [1] |

In both the stored scale multiplies: `W[i, j] = float(q[i, j]) * scale[i // bm, j // bn]`
(transformers' `Fp8Dequantize`; compressed-tensors' `dequantize`). One routine covers them all:
a channel scale is a block of (1, in), a tensor scale one block of (out, in). A weight with
leading dimensions (fused experts [E, out, in]) has scales [E, gm, gn].

Which tensors are quantized: exactly the F8_E4M3 tensors with a sibling scale in the checkpoint
(the shards say it, whatever `modules_to_not_convert` / `ignore` list): in GLM-4.5-Air-FP8 every
linear projection of the decoder (attention q/k/v/o, dense MLP, routed and shared experts); the
embedding, the LM head, the norms, the routers (`mlp.gate`, float32) and their correction biases
stay unquantized. Activation scales (`input_scale`, a static activation scheme) are left as they
are. Zero points (asymmetric schemes) and other formats are refused by the caller.

This module is the format only; the edit of an FP8 weight (dequantize, edit, requantize, write)
is `abliterate/edit/fp8_edit.py`.

Requantization (the inverse, as transformers' `Fp8Quantize` computes it): per block,
`scale = amax / 448` (1 for an all-zero block), `q = clamp(W / scale, -448, 448)` rounded to
nearest even in float8_e4m3fn. Deterministic: the same float32 W gives the same bytes.

Rounding bound. e4m3 has 3 mantissa bits: unit roundoff `u = 2^-4` for normal values; below
2^-6 (scaled) the spacing is 2^-9, so an element moves by at most `max(u |x|, 2^-10 * scale)`.
Hence `|W_q - W|_F <= u |W|_F + 2^-10 |S|_F`, with S the scale broadcast over its block.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abliterate.errors import AbliterateError
from abliterate.weights.dtypes import TORCH_DTYPES

E4M3_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
UNIT_ROUNDOFF = 2.0**-4  # e4m3: 3 mantissa bits
SUBNORMAL_HALF_SPACING = 2.0**-10  # half the spacing below the smallest normal 2^-6
STORED_DTYPE = "F8_E4M3"
E4M3 = TORCH_DTYPES[STORED_DTYPE]
SCALE_DTYPE = "F32"


@dataclass(frozen=True)
class Fp8Format:
    """How a checkpoint stores its FP8 weights."""

    method: str  # "fp8" (transformers fine-grained) | "compressed-tensors"
    scale_suffix: str  # "weight_scale_inv" | "weight_scale": the scale's name replaces "weight"
    block: tuple[int, int] | None  # None: from the scale's shape (channel / tensor strategies)

    def scale_name(self, weight_name: str) -> str:
        return weight_name.removesuffix("weight") + self.scale_suffix


MAX_BLOCK = 1 << 16  # largest block side accepted from a config (GLM/DeepSeek: 128)
_FIX = "fix it in config.json (or copy the file from the model's source)"


class UnsupportedQuantization(AbliterateError):
    """A quantization the tool does not edit (the caller names a tensor and what to do)."""


def _short(value: object) -> str:
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _block_value(value: object, key: str, source: str) -> tuple[int, int]:
    """Two whole numbers in [1, MAX_BLOCK] (a block of rows x columns), else one line naming the key."""
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_BLOCK for v in value)
    ):
        raise AbliterateError(
            f"{source}: `quantization_config.{key}` is {_short(value)}; it must be two whole numbers "
            f"[rows, columns] in [1, {MAX_BLOCK}] (the FP8 scale block): {_FIX}"
        )
    return int(value[0]), int(value[1])


def format_from_config(config: dict, source: str | Path = "config.json") -> Fp8Format | None:
    """The FP8 format `config.json` declares; None without a `quantization_config`.

    Every value read is checked at this boundary: a malformed one is one line naming `source`, the
    key and what it must be (`AbliterateError`). Any other quantization (MXFP4, NVFP4, bitsandbytes,
    GPTQ, AWQ, ...) raises `UnsupportedQuantization`.
    """
    source = str(source)
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise AbliterateError(
            f"{source}: `quantization_config` is {_short(qc)}; it must be an object: {_FIX}"
        )
    raw_method = qc.get("quant_method", "")
    if not isinstance(raw_method, str):
        raise AbliterateError(
            f"{source}: `quantization_config.quant_method` is {_short(raw_method)}; it must be a string "
            f'such as "fp8": {_FIX}'
        )
    method = raw_method.lower()
    if method == "fp8":
        if qc.get("scale_fmt") not in (None, "float32", "fp32"):
            raise unsupported(f"fp8 with scale_fmt {_short(qc.get('scale_fmt'))}")
        block = qc.get("weight_block_size")
        return Fp8Format(
            "fp8",
            "weight_scale_inv",
            None if block is None else _block_value(block, "weight_block_size", source),
        )
    if method == "compressed-tensors":
        groups = qc.get("config_groups")
        if groups is None:
            groups = {}
        if not isinstance(groups, dict):
            raise AbliterateError(
                f"{source}: `quantization_config.config_groups` is {_short(groups)}; it must be an object "
                f'of named groups ({{"group_0": {{"weights": ...}}}}): {_FIX}'
            )
        block = None
        for name, group in groups.items():
            key = f"config_groups.{name}"
            if group is None:
                continue
            if not isinstance(group, dict):
                raise AbliterateError(
                    f"{source}: `quantization_config.{key}` is {_short(group)}; it must be an object: {_FIX}"
                )
            weights = group.get("weights")
            if weights is None:
                continue
            if not isinstance(weights, dict):
                raise AbliterateError(
                    f"{source}: `quantization_config.{key}.weights` is {_short(weights)}; it must be an "
                    f"object: {_FIX}"
                )
            if weights.get("type") != "float" or weights.get("num_bits") != 8:
                raise unsupported(
                    f"compressed-tensors {_short(weights.get('type'))} {_short(weights.get('num_bits'))}-bit weights"
                )
            if weights.get("symmetric") is False:
                raise unsupported("compressed-tensors asymmetric float8 (zero points)")
            if weights.get("strategy") == "block":
                block = _block_value(weights.get("block_structure"), f"{key}.weights.block_structure", source)
            elif weights.get("strategy") not in ("channel", "tensor"):
                raise unsupported(
                    f"compressed-tensors float8 with strategy {_short(weights.get('strategy'))}"
                )
        return Fp8Format("compressed-tensors", "weight_scale", block)
    plain = raw_method and raw_method == raw_method.strip() and raw_method.isprintable()
    raise unsupported(
        raw_method if plain else _short(raw_method), f" (`quantization_config.quant_method` in {source})"
    )


def unsupported(kind: str, where: str = "") -> AbliterateError:
    return UnsupportedQuantization(
        f"quantization {kind} is not supported{where}: only FP8 e4m3 with scales (transformers' fp8, "
        "compressed-tensors float8) is edited; ablate the unquantized (bf16/fp16/fp32) checkpoint and quantize after"
    )


def grid(
    shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int] | None
) -> tuple[int, int]:
    """The block (bm, bn) of a weight of `shape` whose scales have `scale_shape`; errors if they disagree.

    The scale's shape is checked, not only its element count (a [gn, gm] grid holds as many values as
    [gm, gn] but would scale the wrong blocks): block scales are [*lead, gm, gn]; channel scales
    [*lead, out, 1] or [*lead, out]; a tensor scale [], [1] or one per leading index ([*lead], [*lead, 1],
    [*lead, 1, 1])."""
    shape, scale_shape = tuple(shape), tuple(scale_shape)
    if len(shape) < 2:
        raise AbliterateError(f"an FP8 weight of shape {list(shape)} is not a matrix")
    out, inp = shape[-2:]
    lead = shape[:-2]
    if block is None:  # channel ([out, 1]) or tensor ([1] / []) scales, from the scale's shape
        if scale_shape in ((*lead, out, 1), (*lead, out)):
            return 1, inp
        tensor_shapes = {(*lead, 1, 1), (*lead, 1), lead} | ({(), (1,), (1, 1)} if not lead else set())
        if scale_shape in tensor_shapes:
            return out, inp
        raise AbliterateError(
            f"FP8 scales of shape {list(scale_shape)} fit no channel ({[*lead, out, 1]}) or tensor "
            f"({[*lead, 1]}) grid of weight {list(shape)}"
        )
    bm, bn = block
    expected = (*lead, math.ceil(out / bm), math.ceil(inp / bn))
    if scale_shape != expected:
        raise AbliterateError(
            f"FP8 scales of shape {list(scale_shape)} do not match weight {list(shape)} in blocks {list(block)} "
            f"(expected {list(expected)})"
        )
    return bm, bn


# Elements handled at once (a slice of `fp8_edit.SLICE` is one piece): fewer, larger torch calls, so
# threads that edit at once seldom wait for the GIL (fp8_edit.SLICE); the bytes never depend on it.
PIECE = 1 << 22
# The float32 value of each of the 256 e4m3 bytes, as torch's cast gives it (exact: e4m3 values are
# float32 values): the reference of the decoding below, and the values of the NaN bytes.
_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).to(torch.float32)
# An e4m3 byte as float32 bits, by three integer operations on its sign-extended value: << 20 puts
# its 4 exponent and 3 mantissa bits at the bottom of float32's exponent and the top of its mantissa
# (and copies of the sign above them), the mask keeps the sign bit and those 7 bits. The float32 read
# is the e4m3 value times 2^-120, exactly, subnormals included (exponent 0: a float32 subnormal
# m 2^-149 2^20 = 2^-120 (m / 8) 2^-6); times the block's scale times 2^120 (exact: a power of two)
# it is the value times the scale rounded once, the very float32 of the table's product. 6x faster
# than torch's float8 -> float32 cast, 2x faster than the table lookup. NaN bytes (0x7f, 0xff) decode
# to 480 2^-120: they are set from the table.
_DECODE_SHIFT = 20
_DECODE_MASK = -(1 << 31) | (0x7F << _DECODE_SHIFT)  # 0x87F00000 as int32: the sign, 4 + 3 bits
_DECODE_UNIT = 2.0**120
_LARGEST_SCALE = 2.0**7  # below it, scale x 2^120 is a finite float32


_SMALLEST = torch.tensor([1 << _DECODE_SHIFT], dtype=torch.int32).view(torch.float32)  # 2^-9 2^-120


def _decodes_subnormals() -> bool:
    """Whether float32 subnormals are read as they are on this thread (no denormals-are-zero mode,
    `torch.set_flush_denormal`): the bit decoding's smallest values are float32 subnormals."""
    return float(_SMALLEST * _DECODE_UNIT) == 2.0**-9


def has_nan_bytes(codes: torch.Tensor) -> bool:
    """Whether e4m3 bytes (uint8) hold a NaN (0x7f or 0xff: the largest as int8 or as uint8)."""
    return codes.numel() > 0 and (int(codes.max()) == 0xFF or int(codes.view(torch.int8).max()) == 0x7F)


def _blocked(
    x: torch.Tensor, grid_values: torch.Tensor, block: tuple[int, int]
) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
    """`x` [lead, out, cols] cut into at most four views of whole blocks, each with the values of its
    blocks' grid cells shaped to broadcast over it and the two dimensions one block spans: the full
    blocks [lead, gm, bm, gn, bn], the last partial column of blocks, the last partial row of blocks,
    and their corner. An elementwise operation with the grid is one operation per view, whatever the
    number of blocks (no copy: views of `x` and of `grid_values` [lead, ceil(out/bm), ceil(cols/bn)])."""
    lead, out, cols = x.shape
    bm, bn = block
    gm, gn = out // bm, cols // bn
    rows, full = gm * bm, gn * bn
    g = grid_values
    parts = []
    if gm and gn:
        whole = x[:, :rows, :full].view(lead, gm, bm, gn, bn)
        parts.append((whole, g[:, :gm, None, :gn, None], (2, 4)))
    if gm and full < cols:
        parts.append((x[:, :rows, full:].view(lead, gm, bm, cols - full), g[:, :gm, gn, None, None], (2, 3)))
    if rows < out and gn:
        parts.append((x[:, rows:, :full].view(lead, out - rows, gn, bn), g[:, gm, None, :gn, None], (1, 3)))
    if rows < out and full < cols:
        parts.append((x[:, rows:, full:], g[:, gm, gn, None, None], (1, 2)))
    return parts


def _grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int, int]:
    out, cols = shape[-2:]
    return math.prod(shape[:-2]), math.ceil(out / block[0]), math.ceil(cols / block[1])


def _pieces(shape: tuple[int, ...], block: tuple[int, int]):
    """Pieces of rows of a [..., out, cols] tensor, about `PIECE` elements each, that never straddle
    a row of blocks: (matrix, first row, end row, first grid row, end grid row, the piece's block).
    A piece is several whole rows of blocks, or part of one (its block then has the piece's rows);
    every piece is handled by a few vectorised operations (`_blocked`), so the loop runs per piece,
    never per block, and each piece is read from memory once while it sits in the cache."""
    out, cols = shape[-2:]
    bm = block[0]
    rows = max(1, PIECE // max(cols, 1))
    for e in range(math.prod(shape[:-2])):
        if rows >= bm:  # whole rows of blocks (the last one may be partial)
            step = rows // bm * bm
            for r0 in range(0, out, step):
                r1 = min(out, r0 + step)
                yield e, r0, r1, r0 // bm, math.ceil(r1 / bm), block
        else:  # parts of one row of blocks
            for i in range(math.ceil(out / bm)):
                end = min(out, (i + 1) * bm)
                for r0 in range(i * bm, end, rows):
                    r1 = min(end, r0 + rows)
                    yield e, r0, r1, i, i + 1, (r1 - r0, block[1])


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 W = q * scale per block; q float8 (or its bytes as uint8) [..., out, in], scale of the
    grid's size. `out`: a contiguous float32 tensor of q's shape to fill (else a new one). Piece by
    piece of rows (`_pieces`): the bytes decoded into float32 bits in place (`_DECODE_MASK`; NaN bytes,
    0x7f and 0xff, the largest as int8 and as uint8, from the table), then multiplied by their blocks' scales times 2^120 in place (`_blocked`). The
    same bits as the table's value times the scale; a scale of 2^7 or more, a non-finite one, or a
    thread that flushes subnormals to zero use the table itself."""
    w = torch.empty(q.shape, dtype=torch.float32) if out is None else out.view(q.shape)
    lead, (rows, cols) = math.prod(q.shape[:-2]), q.shape[-2:]
    codes, w3 = q.reshape(lead, rows, cols).view(torch.uint8), w.view(lead, rows, cols)
    s = scale.to(torch.float32).reshape(_grid_shape(q.shape, block))
    by_bits = bool((s.abs() < _LARGEST_SCALE).all()) and _decodes_subnormals()
    if by_bits:
        s = s * _DECODE_UNIT  # exact: a power of two, and no overflow below _LARGEST_SCALE
    largest_piece = min(rows, max(1, PIECE // max(cols, 1))) * cols
    index = torch.empty(0 if by_bits else largest_piece, dtype=torch.int32)
    for e, r0, r1, g0, g1, piece_block in _pieces(q.shape, block):
        part, piece_codes = w3[e, r0:r1], codes[e, r0:r1]
        n = part.numel()
        if by_bits:
            bits = part.view(torch.int32).copy_(piece_codes.view(torch.int8))  # sign-extended
            bits.bitwise_left_shift_(_DECODE_SHIFT).bitwise_and_(_DECODE_MASK)
            if has_nan_bytes(piece_codes):
                nan = (piece_codes & 0x7F) == 0x7F  # NaN bytes (the largest): the table's NaN
                part[nan] = _E4M3_VALUES[piece_codes[nan].long()] / _DECODE_UNIT
        else:
            torch.index_select(
                _E4M3_VALUES, 0, index[:n].view(part.shape).copy_(piece_codes).view(-1), out=part.view(-1)
            )
        for view, view_scale, _ in _blocked(part.unsqueeze(0), s[e : e + 1, g0:g1], piece_block):
            view.mul_(view_scale)
    return w


def block_scales(
    w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fresh per-block scales float32 [lead, gm, gn] of W [..., out, in], as transformers' `Fp8Quantize`
    computes them: amax(|block|) / 448 (1 for an all-zero block), rounded to the stored scale dtype
    and back."""
    return _amax_and_scales(w, block, scale_dtype)[1]


def _amax_and_scales(
    w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax(|block|), scale) per block, float32 [lead, gm, gn]. amax(|x|) = max(max x, -min x), piece
    by piece of rows (`_pieces`: the second reduction reads the piece from the cache): the maximum
    and minimum of each block's part of a row along the contiguous last dimension, then over the
    piece's rows, then over the pieces of a row of blocks. max and min are exact, so any order gives
    the same values (no |W| copy); NaN propagates as through abs().amax()."""
    lead, (rows, cols) = math.prod(w.shape[:-2]), w.shape[-2:]
    w3 = w.reshape(lead, rows, cols)
    amax = torch.zeros(_grid_shape(w.shape, block), dtype=torch.float32)
    for e, r0, r1, g0, g1, piece_block in _pieces(w.shape, block):
        piece_amax = amax[e : e + 1, g0:g1]
        part = torch.empty_like(piece_amax) if piece_block[0] != block[0] else piece_amax
        for view, view_amax, dims in _blocked(w3[e : e + 1, r0:r1], part, piece_block):
            high, low = view.amax(dim=dims[1], keepdim=True), view.amin(dim=dims[1], keepdim=True)
            view_amax.copy_(torch.maximum(high, low.neg_()).amax(dim=dims[0], keepdim=True))
        if part is not piece_amax:  # part of a row of blocks: the row's maximum so far
            torch.maximum(piece_amax, part, out=piece_amax)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).to(scale_dtype).to(torch.float32)
    return amax, scale


# Below this, W / scale rounds to at most 448 in e4m3 (464, the midpoint to the next step 480, rounds
# to even 448): clamping first changes no byte. A scale of amax / 448 rounded to its dtype keeps
# amax / scale within 448 (1 + 2^-8) (bf16 rounding) plus float32 division: far below it.
_NO_CLAMP = 460.0


def quantize_(
    w: torch.Tensor,
    block: tuple[int, int],
    scale_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize` in place: `w` (contiguous float32) is divided by its scales and clamped, then cast
    into `out` (float8_e4m3fn of w's shape, else a new one), piece by piece of rows (`_pieces`).
    Memory: the FP8 bytes and the scales. The clamp to +-448 runs only where it can change a byte
    (a block whose amax / scale reaches `_NO_CLAMP`: a scale that underflowed in its dtype, an
    infinite or NaN value)."""
    if w.dtype != torch.float32 or not w.is_contiguous():
        raise TypeError(f"quantize_ divides a contiguous float32 tensor in place, got {w.dtype}")
    amax, scale = _amax_and_scales(w, block, scale_dtype)
    clamp = not bool((amax.double() < _NO_CLAMP * scale.double()).all())
    q = torch.empty(w.shape, dtype=E4M3) if out is None else out.view(w.shape)
    lead, (rows, cols) = math.prod(w.shape[:-2]), w.shape[-2:]
    w3, q3 = w.view(lead, rows, cols), q.view(lead, rows, cols)
    for e, r0, r1, g0, g1, piece_block in _pieces(w.shape, block):
        part = w3[e, r0:r1]
        for view, view_scale, _ in _blocked(part.unsqueeze(0), scale[e : e + 1, g0:g1], piece_block):
            view.div_(view_scale)
        if clamp:
            part.clamp_(-E4M3_MAX, E4M3_MAX)
        q3[e, r0:r1].copy_(part)  # rounded to nearest even
    return q, scale


def quantize(
    w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn shaped like w, scale float32 [lead, gm, gn]): fresh per-block scales amax / 448,
    rounded to the stored scale dtype first (bf16 scales: q is computed with the scale as stored),
    `q = clamp(W / scale, -448, 448)` rounded to nearest even. `w` is left as it is (a float32 copy is
    divided: `quantize_` divides in place). Vectorised over the blocks (`_blocked`)."""
    return quantize_(torch.empty(w.shape, dtype=torch.float32).copy_(w), block, scale_dtype)


def broadcast_scale_norm(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> float:
    """|S|_F: the scales broadcast over the elements of their (possibly partial) blocks, in float64."""
    out, inp = shape[-2:]
    bm, bn = block
    rows = torch.tensor([min(bm, out - i * bm) for i in range(math.ceil(out / bm))], dtype=torch.float64)
    cols = torch.tensor([min(bn, inp - j * bn) for j in range(math.ceil(inp / bn))], dtype=torch.float64)
    s = scale.to(torch.float64).reshape(-1, len(rows), len(cols))
    return float(((s * s) * rows[:, None] * cols[None, :]).sum().sqrt())


def rounding_bound(w_norm: float, scale_norm: float) -> float:
    """Largest |W_q - W|_F of a requantized W: u |W|_F + 2^-10 |S|_F (module docstring), plus the
    float32 division by the scale and the multiplication back (2^-24 each, 2^-22 with headroom)."""
    return (UNIT_ROUNDOFF + 2.0**-22) * w_norm + SUBNORMAL_HALF_SPACING * scale_norm


def requantization_bound(w_norm: float, shape: tuple[int, ...], block: tuple[int, int]) -> float:
    """Largest |W_q - W|_F of any W with |W|_F <= `w_norm` requantized with fresh block scales, from
    `w_norm` alone (validation passes the input's norm, never the output's scales): each fresh scale
    is amax_b / 448 (rounded up by at most 2^-8, a bf16 scale), amax_b^2 <= the block's sum of squares,
    so |S|_F^2 = sum_b n_b amax_b^2 / 448^2 <= max n_b |W|_F^2 / 448^2, with n_b <= bm bn."""
    out, inp = shape[-2:]
    largest_block = min(block[0], out) * min(block[1], inp)
    scale_norm = math.sqrt(largest_block) * w_norm / E4M3_MAX * (1 + 2.0**-8)
    return rounding_bound(w_norm, scale_norm)


def describe(fmt: Fp8Format | None) -> dict[str, Any] | None:
    return (
        None if fmt is None else {"method": fmt.method, "scale_suffix": fmt.scale_suffix, "block": fmt.block}
    )


SCALE_DTYPES = ("F32", "BF16", "F16")


def pair_scales(
    config: dict, tensors: dict[str, Any], source: str | Path = "config.json"
) -> dict[str, tuple[str, tuple[int, int]]]:
    """FP8 weight name -> (its scale tensor's name, block), for a checkpoint whose config declares a
    supported FP8 format; {} for any other quantization (the caller refuses what stays quantized).

    Checked here, at the boundary, one line each: the config's values (`format_from_config`), every
    F8_E4M3 weight's scale present (named with the setting that names it), of a float dtype, finite
    and positive is the edit's business; its shape against the weight's and the block size (`grid`)."""
    try:
        fmt = format_from_config(config, source)
    except UnsupportedQuantization:  # refused by the caller, which names a tensor
        return {}
    if fmt is None:
        return {}
    setting = (
        f"quantization_config.quant_method {fmt.method!r} in {source} stores the scale of `<m>.weight` "
        f"as `<m>.{fmt.scale_suffix}`"
    )
    pairs = {}
    for name, t in tensors.items():
        if t.dtype != STORED_DTYPE or not name.endswith("weight"):
            continue
        scale = tensors.get(fmt.scale_name(name))
        if scale is None:
            raise AbliterateError(
                f"FP8 tensor {name} has no scale {fmt.scale_name(name)} in the checkpoint ({setting}): the "
                "checkpoint is incomplete or its config.json describes another format; re-download it"
            )
        if scale.dtype not in SCALE_DTYPES:
            raise AbliterateError(
                f"FP8 scale {scale.name} ({scale.shard}) is stored as {scale.dtype}; scales must be "
                f"{', '.join(SCALE_DTYPES)}: the checkpoint is corrupt or of another format; re-download it"
            )
        block_text = f"blocks {list(fmt.block)}" if fmt.block else "channel or tensor scales"
        try:
            pairs[name] = (scale.name, grid(t.shape, scale.shape, fmt.block))
        except AbliterateError as exc:
            raise AbliterateError(
                f"FP8 scale {scale.name} ({scale.shard}): {exc} ({block_text} from {source}): the scale or "
                "the config is wrong; re-download the checkpoint"
            ) from None
    return pairs


ACTIVATION_SCALES = ("input_scale", "output_scale", "k_scale", "v_scale")


def uncovered(quantization: dict[str, str], pairs: dict[str, tuple[str, tuple[int, int]]]) -> dict[str, str]:
    """The quantization markers that are neither an FP8 weight with its scale nor an activation scale:
    what the tool cannot edit."""
    known = set(pairs) | {scale for scale, _ in pairs.values()}
    return {
        name: kind
        for name, kind in quantization.items()
        if name not in known and not name.endswith(ACTIVATION_SCALES)
    }


SCALE_AGREEMENT = 2.0**-3  # relative: one e4m3 step of the block's amax


def one_ulp_apart(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, block: tuple[int, int]
) -> bool:
    """Whether `a` (the output, dequantized with its scales `scale_a`) is at most one e4m3 step per
    element from `b`, the reference recomputed from the input (dequantized with `scale_b`): what
    float32 sums in another order can cause (a value crossing a rounding boundary). The bound comes
    from the reference alone, never from the output it judges (a damaged output scale must not widen
    its own bound): every output scale within one e4m3 step (2^-3, relative) of the reference's, and
    each element within max(2^-3 |b|, 2^-9 x the reference block scale) x (1 + 2^-3) of b (the step
    below the smallest normal is 2^-9 x the scale; the factor covers the output's scale being up to
    one step larger)."""
    out, cols = a.shape[-2:]
    grid_shape = (math.prod(a.shape[:-2]), math.ceil(out / block[0]), math.ceil(cols / block[1]))
    sa = scale_a.to(torch.float64).reshape(grid_shape)
    sb = scale_b.to(torch.float64).reshape(grid_shape)
    if not bool(((sa - sb).abs() <= SCALE_AGREEMENT * sb.abs()).all()):
        return False
    reference = (
        sb.repeat_interleave(block[0], 1).repeat_interleave(block[1], 2)[:, :out, :cols].reshape(a.shape)
    )
    step = torch.maximum(2.0**-3 * b.abs(), 2.0**-9 * reference.abs()) * (1 + SCALE_AGREEMENT)
    return bool(((a - b).abs() <= step * (1 + 2.0**-20)).all())


def read_tensor(path: Path, t: Any, into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of a shard, in its stored dtype (`t`: a TensorInfo). `into`: a uint8 tensor of at
    least `t.nbytes` elements to read into (the result is a view of it), else new memory."""
    if into is None:
        into = torch.empty(t.nbytes, dtype=torch.uint8)
    if t.nbytes == 0:
        return torch.empty(t.shape, dtype=TORCH_DTYPES[t.dtype])
    view, done = memoryview(into[: t.nbytes].numpy()), 0
    with open(path, "rb", buffering=0) as f:
        while done < t.nbytes:
            n = os.preadv(f.fileno(), [view[done:]], t.start + done)
            if n == 0:
                raise AbliterateError(
                    f"{path} ended inside tensor {t.name}: the file changed while being read"
                )
            done += n
    return into[: t.nbytes].view(TORCH_DTYPES[t.dtype]).view(t.shape)


def partners(inventory: Any, shard: str) -> list[str]:
    """The other shards whose bytes the FP8 rewrite of `shard` reads: where the scales of its FP8
    weights are, and where the weights of its scales are (they enter its cache key)."""
    others = set()
    for weight, (scale, _) in inventory.fp8.items():
        w, s = inventory.tensors[weight].shard, inventory.tensors[scale].shard
        if shard in (w, s):
            others.update({w, s} - {shard})
    return sorted(others)
