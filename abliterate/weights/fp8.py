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


def format_from_config(config: dict) -> Fp8Format | None:
    """The FP8 format `config.json` declares; None without a `quantization_config`.

    Raises `AbliterateError` for any other quantization (MXFP4, NVFP4, bitsandbytes, GPTQ, AWQ, ...).
    """
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise unsupported(f"a quantization_config that is no mapping ({type(qc).__name__})")
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        if qc.get("scale_fmt") not in (None, "float32", "fp32"):
            raise unsupported(f"fp8 with scale_fmt {qc.get('scale_fmt')}")
        block = qc.get("weight_block_size")
        return Fp8Format("fp8", "weight_scale_inv", tuple(block) if block else None)
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        block = None
        for group in groups.values():
            weights = (group or {}).get("weights") or {}
            if weights.get("type") != "float" or weights.get("num_bits") != 8:
                raise unsupported(
                    f"compressed-tensors {weights.get('type')} {weights.get('num_bits')}-bit weights"
                )
            if weights.get("symmetric") is False:
                raise unsupported("compressed-tensors asymmetric float8 (zero points)")
            if weights.get("strategy") == "block":
                block = tuple(weights.get("block_structure") or ())
            elif weights.get("strategy") not in ("channel", "tensor"):
                raise unsupported(f"compressed-tensors float8 with strategy {weights.get('strategy')}")
        return Fp8Format("compressed-tensors", "weight_scale", block or None)
    raise unsupported(method or "an unnamed quant_method")


def unsupported(kind: str) -> AbliterateError:
    return AbliterateError(
        f"quantization {kind} is not supported: only FP8 e4m3 with scales (transformers' fp8, "
        "compressed-tensors float8) is edited; ablate the unquantized (bf16/fp16/fp32) checkpoint and quantize after"
    )


def grid(
    shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int] | None
) -> tuple[int, int]:
    """The block (bm, bn) of a weight of `shape` whose scales have `scale_shape`; errors if they disagree."""
    if len(shape) < 2:
        raise AbliterateError(f"an FP8 weight of shape {list(shape)} is not a matrix")
    out, inp = shape[-2:]
    lead = math.prod(shape[:-2])
    numel = math.prod(scale_shape)
    if block is None:  # channel ([out, 1]) or tensor ([1] / []) scales, from the scale's size
        if numel == lead * out:
            block = (1, inp)
        elif numel == lead:
            block = (out, inp)
        else:
            raise AbliterateError(
                f"FP8 scales {list(scale_shape)} fit no channel or tensor grid of {list(shape)}"
            )
    bm, bn = block
    if numel != lead * math.ceil(out / bm) * math.ceil(inp / bn):
        raise AbliterateError(
            f"FP8 scales {list(scale_shape)} do not match weight {list(shape)} in blocks {list(block)}"
        )
    return bm, bn


def _slabs(shape: tuple[int, ...], block: tuple[int, int]):
    """(matrix index, first row, last row, block row) of every row of blocks of a [..., out, in] tensor."""
    out = shape[-2]
    lead = math.prod(shape[:-2])
    bm = block[0]
    for e in range(lead):
        for i in range(math.ceil(out / bm)):
            yield e, i * bm, min(out, (i + 1) * bm), i


