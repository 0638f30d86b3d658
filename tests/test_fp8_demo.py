"""The demo model converted to FP8 (blocks of 16 on hidden 64) refuses before and does not after:
measured (transformers dequantizes the FP8 checkpoint on a CPU), ablated FP8 in, FP8 out, validated,
and evaluated both in memory and layer-streamed (the streamed loader dequantizes each layer)."""

from __future__ import annotations

import pytest

from abliterate.check.evaluate import evaluate_model
from abliterate.check.validate import validate_output
from abliterate.cli import main
from abliterate.config import Evaluation, Runtime, Template
from abliterate.demo import DEMO_MODEL_DIR, KINDS, SPLITS, prompt_file
from abliterate.measure.prompts import load_prompts
from abliterate.weights.checkpoint import build_inventory
from abliterate.weights.synthetic import convert_to_fp8


@pytest.mark.slow
def test_fp8_demo_refuses_before_and_not_after(tmp_path):
    src = convert_to_fp8(DEMO_MODEL_DIR, tmp_path / "fp8", (16, 16))
    assert build_inventory(src).fp8
    files = {(kind, split): str(prompt_file("demo", kind, split)) for kind in KINDS for split in SPLITS}
    measure_argv = ["measure", str(src), "--out", str(tmp_path / "measure")]
    measure_argv += ["--harmful", files["harmful", "train"], "--harmless", files["harmless", "train"]]
    measure_argv += ["--harmful-val", files["harmful", "val"], "--harmless-val", files["harmless", "val"]]
    assert main(measure_argv) == 0
    directions = tmp_path / "measure" / "directions.safetensors"
    out = tmp_path / "out"
    assert main(["ablate", str(src), "--directions", str(directions), "--out", str(out), "--quiet"]) == 0
    report = validate_output(src, out, progress=False)
    assert report.ok, report.failures
    harmful, harmless = load_prompts(files["harmful", "test"]), load_prompts(files["harmless", "test"])
    settings = Evaluation(), Template(), Runtime(device="cpu", dtype="float32")
    result = evaluate_model(out, harmful, harmless, *settings, False, baseline_dir=src, progress=False)
    print(result.summary())
    assert result.baseline_refusal_rate_harmful >= 0.95
    assert result.refusal_rate_harmful < 0.10
    assert result.kl_harmless < 0.05
    streamed = evaluate_model(out, harmful, harmless, *settings, True, baseline_dir=src, progress=False)
    assert streamed.baseline_first_token_refusal_rate_harmful >= 0.95
    assert streamed.first_token_refusal_rate_harmful < 0.10
    assert streamed.kl_harmless < 0.05
