"""Figures logged with every run: where a person would rather look than read.

Sized for MLflow's artifact viewer, which shows a PNG at most about 900 pixels wide: every figure is at
most WIDTH inches at DPI (the pixels it is saved with), and its smallest text is SMALL points, which
stays legible at that width. Wide content is stacked, not placed side by side.
"""

from __future__ import annotations

import functools
import math

import matplotlib

matplotlib.use("Agg")  # no display on servers and in tests

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

WIDTH = 8.0  # inches: 800 pixels at DPI, shown unscaled in a browser window of usual size
DPI = 100
SMALL = 11  # points: tick labels, legends, annotations
STYLE = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 12,
    "axes.titlesize": 14,
    "axes.labelsize": 12,
    "xtick.labelsize": SMALL,
    "ytick.labelsize": SMALL,
    "legend.fontsize": SMALL,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def styled(make):
    """Build the figure under STYLE (fonts are fixed when each text is made)."""

    @functools.wraps(make)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return make(*args, **kwargs)

    return wrapper


def data_limits(values: list[float], pad: float = 0.25) -> tuple[float, float]:
    """A log axis's limits around positive `values`, `pad` decades beyond the smallest and largest."""
    low, high = math.log10(min(values)), math.log10(max(values))
    return 10 ** (low - pad), 10 ** (high + pad)


@styled
def direction_strength(stats: dict[str, list], selected: int | None) -> Figure:
    """Norm of the harmful-minus-harmless mean and its SNR, per residual position."""
    fig, left = plt.subplots(figsize=(WIDTH, 4.5))
    positions = list(range(len(stats["mean_diff_norm"])))
    left.plot(positions, stats["mean_diff_norm"], marker="o", color="tab:blue", label="|mean diff|")
    left.set_xlabel("residual position i (input of decoder layer i)")
    left.set_ylabel("|mean harmful - mean harmless|", color="tab:blue")
    right = left.twinx()
    right.plot(positions, stats["snr"], marker="s", color="tab:orange", label="SNR")
    right.set_ylabel("SNR", color="tab:orange")
    if selected is not None:
        left.axvline(selected, color="tab:red", linestyle="--", label=f"selected {selected}")
        left.legend(loc="upper left")
    left.set_title("Refusal direction strength per position")
    fig.tight_layout()
    return fig


@styled
def cosine_heatmap(direction: torch.Tensor) -> Figure:
    """Cosine similarity between every pair of positions' directions."""
    unit = direction.double()
    norms = unit.norm(dim=-1, keepdim=True)
    unit = torch.where(norms > 0, unit / norms.clamp(min=1e-30), torch.zeros_like(unit))
    cos = (unit @ unit.T).numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
    ax.set_xlabel("residual position")
    ax.set_ylabel("residual position")
    ax.set_title("Cosine similarity between positions' directions")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


@styled
def candidate_scores(candidates: list[dict], chosen: int, kl_threshold: float) -> Figure:
    """Each candidate direction's refusal score against its harmless KL, chosen one marked."""
    fig, ax = plt.subplots(figsize=(WIDTH, 5.5))
    kls = [c["kl"] for c in candidates]
    scores = [c["refusal_score"] for c in candidates]
    ax.scatter(kls, scores, color="tab:blue")
    for c in candidates:
        ax.annotate(
            str(c["position"]), (c["kl"], c["refusal_score"]), textcoords="offset points", xytext=(4, 3)
        )
    best = next((c for c in candidates if c["position"] == chosen), None)
    if best is not None:
        ax.scatter(
            [best["kl"]],
            [best["refusal_score"]],
            s=160,
            facecolors="none",
            edgecolors="tab:red",
            label=f"selected {chosen}",
        )
    ax.axvline(kl_threshold, color="grey", linestyle="--", label=f"KL threshold {kl_threshold}")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("first-token KL on harmless prompts (nats)")
    ax.set_ylabel("refusal score on harmful prompts (log-odds)")
    ax.set_title("Candidate directions: refusal vs KL")
    ax.legend()
    fig.tight_layout()
    return fig


@styled
def refusal_vs_kl(points: list[dict]) -> Figure:
    """Variants of a sweep on the refusal-rate vs KL plane; the front is drawn."""
    fig, ax = plt.subplots(figsize=(WIDTH, 5.5))
    for p in points:
        ax.scatter(p["kl"], p["refusal_rate"], color="tab:red" if p.get("on_front") else "tab:blue")
        ax.annotate(p["name"], (p["kl"], p["refusal_rate"]), textcoords="offset points", xytext=(4, 3))
    front = sorted((p for p in points if p.get("on_front")), key=lambda p: p["kl"])
    if front:
        ax.plot([p["kl"] for p in front], [p["refusal_rate"] for p in front], color="tab:red", label="front")
        ax.legend()
    ax.set_xlabel("first-token KL on harmless prompts (nats)")
    ax.set_ylabel("refusal rate on harmful prompts")
    ax.set_title("Sweep variants: refusal vs KL")
    fig.tight_layout()
    return fig


