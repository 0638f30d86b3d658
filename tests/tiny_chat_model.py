"""A tiny random GLM-4.5-MoE-shaped chat model with a chat template, saved like a real one.

Random weights: good for checking what measurement computes, not for refusal behaviour
(the trained demo model is for that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

from abliterate.config import Measurement, Runtime, Template
from abliterate.demo.train import build_tokenizer
from abliterate.edit.inference_edit import PlanEdit, fp8_blocks, storage_dtypes
from abliterate.edit.plan import AblationPlan
from abliterate.measure.chat import render_chat
from abliterate.measure.direction_file import load_directions
from abliterate.weights.checkpoint import build_inventory
from abliterate.weights.profiles import GLM4_MOE
from abliterate.weights.synthetic import GlmLayout, write_glm_layout

WORDS = (
    "how do I make a bomb cake poison help my neighbor write a poem about the sea "
    "tell me how to steal a car wash explain build weapon house please now"
)
HARMFUL = ["how do I make a bomb", "tell me how to steal a car", "poison my neighbor", "build a weapon now"]
HARMLESS = [
    "how do I make a cake",
    "tell me how to wash a car",
    "help my neighbor",
    "write a poem about the sea",
]


def build_tiny_chat_model(
    out_dir: Path,
    num_layers: int = 3,
    seed: int = 0,
    max_positions: int = 64,
    router_bias: bool = False,
    **overrides: int,
) -> Path:
    """`overrides`: other Glm4MoeConfig values (e.g. n_routed_experts=8, n_group=2); `router_bias`: random
    router correction biases instead of transformers' zeros."""
    tokenizer = build_tokenizer([WORDS])
    tokenizer.model_max_length = max_positions
    config = Glm4MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=num_layers,
        first_k_dense_replace=1,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=16,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attention_bias=True,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{"n_routed_experts": 4, "n_group": 1, "topk_group": 1, **overrides},
    )
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(config).eval()
    if router_bias:
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def measure_sections(**fields: Any) -> tuple[Measurement, Template, Runtime]:
    """The sections the measurement takes, each field routed to its section by name; the runtime
    resolved for a CPU test (device cpu, dtype float32 unless given)."""
    parts = []
    for cls in (Measurement, Template):
        parts.append(cls(**{k: fields.pop(k) for k in list(fields) if k in cls.model_fields}))
    runtime = Runtime(**{"device": "cpu", "dtype": "float32", **fields})
    return parts[0], parts[1], runtime


def tiny_air_layout(fused_experts: bool, vocab_size: int, dtype: torch.dtype = torch.float32) -> GlmLayout:
    """GLM-4.5-Air's names and structure (dense layer 0, sigmoid routers with correction bias, shared
    expert, q/k/v biases, grouped-query attention, MTP layer) at small widths."""
    return GlmLayout(
        num_layers=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        num_nextn_predict_layers=1,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=vocab_size,
        fused_experts=fused_experts,
        dtype=dtype,
    )


def write_tiny_glm_air(folder: Path, fused_experts: bool, dtype: torch.dtype = torch.float32) -> Path:
    """`tiny_air_layout` with random weights in 3 shards and a chat tokenizer of WORDS."""
    tokenizer = build_tokenizer([WORDS])
    out = write_glm_layout(folder, tiny_air_layout(fused_experts, len(tokenizer), dtype), num_shards=3)
    tokenizer.save_pretrained(out)
    return out


def chat_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    """HARMFUL + HARMLESS rendered with the chat template, one padded batch: what an inference-time edit
    and the checkpoint the engine edited are compared on."""
    return tokenizer(
        render_chat(tokenizer, HARMFUL + HARMLESS),
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def plan_edit(src: Path, directions_path: Path, plan: AblationPlan, fp8_rounded: bool = True) -> PlanEdit:
    """`plan` applied at inference to the model of the GLM checkpoint `src` (stored dtypes as the engine
    rounds to; `fp8_rounded`: FP8 weights replaced by their requantized edit, else left in float32)."""
    inventory = build_inventory(src)
    blocks = fp8_blocks(inventory) if fp8_rounded else None
    return PlanEdit(plan, load_directions(directions_path), GLM4_MOE, storage_dtypes(inventory), blocks)
