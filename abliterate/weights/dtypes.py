"""The safetensors dtypes: their sizes, the torch dtypes they are read as, and which ones are edited.

One table for every module that reads tensor bytes (the inventory, the FP8 format, the shard
engine, validation, the edit applied at inference time), at the bottom of the weights package so
that each of them can import it without importing any of the others.
"""

from __future__ import annotations

import torch

# Every dtype safetensors 0.8 reads, with its size in bits (F4 and F6 pack several values per byte).
DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U8": 8,
    "U16": 16,
    "U32": 32,
    "U64": 64,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
    "C64": 64,
}

# The float dtypes as torch reads them (F8 ones for FP8 weights, which are edited through their scales).
TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# What the shard engine edits in place: widened to float32, edited, rounded once back.
EDITABLE_DTYPES = ("BF16", "F16", "F32")
