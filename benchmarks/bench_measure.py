"""Measurement speed and memory: our hooked forward pass against generate(output_hidden_states=True).

    .venv/bin/python benchmarks/bench_measure.py [--model DIR|wide] [--batch-size 16] [--repeat 4] [--device cuda]

Both methods produce the same per-position means over the demo model's harmful and harmless
train prompts (repeated `--repeat` times). Ours: one forward pass of the decoder per batch
(no LM head), hooks keep one token per position, batches sorted by length. Baseline (the
common way): `generate(max_new_tokens=1, output_hidden_states=True)` on batches in file
order, keeping every position's full hidden states, then picking the last token. A third row
runs our forward pass on the baseline's unsorted batches, to separate the two effects.

`--model wide` measures a random GLM-4.5-shaped model of hidden size 1024 (12 layers, 16
experts) with the demo tokenizer instead, where the per-token work outweighs Python overhead.

Each method runs in its own process. tokens/s counts prompt tokens (no padding). Peak memory
is the process's peak resident set during measurement above its size after loading the model
(Linux: VmHWM, reset through /proc/self/clear_refs), plus, on CUDA, torch's peak allocation.

Figures seen (2026-11-26, one torch thread; tokens/s ours vs baseline, peak MiB ours vs baseline):
- demo model, this 2-core CPU (shared with other jobs), --repeat 8: 21132 vs 12758 tokens/s
  (1.66x), 0.4 vs 2.9 MiB.
- wide model, same CPU, --repeat 1: 267 vs 249 tokens/s (1.07x), 0.5 vs 81.9 MiB.
- H200 machine's CPU (uncontended), demo, before the copy fix: 24371 vs 20498 tokens/s (1.19x).
- H200 GPU, before the copy fix: demo 0.90x, wide 1.06x, CUDA peak 36 vs 37 MiB and 811 vs
  849 MiB: models this small are launch-bound on a GPU, so length sorting buys nothing there.
Length sorting gives most of the CPU speed-up (compare `ours_unsorted`); not keeping every
position's full hidden states gives the memory difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("ours", "ours_unsorted", "generate_baseline")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(method: str, model_dir: str, batch_size: int, repeat: int, device: str) -> dict:
    from abliterate.config import Template
    from abliterate.demo import prompt_file
    from abliterate.inference.loading import length_sorted_batches, load_model, pad_token_id
    from abliterate.measure.chat import encode_prompts
    from abliterate.measure.means import ResidualAccumulator, capture_residuals
    from abliterate.measure.prompts import load_prompts

    torch.set_num_threads(1)
    model, tokenizer = load_model(model_dir, device=device)
    prompts = [
        p for kind in ("harmful", "harmless") for p in load_prompts(prompt_file("demo", kind, "train"))
    ]
    encoded = encode_prompts(tokenizer, prompts * repeat, Template(), "prompt")
    pad = pad_token_id(tokenizer)
    num_positions = model.config.num_hidden_layers + 1
    acc = ResidualAccumulator(num_positions, model.config.hidden_size)
    chunks = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    # One sorted "batch list" per chunk keeps the file order's padding.
    unsorted = [b for chunk in chunks for b in length_sorted_batches(chunk, batch_size, pad)]

    # Warm-up (untimed, all methods alike): CUDA context, kernels, allocator.
    first = unsorted[0]
    capture_residuals(model, first, -1)
    with torch.inference_mode():
        model.generate(
            input_ids=first.input_ids.to(device),
            attention_mask=first.attention_mask.to(device),
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=pad,
        )
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        base_rss = rss_kib("VmRSS")
    except OSError:  # some sandboxes forbid it: then the peak includes loading the model
        base_rss = 0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if method in ("ours", "ours_unsorted"):
        batches = length_sorted_batches(encoded, batch_size, pad) if method == "ours" else unsorted
        for batch in batches:
            acc.add(capture_residuals(model, batch, -1))
    else:
        with torch.inference_mode():
            for batch in unsorted:
                out = model.generate(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),
                    max_new_tokens=1,
                    do_sample=False,
                    output_hidden_states=True,
                    return_dict_in_generate=True,
                    pad_token_id=pad,
                )
                prompt_states = out.hidden_states[0]  # L+1 tensors [B, T, H]; the last is post-norm
                acc.add(torch.stack([h[:, -1, :].float().cpu() for h in prompt_states]))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in encoded)
    padded = sum(
        int(b.input_ids.numel())
        for b in (length_sorted_batches(encoded, batch_size, pad) if method == "ours" else unsorted)
    )
    return {
        "method": method,
        "prompts": len(encoded),
        "tokens": tokens,
        "padded_tokens": padded,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mib": (rss_kib("VmHWM") - base_rss) / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        "mean_norm_position_0": float(acc.mean[0].norm()),
    }


def build_wide_model(out_dir: Path) -> Path:
    from transformers import AutoTokenizer, Glm4MoeConfig, Glm4MoeForCausalLM

    from abliterate.demo import DEMO_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    config = Glm4MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=4096,
        moe_intermediate_size=256,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        attention_bias=True,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    Glm4MoeForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main() -> int:
    from abliterate.demo import DEMO_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=4, help="measure the prompt list this many times")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.batch_size, args.repeat, args.device)))
        return 0

    if args.model == "wide":
        args.model = str(build_wide_model(Path(tempfile.mkdtemp(prefix="bench-measure-"))))
    rows = {}
    for method in METHODS:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--repeat",
            str(args.repeat),
            "--device",
            args.device,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
        rows[method] = json.loads(done.stdout)
    print(f"model {args.model}, batch size {args.batch_size}, device {args.device}, torch threads 1")
    print(
        f"{'method':<18} {'prompts':>7} {'tokens':>7} {'padded':>7} {'seconds':>8} {'tokens/s':>9} "
        f"{'peak MiB':>9}{'  cuda MiB' if args.device != 'cpu' else ''}"
    )
    for r in rows.values():
        cuda = f" {r['peak_cuda_mib']:>9.1f}" if r["peak_cuda_mib"] is not None else ""
        print(
            f"{r['method']:<18} {r['prompts']:>7} {r['tokens']:>7} {r['padded_tokens']:>7} {r['seconds']:>8.2f} "
            f"{r['tokens_per_s']:>9.0f} {r['peak_rss_mib']:>9.1f}{cuda}"
        )
    ours, base = rows["ours"], rows["generate_baseline"]
    print(f"speed ratio ours / generate baseline: {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    if ours["peak_rss_mib"] > 0:
        print(
            f"peak memory ratio generate baseline / ours: {base['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x"
        )
    if args.device != "cpu":
        print(
            f"peak CUDA memory ratio generate baseline / ours: {base['peak_cuda_mib'] / ours['peak_cuda_mib']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
