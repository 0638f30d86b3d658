"""The sweep's variants and its cheap checks, without Prefect: the CLI runs them before it configures and
starts anything (`abliterate_flows.sweep` imports Prefect, which reads its settings at import)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from abliterate.config import Ablation, Evaluation, Measurement, Selection
from abliterate.edit.output import precheck_output
from abliterate.errors import AbliterateError
from abliterate.paths import child as child_path
from abliterate.pipeline import check_plans, check_settings, run_paths

EXAMPLE_VARIANTS = [
    {"name": "all-layers", "layers": "all"},
    {"name": "half-scale", "layers": "all", "scale": 0.5},
    {"name": "norm-preserving", "layers": "all", "ablation_method": "norm_preserving"},
]


def parse_variants(variants: list[dict[str, Any]]) -> list[tuple[str, Ablation, str]]:
    """(name, ablation settings, direction position) per variant; names are folder names under OUT."""
    if not variants:
        raise AbliterateError("the sweep has no variants: give a list such as " + str(EXAMPLE_VARIANTS))
    out, names = [], set()
    for i, raw in enumerate(variants):
        if not isinstance(raw, dict):
            raise AbliterateError(
                f"variant #{i} is {raw!r}; each variant is a mapping such as {EXAMPLE_VARIANTS[0]}"
            )
        fields = {k: v for k, v in raw.items() if k not in ("name", "direction_position")}
        if "method" in fields:  # the older name of the ablation method
            fields["ablation_method"] = fields.pop("method")
        unknown = set(fields) - set(Ablation.model_fields)
        if unknown:
            known = ", ".join(["name", "direction_position", *Ablation.model_fields])
            raise AbliterateError(f"variant #{i} has unknown keys {sorted(unknown)}; known: {known}")
        name = raw.get("name") or f"variant-{i}"
        if (
            not isinstance(name, str)
            or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name)
            or name in names
        ):
            raise AbliterateError(
                f"variant #{i}: name {name!r} must be unique and use letters, digits, '.', '_' or '-' (it names "
                "the variant's folder under --out)"
            )
        names.add(name)
        position = Selection(direction_position=raw.get("direction_position", "auto")).direction_position
        out.append((name, Ablation(**fields), position))
    return out


def check_sweep(
    model: str,
    out: str,
    variants: list[dict[str, Any]],
    selection: Selection,
    measurement: Measurement,
    evaluation: Evaluation,
    overwrite: bool,
    work_dir: str | None,
) -> tuple[list[tuple[str, Ablation, str]], str, str, str, dict[str, Path]]:
    """The sweep's cheap checks (the variants, their folders under OUT, their plans against the headers, the
    markers), run by the CLI before the server starts and again by the flow: (specs, model, out, work dir,
    variant folders). An empty or unknown variant failed only after the temporary server had started."""
    specs = parse_variants(variants)
    if selection.direction_position == "none":
        raise AbliterateError("direction position `none` only measures: use `abliterate measure` for that")
    model, out, work = run_paths(model, out, work_dir)
    if Path(out).exists() and not Path(out).is_dir():
        raise AbliterateError(
            f"output {out} exists and is not a directory: the sweep writes one folder per variant in it"
        )
    targets = {name: child_path(out, name, "variant name") for name, _, _ in specs}  # never outside OUT
    for target in targets.values():
        precheck_output(str(target), overwrite)
    check_plans(model, [(ablation, position) for _, ablation, position in specs], measurement)
    check_settings(evaluation)
    return specs, model, out, work, targets
