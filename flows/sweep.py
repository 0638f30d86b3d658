"""The sweep flow: several ablation variants (layer targets, scales, methods) against one cached
measurement, each a nested MLflow run under one parent, reported on the refusal-vs-KL front."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from abliterate.directions import DEFAULT_METHOD
from abliterate.errors import AbliterateError
from flows import plots
from flows.main import AblationSpec, Stopwatch, ablation_stage, measurement_stage, run_settings
from flows.runtime import results_dir
from flows.tracking import experiment_name, tracked_run

EXAMPLE_VARIANTS = [
    {"name": "all-layers", "layers": "all"},
    {"name": "half-scale", "layers": "all", "scale": "0.5"},
    {"name": "norm-preserving", "layers": "all", "method": "norm_preserving"},
]


def parse_variants(variants: list[dict[str, Any]]) -> list[tuple[str, AblationSpec]]:
    if not variants:
        raise AbliterateError("the sweep has no variants: give a list such as " + str(EXAMPLE_VARIANTS))
    known = set(AblationSpec.__dataclass_fields__)
    out, names = [], set()
    for i, raw in enumerate(variants):
        if not isinstance(raw, dict):
            raise AbliterateError(f"variant #{i} is {raw!r}; each variant is a mapping such as {EXAMPLE_VARIANTS[0]}")
        fields = {k: v for k, v in raw.items() if k != "name"}
        unknown = set(fields) - known
        if unknown:
            raise AbliterateError(f"variant #{i} has unknown keys {sorted(unknown)}; known: name, {', '.join(sorted(known))}")
        if isinstance(fields.get("targets"), str):
            fields["targets"] = [t.strip() for t in fields["targets"].split(",") if t.strip()]
        fields = {k: (str(v) if k in ("layers", "scale", "direction_position") else v) for k, v in fields.items()}
        name = str(raw.get("name") or f"variant-{i}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in names:
            raise AbliterateError(f"variant name {name!r} must be unique and use letters, digits, '.', '_' or '-'")
        names.add(name)
        out.append((name, AblationSpec(**fields)))
    return out


def refusal_kl_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark the variants no other variant beats on both refusal rate and KL (lower is better)."""
    for p in points:
        p["on_front"] = not any(
            q is not p
            and q["refusal_rate"] <= p["refusal_rate"]
            and q["kl"] <= p["kl"]
            and (q["refusal_rate"] < p["refusal_rate"] or q["kl"] < p["kl"])
            for q in points
        )
    return points


@flow(name="abliterate-sweep", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def sweep_flow(
    model: str,
    out: str,
    variants: list[dict[str, Any]] = EXAMPLE_VARIANTS,  # noqa: B006 - Prefect shows it in the UI form
    harmful: str | None = None,
    harmless: str | None = None,
    harmful_test: str | None = None,
    harmless_test: str | None = None,
    validation_fraction: float = 0.25,
    seed: int = 0,
    position: int = -1,
    system_prompt: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    direction_method: str = DEFAULT_METHOD,
    kl_threshold: float = 0.1,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    overwrite: bool = False,
    force: bool = False,
    work_dir: str | None = None,
    prompt_set: str = "general",
) -> dict[str, Any]:
    """Ablate MODEL once per variant into OUT/<variant name>, measuring once; every variant is
    evaluated and placed on the refusal-rate vs harmless-KL plane. Variants are mappings with
    keys name, layers, scale, targets, direction_position, method, mtp (see the `abliterate` flow).
    """
    specs = parse_variants(variants)
    model = str(Path(model).resolve())
    out_root = Path(out).resolve()
    work = str(Path(work_dir).resolve() if work_dir else results_dir())
    prompts, settings, selection, evaluation = run_settings(
        (harmful, harmless, harmful_test, harmless_test, validation_fraction, seed, prompt_set),
        position, system_prompt, chat_template_kwargs, kl_threshold, batch_size, max_new_tokens,
    )  # fmt: skip
    tags = {"prefect.flow_run_id": flow_run.get_id(), "prefect.flow_name": "abliterate-sweep", "model_dir": model,
            "output_path": str(out_root)}  # fmt: skip
    with tracked_run(experiment_name(model), f"sweep-{flow_run.get_name()}", tags) as parent:
        measured = measurement_stage(
            parent, Stopwatch(parent), model, prompts, settings, direction_method, selection, work
        )
        points = []
        for name, spec in specs:
            child_tags = {**tags, "variant": name, "output_path": str(out_root / name)}
            with tracked_run(experiment_name(model), name, child_tags, parent=parent) as child:
                child.params({"variant": name, "selected_position": measured.selection.position})
                summary = ablation_stage(
                    child, Stopwatch(child), measured, spec, str(out_root / name), evaluation, overwrite, force
                )
            ev = summary["evaluation"]
            points.append({"name": name, "refusal_rate": ev["refusal_rate_harmful"], "kl": ev["kl_harmless"],
                           "refusal_rate_harmless": ev["refusal_rate_harmless"], "output": summary["output"],
                           "mlflow_run_id": child.run_id, "spec": vars(spec)})  # fmt: skip
        refusal_kl_front(points)
        parent.table([{k: v for k, v in p.items() if k != "spec"} for p in points], "variants.json")
        figure = plots.refusal_vs_kl(points)
        parent.figure(figure, "plots/refusal_vs_kl.png")
        plots.close(figure)
        front = [p["name"] for p in points if p["on_front"]]
        parent.tags({"front": ",".join(front)})
        return {"variants": points, "front": front, "selected_position": measured.selection.position,
                "mlflow_run_id": parent.run_id}  # fmt: skip
