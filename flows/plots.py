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
        ax.annotate(str(c["position"]), (c["kl"], c["refusal_score"]), textcoords="offset points", xytext=(4, 3))
    best = next((c for c in candidates if c["position"] == chosen), None)
    if best is not None:
        ax.scatter([best["kl"]], [best["refusal_score"]], s=160, facecolors="none", edgecolors="tab:red",
                   label=f"selected {chosen}")  # fmt: skip
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


def close(fig: Figure) -> None:
    plt.close(fig)
