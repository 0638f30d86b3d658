"""Fixtures of the reliability catalogue, built once for the package: the small checkpoint with its
directions file and reference output, and the prompt files.
"""

from __future__ import annotations

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
