"""`abliterate run` at GLM-4.5-Air's real widths with a memory budget below the model's size: every
stage streams. Reports the run's peak memory against one decoder layer plus activations, the
automatic selection's time against one measurement pass, and a projection of GLM-4.5-Air's full run.

    .venv/bin/python benchmarks/bench_run_streamed.py [--moe-layers 2] [--experts 32] [--prompts 8]
        [--dir /tmp/bench-run] [--keep] [--gpu-tflops 400] [--gpu-h2d-gbps 25] [--device cuda]
        [--layer-tokens 256]

1. Writes a random checkpoint with GLM-4.5-Air's names and real widths (hidden 4096, 96 heads x 128,
   8 key/value heads, dense layer 0 with intermediate 10944, then MoE layers of `--experts` routed
   experts x moe_intermediate 1408 with 8 active, a shared expert, fp32 routers), bf16 on disk; the
   vocabulary is the demo tokenizer's (GLM's 151k-row embedding and head would add 2.5 GB read once
   per pass, see the projection).
2. Runs `abliterate run` on it in a fresh process with `--memory-budget` at half the model's size
   (so measurement, selection and evaluation all stream), `--prompts` prompts per set and split,
   and reads that process's peak resident set (VmHWM; Prefect's temporary server is another process).
3. In another fresh process, times one MoE layer: reading it from the shards into the float32
   module (bytes/s), and running tokens through it (tokens/s), the two costs every streamed pass pays.
4. Projects GLM-4.5-Air's full run (45 MoE layers of 128 experts + the dense layer 0, 151k vocabulary)
   from those per-layer figures on this CPU, and on one GPU from the assumed --gpu-tflops (sustained
   bf16) and --gpu-h2d-gbps (host-to-GPU copy of a layer): no GPU was measured. Scoring is projected
   twice: with the default `--shortlist` (selection's halving rounds: one pass each) and with
   `--shortlist all` (every candidate on every prompt in one pass); both totals and the ratios print.

`--device cuda` (or cuda:N) runs both on the GPU: `abliterate run --device cuda`, and the layer read
from the shards onto the GPU and the tokens through it there (after one untimed warm-up batch, with
the GPU synchronised around each timing); the first column of the projection is then the GPU's,
from its measured rates. `--dtype` (default auto: the checkpoint's bf16 on a GPU, float32 on the
CPU) is the compute dtype of both; `--layer-tokens` the tokens timed through the layer (a GPU needs
thousands to be busy). `benchmarks/gpu_check.sh` runs it so.

The checkpoint (about 1.4 GB per MoE layer at 32 experts) and the output are deleted unless --keep.

Figures seen (2026-12-01, this 2-core CPU shared with other jobs, load average 5.5; defaults: dense
layer 0 + 2 MoE layers of 32 experts, 3.0 GiB bf16, 6.0 GiB float32, largest layer 2.53 GiB,
budget 2.99 GiB, 8 prompts per set and split), two runs:
- peak RSS of `abliterate run` 3.39 / 3.47 GiB (0.40 GiB of it the interpreter with torch,
  transformers, Prefect and MLflow) against 1.5 x (one layer + activations) = 3.81 GiB: 0.89 / 0.91;
- stages (s): measurement 50 / 60, directions 152 / 126 (6 probe passes: random weights refuse
  nothing, so no reply stops early; scoring pass 36 / 22 s), evaluation 34 / 90; the scoring pass
  (baseline + 2 candidates) took 0.72 / 0.37 of a measurement pass;
- one 32-expert MoE layer: 1.27 GiB bf16 read into 2.53 GiB float32 in 4.8 / 3.9 s, 114 / 61 tokens/s;
- projection for GLM-4.5-Air with the general prompt set: this CPU about 31 h (23 h of it scoring
  36 candidates: compute, 37 variants x 138 prompts through every layer; 14 h with
  --max-candidates 8); one GPU (assumed 400 TFLOPS, 25 GB/s host->GPU, 3 GB/s disk) about 18 min.

Figures seen (2026-12-05, load average 9-12 on the 2 cores: several jobs beside it), one run with the
shortlist: one MoE layer read in 4.35 s, 75 tokens/s; projection for GLM-4.5-Air on this CPU 23.8 h
with `--shortlist 3` (scoring 12.2 h: 5 passes, 36 -> 18 -> 9 -> 5 -> 3 candidates on 8, 16, 32, 64,
69 prompts per set) against 46.7 h with `--shortlist all` (scoring 35.1 h): scoring 2.9x, the run
1.96x; the probe (4.2 h) and the stages that select nothing (7.4 h) stay. GPU column: 23.7 against
18.4 min (streamed passes are read-bound there: `--shortlist all` is the faster choice).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]
AIR = {
    "layers": 46,
    "experts": 128,
    "active": 8,
    "hidden": 4096,
    "moe_inter": 1408,
    "dense_inter": 10944,
    "q": 96 * 128,
    "kv": 8 * 128,
    "vocab": 151552,
}
REFUSAL_WORDS = "I cannot help with that . As an AI I'm sorry"


def status_bytes(field: str, pid: str = "self") -> int:
    """VmHWM (peak resident set) or VmRSS of a process, in bytes. Not ru_maxrss: Linux carries that
    across fork and exec, so a child would inherit its parent's peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


