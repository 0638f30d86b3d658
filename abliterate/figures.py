"""How measured figures are written: the console, the reports and the model card say a number the
same way (significant digits, before and after labelled). Imports nothing of the project."""

from __future__ import annotations


def figure(value: object, digits: int = 3) -> str:
    """A measured number as the console, the reports and the model card write it: `digits` significant
    digits whatever its size (a KL of 4.3e-07 stays 4.3e-07, never 0.0000), integers whole, a missing
    figure `n/a`."""
    if value is None:
        return "n/a"
    if isinstance(value, bool | int):
        return str(value)
    if not isinstance(value, float):
        value = float(value)  # type: ignore[arg-type]  # numpy and torch scalars
    if value == 0:
        return "0"
    return f"{value:.{digits}g}"


def before_after(what: str, before: object, after: object) -> str:
    """One figure before and after the ablation, labelled both ways (after alone without a before)."""
    if before is None:
        return f"{what}: {figure(after)}"
    return f"{what}: {figure(before)} before, {figure(after)} after"


def evaluation_lines(metrics: dict) -> list[str]:
    """An evaluation's figures as the console and the model card write them, from its metrics (the
    flow's and `EvaluationResult.metrics()`: `baseline_*` before, the plain names after)."""
    lines = []
    for kind in ("harmful", "harmless"):
        if metrics.get(f"refusal_rate_{kind}") is not None:
            lines.append(
                before_after(
                    f"refusal rate on {kind} prompts (full replies)",
                    metrics.get(f"baseline_refusal_rate_{kind}"),
                    metrics[f"refusal_rate_{kind}"],
                )
            )
    for name, what in (
        ("first_token_refusal_rate_harmful", "first-token refusal rate on harmful prompts"),
        ("refusal_score_harmful", "first-token refusal score (log-odds) on harmful prompts"),
    ):
        if metrics.get(name) is not None:
            lines.append(before_after(what, metrics.get(f"baseline_{name}"), metrics[name]))
    if metrics.get("kl_harmless") is not None:
        lines.append(
            f"first-token KL(before || after) on harmless prompts: {figure(metrics['kl_harmless'])} nats"
        )
    return lines
