"""Peak memory of layer-streamed measurement on a checkpoint with GLM-4.5-Air's real widths.

    .venv/bin/python benchmarks/bench_streaming.py [--moe-layers 2] [--dtype bfloat16] [--prompts 8]
        [--dir /tmp/bench-streaming] [--keep] [--in-memory]

Writes a random checkpoint with GLM-4.5-Air's names and real widths (hidden 4096, 96 heads x 128,
8 key/value heads, dense layer 0 with intermediate 10944, then MoE layers of 128 experts x
moe_intermediate 1408 plus a shared expert; the vocabulary is the demo tokenizer's, the real
151k-row embedding would only add bytes), then measures it layer-streamed in a fresh process
(so writing the checkpoint does not count) and reports that process's peak resident set
(VmHWM) against one decoder layer's bytes and the whole checkpoint. The checkpoint is
deleted afterwards unless --keep. About 4.6 GB on disk per MoE layer: check `df -h` first.

--in-memory also measures with the whole model loaded, in another fresh process, and reports
its peak and the largest relative difference of the means (needs the whole model in RAM).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

GIB = 1 << 30


def status_bytes(field: str) -> int:
    """VmHWM (peak resident set of this process image) or VmRSS, in bytes, from /proc/self/status.

    Not ru_maxrss: Linux carries that across fork and exec, so a child would inherit the peak of
    the parent that wrote the checkpoint.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(model_dir: str, dtype: str, prompts: int, mode: str, out: str) -> None:
    """Measure in this process and write the figures (and the means) for the parent."""
    torch.set_num_threads(1)
    from abliterate.config import Measurement, Runtime, Template
    from abliterate.demo import prompt_file
    from abliterate.measure.means import measure_checkpoint
    from abliterate.measure.prompts import load_prompts
    from abliterate.measure.streamed import measure_streamed

    harmful = load_prompts(prompt_file("demo", "harmful", "train"))[: prompts // 2]
    harmless = load_prompts(prompt_file("demo", "harmless", "train"))[: prompts - prompts // 2]
    settings = Measurement(), Template(), Runtime(device="cpu", dtype=dtype, batch_size=8)
    start_rss = status_bytes("VmRSS")
    start = time.perf_counter()
    run = measure_streamed if mode == "streamed" else measure_checkpoint
    measurement = run(model_dir, harmful, harmless, *settings, progress=True)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    torch.save({"harmful": measurement.harmful.mean, "harmless": measurement.harmless.mean}, out + ".pt")
    figures = {
        "peak_rss": peak,
        "rss_before": start_rss,
        "seconds": seconds,
        "tokens": measurement.harmful.tokens + measurement.harmless.tokens,
    }
    Path(out).write_text(json.dumps(figures))


def run_child(model_dir: Path, dtype: str, prompts: int, mode: str) -> tuple[dict, dict]:
    out = str(model_dir.parent / f"{model_dir.name}-{mode}.json")
    cmd = [sys.executable, __file__, "--child", mode, "--dir", str(model_dir), "--dtype", dtype]
    subprocess.run(cmd + ["--prompts", str(prompts), "--child-out", out], check=True)
    figures = json.loads(Path(out).read_text())
    means = torch.load(out + ".pt")
    Path(out).unlink()
    Path(out + ".pt").unlink()
    return figures, means


def write_checkpoint(model_dir: Path, moe_layers: int) -> None:
    from abliterate.demo import prompt_file
    from abliterate.demo.train import build_tokenizer
    from abliterate.measure.prompts import load_prompts
    from abliterate.weights.synthetic import GlmLayout, write_glm_layout

    tokenizer = build_tokenizer(
        [p for k in ("harmful", "harmless") for p in load_prompts(prompt_file("demo", k, "train"))]
    )
    layout = GlmLayout(
        num_layers=1 + moe_layers,
        n_routed_experts=128,
        num_experts_per_tok=8,
        num_nextn_predict_layers=0,  # the MTP layer is never read: leave it out to save disk
        hidden_size=4096,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=len(tokenizer),
    )
    start = time.perf_counter()
    write_glm_layout(model_dir, layout, num_shards=2 * (1 + moe_layers))
    tokenizer.save_pretrained(model_dir)
    print(f"wrote {model_dir} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--moe-layers", type=int, default=2, help="MoE layers after the dense layer 0 (default 2)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument(
        "--prompts", type=int, default=8, help="prompts, half harmful, half harmless (default 8)"
    )
    parser.add_argument("--dir", default="/tmp/bench-streaming", help="checkpoint directory (replaced)")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the checkpoint")
    parser.add_argument("--in-memory", action="store_true", help="also measure with the whole model loaded")
    parser.add_argument("--child", choices=["streamed", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.dir, args.dtype, args.prompts, args.child, args.child_out)
        return 0

    from abliterate.inference.streaming import weight_bytes
    from abliterate.weights.checkpoint import build_inventory

    model_dir = Path(args.dir)
    if not (args.keep and (model_dir / "config.json").is_file()):
        write_checkpoint(model_dir, args.moe_layers)
    try:
        inventory = build_inventory(model_dir)
        sizes = weight_bytes(model_dir, args.dtype, inventory)
        streamed, streamed_means = run_child(model_dir, args.dtype, args.prompts, "streamed")
        rows = [("streamed", streamed)]
        if args.in_memory:
            in_memory, in_memory_means = run_child(model_dir, args.dtype, args.prompts, "in-memory")
            rows.append(("in-memory", in_memory))
            error = max(
                float(
                    (
                        (streamed_means[k] - in_memory_means[k]).norm(dim=-1)
                        / in_memory_means[k].norm(dim=-1)
                    ).max()
                )
                for k in ("harmful", "harmless")
            )
    finally:
        if not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)

    print(f"checkpoint: {len(inventory.shards)} shards, {inventory.total_bytes / GIB:.2f} GiB on disk (bf16)")
    print(
        f"weights in {args.dtype}: {sizes.total / GIB:.2f} GiB in all, largest decoder layer "
        f"{sizes.largest_layer / GIB:.2f} GiB, embedding {sizes.embedding / GIB:.3f} GiB"
    )
    print(
        f"{'method':>10} {'peak RSS GiB':>13} {'/ layer':>8} {'/ model':>8} {'RSS at start':>13} {'seconds':>8}"
    )
    for name, figures in rows:
        peak = figures["peak_rss"]
        print(
            f"{name:>10} {peak / GIB:>13.2f} {peak / sizes.largest_layer:>8.2f} {peak / sizes.total:>8.2f} "
            f"{figures['rss_before'] / GIB:>13.2f} {figures['seconds']:>8.1f}"
        )
    if args.in_memory:
        print(f"max relative difference of the means, streamed vs in-memory: {error:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