# ---------------------------------------------------------------- the checkpoint and prompts


def prompt_sets(n: int) -> dict[str, list[str]]:
    from abliterate.demo import prompt_file
    from abliterate.measure.prompts import load_prompts

    return {
        f"{kind}{suffix}": load_prompts(prompt_file("demo", kind, split))[:n]
        for kind in ("harmful", "harmless")
        for split, suffix in (("train", ""), ("test", "_test"))
    }


def write_model(model_dir: Path, moe_layers: int, experts: int, prompts: dict[str, list[str]]) -> None:
    from abliterate.demo.train import build_tokenizer
    from abliterate.weights.synthetic import GlmLayout, write_glm_layout

    tokenizer = build_tokenizer([p for ps in prompts.values() for p in ps] + [REFUSAL_WORDS])
    layout = GlmLayout(
        num_layers=1 + moe_layers,
        n_routed_experts=experts,
        num_experts_per_tok=AIR["active"],
        num_nextn_predict_layers=0,
        hidden_size=AIR["hidden"],
        intermediate_size=AIR["dense_inter"],
        moe_intermediate_size=AIR["moe_inter"],
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=len(tokenizer),
    )
    began = time.perf_counter()
    write_glm_layout(model_dir, layout, num_shards=2 * (1 + moe_layers))
    tokenizer.save_pretrained(model_dir)
    print(f"wrote {model_dir} in {time.perf_counter() - began:.0f} s", file=sys.stderr)


# ---------------------------------------------------------------- children (fresh processes)


def child_run(argv: list[str], out: str) -> None:
    """`abliterate run` in this process; its summary and this process's peak memory for the parent."""
    import torch

    torch.set_num_threads(1)
    import contextlib
    import io

    from abliterate_flows.runtime import configure

    configure()  # what `abliterate run` does first; then everything it imports, so the RSS at start counts it
    import abliterate_flows.main  # noqa: F401
    import abliterate_flows.sweep  # noqa: F401
    from abliterate.cli import main

    start_rss = status_bytes("VmRSS")
    sys.argv = ["abliterate", *argv]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main()
    summary = json.loads(printed.getvalue()) if code == 0 else {}
    Path(out).write_text(
        json.dumps(
            {"code": code, "peak_rss": status_bytes("VmHWM"), "rss_before": start_rss, "summary": summary},
            default=str,
        )
    )


