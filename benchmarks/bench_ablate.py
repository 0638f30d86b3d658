"""Ablation throughput and memory at GLM-4.5-Air's real tensor widths, against a plain file copy.

Writes a checkpoint with GLM-4.5-Air's layout and widths (hidden 4096, moe_intermediate 1408,
96 heads x 128, dense intermediate 10944) but few layers and experts (so it fits in ~2-4 GB)
and a small vocabulary (the real 151,552-row embeddings alone would take 5 GB), then:
- copies its shards with a plain file copy (shutil.copyfile + fsync, as the engine syncs);
- ablates it with the default plan in a child process (so its peak RSS is its own);
and prints GB/s of both, their ratio (of the medians, and the range of the per-round ratios:
the machine is shared and disk writeback is noisy), and the child's peak RSS against the
largest tensor. Aims: ratio >= 0.8; peak RSS < 3 x largest tensor + 500 MB.

`--cold` evicts the model's shards from the page cache before every copy and ablation
(posix_fadvise DONTNEED), so both read from the disk, as they do for a model larger than RAM.
`--dir D` keeps the scratch directory and reuses the model written there by an earlier run.
`--rank K` removes K directions at each layer (a directions file with a random orthonormal `pca`
subspace of rank K; the plan's `rank: K`): the cost of a subspace edit against the single direction.

    .venv/bin/python benchmarks/bench_ablate.py [--experts 20] [--layers 3] [--fused] [--workers 2] [--repeat 3]
        [--cold] [--dir /tmp/bench-ablate] [--rank 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from abliterate.config import Runtime

GB = 1e9
MB = 1 << 20


def peak_rss() -> int:
    """VmHWM: this process's peak resident set (ru_maxrss would carry the parent's over fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(model: str, directions: str, out: str, workers: int, rank: int) -> None:
    """The measured ablation: its own peak RSS after imports and at the end."""
    import torch

    torch.set_num_threads(1)
    from abliterate.config import Ablation, Selection
    from abliterate.edit.ablate import ablate_checkpoint, load_inputs
    from abliterate.edit.matching import configured_plan

    after_import = peak_rss()
    began = time.perf_counter()
    inputs = load_inputs(model, directions)
    plan = configured_plan(inputs, Ablation(rank=rank), Selection().direction_position)
    ablate_checkpoint(
        model, directions, out, plan, workers=workers, progress=False, log=lambda _: None, inputs=inputs
    )
    seconds = time.perf_counter() - began
    peak = peak_rss()
    print(json.dumps({"seconds": seconds, "rss_after_import": after_import, "rss_peak": peak}))


