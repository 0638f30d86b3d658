"""Checkpoints with real tensor names and counts at chosen widths, for tests, demos and benchmarks.

`write_glm_layout` writes GLM-4.5-Air's exact layout (46 decoder layers, layer 0 dense,
128 routed experts + 1 shared expert per MoE layer, fp32 routers with correction bias,
q/k/v biases, the MTP layer 46) with random weights, sharded like a Hugging Face
checkpoint. Widths are parameters: tiny for tests, real (hidden 4096, moe_intermediate
1408) for benchmarks. Shards are written one at a time, so memory stays at one shard.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from abliterate.vocabulary import INDEX_FILE, SINGLE_FILE
from abliterate.weights import fp8
from abliterate.weights.checkpoint import shard_names


@dataclass(frozen=True)
class GlmLayout:
    num_layers: int = 46
    first_k_dense_replace: int = 1
    n_routed_experts: int = 128
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    num_nextn_predict_layers: int = 1
    hidden_size: int = 8
    intermediate_size: int = 16
    moe_intermediate_size: int = 4
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 4
    vocab_size: int = 32
    dtype: torch.dtype = torch.bfloat16
    fused_experts: bool = False  # transformers 5's save_original_format=False layout

    def config(self) -> dict:
        return {
            "architectures": ["Glm4MoeForCausalLM"],
            "model_type": "glm4_moe",
            "attention_bias": True,
            "first_k_dense_replace": self.first_k_dense_replace,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 4096,
            "moe_intermediate_size": self.moe_intermediate_size,
            "n_group": 1,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "norm_topk_prob": True,
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000,
            "routed_scaling_factor": 1.0,
            "tie_word_embeddings": False,
            "topk_group": 1,
            "torch_dtype": str(self.dtype).removeprefix("torch."),
            "use_qk_norm": False,
            "vocab_size": self.vocab_size,
        }


def glm_tensor_specs(layout: GlmLayout) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor, in the order GLM-4.5's shards hold them."""
    h, dt = layout.hidden_size, layout.dtype
    q = layout.num_attention_heads * layout.head_dim
    kv = layout.num_key_value_heads * layout.head_dim
    yield "model.embed_tokens.weight", (layout.vocab_size, h), dt
    for i in range(layout.num_layers + layout.num_nextn_predict_layers):
        p = f"model.layers.{i}."
        mtp = i >= layout.num_layers
        if mtp:
            yield p + "embed_tokens.weight", (layout.vocab_size, h), dt
            yield p + "enorm.weight", (h,), dt
            yield p + "hnorm.weight", (h,), dt
            yield p + "eh_proj.weight", (h, 2 * h), dt
            yield p + "shared_head.norm.weight", (h,), dt
            yield p + "shared_head.head.weight", (layout.vocab_size, h), dt
        yield p + "input_layernorm.weight", (h,), dt
        yield p + "post_attention_layernorm.weight", (h,), dt
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            yield p + f"self_attn.{name}.weight", (rows, h), dt
            yield p + f"self_attn.{name}.bias", (rows,), dt
        yield p + "self_attn.o_proj.weight", (h, q), dt
        if i < layout.first_k_dense_replace:
            inter = layout.intermediate_size
            yield p + "mlp.gate_proj.weight", (inter, h), dt
            yield p + "mlp.up_proj.weight", (inter, h), dt
            yield p + "mlp.down_proj.weight", (h, inter), dt
            continue
        inter, n = layout.moe_intermediate_size, layout.n_routed_experts
        yield p + "mlp.gate.weight", (n, h), torch.float32  # routers are fp32 on disk
        yield p + "mlp.gate.e_score_correction_bias", (n,), torch.float32
        if layout.fused_experts:
            yield p + "mlp.experts.gate_up_proj", (n, 2 * inter, h), dt
            yield p + "mlp.experts.down_proj", (n, h, inter), dt
        else:
            for e in range(n):
                yield p + f"mlp.experts.{e}.gate_proj.weight", (inter, h), dt
                yield p + f"mlp.experts.{e}.up_proj.weight", (inter, h), dt
                yield p + f"mlp.experts.{e}.down_proj.weight", (h, inter), dt
        shared = inter * layout.n_shared_experts
        yield p + "mlp.shared_experts.gate_proj.weight", (shared, h), dt
        yield p + "mlp.shared_experts.up_proj.weight", (shared, h), dt
        yield p + "mlp.shared_experts.down_proj.weight", (h, shared), dt
    yield "model.norm.weight", (h,), dt
    yield "lm_head.weight", (layout.vocab_size, h), dt