def _row(scales: torch.Tensor, bn: int, cols: int) -> torch.Tensor:
    """One row of block scales [gn] spread over the `cols` columns it covers."""
    return scales.repeat_interleave(bn)[:cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 W = q * scale per block; q float8 [..., out, in], scale of the grid's size. One row of
    blocks at a time, in place (no padded copy of the tensor)."""
    out, cols = q.shape[-2:]
    bn = block[1]
    w = torch.empty(q.shape, dtype=torch.float32)
    q3, w3 = q.reshape(-1, out, cols), w.view(-1, out, cols)
    s3 = scale.to(torch.float32).reshape(q3.shape[0], math.ceil(out / block[0]), math.ceil(cols / bn))
    for e, r0, r1, i in _slabs(q.shape, block):
        slab = w3[e, r0:r1]
        slab.copy_(q3[e, r0:r1])
        slab.mul_(_row(s3[e, i], bn, cols))
    return w


def quantize(
    w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn shaped like w, scale float32 [lead, gm, gn]): fresh per-block scales amax / 448,
    rounded to the stored scale dtype first (bf16 scales: q is computed with the scale as stored).
    One row of blocks at a time: memory is the output plus one row of blocks in float32."""
    out, cols = w.shape[-2:]
    bn = block[1]
    gn, full = math.ceil(cols / bn), (cols // bn) * bn
    q = torch.empty(w.shape, dtype=E4M3)
    w3, q3 = w.reshape(-1, out, cols), q.view(-1, out, cols)
    scale = torch.empty(w3.shape[0], math.ceil(out / block[0]), gn, dtype=torch.float32)
    for e, r0, r1, i in _slabs(w.shape, block):
        slab = w3[e, r0:r1].to(torch.float32, copy=True)  # divided in place below: never the caller's
        amax = torch.empty(gn, dtype=torch.float32)
        if full:
            amax[: full // bn] = slab[:, :full].reshape(r1 - r0, full // bn, bn).abs().amax(dim=(0, 2))
        if full < cols:
            amax[-1] = slab[:, full:].abs().amax()
        sc = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).to(scale_dtype).to(torch.float32)
        scale[e, i] = sc
        q3[e, r0:r1] = slab.div_(_row(sc, bn, cols)).clamp_(-E4M3_MAX, E4M3_MAX)
    return q, scale


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


def describe(fmt: Fp8Format | None) -> dict[str, Any] | None:
    return (
        None if fmt is None else {"method": fmt.method, "scale_suffix": fmt.scale_suffix, "block": fmt.block}
    )


def pair_scales(config: dict, tensors: dict[str, Any]) -> dict[str, tuple[str, tuple[int, int]]]:
    """FP8 weight name -> (its scale tensor's name, block), for a checkpoint whose config declares a
    supported FP8 format; {} for any other (the caller refuses what stays quantized)."""
    try:
        fmt = format_from_config(config)
    except (AbliterateError, AttributeError, TypeError, ValueError):  # malformed: refused by the caller
        return {}
    if fmt is None:
        return {}
    pairs = {}
    for name, t in tensors.items():
        if t.dtype != STORED_DTYPE or not name.endswith("weight"):
            continue
        scale = tensors.get(fmt.scale_name(name))
        if scale is None or scale.dtype not in ("F32", "BF16", "F16"):
            continue
        try:
            pairs[name] = (scale.name, grid(t.shape, scale.shape, fmt.block))
        except (AbliterateError, TypeError, ValueError):
            continue
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


def one_ulp_apart(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, block: tuple[int, int]
) -> bool:
    """Whether two requantizations of the same edit (dequantized `a`, `b` with their scales) differ
    by at most one e4m3 step per element: what float32 sums in another order can cause (a value
    crossing a rounding boundary). The step at |x| is at most 2^-3 |x| (3 mantissa bits) for normal
    values and 2^-9 x the block scale below them."""
    out, cols = a.shape[-2:]
    grid_shape = (math.prod(a.shape[:-2]), math.ceil(out / block[0]), math.ceil(cols / block[1]))
    largest = torch.maximum(
        scale_a.to(torch.float64).reshape(grid_shape), scale_b.to(torch.float64).reshape(grid_shape)
    )
    largest = (
        largest.repeat_interleave(block[0], 1).repeat_interleave(block[1], 2)[:, :out, :cols].reshape(a.shape)
    )
    step = torch.maximum(2.0**-3 * torch.maximum(a.abs(), b.abs()), 2.0**-9 * largest)
    return bool(((a - b).abs() <= step * (1 + 2.0**-20)).all())


def read_tensor(path: Path, t: Any) -> torch.Tensor:
    """One tensor of a shard, in its stored dtype (`t`: a TensorInfo)."""
    buffer = bytearray(t.nbytes)
    with open(path, "rb", buffering=0) as f:
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            n = os.preadv(f.fileno(), [view[done:]], t.start + done)
            if n == 0:
                raise AbliterateError(
                    f"{path} ended inside tensor {t.name}: the file changed while being read"
                )
            done += n
    if not buffer:
        return torch.empty(t.shape, dtype=TORCH_DTYPES[t.dtype])
    return torch.frombuffer(buffer, dtype=TORCH_DTYPES[t.dtype]).reshape(t.shape)


def partners(inventory: Any, shard: str) -> list[str]:
    """The other shards whose bytes the FP8 rewrite of `shard` reads: where the scales of its FP8
    weights are, and where the weights of its scales are (they enter its cache key)."""
    others = set()
    for weight, (scale, _) in inventory.fp8.items():
        w, s = inventory.tensors[weight].shard, inventory.tensors[scale].shard
        if shard in (w, s):
            others.update({w, s} - {shard})
    return sorted(others)
