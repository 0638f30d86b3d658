"""Directions from means: planted-direction recovery, the projected variant, stats, the file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from abliterate import config
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import load_directions
from abliterate.measure.directions import compute_directions, write_directions
from abliterate.measure.means import Measurement, ResidualAccumulator, SetStats

H = 64


def stats_from(samples: torch.Tensor, chunk: int = 7) -> SetStats:
    """Accumulate [N, P, H] samples in uneven batches, as measurement does."""
    acc = ResidualAccumulator(samples.shape[1], samples.shape[2])
    for start in range(0, samples.shape[0], chunk):
        acc.add(samples[start : start + chunk].transpose(0, 1))
    return SetStats(acc.mean, acc.variance(), acc.count, tokens=0, sha256="x")


def measurement_from(harmful: torch.Tensor, harmless: torch.Tensor) -> Measurement:
    sections = config.Measurement(), config.Template(), config.Runtime(device="cpu", dtype="float32")
    return Measurement(stats_from(harmful), stats_from(harmless), *sections, harmful.shape[1] - 1, H)


def planted(n: int = 2000, positions: int = 4, strength: float = 8.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(positions, H, generator=gen, dtype=torch.float64)
    r = r / r.norm(dim=-1, keepdim=True)
    offset = 5 * torch.randn(positions, H, generator=gen, dtype=torch.float64)  # shared mean, not refusal
    harmless = offset + torch.randn(n, positions, H, generator=gen, dtype=torch.float64)
    harmful = offset + strength * r + torch.randn(n, positions, H, generator=gen, dtype=torch.float64)
    return harmful, harmless, r


def test_accumulator_matches_plain_statistics():
    x = torch.randn(50, 3, H, dtype=torch.float64) * 10 + 1000  # large offset: sum-of-squares would cancel
    s = stats_from(x.float())
    assert s.count == 50
    # float64 rounding bounds (u = 2^-53), both sides summing the same N float32 values exactly
    # converted: a mean of N terms, merged per batch (difference, product, sum), errs by at most
    # 2 N u max|x| on each side. A deviation x - mean errs by (B + 2) u max|x| (B = 7 per batch), its
    # square by twice that times max|x - mean|; the sums and merges add N u max|x - mean|^2 on each side.
    ref = x.float().double()
    n, u, batch = ref.shape[0], 2.0**-53, 7
    big, dev = float(ref.abs().max()), float((ref - ref.mean(0)).abs().max())
    torch.testing.assert_close(s.mean, ref.mean(0), rtol=0, atol=4 * n * u * big)
    var_atol = (2 * (batch + 3) * n * big * dev + 4 * n * dev**2) * u / (n - 1)
    torch.testing.assert_close(s.variance, ref.var(0), rtol=0, atol=var_atol)


def test_planted_direction_is_recovered():
    harmful, harmless, r = planted()
    d = compute_directions(measurement_from(harmful, harmless), "mean_diff")
    cos = (d.direction * r).sum(-1)
    assert cos.min() > 0.999
    # Unit rows; the mean difference is the planted strength; both sets have unit variance per
    # dimension, so the spread is sqrt(H) and SNR = 8 / 8. Sampling noise, not rounding: the mean
    # difference's component along r has standard error sqrt(2 / n) = 0.032 (0.1 is 3 of them), the
    # SNR's is about 0.032 / 8 plus 0.002 from the spread (0.02 is 4 of them).
    torch.testing.assert_close(d.direction.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    assert d.mean_diff_norm.sub(8.0).abs().max() < 0.1
    assert d.snr.sub(1.0).abs().max() < 0.02


def test_projected_direction_is_orthogonal_to_harmless_mean():
    harmful, harmless, r = planted()
    d = compute_directions(measurement_from(harmful, harmless), "projected")
    unit_harmless = d.harmless_mean / d.harmless_mean.norm(dim=-1, keepdim=True)
    # float64 (u = 2^-53): the component along the harmless unit vector is an H-term dot product
    # (H u |diff|), removed and normalised (3 u), checked by another H-term dot product (H u); the
    # first errors are relative to |diff|, so they grow by |diff| / |what is kept|.
    diff = d.harmful_mean - d.harmless_mean
    kept = diff - (diff * unit_harmless).sum(-1, keepdim=True) * unit_harmless
    stretch = float((diff.norm(dim=-1) / kept.norm(dim=-1)).max())
    assert (d.direction * unit_harmless).sum(-1).abs().max() <= (2 * H + 3) * 2.0**-53 * stretch
    # It is the planted direction without its component along the harmless mean.
    expected = r - (r * unit_harmless).sum(-1, keepdim=True) * unit_harmless
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert (d.direction * expected).sum(-1).min() > 0.999
    assert d.method == "projected"


def test_equal_means_give_a_zero_direction_and_stats():
    harmful, harmless, _ = planted(positions=3)
    harmful[:, 0] = harmless[:, 0]  # position 0 is the same token's embedding for every prompt
    d = compute_directions(measurement_from(harmful, harmless), "projected")
    assert d.defined == [1, 2]
    assert float(d.direction[0].abs().max()) == 0.0
    assert float(d.mean_diff_norm[0]) == 0.0 and float(d.snr[0]) == 0.0
    stats = d.stats(selected_position=2)
    assert stats["cos_prev"][0] is None and stats["cos_next"][2] is None
    assert stats["cos_selected"][2] == pytest.approx(1.0) and stats["cos_selected"][0] == 0.0


def test_neighbour_cosines():
    harmful, harmless, r = planted(positions=3)
    harmful = harmless.clone()
    harmful[:, :, 0] += 1.0
    harmful[:, 2, 1] += 1.0  # position 2 turns 45 degrees away
    d = compute_directions(measurement_from(harmful, harmless), "mean_diff")
    cos_prev, cos_next = d.neighbour_cosines()
    assert cos_prev[1] == pytest.approx(1.0)
    assert cos_next[1] == pytest.approx(math.sqrt(0.5))


def test_unknown_method():
    harmful, harmless, _ = planted(n=4)
    with pytest.raises(AbliterateError, match="unknown direction method"):
        compute_directions(measurement_from(harmful, harmless), "pca")


def test_written_file_reads_back_with_the_shared_reader(tmp_path):
    harmful, harmless, r = planted()
    measurement = measurement_from(harmful, harmless)
    measurement.settings = config.Measurement(token_position=-2)
    measurement.template = config.Template(
        chat_template_kwargs={"enable_thinking": False}, system_prompt="Be brief."
    )
    d = compute_directions(measurement, "projected")
    path = write_directions(
        tmp_path, d, measurement, "fp123", selected_position=2, extra={"selection": {"a": 1}}
    )
    loaded = load_directions(path, hidden_size=H)
    assert loaded.num_positions == 4 and loaded.selected_position == 2
    torch.testing.assert_close(loaded.direction, d.direction.float())
    torch.testing.assert_close(loaded.harmful_mean, d.harmful_mean.float())
    torch.testing.assert_close(loaded.vector(), d.direction[2].float())
    meta = loaded.metadata
    assert meta["fingerprint"] == "fp123" and meta["method"] == "projected"
    assert meta["n_harmful"] == 2000 and meta["n_harmless"] == 2000
    assert meta["position"] == -2 and meta["num_layers"] == 3 and meta["hidden_size"] == H
    assert meta["template"] == {
        "system_prompt": "Be brief.",
        "chat_template_kwargs": {"enable_thinking": False},
    }
    assert set(meta["versions"]) == {"torch", "transformers", "safetensors", "abliterate"}
    assert meta["stats"]["cos_selected"][2] == pytest.approx(1.0)
    assert json.loads((tmp_path / "directions.json").read_text()) == meta