@styled
def search_front(
    trials: list[dict], front: list[dict], reference: dict | None, chosen: dict | None, kl_max: float
) -> Figure:
    """A search's trials on the refusal-rate vs KL plane with the front, `run`'s automatic choice and the
    chosen trial; below it, the refusal rate and the KL of those two side by side. The KL axis spans the
    trials' KLs (log scale); the KL bound is drawn when it falls inside that span, else named in the legend."""
    fig = plt.figure(figsize=(WIDTH, 9))
    grid = fig.add_gridspec(2, 2, height_ratios=[2.2, 1])
    plane = fig.add_subplot(grid[0, :])
    refusal, kl = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    marks = [(reference, "*", "tab:blue", "run's automatic choice"), (chosen, "o", "tab:green", "chosen")]
    shown = trials + [m for m, *_ in marks if m is not None]
    positive = [t["kl"] for t in shown if t["kl"] > 0] or [1e-8]
    floor = min(positive) / 2  # a zero KL still shows on the log axis, at the left edge
    low, high = data_limits(positive + ([floor] if any(t["kl"] <= 0 for t in shown) else []))

    def at(item: dict) -> float:
        return max(item["kl"], floor)

    plane.scatter(
        [at(t) for t in trials],
        [t["refusal_rate"] for t in trials],
        color="tab:gray",
        alpha=0.5,
        s=24,
        label="trials",
    )
    ordered = sorted(front, key=lambda t: t["kl"])
    plane.plot(
        [at(t) for t in ordered],
        [t["refusal_rate"] for t in ordered],
        color="tab:red",
        marker="o",
        label="front",
    )
    for item, marker, color, label in marks:
        if item is not None:
            plane.scatter(
                [at(item)],
                [item["refusal_rate"]],
                marker=marker,
                s=260,
                facecolors="none" if marker == "o" else color,
                edgecolors=color,
                linewidths=2,
                label=f"{label} (trial {item['trial']})",
            )
    if low <= kl_max <= high:
        plane.axvline(kl_max, color="grey", linestyle="--", label=f"KL bound {kl_max:g}")
    else:  # beyond the data: drawing it would crowd every trial into one end of the axis
        plane.plot([], [], color="grey", linestyle="--", label=f"KL bound {kl_max:g} (off the axis)")
    plane.set_xscale("log")
    plane.set_xlim(low, high)
    plane.set_ylim(-0.05, 1.05)
    plane.set_xlabel("first-token KL on held-out harmless prompts (nats)")
    plane.set_ylabel("refusal rate, held-out harmful")
    plane.set_title(f"Search: {len(trials)} trials, {len(front)} on the front")
    plane.legend(loc="best")
    names, refusals, kls, colors = [], [], [], []
    for item, _, color, label in marks:
        if item is not None:
            names.append(f"{label.split()[0]}\ntrial {item['trial']}")
            refusals.append(item["refusal_rate"])
            kls.append(item["kl"])
            colors.append(color)
    refusal.bar(names, refusals, color=colors)
    refusal.set_ylim(0, 1.15)
    refusal.set_title("refusal rate")
    kl.bar(names, kls, color=colors)
    kl.set_ylim(0, max(kls or [0]) * 1.25 or 1)
    kl.set_title("first-token KL (nats)")
    for ax, values, fmt in ((refusal, refusals, "{:.3f}"), (kl, kls, "{:.2g}")):
        for i, v in enumerate(values):
            ax.annotate(fmt.format(v), (i, v), ha="center", va="bottom", fontsize=SMALL)
    fig.tight_layout()
    return fig


@styled
def expert_routing(layers: list[int], harmful: list[list[float]], harmless: list[list[float]]) -> Figure:
    """Per MoE layer and routed expert: share of tokens routed to it on harmful and harmless prompts, and
    the difference (refusal-specific experts are red)."""
    a, b = torch.tensor(harmful), torch.tensor(harmless)
    fig, axes = plt.subplots(3, 1, figsize=(WIDTH, 3 * max(2.5, 0.12 * len(layers) + 1.5)))
    top = float(max(a.max(), b.max()))
    spread = float((a - b).abs().max()) or 1.0
    panels = (
        (a, "harmful prompts", "viridis", 0, top),
        (b, "harmless prompts", "viridis", 0, top),
        (a - b, "harmful - harmless", "RdBu_r", -spread, spread),
    )
    for ax, (data, title, cmap, low, high) in zip(axes, panels, strict=True):
        image = ax.imshow(data.numpy(), aspect="auto", cmap=cmap, vmin=low, vmax=high, origin="lower")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers] if len(layers) <= 50 else None)
        ax.set_xlabel("routed expert")
        ax.set_ylabel("layer")
        ax.set_title(f"share of tokens routed: {title}")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