def evict(model: Path, shards: list[str]) -> None:
    """Drop the shards' (clean) pages from the page cache: the next read comes from the disk."""
    for shard in shards:
        fd = os.open(model / shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_copy(src: Path, dst: Path, shards: list[str]) -> float:
    dst.mkdir(parents=True)
    began = time.perf_counter()
    for shard in shards:
        shutil.copyfile(src / shard, dst / shard)
        with open(dst / shard, "rb+") as handle:
            os.fsync(handle.fileno())
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, default=20, help="routed experts per MoE layer (default 20)")
    parser.add_argument(
        "--layers", type=int, default=3, help="decoder layers, layer 0 dense (default 3; +1 MTP)"
    )
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary rows (default 8192)")
    parser.add_argument("--shards", type=int, default=4, help="shards (default 4)")
    parser.add_argument("--fused", action="store_true", help="fused 3-D expert tensors on disk")
    parser.add_argument(
        "--workers",
        type=int,
        default=Runtime().workers,
        help="shards ablated in parallel (default %(default)s, as the CLI)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="alternating copy/ablation rounds; medians (default 3)"
    )
    parser.add_argument(
        "--cold", action="store_true", help="read the model from the disk, not the page cache"
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="scratch directory, kept; a model already written there with the "
        "same options is reused (default: a new one under /tmp, deleted)",
    )
    parser.add_argument(
        "--rank",
        type=int,
        default=1,
        help="directions removed at each layer (a subspace when > 1; default 1)",
    )
    parser.add_argument(
        "--child", nargs=5, metavar=("MODEL", "DIRECTIONS", "OUT", "WORKERS", "RANK"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        model, directions, out, workers, rank = args.child
        child(model, directions, out, int(workers), int(rank))
        return

    import torch

    torch.set_num_threads(1)
    from abliterate.measure.direction_file import save_directions
    from abliterate.weights.checkpoint import build_inventory
    from abliterate.weights.synthetic import GlmLayout, write_glm_layout

    layout = GlmLayout(
        num_layers=args.layers,
        n_routed_experts=args.experts,
        hidden_size=4096,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=args.vocab,
        fused_experts=args.fused,
    )
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench-ablate-", dir="/tmp"))
    try:
        began = time.perf_counter()
        model, stamp = scratch / "model", json.dumps([repr(layout), args.shards])
        if (scratch / "layout.json").is_file() and (scratch / "layout.json").read_text() == stamp:
            inventory = build_inventory(model)
            print(f"reusing {model}: {inventory.total_bytes / GB:.2f} GB in {len(inventory.shards)} shards")
        else:
            shutil.rmtree(model, ignore_errors=True)
            write_glm_layout(model, layout, num_shards=args.shards)
            (scratch / "layout.json").write_text(stamp)
            inventory = build_inventory(model)
            print(
                f"wrote {model}: {inventory.total_bytes / GB:.2f} GB in {len(inventory.shards)} shards, "
                f"{len(inventory.tensors)} tensors ({time.perf_counter() - began:.0f} s)"
            )
        gen = torch.Generator().manual_seed(0)
        direction = torch.randn(args.layers + 1, 4096, generator=gen)
        subspaces = {}
        if args.rank > 1:  # row 0 the direction, the others random; orthonormal (float64 QR)
            rows = torch.cat(
                [
                    direction[:, None].double(),
                    torch.randn(args.layers + 1, args.rank - 1, 4096, generator=gen).double(),
                ],
                dim=1,
            )
            q, r = torch.linalg.qr(rows.transpose(1, 2))
            subspaces["pca"] = (q * r.diagonal(dim1=1, dim2=2).sign()[:, None]).transpose(1, 2).float()
        meta = {"fingerprint": inventory.fingerprint, "selected_position": args.layers // 2}
        if subspaces:
            meta["subspace"] = {"pca": {"provenance": "random orthonormal rows (benchmark)"}}
        directions = save_directions(scratch / "directions.safetensors", direction, meta, subspaces=subspaces)
        shard_bytes = sum((model / s).stat().st_size for s in inventory.shards)
        largest = max(inventory.tensors.values(), key=lambda t: t.nbytes)

        copies, runs = [], []
        for _ in range(args.repeat):  # alternate, so both see the same (shared, noisy) machine
            shutil.rmtree(scratch / "out", ignore_errors=True)
            os.sync()  # earlier writeback must not slow down what is measured next
            if args.cold:
                evict(model, inventory.shards)
            copies.append(plain_copy(model, scratch / "copy", inventory.shards))
            shutil.rmtree(scratch / "copy")
            os.sync()
            if args.cold:
                evict(model, inventory.shards)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(model),
                str(directions),
                str(scratch / "out"),
                str(args.workers),
                str(args.rank),
            ]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        manifest = json.loads((scratch / "out" / "abliteration.json").read_text())
        copy_s = statistics.median(copies)
        measured = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "rss_peak": max(r["rss_peak"] for r in runs),
            "rss_after_import": max(r["rss_after_import"] for r in runs),
        }
        copy_list = ", ".join(f"{c:.1f}" for c in copies)
        ablate_list = ", ".join(f"{r['seconds']:.1f}" for r in runs)
        print(f"runs (s): copy {copy_list}; ablation {ablate_list} (medians below)")
        ablate_gbs = shard_bytes / GB / measured["seconds"]
        copy_gbs = shard_bytes / GB / copy_s
        limit = 3 * largest.nbytes + 500 * MB
        print(
            f"edited: {manifest['counts']} ({sum(t.nbytes for e in manifest['edited'] for t in [inventory.tensors[e['name']]]) / GB:.2f} GB rewritten)"
        )  # noqa: E501
        print(
            f"ablation:   {ablate_gbs:.2f} GB/s ({shard_bytes / GB:.2f} GB in {measured['seconds']:.1f} s, "
            f"workers={args.workers})"
        )
        print(f"plain copy: {copy_gbs:.2f} GB/s ({copy_s:.1f} s)")
        ratios = sorted(c / r["seconds"] for c, r in zip(copies, runs, strict=True))
        print(
            f"ratio ablation / copy: {ablate_gbs / copy_gbs:.2f} (aim >= 0.8); per round "
            f"{ratios[0]:.2f}-{ratios[-1]:.2f}{' (cold reads)' if args.cold else ''}"
        )
        print(
            f"largest tensor: {largest.name} {list(largest.shape)} {largest.dtype} = {largest.nbytes / MB:.0f} MiB"
        )
        print(
            f"peak RSS: {measured['rss_peak'] / MB:.0f} MiB (after imports {measured['rss_after_import'] / MB:.0f} MiB); "
            f"aim < 3 x largest + 500 MiB = {limit / MB:.0f} MiB: {'OK' if measured['rss_peak'] < limit else 'ABOVE'}"
        )
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
