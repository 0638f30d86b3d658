"""Shared pieces of the reliability catalogue (docs/RELIABILITY.md): the small GLM-4.5-layout
checkpoint's shape, the CLI driver that turns a crash into a failure, and the byte-level edits that
several stages' cases use.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import torch

from abliterate.measure.direction_file import save_directions
from abliterate.vocabulary import MANIFEST_FILE
from abliterate.weights.checkpoint import build_inventory
from abliterate.weights.synthetic import GlmLayout

# Shards of ~90 KB: big enough that a small filesystem fills up in the middle of one.
LAYOUT = GlmLayout(
    num_layers=3, n_routed_experts=4, hidden_size=64, intermediate_size=64, moe_intermediate_size=32
)
H, POSITIONS = LAYOUT.hidden_size, LAYOUT.num_layers + 1
SHARDS = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {s: (folder / s).read_bytes() for s in SHARDS}


def ablate_args(model: Path, directions: Path, out: Path, *extra: str) -> list[str]:
    return ["ablate", str(model), "--directions", str(directions), "--out", str(out), "--quiet", *extra]


def rewrite_header(shard: Path, change) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = change(json.loads(raw[8 : 8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def entry(name: str, key: str, value):
    def change(header):
        header[name][key] = value
        return header

    return change


def shift(name: str, delta: int):
    """Move one tensor's data offsets by `delta` bytes (its size unchanged)."""

    def change(header):
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + delta, end + delta]
        return header

    return change


def first_tensor(shard: Path) -> str:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def second_tensor(shard: Path) -> str:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]


def with_means(
    tmp_path: Path,
    direction: torch.Tensor,
    harmless: torch.Tensor,
    harmful: torch.Tensor | None = None,
    **metadata,
) -> Path:
    harmful = torch.randn(POSITIONS, H) if harmful is None else harmful
    return save_directions(
        tmp_path / "means.safetensors",
        direction,
        {"selected_position": 2, **metadata},
        harmful_mean=harmful,
        harmless_mean=harmless,
    )


def tree(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `folder` (the small outputs of these tests)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_partial_shard(out: Path, reference: Path) -> None:
    """Whatever a failed run left: every shard under its final name is complete; no manifest."""
    assert not (out / MANIFEST_FILE).exists()
    for shard in SHARDS:
        if (out / shard).exists():
            assert (out / shard).read_bytes() == (reference / shard).read_bytes(), f"partial {shard}"
    assert not list(out.glob(".*.tmp-*")), "temporary shard left behind"


def edit_tensor_bytes(folder: Path, name: str, change, source: Path | None = None) -> None:
    """Store `change(values)` (a float32 tensor -> tensor) as one tensor of a checkpoint, in place, in its
    own dtype; `values` are the tensor's values in `source` (default: the checkpoint itself)."""
    t = build_inventory(folder).tensors[name]
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[t.dtype]
    path = folder / t.shard
    raw = bytearray(path.read_bytes())
    read = bytearray(((source or folder) / t.shard).read_bytes()[t.start : t.end])
    values = torch.frombuffer(read, dtype=dtype).reshape(t.shape).float()
    raw[t.start : t.end] = change(values).to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(raw))


# A run that waits, before copying its first byte range, until GATE exists; it says so in GATE.waiting.
# Meanwhile it holds its output directory's lock, as a long run does.
PAUSED = """
import sys, time
from pathlib import Path
import abliterate.edit.engine as engine
gate = Path(sys.argv[1])
copy = engine._copy_range
def waiting_copy(*args, **kwargs):
    stop = args[4] if len(args) > 4 else kwargs.get("stop")
    Path(str(gate) + ".waiting").touch()
    while not gate.exists() and not (stop is not None and stop.is_set()):
        time.sleep(0.02)
    return copy(*args, **kwargs)
engine._copy_range = waiting_copy
from abliterate.cli import main
sys.exit(main(sys.argv[2:]))
"""


def start_paused(gate: Path, args: list[str]) -> subprocess.Popen:
    run = subprocess.Popen(
        [sys.executable, "-c", PAUSED, str(gate), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    waiting = Path(str(gate) + ".waiting")
    for _ in range(3000):
        if waiting.exists() or run.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"])
    assert waiting.exists(), run.communicate(timeout=60)
    return run