def child_layer(model_dir: str, tokens: int, out: str, device: str, dtype: str) -> None:
    """One MoE layer (index 1): seconds to read it into the module (`dtype` on `device`), and to run
    `tokens` tokens. On a GPU, one untimed batch first (kernel loading), and synchronised timings."""
    import torch

    torch.set_num_threads(1)
    from abliterate.inference.devices import DTYPES
    from abliterate.inference.streaming import LayerStream

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    stream = LayerStream(model_dir, dtype, device)
    layer = stream.layers[1]
    sync()
    began = time.perf_counter()
    stream.loader.load_layer(1, layer)
    sync()
    load_s = time.perf_counter() - began
    nbytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    disk = sum(t.nbytes for t in stream.inventory.tensors.values() if t.name.startswith("model.layers.1."))
    rotary = stream.decoder.rotary_emb
    length = 32
    hidden = torch.randn(tokens // length, length, stream.config.hidden_size) * 0.05
    hidden = hidden.to(device=device, dtype=DTYPES[dtype])
    position_ids = torch.arange(length, device=device).expand(hidden.shape[0], -1)
    with torch.inference_mode():
        embeddings = rotary(hidden, position_ids)
        if device.startswith("cuda"):
            warm = tuple(e[:1] for e in embeddings)
            layer(hidden[:1], position_embeddings=warm, position_ids=position_ids[:1], attention_mask=None)
        sync()
        began = time.perf_counter()
        layer(hidden, position_embeddings=embeddings, position_ids=position_ids, attention_mask=None)
        sync()
        run_s = time.perf_counter() - began
    Path(out).write_text(
        json.dumps(
            {
                "load_s": load_s,
                "bytes_f32": nbytes,
                "bytes_disk": disk,
                "run_s": run_s,
                "tokens": hidden.shape[0] * length,
                "device": device,
                "dtype": dtype,
            }
        )
    )


def in_child(kind: str, args: list[str]) -> dict:
    out = f"/tmp/bench-run-{os.getpid()}-{kind}.json"
    cmd = [sys.executable, __file__, "--child", kind, "--child-out", out, "--", *args]
    subprocess.run(cmd, check=True, cwd=ROOT)
    figures = json.loads(Path(out).read_text())
    Path(out).unlink()
    return figures


# ---------------------------------------------------------------- projection


def projection(
    layer: dict,
    prompts: dict[str, int],
    tokens_per_prompt: float,
    io: dict,
    assumed: dict,
    probe_passes: int,
    selection: Any,
    candidates: int | None = None,
) -> list[tuple[str, float, float]]:
    """(stage, CPU seconds, GPU seconds) of GLM-4.5-Air's full run with `prompts` (train: measured, val:
    both validation sets, test: both test sets) of `tokens_per_prompt` tokens.

    A streamed pass pays, per decoder layer, the read into the compute dtype and the tokens through
    it, measured here per MoE layer at `--experts` experts: reading scales with the layer's bytes
    (128 experts), compute does not (8 experts are active either way). Ablation and validation are
    bandwidth-bound: this run's seconds per checkpoint byte. On the GPU: the layer read from disk at
    the assumed disk GB/s, copied at the assumed host-to-GPU GB/s, computed at the assumed TFLOPS.
    Scoring follows selection's own rounds (`halving_rounds` with the `selection` section's shortlist):
    one pass per round, the baseline on every validation prompt in the first, each round's candidates on
    its new prompts."""
    from abliterate.select.selection import halving_rounds

    expert_bytes = layer["experts"] * 3 * AIR["hidden"] * AIR["moe_inter"] * 2  # bf16 on disk
    other_bytes = layer["bytes_disk"] - expert_bytes
    air_layer = 128 * 3 * AIR["hidden"] * AIR["moe_inter"] * 2 + other_bytes
    read_cpu = layer["load_s"] * air_layer / layer["bytes_disk"]  # s per Air MoE layer
    per_token_cpu = layer["run_s"] / layer["tokens"]
    flops_per_token = 2 * (
        AIR["hidden"] * (AIR["q"] + 2 * AIR["kv"])
        + AIR["q"] * AIR["hidden"]
        + 9 * 3 * AIR["hidden"] * AIR["moe_inter"]
    )  # attention projections, 8 + 1 experts
    per_token_gpu = flops_per_token / (assumed["tflops"] * 1e12)
    read_gpu = air_layer / (assumed["disk_gbps"] * 1e9) + air_layer / (assumed["h2d_gbps"] * 1e9)
    layers = AIR["layers"]
    if candidates is None:
        candidates = math.floor(layers * 0.8)  # positions 1..36 (0 is undefined: every prompt ends alike)

    def passes(n_passes: int, tokens: float) -> tuple[float, float]:
        return (
            n_passes * layers * (read_cpu + tokens * per_token_cpu),
            n_passes * layers * (read_gpu + tokens * per_token_gpu),
        )

    val, air_bytes = prompts["val"], layers * air_layer
    rounds = halving_rounds(candidates, prompts["val_harmful"], prompts["val_harmless"], selection)
    scoring, done = [0.0, 0.0], 0
    for number, plan in enumerate(rounds):
        upto = plan.harmful_prompts + plan.harmless_prompts
        scored = plan.candidates * (upto - done) + (val if number == 0 else 0)
        scoring = [a + b for a, b in zip(scoring, passes(1, scored * tokens_per_prompt), strict=True)]
        done = upto
    fully = rounds[-1].candidates
    return [
        ("measurement (1 pass)", *passes(1, prompts["train"] * tokens_per_prompt)),
        (
            f"find refusal tokens (at most {probe_passes} passes)",
            *passes(probe_passes, val / 2 * (tokens_per_prompt + 3)),
        ),
        (
            f"score {candidates} candidates + baseline (shortlist {selection.shortlist}: {len(rounds)} "
            f"pass{'es' if len(rounds) > 1 else ''}, {fully} on every prompt)",
            *scoring,
        ),
        ("evaluation before + after (2 passes)", *passes(2, prompts["test"] * tokens_per_prompt)),
        (
            "ablation + validation (this run's s/byte; GPU: 4 disk passes)",
            io["seconds_per_byte"] * air_bytes,
            4 * air_bytes / (assumed["disk_gbps"] * 1e9),
        ),
    ]


def general_counts() -> dict[str, int]:
    """What a run on a model other than the demo uses by default: the general prompt set, split 25 %."""
    from abliterate.demo import prompt_file
    from abliterate.measure.prompts import load_prompts, split_prompts

    counts = {"train": 0, "val": 0, "test": 0}
    for kind in ("harmful", "harmless"):
        val, train = split_prompts(load_prompts(prompt_file("general", kind, "train")), 0.25, 0)
        counts["train"] += len(train)
        counts["val"] += len(val)
        counts[f"val_{kind}"] = len(val)
        counts["test"] += len(load_prompts(prompt_file("general", kind, "test")))
    return counts


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--moe-layers", type=int, default=2, help="MoE layers after the dense layer 0 (default 2)"
    )
    parser.add_argument(
        "--experts", type=int, default=32, help="routed experts per MoE layer (GLM-4.5-Air: 128)"
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts per set and split (default 8)")
    parser.add_argument("--dir", default="/tmp/bench-run", help="working folder (replaced)")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the checkpoint")
    parser.add_argument(
        "--gpu-tflops", type=float, default=400.0, help="assumed sustained bf16 TFLOPS of one GPU"
    )
    parser.add_argument(
        "--gpu-h2d-gbps", type=float, default=25.0, help="assumed host-to-GPU GB/s of layer copies"
    )
    parser.add_argument(
        "--disk-gbps", type=float, default=3.0, help="assumed disk read GB/s of the GPU machine"
    )
    parser.add_argument(
        "--air-tokens",
        type=float,
        default=40.0,
        help="assumed tokens per chat-rendered prompt of "
        "GLM-4.5-Air's tokenizer and template on the general prompt set (default 40)",
    )
    parser.add_argument(
        "--figures", default="/tmp/bench-run-figures.json", help="where the measured figures go (JSON)"
    )
    parser.add_argument(
        "--device", default="cpu", help="where the run and the layer run: cpu | cuda | cuda:N"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="compute dtype: auto (bf16, the checkpoint's, on a GPU; float32 on the CPU) | bfloat16 | float32",
    )
    parser.add_argument(
        "--layer-tokens", type=int, default=256, help="tokens timed through one MoE layer (default 256)"
    )
    parser.add_argument("--child", choices=["run", "layer"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "run":
        child_run(args.rest, args.child_out)
        return 0
    if args.child == "layer":
        child_layer(args.rest[0], int(args.rest[1]), args.child_out, args.rest[2], args.rest[3])
        return 0

    from abliterate.inference.devices import resolve_device, resolve_dtype
    from abliterate.inference.streaming import weight_bytes
    from abliterate.weights.checkpoint import build_inventory

    work = Path(args.dir)
    model = work / "model"
    prompts = prompt_sets(args.prompts)
    if not (args.keep and (model / "config.json").is_file()):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_model(model, args.moe_layers, args.experts, prompts)
    files = {}
    for name, values in prompts.items():
        files[name] = work / f"{name}.txt"
        files[name].write_text("\n".join(values) + "\n")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, model)
    sizes = weight_bytes(model, dtype, build_inventory(model))
    budget = sizes.total // 2
    out = work / "out"
    argv = [
        str(model),
        "--out",
        str(out),
        "--overwrite",
        "--memory-budget",
        str(budget),
        "--batch-size",
        "8",
        "--device",
        device,
        "--dtype",
        dtype,
        "--kl-threshold",
        "10",
        "--max-new-tokens",
        "8",
        "--json",
        "--quiet",
        "--work-dir",
        str(work / "results"),
    ]
    for name, path in files.items():
        argv += [f"--{name.replace('_', '-')}", str(path)]
    os.environ["ABLITERATE_HOME"] = str(work)
    began = time.perf_counter()
    figures = in_child("run", ["run", *argv])
    wall = time.perf_counter() - began
    if figures["code"] != 0:
        print(f"abliterate run failed with exit code {figures['code']}", file=sys.stderr)
        return 1
    summary = figures["summary"]
    durations = summary.get("durations", {})
    layer = in_child("layer", [str(model), str(args.layer_tokens), device, dtype])
    layer["experts"] = args.experts

    from abliterate.config import Template
    from abliterate.inference.loading import load_tokenizer
    from abliterate.measure.chat import encode_prompts

    tokenizer = load_tokenizer(model)
    lengths = [len(x) for v in prompts.values() for x in encode_prompts(tokenizer, v, Template(), "prompt")]
    tokens_per_prompt = sum(lengths) / len(lengths)
    hidden, longest = 4096, max(lengths)
    n_val = 2 * max(1, round(args.prompts * 0.25))  # the flow's seeded 25% split of each training set
    n_train = 2 * args.prompts - n_val
    candidates = max(1, math.floor((1 + args.moe_layers) * 0.8))
    activations = {  # float32 hidden states held between layers: prompts x padded length x hidden x 4
        "measurement": n_train * longest * hidden * 4,
        "selection": (candidates + 1) * n_val * longest * hidden * 4,
        "evaluation": 2 * args.prompts * longest * hidden * 4,
    }
    bound = 1.5 * (sizes.largest_layer + max(activations.values()))

    manifest = json.loads((out / "abliteration.json").read_text())
    selection = manifest["directions"]["metadata"].get("selection") or {}
    checkpoint_bytes = build_inventory(model).total_bytes
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nmodel: dense layer 0 + {args.moe_layers} MoE layers of {args.experts} experts (hidden 4096, experts "
        f"1408 wide, 8 active), {checkpoint_bytes / GIB:.2f} GiB bf16 on disk, {sizes.total / GIB:.2f} GiB in "
        f"{dtype}, largest layer {sizes.largest_layer / GIB:.2f} GiB; --memory-budget {budget / GIB:.2f} GiB: "
        "every stage streams"
    )
    print(
        f"prompts: {args.prompts} per set and split ({n_train} measured, {n_val} validation, "
        f"{2 * args.prompts} test), {tokens_per_prompt:.1f} tokens on average, longest {longest}"
    )
    ev = summary.get("evaluation", {})
    print(
        f"selected position {summary.get('selected_position')} (random weights: the figures mean nothing); "
        f"evaluation: first-token KL {ev.get('kl_harmless', float('nan')):.3g}, full replies "
        f"{'made' if 'refusal_rate_harmful' in ev else 'not made'}"
    )
    peak = figures["peak_rss"]
    held = sizes.largest_layer + max(activations.values())
    print(
        f"\npeak RSS of `abliterate run`: {peak / GIB:.2f} GiB; after its imports (Python, torch, transformers, "
        f"Prefect, MLflow) {figures['rss_before'] / GIB:.2f} GiB, so the run added {(peak - figures['rss_before']) / GIB:.2f} "
        f"GiB. One decoder layer + activations: {held / GIB:.2f} GiB (activations {max(activations.values()) / GIB:.3f}); "
        f"1.5x = {bound / GIB:.2f} GiB: the whole process is {peak / bound:.2f} of it, what the run added "
        f"{(peak - figures['rss_before']) / bound:.2f}"
    )
    print(
        "stage durations (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in durations.items())
        + f"; wall {wall:.0f} s"
    )
    measurement = durations.get("measurement") or float("nan")
    print(
        f"selection: {selection.get('weight_reads')} passes over the weights ({len(selection.get('rounds', []))} "
        f"scoring {len(selection.get('candidates', [])) + len(selection.get('ranked_out', []))} candidates + the "
        "baseline, the rest finding refusal tokens; the directions file keeps no timings); whole directions stage "
        f"against one measurement pass ({measurement:.1f} s): {durations.get('directions', float('nan')) / measurement:.2f}x"
    )
    print(
        f"\none MoE layer ({args.experts} experts): read {layer['bytes_disk'] / GIB:.2f} GiB bf16 into "
        f"{layer['bytes_f32'] / GIB:.2f} GiB {dtype} on {device} in {layer['load_s']:.2f} s "
        f"({layer['bytes_disk'] / layer['load_s'] / 1e9:.2f} GB/s read); {layer['tokens']} tokens through it "
        f"in {layer['run_s']:.2f} s ({layer['tokens'] / layer['run_s']:.0f} tokens/s)"
    )
    io = {
        "seconds_per_byte": (durations.get("ablation", 0) + durations.get("validation", 0)) / checkpoint_bytes
    }
    assumed = {"tflops": args.gpu_tflops, "h2d_gbps": args.gpu_h2d_gbps, "disk_gbps": args.disk_gbps}
    general = general_counts()
    from abliterate.config import Selection

    shortlisted, every = Selection(), Selection(shortlist="all")
    rows = projection(layer, general, args.air_tokens, io, assumed, 6, shortlisted)
    rows_all = projection(layer, general, args.air_tokens, io, assumed, 6, every)
    print(
        f"\nprojection, GLM-4.5-Air (46 layers, 128 experts) with the general prompt set ({general['train']} "
        f"measured, {general['val']} validation, {general['test']} test prompts, {args.air_tokens:.0f} tokens each): "
        f"{'this CPU' if device == 'cpu' else device}, from the measured per-layer figures | one GPU, assumed {args.gpu_tflops:.0f} TFLOPS bf16, "
        f"{args.gpu_h2d_gbps:.0f} GB/s host->GPU, {args.disk_gbps:.0f} GB/s disk (no GPU measured)"
    )
    for name, cpu_s, gpu_s in rows:
        print(f"  {name:<62} {cpu_s / 3600:>7.1f} h | {gpu_s / 60:>7.1f} min")
    print(
        f"  {'total':<62} {sum(r[1] for r in rows) / 3600:>7.1f} h | {sum(r[2] for r in rows) / 60:>7.1f} min"
    )
    total, total_all = sum(r[1] for r in rows), sum(r[1] for r in rows_all)
    print(
        f"  {'scoring every candidate instead: ' + rows_all[2][0]:<62} {rows_all[2][1] / 3600:>7.1f} h | "
        f"{rows_all[2][2] / 60:>7.1f} min  (total {total_all / 3600:.1f} h | {sum(r[2] for r in rows_all) / 60:.1f} min)"
    )
    print(
        f"  shortlist {shortlisted.shortlist} (first round {shortlisted.shortlist_prompts} prompts per set) against all: "
        f"scoring {rows_all[2][1] / rows[2][1]:.1f}x less CPU time, the full run {total_all / total:.2f}x; "
        f"selection (probe + scoring) {(rows_all[1][1] + rows_all[2][1]) / (rows[1][1] + rows[2][1]):.1f}x; "
        f"the stages selection does not run: {(total - rows[1][1] - rows[2][1]) / 3600:.1f} h"
    )
    Path(args.figures).write_text(
        json.dumps(
            {
                "layer": layer,
                "durations": durations,
                "selection": selection,
                "peak_rss": peak,
                "rss_before": figures["rss_before"],
                "bound": bound,
                "io": io,
                "rows": rows,
                "rows_all": rows_all,
                "device": device,
                "dtype": dtype,
            },
            indent=2,
            default=str,
        )
    )
    print(f"figures written to {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