def write_checkpoint(
    out_dir: str | Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    config: dict,
    num_shards: int = 4,
    seed: int = 0,
    single_file: bool = False,
) -> Path:
    """Write random weights for `specs` into `num_shards` balanced shards plus the index.

    Norm weights are ones (as in a fresh model); other tensors are small Gaussians.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    sizes = [math.prod(shape) * torch.empty((), dtype=dt).element_size() for _, shape, dt in specs]
    total = sum(sizes)
    num_shards = 1 if single_file else max(1, min(num_shards, len(specs)))
    bounds, acc, shard = [], 0, 0
    for size in sizes:  # greedy split into shards of about total/num_shards bytes
        bounds.append(shard)
        acc += size
        if acc >= total * (shard + 1) / num_shards and shard < num_shards - 1:
            shard += 1
    count = max(bounds) + 1
    weight_map: dict[str, str] = {}
    for s in range(count):
        fname = SINGLE_FILE if single_file else f"model-{s + 1:05d}-of-{count:05d}.safetensors"
        tensors = {}
        for (name, shape, dt), b in zip(specs, bounds, strict=True):
            if b != s:
                continue
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=dt)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.05).to(dt)
            weight_map[name] = fname
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        del tensors
    if not single_file:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps({"do_sample": False}, indent=2) + "\n")
    return out_dir


def write_glm_layout(
    out_dir: str | Path,
    layout: GlmLayout | None = None,
    num_shards: int = 8,
    seed: int = 0,
    single_file: bool = False,
) -> Path:
    layout = layout or GlmLayout()
    return write_checkpoint(
        out_dir, list(glm_tensor_specs(layout)), layout.config(), num_shards, seed, single_file
    )


def write_llama_layout(
    out_dir: str | Path,
    num_layers: int = 4,
    hidden: int = 8,
    inter: int = 16,
    vocab: int = 32,
    num_shards: int = 2,
) -> Path:
    """A dense llama-style checkpoint (tied embeddings off) with the real key names."""
    dt = torch.bfloat16
    specs: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        ("model.embed_tokens.weight", (vocab, hidden), dt)
    ]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,), dt),
            (p + "self_attn.q_proj.weight", (hidden, hidden), dt),
            (p + "self_attn.k_proj.weight", (hidden // 2, hidden), dt),
            (p + "self_attn.v_proj.weight", (hidden // 2, hidden), dt),
            (p + "self_attn.o_proj.weight", (hidden, hidden), dt),
            (p + "post_attention_layernorm.weight", (hidden,), dt),
            (p + "mlp.gate_proj.weight", (inter, hidden), dt),
            (p + "mlp.up_proj.weight", (inter, hidden), dt),
            (p + "mlp.down_proj.weight", (hidden, inter), dt),
        ]
    specs += [("model.norm.weight", (hidden,), dt), ("lm_head.weight", (vocab, hidden), dt)]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    return write_checkpoint(out_dir, specs, config, num_shards)


def fp8_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Which tensors an FP8 release of a GLM / llama-style model stores in FP8: the linear projections
    of the decoder layers (attention, dense MLP, routed and shared experts, MTP `eh_proj`); not the
    routers (`mlp.gate`), norms, embeddings, LM heads or biases (as in GLM-4.5-Air-FP8)."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight") and len(shape) == 2


def convert_to_fp8(
    src: str | Path,
    dst: str | Path,
    block: tuple[int, int] | None = (128, 128),
    scales_apart: bool = True,
    method: str = "fp8",
) -> Path:
    """Write `dst`: checkpoint `src` in transformers' fine-grained FP8 format (`weight_block_size`
    `block`, `<m>.weight` F8_E4M3 + `<m>.weight_scale_inv` F32), shard by shard, every other file
    copied. `scales_apart`: every second quantized weight has its scale in the next shard (a weight
    and its scale may sit in different shards in real checkpoints). `method="compressed-tensors"`:
    llm-compressor's float8 layout instead (`<m>.weight_scale`; `block` None: per-channel [out, 1])."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shards, _, _ = shard_names(src)
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in shards]
    count = 0
    for s, shard in enumerate(shards):
        with safe_open(str(src / shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no iterator
                w = f.get_tensor(name)
                if not fp8_quantized(name, tuple(w.shape)):
                    outputs[s][name] = w
                    continue
                q, scale = fp8.quantize(w, block or (1, w.shape[-1]))
                outputs[s][name] = q
                target = (s + 1) % len(shards) if scales_apart and count % 2 else s
                suffix = "weight_scale_inv" if method == "fp8" else "weight_scale"
                outputs[target][name.removesuffix("weight") + suffix] = scale.reshape(
                    -1, *scale.shape[1:]
                ).squeeze(0)
                count += 1
    weight_map = {}
    for shard, tensors in zip(shards, outputs, strict=True):
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (INDEX_FILE, "config.json"):
            shutil.copy2(p, dst / p.name)
    if (src / INDEX_FILE).is_file():
        total = sum(t.numel() * t.element_size() for tensors in outputs for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((src / "config.json").read_text())
    if method == "fp8":
        config["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
        }
    else:
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
        weights.update(
            {"strategy": "block", "block_structure": list(block)} if block else {"strategy": "channel"}
        )
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}
            },
            "ignore": ["lm_head", "re:.*mlp.gate$"],
        }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
