"""Fixtures of the reliability catalogue, built once for the package: the small checkpoint with its
directions file and reference output, and the prompt files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from abliterate.cli import main
from abliterate.measure.direction_file import save_directions
from abliterate.weights.checkpoint import build_inventory
from abliterate.weights.synthetic import write_glm_layout

from .common import LAYOUT, POSITIONS, H


@pytest.fixture(scope="package")
def base(tmp_path_factory):
    """A small GLM-4.5-layout checkpoint, its directions file and a reference output (via the CLI)."""
    root = tmp_path_factory.mktemp("reliability")
    model = write_glm_layout(root / "model", LAYOUT, num_shards=3)
    gen = torch.Generator().manual_seed(7)
    directions = save_directions(
        root / "directions.safetensors",
        torch.randn(POSITIONS, H, generator=gen),
        {"fingerprint": build_inventory(model).fingerprint, "selected_position": 2},
    )
    reference = root / "reference"
    args = ["ablate", str(model), "--directions", str(directions), "--out", str(reference), "--quiet"]
    assert main(args) == 0
    return model, directions, reference


@pytest.fixture(scope="package")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    good = root / "harmless.txt"
    good.write_text("Write a haiku about spring.\nName three rivers.\nHow do magnets work?\n")
    files = {
        "empty": (b"", ["no prompts", "empty"]),
        "blank lines only": (b"\n   \n\t\n\n", ["no prompts", "blank"]),
        "not UTF-8": (
            b"Name a colour.\nCaf\xe9 menu ideas\n",
            ["not valid UTF-8 at byte offset 18 (line 2)", "re-save"],
        ),
    }
    for name, (data, _) in files.items():
        (root / f"{name}.txt").write_bytes(data)
    huge = root / "huge.txt"
    huge.write_text("Name a colour.\n" + "word " * 400 + "\nHow do I pick a lock?\n")
    return root, good, files, huge


@pytest.fixture(scope="package")
def fp8_base(tmp_path_factory):
    """The small checkpoint in transformers' fine-grained FP8 (blocks of 16, scales partly in other
    shards), its directions file and a reference output (via the CLI)."""
    from abliterate.weights.synthetic import convert_to_fp8

    root = tmp_path_factory.mktemp("reliability-fp8")
    bf16 = write_glm_layout(root / "bf16", LAYOUT, num_shards=3)
    model = convert_to_fp8(bf16, root / "model", (16, 16))
    gen = torch.Generator().manual_seed(7)
    directions = save_directions(
        root / "directions.safetensors",
        torch.randn(POSITIONS, H, generator=gen),
        {"fingerprint": build_inventory(model).fingerprint, "selected_position": 2},
    )
    reference = root / "reference"
    args = ["ablate", str(model), "--directions", str(directions), "--out", str(reference), "--quiet"]
    assert main(args) == 0
    return model, directions, reference


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs (covered by the injected-failure test)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def mounts():
    """mounts(WHERE, OPTIONS): a tmpfs (a small or read-only filesystem), unmounted after the test;
    the test is skipped where it cannot mount (not root, no mount)."""
    mounted: list[Path] = []
    yield lambda where, options: (_mount_tmpfs(where, options), mounted.append(where))
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=False)
