"""Validation time, peak memory and residual margins on a GLM-4.5-Air-layout checkpoint.

    .venv/bin/python benchmarks/bench_validate.py [--hidden 8] [--moe-intermediate 4] [--shards 8] [--fused]

Writes GLM-4.5-Air's full layout (46 decoder layers + MTP layer, 128 experts, 18,329 tensors)
at the given widths, ablates it with the engine (default plan), then runs `validate_output`
in a child process and prints its time, the child's peak resident memory (Linux VmHWM) next
to the checkpoint size, and per role the worst projection residual against the dtype's unit
roundoff u and against the tolerance (the margin behind TOLERANCE_FACTOR).
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

from abliterate.check.residuals import UNIT_ROUNDOFF
from abliterate.edit.ablate import ablate_checkpoint
from abliterate.measure.direction_file import save_directions
from abliterate.weights.synthetic import GlmLayout, write_glm_layout

# The child: validate in a fresh process, report its resident memory before and at the peak.
CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from abliterate.check.validate import validate_output
def kib(field):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))
before = kib('VmRSS')
result = validate_output(sys.argv[1], sys.argv[2], progress=False)
report = result.to_json()  # (the report file leaves the wall time out: identical inputs, identical files)
report['seconds'], report['rss_before_kib'], report['rss_peak_kib'] = result.seconds, before, kib('VmHWM')
print(json.dumps(report))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--moe-intermediate", type=int, default=4)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--fused", action="store_true", help="fused 3-D expert tensors on disk")
    parser.add_argument(
        "--workdir", default=None, help="where to write the checkpoints (default: a temp dir)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        layout = GlmLayout(
            hidden_size=args.hidden,
            moe_intermediate_size=args.moe_intermediate,
            intermediate_size=4 * args.moe_intermediate,
            head_dim=max(4, args.hidden // 8),
            fused_experts=args.fused,
        )
        began = time.perf_counter()
        src = write_glm_layout(root / "original", layout, num_shards=args.shards)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        gen = torch.Generator().manual_seed(1)
        direction = torch.randn(layout.num_layers + 1, layout.hidden_size, generator=gen)
        directions = save_directions(
            root / "directions.safetensors",
            direction / direction.norm(dim=-1, keepdim=True),
            {"selected_position": 23},
        )
        ablate_checkpoint(src, directions, root / "ablated", progress=False, log=lambda _: None)
        print(
            f"checkpoint: {size / 1e9:.3f} GB in {args.shards} shards, written and ablated in "
            f"{time.perf_counter() - began:.1f} s"
        )

        began = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(src), str(root / "ablated")],
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - began
        if child.returncode != 0:
            sys.exit(child.stderr)
        report = json.loads(child.stdout)
        base, peak = report["rss_before_kib"] / 1024, report["rss_peak_kib"] / 1024
        print(
            f"validate: ok={report['ok']} tensors={report['tensors']} changed={report['changed']}, "
            f"{report['seconds']:.1f} s ({seconds:.1f} s with process start), "
            f"{report['bytes_hashed'] / 1e9:.3f} GB hashed; peak RSS {peak:.0f} MiB = {base:.0f} MiB after "
            f"imports + {peak - base:.0f} MiB for the validation"
        )
        dtypes = {"router": "F32"}
        print(f"{'role':<20} {'count':>6} {'worst residual':>15} {'/ u':>8} {'/ tolerance':>12}")
        for role, worst in report["worst_residual"].items():
            u = UNIT_ROUNDOFF[dtypes.get(role, "BF16")]
            print(
                f"{role:<20} {report['changed_by_role'][role]:>6} {worst['residual']:>15.3g} "
                f"{worst['residual'] / u:>8.3f} {worst['residual'] / worst['tolerance']:>12.3f}"
            )
        for line in report["failures"][:5]:
            print("failure:", line)


if __name__ == "__main__":
    main()
