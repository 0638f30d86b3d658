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
   bf16) and --gpu-h2d-gbps (host-to-GPU copy of a layer): no GPU was measured. Projected twice:
   before (every candidate on every prompt in one pass, the refusal-token probe recomputing prompt +
   reply each pass) and after (the defaults: `--prefilter`, then `--shortlist`'s halving rounds, one
   pass each; the probe with the layers' keys and values cached, its first pass the baseline's harmful
   scores); the rank choice at the chosen position (issue 25's subspaces at the defaults): before, every
   rank on both validation sets and every direction alone on the harmful set in one pass (the code before
   the elimination); after, its usual case (one direction leaves at most wilson_upper(0, n) n refusals:
   nothing scored) in the table, and its worst case (no rank dropped: the ranks through the harmful
   rounds, then the harmless set, then the chosen rank's k-1 rows for the shares) beside it; each stage's
   hours before and after, the ratios and both totals print, and the total without any rank choice. Then the full replies of one model (`--full-replies always`):
   accelerate's offloading (every layer read per new token of each batch) against the runner's cached
   layer-streamed greedy (one read per new token for every prompt), from the same measured rates.
   `--full-replies always` makes the run's own evaluation make them so (its seconds in the stages).
5. Selects the direction on the demo model and on the demo behind a silent layer (refusal positions 3
   and 4) with every candidate scored on every prompt and with the defaults, and prints both positions.
   The selection's own seconds (probe, scoring) come from the run's MLflow metrics.

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

Figures seen (2026-12-05, load average 6-11 on the 2 cores), two runs with the prefilter (4), the
shortlist (1) and the cached probe against scoring everything with the probe recomputed: the full run
76.5 h -> 16.3 h (4.70x; layer read 3.49 s, 44 tokens/s) and 71.5 h -> 18.9 h (3.79x; read 10.52 s,
50 tokens/s); scoring 59.6 -> 3.6 h and 53.1 -> 4.2 h, the probe 6.1 -> 1.8 h and 7.4 -> 3.6 h; the
other stages unchanged. Selected position: demo 3 against 3, shifted demo 4 against 4. GPU column
18.4 -> 20.9 min (three scoring passes instead of one).

Figures seen (2026-12-05 09:51-10:13, load average 0.4-2 on the 2 cores), four runs: one MoE layer read
in 1.56 / 1.30 / 1.32 / 1.41 s, 220 / 200 / 200 / 202 tokens/s; the full run 15.9 -> 4.0 h (3.99x) and
17.1 -> 3.9 h (4.35x) before the rank choice was counted (runs 1, 2); counting it 20.5 -> 7.3 h (2.80x)
and 20.3 -> 7.2 h (2.81x), without it 17.3 -> 4.1 h (4.24x) and 17.0 -> 4.0 h (4.27x) (runs 3, 4): the rank choice's pass is
3.2 h, 6 subspace ranks on both validation sets and 6 directions alone on the harmful ones at the
chosen position. Full replies of one model, 48 tokens on 194 prompts: accelerate offloading 37-44 h,
the cached greedy 3.8-4.3 h (9.6-10.3x). Runs 1 and 4 with `--full-replies always`: the run's
evaluation 153 / 126 s with 8-token replies of both models against 19 / 20 s without. Selected
position: demo 3 against 3, shifted demo 4 against 4, in every run.

Figures seen (2026-12-05 12:03, load average 1.5-2.3 on the 2 cores), one run after the rank choice
scores only what can earn (before: the old rank pass, 6 ranks on both sets + 6 rows in one pass): one
MoE layer read in 2.22 s, 144 tokens/s; the full run 28.5 -> 5.6 h (5.07x) in the rank choice's usual
case (one direction leaves <= 3.64 of 69 refusing: nothing scored, 4.52 -> 0 h), 28.5 -> 9.8 h (2.91x) in
its worst (no rank dropped: 3 harmful passes of 16/32/69, the harmless, 3 rows for the shares: 4.52 ->
4.17 h), 23.9 -> 5.6 h (4.26x) without any rank choice; GPU column 19.8 -> 20.9 min (usual) and 27.7 min
(worst). Selected position: demo 3 against 3, shifted demo 4 against 4.
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
    peak = status_bytes("VmHWM")
    timings = {}
    if code == 0:  # the selection's timings live with the MLflow run (the directions file keeps none)
        from mlflow import MlflowClient

        from abliterate_flows.runtime import tracking_uri

        metrics = MlflowClient(tracking_uri()).get_run(summary["mlflow_run_id"]).data.metrics
        timings = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("selection/seconds_")}
    Path(out).write_text(
        json.dumps(
            {
                "code": code,
                "peak_rss": peak,
                "rss_before": start_rss,
                "summary": summary,
                "selection_seconds": timings,
            },
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
    cached: bool = True,
    candidates: int | None = None,
    rank_work: tuple[str, list[int]] = ("no subspace", []),
) -> list[tuple[str, float, float]]:
    """(stage, CPU seconds, GPU seconds) of GLM-4.5-Air's full run with `prompts` (train: measured, val:
    both validation sets, test: both test sets) of `tokens_per_prompt` tokens.

    A streamed pass pays, per decoder layer, the read into the compute dtype and the tokens through
    it, measured here per MoE layer at `--experts` experts: reading scales with the layer's bytes
    (128 experts), compute does not (8 experts are active either way). Ablation and validation are
    bandwidth-bound: this run's seconds per checkpoint byte. On the GPU: the layer read from disk at
    the assumed disk GB/s, copied at the assumed host-to-GPU GB/s, computed at the assumed TFLOPS.

    The probe (greedy replies to the harmful validation prompts) reads the weights once per token: with
    `cached` (the runner's layer caches) the first pass runs the prompts and each later one a token per
    reply, and the first pass gives the unmodified model's harmful first tokens to scoring; without, each
    pass runs prompt + reply so far and scoring runs the unmodified model on both sets. Scoring follows
    selection's own rounds (`prefilter`, then `halving_rounds` with the `selection` section's shortlist):
    one pass per round, the unmodified model in the first, each round's candidates on its new prompts.
    The rank choice at the chosen position (`rank_work`: its label and the variant-prompts of each of its
    passes, `rank_choice_work`) adds one pass each."""
    from abliterate.select.selection import halving_rounds

    passes, air_layer = air_passes(layer, assumed)
    layers = AIR["layers"]
    if candidates is None:
        candidates = math.floor(layers * 0.8)  # positions 1..36 (0 is undefined: every prompt ends alike)
    if selection.prefilter != "all":
        candidates = min(candidates, int(selection.prefilter))

    def add(*parts: tuple[float, float]) -> tuple[float, float]:
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    harmful, val, air_bytes = prompts["val_harmful"], prompts["val"], layers * air_layer
    if cached:  # the prompts once, then one token per reply per pass
        probe = add(passes(1, harmful * tokens_per_prompt), passes(probe_passes - 1, harmful))
    else:  # every pass runs prompt + reply so far: on average prompt + 3 tokens
        probe = passes(probe_passes, harmful * (tokens_per_prompt + 3))
    rounds = halving_rounds(candidates, prompts["val_harmful"], prompts["val_harmless"], selection)
    scoring, done = (0.0, 0.0), 0
    baseline = val - harmful if cached else val  # the probe's first pass gave the harmful ones
    for number, plan in enumerate(rounds):
        upto = plan.harmful_prompts + plan.harmless_prompts
        scored = plan.candidates * (upto - done) + (baseline if number == 0 else 0)
        scoring = add(scoring, passes(1, scored * tokens_per_prompt))
        done = upto
    fully = rounds[-1].candidates
    rank_label, rank_passes = rank_work
    rank_pass = add((0.0, 0.0), *(passes(1, work * tokens_per_prompt) for work in rank_passes))
    pre = "" if selection.prefilter == "all" else f"prefilter {selection.prefilter}, "
    return [
        ("measurement (1 pass)", *passes(1, prompts["train"] * tokens_per_prompt)),
        (
            f"find refusal tokens ({probe_passes} passes, {'cached' if cached else 'recomputed'})",
            *probe,
        ),
        (
            f"score {candidates} + baseline ({pre}shortlist {selection.shortlist}: {len(rounds)} "
            f"pass{'es' if len(rounds) > 1 else ''}, {fully} on every prompt)",
            *scoring,
        ),
        (f"rank choice ({rank_label})", *rank_pass),
        ("evaluation before + after (2 passes)", *passes(2, prompts["test"] * tokens_per_prompt)),
        (
            "ablation + validation (this run's s/byte; GPU: 4 disk passes)",
            io["seconds_per_byte"] * air_bytes,
            4 * air_bytes / (assumed["disk_gbps"] * 1e9),
        ),
    ]


def rank_choice_work(case: str, prompts: dict[str, int], selection: Any, subspace_rank: int, batch_size: int):
    """(label, variant-prompts of each pass) of the rank choice at the chosen position with the defaults'
    subspaces (`pca` and `clusters`: `categories` needs a category field), ranks 2..top of each (top =
    min(max_rank, subspace_rank)), as `score_ranks` and `direction_shares` run them. `before`: the code
    before the elimination (every rank on both validation sets and every row 1..top-1 alone on the harmful
    set, one pass); `usual`: one direction leaves at most wilson_upper(0, n) n of the n harmful prompts
    refusing, so no rank can earn and nothing is scored; `worst`: no rank is dropped, so every rank goes
    through the harmful rounds (`rank_rounds`), then the harmless set, and the chosen rank top's rows
    1..top-1 alone on the harmful set (the shares)."""
    from abliterate.inference.scores import wilson_bounds
    from abliterate.select.selection import rank_rounds

    top = min(selection.max_rank, subspace_rank)
    ranks, harmful, harmless = 2 * (top - 1), prompts["val_harmful"], prompts["val_harmless"]
    if case == "before":
        return (
            f"1 pass: {ranks} ranks on both sets, {ranks} directions alone on the harmful",
            [ranks * (harmful + harmless) + ranks * harmful],
        )
    if case == "usual":
        floor = wilson_bounds(0, harmful, selection.rank_confidence)[1]
        return (
            f"usual: one direction leaves <= {floor * harmful:.2f} of {harmful} refusing, nothing scored",
            [],
        )
    steps = rank_rounds(harmful, selection.shortlist_prompts, batch_size)
    work = [ranks * (end - start) for start, end in zip([0, *steps[:-1]], steps, strict=True)]
    return (
        f"worst: none dropped, {len(steps)} harmful passes ({'/'.join(map(str, steps))}), the harmless, "
        f"{top - 1} shares",
        [*work, ranks * harmless, (top - 1) * harmful],
    )


def print_projection(layer: dict, io: dict, assumed: dict, general: dict, air_tokens: float, device: str):
    """Print GLM-4.5-Air's projected run before and after (the table, the rank choice's usual and worst
    cases, the totals); returns (before, after in the usual case, after in the worst case) rows."""
    from abliterate.config import Measurement, Runtime, Selection

    # before: every candidate on every prompt, the probe recomputing prompt + reply each pass (the code
    # before issue 24), every rank on every prompt (before the rank choice's elimination); after: the
    # defaults (prefilter, shortlist), the cached probe, the rank choice in its usual and its worst case
    everything = Selection(shortlist="all", prefilter="all")
    rank_case = {
        case: rank_choice_work(case, general, Selection(), Measurement().subspace_rank, Runtime().batch_size)
        for case in ("before", "usual", "worst")
    }
    before, rows, worst = (
        projection(layer, general, air_tokens, io, assumed, 6, chosen, cached, rank_work=rank_case[case])
        for chosen, cached, case in (
            (everything, False, "before"),
            (Selection(), True, "usual"),
            (Selection(), True, "worst"),
        )
    )
    print(
        f"\nprojection, GLM-4.5-Air (46 layers, 128 experts) with the general prompt set ({general['train']} "
        f"measured, {general['val']} validation, {general['test']} test prompts, {air_tokens:.0f} tokens each): "
        f"{'this CPU' if device == 'cpu' else device}, from the measured per-layer figures | one GPU, assumed "
        f"{assumed['tflops']:.0f} TFLOPS bf16, {assumed['h2d_gbps']:.0f} GB/s host->GPU, {assumed['disk_gbps']:.0f} GB/s disk "
        "(no GPU measured); before: every candidate scored on every prompt, the probe recomputed, every rank on "
        "every prompt; after: the defaults, the rank choice in its usual case"
    )
    print(f"  {'stage':<22} {'before':>9} {'after':>9} {'ratio':>7} | {'GPU before':>10} {'after':>8}")
    labels = [
        "measurement",
        "refusal-token probe",
        "scoring",
        "rank choice",
        "evaluation",
        "ablation+validation",
    ]
    for label, old, new in zip(labels, before, rows, strict=True):
        ratio = f"{old[1] / new[1]:>6.2f}x" if new[1] > 0 else f"{'-':>7}"
        print(
            f"  {label:<22} {old[1] / 3600:>7.2f} h {new[1] / 3600:>7.2f} h {ratio} "
            f"| {old[2] / 60:>6.1f} min {new[2] / 60:>5.1f} min"
        )
    total_before, total = sum(r[1] for r in before), sum(r[1] for r in rows)
    gpu_before, gpu = sum(r[2] for r in before), sum(r[2] for r in rows)
    total_worst, gpu_worst = sum(r[1] for r in worst), sum(r[2] for r in worst)
    print(
        f"  {'total':<22} {total_before / 3600:>7.2f} h {total / 3600:>7.2f} h "
        f"{total_before / total:>6.2f}x | {gpu_before / 60:>6.1f} min {gpu / 60:>5.1f} min"
    )
    print(
        f"  {'rank choice, worst':<22} {before[3][1] / 3600:>7.2f} h {worst[3][1] / 3600:>7.2f} h "
        f"{before[3][1] / worst[3][1]:>6.2f}x | {before[3][2] / 60:>6.1f} min {worst[3][2] / 60:>5.1f} min"
    )
    print(
        f"  {'total, worst':<22} {total_before / 3600:>7.2f} h {total_worst / 3600:>7.2f} h "
        f"{total_before / total_worst:>6.2f}x | {gpu_before / 60:>6.1f} min {gpu_worst / 60:>5.1f} min"
    )
    for name, old, new in ((labels[1], before[1], rows[1]), (labels[2], before[2], rows[2])):
        print(f"  {name}: before {old[0]}; after {new[0]}")
    print(f"  rank choice: before {before[3][0]}; after, usual {rows[3][0]}; after, worst {worst[3][0]}")
    rank_before = before[3][1]
    print(
        f"  the full run: {total_before / 3600:.1f} h -> {total / 3600:.1f} h on this CPU, {total_before / total:.2f}x"
        f" (usual case); {total_worst / 3600:.1f} h, {total_before / total_worst:.2f}x (worst case); without any "
        f"rank choice: {(total_before - rank_before) / 3600:.1f} h -> {total / 3600:.1f} h, "
        f"{(total_before - rank_before) / total:.2f}x"
    )
    return before, rows, worst


def air_passes(layer: dict, assumed: dict) -> tuple[Any, int]:
    """(passes(n, tokens) -> (CPU s, GPU s) of n streamed passes over GLM-4.5-Air's 46 layers with `tokens`
    tokens each; the bytes of one Air MoE layer), from the measured MoE layer at `--experts` experts: the
    read scales with the layer's bytes (128 experts), compute does not (8 experts are active either way)."""
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

    def passes(n_passes: float, tokens: float) -> tuple[float, float]:
        return (
            n_passes * layers * (read_cpu + tokens * per_token_cpu),
            n_passes * layers * (read_gpu + tokens * per_token_gpu),
        )

    return passes, air_layer


def replies_projection(
    layer: dict, prompts: dict[str, int], tokens_per_prompt: float, assumed: dict, new_tokens: int, batch: int
) -> dict[str, tuple[float, float]]:
    """(CPU s, GPU s) of the evaluation's full greedy replies of one over-budget model (`--full-replies
    always`, `new_tokens` tokens) on both test sets of GLM-4.5-Air, from the same measured per-layer rates:
    before, accelerate's offloading with `generate` (its own key/value cache, but every offloaded layer read
    once per new token of each batch of `batch` prompts; counted as if every layer were offloaded, the
    budget holding a small share of the 46); after, the runner's cached greedy (the prompts in the first
    pass, then one token per reply per pass, every test prompt together)."""
    passes, _ = air_passes(layer, assumed)
    test = prompts["test"]
    batches = math.ceil(test / batch)

    def add(*parts: tuple[float, float]) -> tuple[float, float]:
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    before = add(
        passes(batches, test / batches * tokens_per_prompt),
        passes(batches * (new_tokens - 1), test / batches),
    )
    after = add(passes(1, test * tokens_per_prompt), passes(new_tokens - 1, test))
    return {"before": before, "after": after}


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


def same_choice() -> dict[str, tuple[int, int]]:
    """The selected position with every candidate scored on every prompt against the defaults' (prefilter,
    shortlist), on the demo model (refusal position 3) and on the demo behind one silent layer (position 4):
    tests/test_shortlist.py's models and prompts."""
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from test_shortlist import EVERYTHING, choose, demo_split, directions_of, shifted_demo

    from abliterate.config import Selection
    from abliterate.demo import DEMO_MODEL_DIR
    from abliterate.inference.loading import load_model

    harmful, harmless, harmful_val, harmless_val = demo_split()
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, model_dir in (("demo", DEMO_MODEL_DIR), ("shifted demo", None)):
            model, tokenizer = load_model(model_dir or shifted_demo(Path(folder) / "shifted"))
            directions = directions_of(model, tokenizer, harmful, harmless)
            every, default = (
                choose(model, tokenizer, directions, harmful_val, harmless_val, selection).position
                for selection in (Selection(**EVERYTHING), Selection())
            )
            out[name] = (every, default)
    return out


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
    parser.add_argument(
        "--full-replies",
        default="auto",
        choices=["auto", "always"],
        help="the run's evaluation: auto (first-token figures only: the model streams) | always (full replies "
        "of both models by the runner's cached layer-streamed greedy, --max-new-tokens 8)",
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
        "--full-replies",
        args.full_replies,
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
    seconds = figures["selection_seconds"]
    scored = len(selection.get("candidates", [])) + len(selection.get("ranked_out", []))
    print(
        f"selection (MLflow's selection/seconds_*): {selection.get('weight_reads')} passes over the weights, "
        f"{seconds.get('seconds_probe', float('nan')):.1f} s finding refusal tokens (cached greedy), "
        f"{seconds.get('seconds_scoring', float('nan')):.1f} s scoring {scored} candidates + the baseline in "
        f"{len(selection.get('rounds', []))} rounds ({len(selection.get('prefiltered_out', []))} prefiltered out); "
        f"whole directions stage against one measurement pass ({measurement:.1f} s): "
        f"{durations.get('directions', float('nan')) / measurement:.2f}x"
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
    before, rows, worst = print_projection(layer, io, assumed, general, args.air_tokens, device)
    from abliterate.config import Evaluation, Runtime, Selection

    new_tokens, batch = Evaluation().max_new_tokens, Runtime().batch_size
    replies = replies_projection(layer, general, args.air_tokens, assumed, new_tokens, batch)
    (old_cpu, old_gpu), (new_cpu, new_gpu) = replies["before"], replies["after"]
    print(
        f"  full replies of one model (--full-replies always, {new_tokens} new tokens, {general['test']} test "
        f"prompts; not in the total, the streamed default makes none): accelerate offloading (every layer read "
        f"per new token of each of {math.ceil(general['test'] / batch)} batches of {batch}) {old_cpu / 3600:.1f} h"
        f" -> the cached layer-streamed greedy ({new_tokens} reads) {new_cpu / 3600:.2f} h on this CPU, "
        f"{old_cpu / new_cpu:.1f}x | GPU {old_gpu / 60:.1f} -> {new_gpu / 60:.1f} min"
    )
    positions = same_choice()
    print(
        "selected position, every candidate on every prompt against the defaults (prefilter "
        f"{Selection().prefilter}, shortlist {Selection().shortlist}): "
        + "; ".join(
            f"{name} {every} against {default}{'' if every == default else ' (DIFFERENT)'}"
            for name, (every, default) in positions.items()
        )
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
                "rows_before": before,
                "rows_worst": worst,
                "replies": replies,
                "positions": positions,
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
