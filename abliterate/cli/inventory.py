"""`abliterate inventory MODEL_DIR`: what the checkpoint holds, from headers only."""

from __future__ import annotations

import argparse
import json
import time

from abliterate.edit.plan import format_layers
from abliterate.errors import AbliterateError
from abliterate.weights.checkpoint import build_inventory, choose_profile
from abliterate.weights.profiles import PROFILES
from abliterate.weights.structure import Structure, detect_structure


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "inventory",
        help="list every tensor's role and check the structure against config.json (reads headers only)",
        description=(
            "Read the safetensors headers of MODEL_DIR (sharded with model.safetensors.index.json, or a "
            "single model.safetensors), classify every tensor into a weight role (attn_out, mlp_down, "
            "expert_down, shared_expert_down, router, ...) and cross-check the layers, experts, routers "
            "and MTP layers against config.json. No tensor data is read, so it answers in seconds "
            "even for a 220 GB checkpoint. Exits 2 with a one-line reason when the checkpoint is broken."
        ),
    )
    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="Hugging Face checkpoint directory, or a Hub id org/name[@revision]",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_profile_options(parser)
    parser.add_argument(
        "--track",
        action="store_true",
        help="run as the Prefect `inventory` flow (cached tasks) and log the counts to MLflow",
    )
    parser.set_defaults(func=run)


def add_profile_options(parser: argparse.ArgumentParser) -> None:
    """--family and --map: role rules for checkpoints whose config.json names no known family."""
    parser.add_argument(
        "--family",
        choices=sorted(PROFILES),
        help="use this family's role rules (default: the one config.json's model_type selects)",
    )
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="REGEX=ROLE",
        help="classify tensors whose full name matches REGEX as ROLE, before the family's own rules "
        "(repeatable; for a model that names some tensors its own way). Capture the layer index with "
        "(?P<layer>\\d+) and a routed expert's with (?P<expert>\\d+), e.g. "
        "'model\\.layers\\.(?P<layer>\\d+)\\.attention\\.dense\\.weight=attn_out'. The residual axis is the "
        "role's usual one (writers: rows, readers and embed: columns). Default: none, the family's rules alone",
    )


def run(args: argparse.Namespace) -> int:
    if args.track and args.map:
        raise AbliterateError(
            "--track runs the cached inventory flow, which takes --family but not --map yet"
        )
    if args.track:
        from abliterate_flows.runtime import configure

        configure()
        from abliterate_flows.inventory import inventory_flow

        inventory_flow(args.model_dir, args.family)
    started = time.perf_counter()
    inventory = build_inventory(args.model_dir, choose_profile(args.model_dir, args.family, args.map))
    structure = detect_structure(inventory)
    if args.json:
        print(json.dumps(structure.to_json(), indent=2))
    else:
        print(format_summary(structure, time.perf_counter() - started))
    return 0


def format_summary(s: Structure, seconds: float) -> str:
    lines = [
        f"{s.architecture} ({s.family}), {s.tensors:,} tensors in {s.shards} shard(s), "
        f"{s.bytes / 1e9:.3f} GB, read in {seconds:.2f} s",
        f"fingerprint      {s.fingerprint}",
        f"hidden size      {s.hidden_size}",
        f"decoder layers   {s.num_layers}: dense {format_layers(s.dense_layers)}; MoE {format_layers(s.moe_layers)}",
        f"experts          {s.experts_per_layer} routed + {s.shared_experts} shared per MoE layer"
        + (" (fused 3-D tensors on disk)" if s.fused_experts else ""),
        f"router           {s.router_dtype or 'none'}"
        + (", with e_score_correction_bias" if s.router_bias else ""),
        f"MTP layers       {format_layers(s.mtp_layers)}",
        f"embeddings       {'tied' if s.tied_embeddings else 'separate lm_head'}",
        f"dtypes           {', '.join(f'{k} {v:,}' for k, v in s.dtypes.items())}",
        "",
        f"{'role':<22}{'main':>10}{'mtp':>8}",
    ]
    for role in sorted(set(s.roles) | set(s.mtp_roles)):
        lines.append(f"{role:<22}{s.roles.get(role, 0):>10,}{s.mtp_roles.get(role, 0):>8,}")
    if s.fp8_weights:
        lines += [
            "",
            f"FP8 weights      {s.fp8_weights:,} with their scales: ablated FP8 in, FP8 out (docs/FP8.md)",
        ]
    if s.quantization:
        lines += [
            "",
            f"quantized ({s.quantization}): not supported for ablation; use the bf16/fp16 checkpoint",
        ]
    lines += [f"warning: {w}" for w in s.warnings]
    return "\n".join(lines)
