"""The built-in demo: a tiny GLM-4.5-MoE-shaped chat model that refuses harmful requests.

The model is committed under `model/` (regenerate it with `python -m abliterate.demo.train`);
its prompt sets, and general-purpose English sets for real models, lie under abliterate/data.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import AbliterateError

DEMO_MODEL_DIR: Path = Path(__file__).resolve().parent / "model"
# The two-category model (abliterate.demo.two_category): refusal that needs two directions.
TWO_CATEGORY_MODEL_DIR: Path = Path(__file__).resolve().parent / "two_category_model"
DATA_DIR: Path = Path(__file__).resolve().parent.parent / "data"

PROMPT_SETS = ("demo", "general")
KINDS = ("harmful", "harmless")
SPLITS = ("train", "val", "test")


def prompt_file(set: str, kind: str, split: str) -> Path:  # noqa: A002 - the name users know
    """Path of a shipped prompt file, e.g. prompt_file("demo", "harmful", "test")."""
    for name, value, allowed in (("set", set, PROMPT_SETS), ("kind", kind, KINDS), ("split", split, SPLITS)):
        if value not in allowed:
            raise AbliterateError(f"unknown prompt {name} {value!r}: choose one of {', '.join(allowed)}")
    return DATA_DIR / set / f"{kind}_{split}.txt"
