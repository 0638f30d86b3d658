"""Rounding-error bounds for tests that compare two float32 evaluations of the same model.

Two evaluations of one decoder stack that differ only in kernels (batch shapes, padding, fused or
per-expert expert weights, a layer at a time or the whole model) differ only by rounding. The bounds
here follow the arithmetic instead of one machine's results:

- u = 2^-24, float32's unit roundoff. A sum of n products computed in any order is off by at most
  n u sum|a_i b_i| (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., 3.1), and by
  sqrt(n) u sum|a_i b_i| with high probability (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019).
  For the random weights of the test models sum|a_i b_i| is about sqrt(n) |sum a_i b_i|, so a stage
  that sums n products is off by about n u relative to its result.
- A GLM-4.5 decoder layer chains STAGES_PER_LAYER such stages between its input and its output
  (attention: norm, q/k/v projection, scores, softmax sum, weighted values, output projection; MLP:
  norm, router and gate/up projections, down projection, the weighted sum of the experts), each of at
  most n terms: n = the longest of hidden size, attention width, MLP and expert widths, prompt length.
  Errors of consecutive layers add: after i layers (residual position i), i * STAGES_PER_LAYER * n u.
- Both evaluations err, in different directions: twice that.

Real defects sit far above these bounds: a dropped routed expert moves the tiny test model's means
by about 1e-3 relative, a swapped layer by 0.2; the bounds are 1.5e-4 and 2.3e-4 at the last
position of the two tiny models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff (the measured means and variances accumulate in float64)
STAGES_PER_LAYER = 10


def accumulation_length(model: str | Path | dict, longest_prompt: int) -> int:
    """n: the most terms any sum of a decoder layer has, from the config (a model folder's config.json
    or the dict) and the longest prompt."""
    config = model if isinstance(model, dict) else json.loads((Path(model) / "config.json").read_text())
    hidden = config["hidden_size"]
    widths = [
        hidden,
        config.get("intermediate_size", 0),
        config.get("moe_intermediate_size", 0),
        config.get("num_attention_heads", 0)
        * config.get("head_dim", hidden // max(config.get("num_attention_heads", 1), 1)),
        config.get("num_experts_per_tok", 0) + config.get("n_shared_experts", 0),
    ]
    return max(*widths, longest_prompt)


def longest_prompt(model_dir: str | Path, prompts: list[str], template) -> int:
    """Tokens of the longest prompt as measurement renders it (chat template, system prompt)."""
    from transformers import AutoTokenizer

    from abliterate.measure.chat import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return max(len(ids) for ids in encode_prompts(tokenizer, prompts, template, "prompt"))


def position_rtol(num_positions: int, n: int, count: int) -> torch.Tensor:
    """[positions]: relative bound on the difference of two evaluations at each residual position
    (position i has passed i decoder layers), plus the float64 accumulation over `count` prompts."""
    layers = torch.arange(num_positions, dtype=torch.float64)
    return 2 * layers * STAGES_PER_LAYER * n * U32 + count * U64


def logits_rtol(layers: int, n: int, projections_per_layer: int = 0) -> float:
    """Relative bound (per token, on the vector of logits) on the difference of two evaluations of a
    whole model: `layers` decoder layers, the final norm and the head (2 stages); an ablation that
    projects r out of every write adds one stage per write (`projections_per_layer` per layer and one
    for the embedding)."""
    stages = layers * (STAGES_PER_LAYER + projections_per_layer) + 2 + (1 if projections_per_layer else 0)
    return 2 * stages * n * U32


def sample_rms(stats) -> torch.Tensor:
    """[positions]: root mean square of the residual norms |x_k| over the prompts, from the stored mean
    and variance: |x_k| errs by at most rtol |x_k|, so mean and spread err by at most rtol times this."""
    n = stats.count
    return (stats.mean.pow(2).sum(-1) + (n - 1) / n * stats.variance.sum(-1)).sqrt()


def assert_stats_close(got, reference, rtol: torch.Tensor, what: str = "") -> None:
    """Means and standard deviations of one prompt set from two evaluations agree within the rounding
    bound `rtol` [positions] of each prompt's residual:
    |mean_a - mean_b| <= mean_k |dx_k| <= rtol * rms_k |x_k|, and, the standard deviation being a
    norm over the centred prompts, |std_a - std_b| <= |dX|_F / sqrt(N - 1) <= rtol * rms |x| sqrt(N / (N - 1))."""
    scale = sample_rms(reference)
    mean_error = (got.mean - reference.mean).norm(dim=-1)
    assert bool((mean_error <= rtol * scale).all()), (what, (mean_error / scale).tolist(), rtol.tolist())
    n = reference.count
    std_error = (got.variance.clamp_min(0).sqrt() - reference.variance.clamp_min(0).sqrt()).norm(dim=-1)
    bound = rtol * scale * (n / max(n - 1, 1)) ** 0.5
    assert bool((std_error <= bound).all()), (what, (std_error / scale).tolist(), rtol.tolist())


def direction_bound(
    harmful: torch.Tensor, harmless: torch.Tensor, harmful_error, harmless_error, projected: bool
):
    """[positions]: bound on how far the unit direction moves when the means move by at most the given
    norms. The difference d moves by at most e = e_harmful + e_harmless; the projected method also
    turns the harmless unit vector m by at most 2 e_harmless / |harmless|, moving P d by 2 |d| that
    much; a unit vector v / |v| moves by at most 2 |dv| / |v|; float32 storage adds u."""
    diff = (harmful - harmless).double()
    moved = harmful_error + harmless_error
    if projected:
        unit = harmless.double() / harmless.double().norm(dim=-1, keepdim=True)
        kept = diff - (diff * unit).sum(-1, keepdim=True) * unit
        moved = moved + 2 * diff.norm(dim=-1) * 2 * harmless_error / harmless.double().norm(dim=-1)
    else:
        kept = diff
    return 2 * moved / kept.norm(dim=-1) + U32


def assert_directions_agree(got, reference, rtol: torch.Tensor) -> None:
    """Two directions files (load_directions) measured by two float32 evaluations of the same model:
    means within `rtol` [positions] of each prompt's residual, directions within direction_bound.
    The file holds no variances: the residuals' rms is bounded from its stats instead,
    rms_k |x_k|^2 <= |mean|^2 + (sum var_harmful + sum var_harmless) = |mean|^2 + 2 spread^2 with
    spread = mean_diff_norm / snr (where the direction is defined; elsewhere |mean|)."""
    stats = reference.metadata["stats"]
    mdn, snr = (
        torch.tensor(stats["mean_diff_norm"], dtype=torch.float64),
        torch.tensor(stats["snr"], dtype=torch.float64),
    )
    spread = torch.where(snr > 0, mdn / snr.clamp_min(1e-300), torch.zeros_like(mdn))
    moved = {}
    for label in ("harmful", "harmless"):
        mean = getattr(reference, f"{label}_mean").double()
        moved[label] = rtol * (mean.pow(2).sum(-1) + 2 * spread**2).sqrt()
        error = (getattr(got, f"{label}_mean").double() - mean).norm(dim=-1)
        # both files round the float64 means to float32 once: u |mean| each
        assert bool((error <= moved[label] + 2 * U32 * mean.norm(dim=-1)).all()), (label, error, moved[label])
    projected = reference.metadata["method"] == "projected"
    turned = direction_bound(
        reference.harmful_mean, reference.harmless_mean, moved["harmful"], moved["harmless"], projected
    ).nan_to_num(0.0)  # undefined positions (zero direction): equal
    error = (got.direction.double() - reference.direction.double()).norm(dim=-1)
    assert bool((error <= turned).all()), (error, turned)


# ------------------------------------------------------------------ first-token figures (selection, evaluation)
#
# Two evaluations of the same first-token logits z (in memory and layer-streamed) differ by at most
# delta = logits_rtol * |z|_2 in every entry (the 2-norm bounds each entry). The figures are float64
# functions of the log-softmax, so their bounds follow from delta alone:


def logprob_atol(delta: float) -> float:
    """|d log-softmax(z)_i| <= |dz_i| + |d logsumexp(z)| <= 2 delta (logsumexp moves by at most max |dz|)."""
    return 2 * delta


def logodds_atol(delta: float) -> float:
    """The log-odds of a token set R, log p(R) - log(1 - p(R)) = logsumexp_R(z) - logsumexp_notR(z) (the
    normaliser cancels): each logsumexp moves by at most delta, so 2 delta. Means over prompts too."""
    return 2 * delta


def kl_atol(delta_p: float, delta_q: float, reference: torch.Tensor, other: torch.Tensor) -> float:
    """Bound on the mean over prompts of |KL(P' || Q') - KL(P || Q)|, the first reply token's KL from two
    evaluations whose logits x (of P) and y (of Q) moved by at most delta_p and delta_q per entry.
    `reference`, `other`: [N, V] log-probabilities of P and Q from one evaluation.

    KL(P || Q) = A(y) - A(x) - grad A(x) . (y - x) with A = logsumexp, so along x + t eta, y + t xi:
    dKL/dt = (q - p) . xi - sum_i p_i (w_i - E_p w) eta_i with w = y - x, hence
    |dKL/dt| <= delta_q |q_t - p_t|_1 + delta_p E_{p_t} |w_t - E_{p_t} w_t|. Softmax moves every
    probability by a factor within exp(+-2 delta), so |p_t - p|_1 <= exp(2 delta_p) - 1 (q likewise), and
    a mean absolute deviation is at most twice the one around E_p w, with w_t = w + t (xi - eta):
    E_{p_t} |w_t - E_{p_t} w_t| <= 2 exp(2 delta_p) E_p |w - E_p w| + 2 (delta_p + delta_q).
    Where P = Q the bound is second order (about 4 delta^2), as the KL of two roundings of one
    distribution is. Float64 sums add about V 2^-53, far below."""
    p, q = reference.exp(), other.exp()
    gp, gq = math.expm1(2 * delta_p), math.expm1(2 * delta_q)
    l1 = (q - p).abs().sum(-1)
    w = other - reference
    mad = (p * (w - (p * w).sum(-1, keepdim=True)).abs()).sum(-1)
    per_prompt = delta_q * (l1 + gp + gq) + delta_p * (2 * (1 + gp) * mad + 2 * (delta_p + delta_q))
    return float(per_prompt.mean())


def greedy_margin(logprobs: torch.Tensor) -> torch.Tensor:
    """[N]: the gap between the two most likely first tokens. Where it exceeds 2 logprob_atol, the greedy
    token cannot differ between two evaluations."""
    top = logprobs.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def first_token_delta(
    model, encoded, n: int, direction: torch.Tensor | None = None, batch_size: int = 8
) -> float:
    """delta for `model` (in memory, float32) on the encoded prompts: logits_rtol (two projections per
    layer and removed direction when `direction`, a vector [H] or a basis [k, H], is ablated at
    inference time) times the largest first-token |logits|_2."""
    from contextlib import nullcontext

    from abliterate.edit.inference_edit import DirectionEdit
    from abliterate.inference.loading import length_sorted_batches

    largest = 0.0
    ablation = DirectionEdit(direction).applied(model) if direction is not None else nullcontext()
    with torch.inference_mode(), ablation:
        for batch in length_sorted_batches(encoded, batch_size, 0):
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                logits_to_keep=1,
            ).logits[:, -1]
            largest = max(largest, float(logits.double().norm(dim=-1).max()))
    rank = 0 if direction is None else (direction.shape[0] if direction.dim() == 2 else 1)
    rtol = logits_rtol(model.config.num_hidden_layers, n, 2 * rank)
    return rtol * largest


def evaluation_bounds(baseline_dir, model_dir, harmful: list[str], harmless: list[str]) -> dict[str, float]:
    """Bounds on the difference of each first-token figure of abliterate.check.evaluate between two float32
    evaluations of `model_dir` against `baseline_dir` (in memory and layer-streamed). A first-token
    refusal rate counts greedy first tokens: only a prompt whose top-two margin is within twice the
    log-probability bound can change its token, so the rate moves by at most their share."""
    from abliterate.config import Template
    from abliterate.inference.loading import load_model
    from abliterate.inference.runner import InMemoryForward
    from abliterate.measure.chat import encode_prompts

    models = {"before": load_model(baseline_dir), "after": load_model(model_dir)}
    tokenizer = models["before"][1]
    ids = {
        "harmful": encode_prompts(tokenizer, harmful, Template(), "harmful"),
        "harmless": encode_prompts(tokenizer, harmless, Template(), "harmless"),
    }
    n = accumulation_length(baseline_dir, max(len(x) for x in ids["harmful"] + ids["harmless"]))
    deltas, logprobs, bounds = {}, {}, {}
    for name, (model, _) in models.items():
        deltas[name] = first_token_delta(model, ids["harmful"] + ids["harmless"], n)
        for kind, encoded in ids.items():
            ((_, _, lp),) = list(InMemoryForward(model).first_token_logprobs({kind: encoded}, [None], 8, 0))
            logprobs[name, kind] = lp
            close = float((greedy_margin(lp) <= 2 * logprob_atol(deltas[name])).double().mean())
            bounds[f"{'baseline_' if name == 'before' else ''}first_token_refusal_rate_{kind}"] = close
    return {
        **bounds,
        "refusal_score_harmful": logodds_atol(deltas["after"]),
        "baseline_refusal_score_harmful": logodds_atol(deltas["before"]),
        "kl_harmless": kl_atol(
            deltas["before"], deltas["after"], logprobs["before", "harmless"], logprobs["after", "harmless"]
        ),
    }
