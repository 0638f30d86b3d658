"""FP8 block quantization: the round trip stays within the e4m3 rounding bound (abliterate/weights/fp8.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abliterate.errors import AbliterateError
from abliterate.weights import fp8

SHAPES = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40))
BLOCKS = st.tuples(st.integers(1, 16), st.integers(1, 16))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(shape=SHAPES, block=BLOCKS, seed=st.integers(0, 2**31 - 1), spread=st.floats(-30, 30))
def test_round_trip_within_bound_elementwise(shape, block, seed, spread):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp2(
        torch.randint(-8, 8, shape, generator=g).float() + spread
    )
    q, scale = fp8.quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32
    assert scale.shape == (shape[0], math.ceil(shape[1] / block[0]), math.ceil(shape[2] / block[1]))
    back = fp8.dequantize(q, scale, block)
    # element bound: u |w| + 2^-10 s of its block (+ the two float32 operations)
    s = scale.repeat_interleave(block[0], 1).repeat_interleave(block[1], 2)[:, : shape[1], : shape[2]]
    err = (back.double() - w.double()).abs()
    bound = (fp8.UNIT_ROUNDOFF + 2.0**-22) * w.double().abs() + fp8.SUBNORMAL_HALF_SPACING * s.double()
    assert bool((err <= bound).all())
    # the Frobenius form the validator uses
    total = float((back.double() - w.double()).norm())
    assert total <= fp8.rounding_bound(
        float(w.double().norm()), fp8.broadcast_scale_norm(scale, shape, block)
    )
    # deterministic, and a second quantization of the dequantized values changes nothing beyond the bound
    q2, scale2 = fp8.quantize(w, block)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(scale, scale2)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(shape=SHAPES, block=BLOCKS)
def test_zero_blocks_get_scale_one(shape, block):
    q, scale = fp8.quantize(torch.zeros(shape), block)
    assert bool((scale == 1).all()) and not q.float().any()


def test_formats_from_config():
    fine = fp8.format_from_config(
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    )
    assert fine == fp8.Fp8Format("fp8", "weight_scale_inv", (128, 128))
    assert (
        fine.scale_name("model.layers.1.mlp.down_proj.weight")
        == "model.layers.1.mlp.down_proj.weight_scale_inv"
    )
    ct = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            }
        },
        "ignore": ["lm_head", "re:.*mlp.gate$"],
    }
    channel = fp8.format_from_config({"quantization_config": ct})
    assert channel == fp8.Fp8Format("compressed-tensors", "weight_scale", None)
    assert fp8.grid((64, 32), (64, 1), channel.block) == (1, 32)
    assert fp8.grid((2, 64, 32), (2, 1), channel.block) == (64, 32)  # a tensor scale per expert
    assert fp8.format_from_config({}) is None
    for qc in (
        {"quant_method": "mxfp4"},
        {"quant_method": "bitsandbytes"},
        {"quant_method": "gptq"},
        {"quant_method": "awq"},
        {"quant_method": "fp8", "scale_fmt": "ue8m0"},
    ):
        with pytest.raises(AbliterateError, match="not supported.*unquantized"):
            fp8.format_from_config({"quantization_config": qc})
    with pytest.raises(AbliterateError, match="do not match"):
        fp8.grid((64, 32), (3, 3), (16, 16))


def _reference(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype):
    """transformers' `Fp8Quantize` block by block, as plainly as it can be written (the vectorised
    `fp8.quantize` must give its very bytes), and the dequantization of its result."""
    bm, bn = block
    lead, out, cols = w.shape
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(lead, math.ceil(out / bm), math.ceil(cols / bn))
    back = torch.empty(w.shape)
    for e in range(lead):
        for i in range(scale.shape[1]):
            for j in range(scale.shape[2]):
                rows, columns = slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn)
                part = w[e, rows, columns].float()
                amax = part.abs().amax()
                s = torch.where(amax > 0, amax / fp8.E4M3_MAX, torch.ones_like(amax)).to(scale_dtype).float()
                scale[e, i, j] = s
                q[e, rows, columns] = (part / s.expand_as(part)).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX)
                back[e, rows, columns] = q[e, rows, columns].float() * s.expand_as(part)
    return q, scale, back


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    shape=SHAPES,
    block=BLOCKS,
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(-40, 30),
    scale_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    piece=st.sampled_from([1, 7, 100, fp8.PIECE]),
    special=st.sampled_from([None, float("nan"), float("inf"), 0.0]),
)
def test_vectorised_requantization_is_bit_identical_to_the_block_by_block_one(
    shape, block, seed, spread, scale_dtype, piece, special
):
    """Pieces of rows of any size, views of whole blocks, the table lookup, the skipped clamp: the
    same bytes as the plain per-block computation (scales underflowing in float16, NaN, Inf and
    zero blocks included)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp2(
        torch.randint(-8, 8, shape, generator=g).float() + spread
    )
    if special is not None:
        w[0, 0, 0] = special
    q_ref, scale_ref, back_ref = _reference(w, block, scale_dtype)
    default = fp8.PIECE
    fp8.PIECE = piece  # the piece size decides speed only
    try:
        q, scale = fp8.quantize(w, block, scale_dtype)
        back = fp8.dequantize(q, scale.to(scale_dtype), block)
    finally:
        fp8.PIECE = default
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale.view(torch.int32), scale_ref.view(torch.int32))
    assert torch.equal(back.view(torch.int32), back_ref.view(torch.int32))


@pytest.mark.parametrize(
    "scale",
    [1.0, 3e-4, -2.5, 1e-40, 2.0**-149, 127.9, 128.0, 1e30, float("nan"), float("inf"), 0.0],
)
def test_the_bit_decoding_gives_the_tables_value_times_the_scale_for_every_byte(scale):
    """All 256 bytes (subnormals, +-0, NaN) times scales from float32's smallest subnormal to 1e30: the
    bits of the table's value times the scale (the decoding by integer operations below 2^7, the table
    itself from there and for NaN and Inf scales)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(4).reshape(8, 128)
    expected = fp8._E4M3_VALUES[codes.long()] * torch.tensor(scale)
    got = fp8.dequantize(codes.view(fp8.E4M3), torch.full((1, 1), scale), (128, 128))
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
