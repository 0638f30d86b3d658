"""FP8 ablation: throughput against a plain copy of the same files (`cp`) and against the bf16
path; validation time; residual after requantization against the reference (the exact edit,
requantized).

Writes a GLM-4.5-Air-layout checkpoint at real widths (hidden 4096, moe_intermediate 1408, 96 heads
x 128, dense intermediate 10944) with few layers and experts, converts it to transformers'
fine-grained FP8 (blocks of 128, scales of every second weight in the next shard: each of those
weights is requantized by both shards' tasks), then, `--repeat` rounds, alternating so all three
see the same (shared, noisy) machine, each after `os.sync()`: copies the FP8 shards
(shutil.copyfile + fsync, as `bench_ablate.py` and the engine sync), ablates the bf16 checkpoint
and the FP8 one with the default plan (`--workers` threads, as the CLI). Prints seconds, GB/s of
the checkpoint's bytes and edited parameters per second of each, the medians' ratios with the
range of the per-round ratios, the load average, then `validate_output`'s time on both outputs
(FP8: every edit recomputed by the ablation's own requantization), and per edited FP8 tensor the
projection residual |r^T W'| / |W| of the output (dequantized) and of the reference, with the
validator's tolerance; and the distance |W'_out - W'_ref|_F / |W|_F. Aim: FP8 ablation >= 0.5x
the plain copy.

    .venv/bin/python benchmarks/bench_fp8.py [--experts 8] [--layers 3] [--repeat 3] [--workers 2]
        [--dir /tmp/bench-fp8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from abliterate.config import Runtime

GB = 1e9


def plain_copy(src: Path, dst: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to copy the shards of `src` into a new `dst`, each synced (what `cp` + sync
    costs)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    began, cpu = time.perf_counter(), time.process_time()
    for p in sorted(src.glob("*.safetensors")):
        shutil.copyfile(p, dst / p.name)
        with open(dst / p.name, "rb+") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - began, time.process_time() - cpu


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=Runtime().workers, help="shards ablated at once (default: as the CLI)"
    )
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from abliterate.check.residuals import FLOAT32_UNIT, TOLERANCE_FACTOR
    from abliterate.check.validate import validate_output
    from abliterate.edit.ablate import ablate_checkpoint, load_inputs
    from abliterate.edit.matching import direction_for
    from abliterate.edit.plan import AblationPlan
    from abliterate.measure.direction_file import load_directions, save_directions
    from abliterate.vocabulary import MANIFEST_FILE
    from abliterate.weights import fp8
    from abliterate.weights.checkpoint import build_inventory
    from abliterate.weights.synthetic import GlmLayout, convert_to_fp8, write_glm_layout

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-fp8-"))
    root.mkdir(parents=True, exist_ok=True)
    layout = GlmLayout(
        num_layers=args.layers,
        n_routed_experts=args.experts,
        num_experts_per_tok=2,
        num_nextn_predict_layers=0,
        hidden_size=4096,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=1024,
    )
    bf16, f8 = root / "bf16", root / "fp8"
    stamp = json.dumps(repr(layout))
    if not (root / "layout.json").is_file() or (root / "layout.json").read_text() != stamp:
        write_glm_layout(bf16, layout, num_shards=4)
        convert_to_fp8(bf16, f8, (128, 128))
        (root / "layout.json").write_text(stamp)
    gen = torch.Generator().manual_seed(0)
    directions = {}
    for name, model in (("bf16", bf16), ("fp8", f8)):
        d = torch.randn(layout.num_layers + 1, layout.hidden_size, generator=gen)
        meta = {"fingerprint": build_inventory(model).fingerprint, "selected_position": 1}
        directions[name] = save_directions(root / f"{name}.safetensors", d, meta)

    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))

    def edited_params(name: str) -> int:
        entries = json.loads((root / f"out-{name}" / MANIFEST_FILE).read_text())["edited"]
        inv = load_inputs(bf16 if name == "bf16" else f8, directions[name]).inventory
        return sum(inv.tensors[e["name"]].shape[0] * inv.tensors[e["name"]].shape[1] for e in entries)

    print(f"before: {load()}; {os.cpu_count()} CPUs; workers {args.workers}")
    times: dict[str, list[float]] = {"copy_fp8": [], "ablate_bf16": [], "ablate_fp8": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}  # user + system seconds of this process
    for _ in range(args.repeat):
        os.sync()  # earlier writeback must not slow down what is measured next
        wall, used = plain_copy(f8, root / "copy")
        times["copy_fp8"].append(wall)
        cpu["copy_fp8"].append(used)
        shutil.rmtree(root / "copy")
        for name, model in (("bf16", bf16), ("fp8", f8)):
            out = root / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            began, used = time.perf_counter(), time.process_time()
            ablate_checkpoint(
                model, directions[name], out, workers=args.workers, progress=False, log=lambda _: None
            )
            times[f"ablate_{name}"].append(time.perf_counter() - began)
            cpu[f"ablate_{name}"].append(time.process_time() - used)
    print(f"after:  {load()}")
    sizes = {"copy_fp8": size(f8), "ablate_bf16": size(bf16), "ablate_fp8": size(f8)}
    params = {"ablate_bf16": edited_params("bf16"), "ablate_fp8": edited_params("fp8")}
    median = {k: statistics.median(v) for k, v in times.items()}
    for k in times:
        extra = f", {params[k] / median[k] / 1e6:7.1f} M edited parameters/s" if k in params else ""
        print(
            f"{k:12s} {sizes[k] / GB:6.3f} GB  median {median[k]:7.2f} s  {sizes[k] / GB / median[k]:6.3f} GB/s{extra}"
            f"  (runs {', '.join(f'{t:.2f}' for t in times[k])}; CPU s {', '.join(f'{t:.2f}' for t in cpu[k])})"
        )

    def rounds(a: str, b: str) -> str:
        ratios = sorted(x / y for x, y in zip(times[a], times[b], strict=True))
        return f"per round {ratios[0]:.2f}-{ratios[-1]:.2f}"

    ratio = median["copy_fp8"] / median["ablate_fp8"]
    print(
        f"fp8 ablation / plain copy (cp) of the same fp8 files, GB/s: {ratio:.2f} "
        f"({rounds('copy_fp8', 'ablate_fp8')}; aim >= 0.5: {'reached' if ratio >= 0.5 else 'NOT reached'})"
    )
    cpu_median = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"CPU seconds of this process: plain copy {cpu_median['copy_fp8']:.2f}, fp8 ablation "
        f"{cpu_median['ablate_fp8']:.2f}, bf16 ablation {cpu_median['ablate_bf16']:.2f} (wall time above "
        f"the CPU time is waiting: for the disk, or for a core other processes hold; {load()})"
    )
    per_param = params["ablate_fp8"] / median["ablate_fp8"] / (params["ablate_bf16"] / median["ablate_bf16"])
    print(
        f"fp8 ablation / bf16 ablation: edited parameters per second {per_param:.2f}; "
        f"wall time {median['ablate_bf16'] / median['ablate_fp8']:.2f} ({rounds('ablate_bf16', 'ablate_fp8')})"
    )
    for name, model in (("bf16", bf16), ("fp8", f8)):
        report = validate_output(model, root / f"out-{name}", progress=False)
        print(
            f"validate {name}: {report.seconds:.2f} s, {'passed' if report.ok else 'FAILED'}, "
            f"recomputed {report.recomputed}"
        )

    # residuals: output vs the reference (the exact float64 edit of the dequantized input, requantized)
    out = root / "out-fp8"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    plan = AblationPlan.from_dict(manifest["plan"])
    dirs = load_directions(directions["fp8"], layout.hidden_size)
    from safetensors import safe_open

    index = json.loads((f8 / "model.safetensors.index.json").read_text())["weight_map"]

    def tensor(folder: Path, name: str) -> torch.Tensor:
        with safe_open(str(folder / index[name]), "pt") as f:
            return f.get_tensor(name)

    rows = []
    for e in manifest["edited"]:
        if "scale_tensor" not in e:
            continue
        block = tuple(e["block"])
        w = fp8.dequantize(tensor(f8, e["name"]), tensor(f8, e["scale_tensor"]), block).double()
        new_scale = tensor(out, e["scale_tensor"])
        new = fp8.dequantize(tensor(out, e["name"]), new_scale, block).double()
        r = direction_for(plan, dirs, e["layer"]).double()
        exact = w - torch.outer(r, r @ w) if e["residual_axis"] == 0 else w - torch.outer(w @ r, r)
        ref_q, ref_s = fp8.quantize(exact.float(), block)
        ref = fp8.dequantize(ref_q, ref_s, block).double()

        def res(x: torch.Tensor, r: torch.Tensor = r, e: dict = e, w: torch.Tensor = w) -> float:
            return float((r @ x if e["residual_axis"] == 0 else x @ r).norm() / w.norm())

        bound = fp8.rounding_bound(
            float(new.norm()), fp8.broadcast_scale_norm(new_scale, tuple(w.shape), block)
        )
        tol = TOLERANCE_FACTOR * (bound / float(w.norm()) + layout.hidden_size * FLOAT32_UNIT)
        rows.append(
            (
                e["role"],
                res(new),
                res(ref),
                tol,
                float((new - ref).norm() / w.norm()),
                float((new - exact).norm() / w.norm()),
            )
        )
    print(
        f"{'role':20s} {'n':>3s} {'residual out':>13s} {'residual ref':>13s} {'tolerance':>10s} "
        f"{'|out-ref|/|W|':>14s} {'|out-exact|/|W|':>16s}  (worst of each role)"
    )
    for role in sorted({r[0] for r in rows}):
        sel = [r for r in rows if r[0] == role]
        print(
            f"{role:20s} {len(sel):3d} {max(r[1] for r in sel):13.3g} {max(r[2] for r in sel):13.3g} "
            f"{min(r[3] for r in sel):10.3g} {max(r[4] for r in sel):14.3g} {max(r[5] for r in sel):16.3g}"
        )
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
