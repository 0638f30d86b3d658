"""benchmarks/gpu_check.sh: its CPU mode runs here (so the GPU check cannot rot unseen), every figure
line printed and every comparison within its derived bound; its GPU mode fits ten minutes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from fixtures import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FIGURES = [
    # 1. the device tests
    "device_tests_passed",
    "device_tests_failed",
    "device_tests_errors",
    "device_tests_skipped",
    "device_tests_seconds",
    # 2. the demo on the device against the CPU
    "demo_device_refusal_rate_before",
    "demo_device_refusal_rate_after",
    "demo_device_kl_harmless",
    "demo_cpu_refusal_rate_before",
    "demo_cpu_refusal_rate_after",
    "demo_cpu_kl_harmless",
    "demo_selected_position",
    "demo_direction_difference",
    "demo_directions_within_bound",
    "demo_output_tensors_differing",
    "demo_kl_harmless_difference",
    "demo_kl_harmless_bound",
    "demo_refusal_score_harmful_difference",
    "demo_refusal_score_harmful_bound",
    "demo_first_token_refusal_rate_harmful_difference",
    "demo_first_token_refusal_rate_harmful_bound",
    "demo_comparison",
    # 3. the real-width streamed benchmark
    "streamed_device",
    "streamed_layer_read_seconds",
    "streamed_layer_read",
    "streamed_layer_tokens",
    "streamed_projected_full_run",
    "streamed_seconds",
    # 4. --device auto over the devices
    "auto_model_size",
    "auto_host_budget",
    "auto_placement",
    "auto_seconds",
    "auto_logprob_difference",
    "auto_logprob_bound",
    "auto_comparison",
    # 5. the search
    "search_device",
    "search_trials",
    "search_trials_per_minute",
    "search_measure_and_select_seconds",
    "search_seconds",
] + [f"step_{i}_seconds" for i in range(1, 6)]


def test_the_gpu_part_is_bounded_by_ten_minutes_and_the_script_explains_itself():
    text = SCRIPT.read_text()
    gpu_bounds = re.search(r'MODE" == gpu \]\]; then\n\s+DEVICE=cuda\n\s+BOUNDS=\(([\d ]+)\)', text)
    assert gpu_bounds, "the GPU mode's BOUNDS=(...) line moved: update this test"
    assert "timeout -k 5 " in text  # a step that ignores the TERM signal is killed 5 s later
    assert sum(int(x) for x in gpu_bounds.group(1).split()) + 5 * 5 <= 600
    shown = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--cpu" in shown.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    if not torch.cuda.is_available():  # the GPU mode without a GPU: one line, before any work
        gpu = subprocess.run(
            ["bash", str(SCRIPT)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHON": sys.executable},
        )
        assert gpu.returncode == 2 and "--cpu" in gpu.stderr and len(gpu.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_cpu_mode_prints_every_figure_and_every_comparison_holds(tmp_path):
    """The whole script with --cpu: the same five steps on the CPU at tiny sizes (minutes here)."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--cpu", "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=3600,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, (done.stdout, done.stderr[-4000:])
    figures = {}
    for line in lines[:-1]:
        name, value = re.fullmatch(r"([a-z0-9_]+): (\S.*)", line).groups()  # name: value unit
        figures[name] = value
    assert [name for name in FIGURES if name not in figures] == []
    assert re.fullmatch(r"gpu_check: 5 of 5 steps passed \(mode cpu, device cpu\), \d+ s", lines[-1])
    assert figures["demo_comparison"] == "pass" and figures["auto_comparison"] == "pass"
    assert figures["demo_directions_within_bound"] == "yes"
    number = {name: float(value.split()[0]) for name, value in figures.items() if re.match(r"-?[\d.]", value)}
    for name in ("kl_harmless", "refusal_score_harmful", "first_token_refusal_rate_harmful"):
        assert number[f"demo_{name}_difference"] <= number[f"demo_{name}_bound"], name
    assert number["auto_logprob_difference"] <= number["auto_logprob_bound"]
    # the demo's behaviour on both runs: refuses before, not after, KL far below selection's threshold
    for run in ("device", "cpu"):
        assert number[f"demo_{run}_refusal_rate_before"] == 1.0
        assert number[f"demo_{run}_refusal_rate_after"] == 0.0
        assert 0 < number[f"demo_{run}_kl_harmless"] < 1e-4
    assert number["device_tests_passed"] > 0 and number["device_tests_failed"] == 0
    assert "cpu" in figures["auto_placement"] and "disk" in figures["auto_placement"]
    assert number["search_trials"] == 3 and number["search_trials_per_minute"] > 0
    assert number["streamed_layer_tokens"] > 0 and number["streamed_projected_full_run"] > 0
