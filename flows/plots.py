"""Figures logged with every run: where a person would rather look than read."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and in tests

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def direction_strength(stats: dict[str, list], selected: int | None) -> Figure:
    """Norm of the harmful-minus-harmless mean and its SNR, per residual position."""
    fig, left = plt.subplots(figsize=(8, 4))
    positions = list(range(len(stats["mean_diff_norm"])))
    left.plot(positions, stats["mean_diff_norm"], marker="o", color="tab:blue", label="|mean diff|")
    left.set_xlabel("residual position (input of decoder layer i; last = final layer output)")
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


def cosine_heatmap(direction: torch.Tensor) -> Figure:
    """Cosine similarity between every pair of positions' directions."""
    unit = direction.double()
    norms = unit.norm(dim=-1, keepdim=True)
    unit = torch.where(norms > 0, unit / norms.clamp(min=1e-30), torch.zeros_like(unit))
    cos = (unit @ unit.T).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
    ax.set_xlabel("residual position")
    ax.set_ylabel("residual position")
    ax.set_title("Cosine similarity between positions' directions")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def candidate_scores(candidates: list[dict], chosen: int, kl_threshold: float) -> Figure:
    """Each candidate direction's refusal score against its harmless KL, chosen one marked."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
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


def refusal_vs_kl(points: list[dict]) -> Figure:
    """Variants of a sweep on the refusal-rate vs KL plane; the front is drawn."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
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


def search_front(
    trials: list[dict], front: list[dict], reference: dict | None, chosen: dict | None, kl_max: float
) -> Figure:
    """A search's trials on the refusal-rate vs KL plane with the front, `run`'s automatic choice and the
    chosen trial; beside it, the refusal rate and the KL of those two side by side."""
    fig, (plane, refusal, kl) = plt.subplots(
        1, 3, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2.2, 1, 1]}
    )
    tiny = min([t["kl"] for t in trials if t["kl"] > 0] or [1e-8])
    x = [max(t["kl"], tiny / 2) for t in trials]  # a zero KL still shows on the log axis
    plane.scatter(x, [t["refusal_rate"] for t in trials], color="tab:gray", alpha=0.5, s=18, label="trials")
    ordered = sorted(front, key=lambda t: t["kl"])
    plane.plot(
        [max(t["kl"], tiny / 2) for t in ordered],
        [t["refusal_rate"] for t in ordered],
        color="tab:red",
        marker="o",
        label="front",
    )
    marks = [(reference, "*", "tab:blue", "run's automatic choice"), (chosen, "o", "tab:green", "chosen")]
    for item, marker, color, label in marks:
        if item is not None:
            plane.scatter(
                [max(item["kl"], tiny / 2)],
                [item["refusal_rate"]],
                marker=marker,
                s=220,
                facecolors="none" if marker == "o" else color,
                edgecolors=color,
                linewidths=2,
                label=f"{label} (trial {item['trial']})",
            )
    plane.axvline(kl_max, color="grey", linestyle="--", label=f"KL bound {kl_max:g}")
    plane.set_xscale("log")
    plane.set_xlabel("first-token KL on held-out harmless prompts (nats)")
    plane.set_ylabel("refusal rate on held-out harmful prompts")
    plane.set_title(f"Search: {len(trials)} trials, {len(front)} on the front")
    plane.legend(fontsize=8)
    names, refusals, kls, colors = [], [], [], []
    for item, _, color, label in marks:
        if item is not None:
            names.append(f"{label.split()[0]}\ntrial {item['trial']}")
            refusals.append(item["refusal_rate"])
            kls.append(item["kl"])
            colors.append(color)
    refusal.bar(names, refusals, color=colors)
    refusal.set_ylim(0, 1)
    refusal.set_title("refusal rate")
    kl.bar(names, kls, color=colors)
    kl.set_title("first-token KL (nats)")
    for ax, values, fmt in ((refusal, refusals, "{:.3f}"), (kl, kls, "{:.2g}")):
        for i, v in enumerate(values):
            ax.annotate(fmt.format(v), (i, v), ha="center", va="bottom", fontsize=9)
    fig.tight_layout()
    return fig


def expert_routing(layers: list[int], harmful: list[list[float]], harmless: list[list[float]]) -> Figure:
    """Per MoE layer and routed expert: share of tokens routed to it on harmful and harmless prompts, and
    the difference (refusal-specific experts are red)."""
    a, b = torch.tensor(harmful), torch.tensor(harmless)
    fig, axes = plt.subplots(1, 3, figsize=(15, max(3.0, 0.25 * len(layers) + 2)))
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
