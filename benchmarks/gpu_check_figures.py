"""The figures and comparisons of `benchmarks/gpu_check.sh`, one step each; every figure one line
`name: value unit`; exit code 1 when a comparison falls outside its bound.

    python benchmarks/gpu_check_figures.py tests LOG SECONDS
    python benchmarks/gpu_check_figures.py demo REFERENCE_OUT REFERENCE_JSON DEVICE_OUT DEVICE_JSON
    python benchmarks/gpu_check_figures.py streamed FIGURES_JSON SECONDS
    python benchmarks/gpu_check_figures.py auto WORK --device cuda|cpu
    python benchmarks/gpu_check_figures.py search JSON SECONDS

Tolerances are tests/numerics.py's float32 bounds (layers x summation stages x terms x 2^-24, twice):
the same derivations the test suite uses to compare two evaluations of one model.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/numerics.py: the project's tolerance derivations


def figure(name: str, value, unit: str = "") -> None:
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    print(f"{name}: {text} {unit}".rstrip(), flush=True)


# ---------------------------------------------------------------- 1. the device tests


def tests(log: str, seconds: str) -> int:
    """pytest's summary line ("19 passed, 1 skipped in 12.6s") as figures; fails on a failure or error."""
    text = Path(log).read_text()
    lines = [x for x in text.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped)\b", x)]
    summary = lines[-1] if lines else ""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary):
        counts["errors" if word.startswith("error") else word] = int(number)
    for key in ("passed", "failed", "errors", "skipped"):
        figure(f"device_tests_{key}", counts[key], "tests")
    figure("device_tests_seconds", float(seconds), "s")
    return 0 if counts["passed"] and not counts["failed"] and not counts["errors"] else 1


# ---------------------------------------------------------------- 2. the demo on the device against the CPU


def demo(reference_out: str, reference_json: str, device_out: str, device_json: str) -> int:
    """The device run's figures against the CPU run's: the same selected position, directions within the
    measurement bound (assert_directions_agree), first-token figures (refusal score and rates, KL) within
    evaluation_bounds, as tests/test_flows.py compares an in-memory and a layer-streamed run."""
    from numerics import (
        accumulation_length,
        assert_directions_agree,
        evaluation_bounds,
        longest_prompt,
        position_rtol,
    )
    from safetensors.torch import load_file

    from abliterate.config import Template
    from abliterate.demo import DEMO_MODEL_DIR, prompt_file
    from abliterate.measure.direction_file import load_directions
    from abliterate.measure.prompts import load_prompts

    ref, dev = json.loads(Path(reference_json).read_text()), json.loads(Path(device_json).read_text())
    ok = True
    for name, summary in (("device", dev), ("cpu", ref)):
        ev = summary["evaluation"]
        figure(f"demo_{name}_refusal_rate_before", ev.get("baseline_refusal_rate_harmful", float("nan")))
        figure(f"demo_{name}_refusal_rate_after", ev.get("refusal_rate_harmful", float("nan")))
        figure(f"demo_{name}_kl_harmless", ev["kl_harmless"], "nats")
    same_position = ref["selected_position"] == dev["selected_position"]
    figure("demo_selected_position", f"{dev['selected_position']} (cpu {ref['selected_position']})")
    ok &= same_position and bool(ref["validation_ok"]) and bool(dev["validation_ok"])

    manifests = [json.loads((Path(d) / "abliteration.json").read_text()) for d in (reference_out, device_out)]
    a, b = (load_directions(m["directions"]["path"]) for m in manifests)
    template = a.metadata["template"]
    settings = Template(
        chat_template_kwargs=template["chat_template_kwargs"], system_prompt=template["system_prompt"]
    )
    train = [p for kind in ("harmful", "harmless") for p in load_prompts(prompt_file("demo", kind, "train"))]
    n = accumulation_length(DEMO_MODEL_DIR, longest_prompt(DEMO_MODEL_DIR, train, settings))
    count = max(a.metadata["n_harmful"], a.metadata["n_harmless"])
    gap = float((a.direction.double() - b.direction.double()).norm(dim=-1).max())
    figure("demo_direction_difference", gap, "(largest |r_device - r_cpu| over positions)")
    try:
        assert_directions_agree(b, a, position_rtol(a.num_positions, n, count))
        figure("demo_directions_within_bound", "yes")
    except AssertionError as exc:
        figure("demo_directions_within_bound", f"no {str(exc)[:200]}")
        ok = False

    differing, total = 0, 0
    for shard in sorted(Path(reference_out).glob("*.safetensors")):
        x, y = load_file(shard), load_file(Path(device_out) / shard.name)
        total += len(x)
        differing += sum(1 for k in x if not (k in y and x[k].equal(y[k])))
    figure("demo_output_tensors_differing", f"{differing} of {total}", "tensors")

    harmful, harmless = (load_prompts(prompt_file("demo", kind, "test")) for kind in ("harmful", "harmless"))
    ev_ref, ev_dev = ref["evaluation"], dev["evaluation"]
    for name, bound in evaluation_bounds(DEMO_MODEL_DIR, reference_out, harmful, harmless).items():
        difference = abs(ev_dev[name] - ev_ref[name])
        unit = "nats" if name == "kl_harmless" else ""
        figure(f"demo_{name}_difference", difference, unit)
        figure(f"demo_{name}_bound", bound, unit)
        ok &= difference <= bound
    for name in ("refusal_rate_harmful", "baseline_refusal_rate_harmful"):
        # greedy 48-token replies: no derived bound (a close call at any token may flip); reported
        if name in ev_ref and name in ev_dev:
            figure(f"demo_{name}_difference", abs(ev_dev[name] - ev_ref[name]))
    figure("demo_comparison", "pass" if ok else "FAIL")
    return 0 if ok else 1


# ---------------------------------------------------------------- 3. the real-width streamed benchmark


def streamed(figures_json: str, seconds: str) -> int:
    data = json.loads(Path(figures_json).read_text())
    layer, device = data["layer"], data.get("device", "cpu")
    figure("streamed_device", f"{device} {data.get('dtype', '')}".strip())
    figure("streamed_layer_read_seconds", layer["load_s"], "s")
    figure("streamed_layer_read", layer["bytes_disk"] / layer["load_s"] / 1e9, "GB/s")
    figure("streamed_layer_tokens", layer["tokens"] / layer["run_s"], "tokens/s")
    hours = sum(row[1] for row in data["rows"]) / 3600
    figure("streamed_projected_full_run", hours, f"h (GLM-4.5-Air, from the rates measured on {device})")
    figure("streamed_seconds", float(seconds), "s")
    return 0


# ---------------------------------------------------------------- 4. --device auto over GPU, CPU and disk


def auto(work: str, device: str) -> int:
    """A model loaded with `--device auto` and a small host-memory budget, so that accelerate's device map
    fills the GPU, then the budget of host memory, then disk; its first-token log-probabilities against
    the same model on the CPU in memory, within 2 logits_rtol |z| (tests/test_devices.py's bound).

    One GPU holds any small model whole, so while the map is made this process holds all of the GPU's
    free memory but a third of the model's size (a real allocation, as another job's tensors would be),
    and frees it before the forward pass. Without a GPU, `auto` is the CPU: host memory, then disk."""
    import torch
    from numerics import accumulation_length, logits_rtol

    from abliterate.config import Template
    from abliterate.demo import prompt_file
    from abliterate.demo.train import build_tokenizer
    from abliterate.inference.loading import load_model
    from abliterate.inference.runner import InMemoryForward
    from abliterate.inference.streaming import weight_bytes
    from abliterate.measure.chat import encode_prompts
    from abliterate.measure.prompts import load_prompts
    from abliterate.weights.synthetic import GlmLayout, write_glm_layout

    gpu = device != "cpu"
    if gpu and not torch.cuda.is_available():
        print("auto: no CUDA device: run with --cpu", file=sys.stderr)
        return 1
    prompts = load_prompts(prompt_file("demo", "harmless", "test"))[:8]
    tokenizer = build_tokenizer(prompts)
    widths = (  # GPU: 12 layers of about 67 MB in float32; CPU: a few KB each
        dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, n_routed_experts=8,
             num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_layers=12)
        if gpu
        else dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_layers=6)
    )  # fmt: skip
    layout = GlmLayout(num_experts_per_tok=2, num_nextn_predict_layers=0, vocab_size=len(tokenizer), **widths)
    model_dir = Path(work) / "auto-model"
    write_glm_layout(model_dir, layout, num_shards=4)
    tokenizer.save_pretrained(model_dir)
    total = weight_bytes(model_dir, "float32").total
    budget = total // 4  # host memory: a quarter of the model
    figure("auto_model_size", total / 2**20, "MiB float32")
    figure("auto_host_budget", budget / 2**20, "MiB")

    hog = None
    if gpu:
        free = torch.cuda.mem_get_info()[0]
        share = total // 3  # the GPU's part: a third of the model
        hog = torch.empty(max(0, free - share), dtype=torch.uint8, device="cuda")
        figure("auto_gpu_free_when_mapped", torch.cuda.mem_get_info()[0] / 2**20, "MiB")
    began = time.perf_counter()
    model, _ = load_model(model_dir, "float32", "auto", budget=budget)
    del hog
    if gpu:
        torch.cuda.empty_cache()
    places = {str(v) if not isinstance(v, int) else f"cuda:{v}" for v in model.hf_device_map.values()}
    figure("auto_placement", model.abliterate_placement.replace(",", ";"), "modules")
    encoded = encode_prompts(tokenizer, prompts, Template(), "prompt")
    ((_, _, spread),) = list(InMemoryForward(model).first_token_logprobs({"x": encoded}, [None], 4, 0))
    figure("auto_seconds", time.perf_counter() - began, "s (load + one pass)")
    del model

    reference, _ = load_model(model_dir, "float32", "cpu")
    ((_, _, whole),) = list(InMemoryForward(reference).first_token_logprobs({"x": encoded}, [None], 4, 0))
    largest = 0.0
    with torch.inference_mode():
        for ids in encoded:
            logits = reference(input_ids=torch.tensor([ids])).logits[0, -1]
            largest = max(largest, float(logits.double().norm()))
    n = accumulation_length(model_dir, max(len(x) for x in encoded))
    bound = 2 * logits_rtol(layout.num_layers, n) * largest
    difference = float((spread.double().cpu() - whole.double()).abs().max())
    figure("auto_logprob_difference", difference, "nats")
    figure("auto_logprob_bound", bound, "nats")
    spread = {"cpu", "disk"} <= places and (not gpu or any(p.startswith("cuda") for p in places))
    ok = spread and difference <= bound
    figure("auto_comparison", "pass" if ok else "FAIL")
    return 0 if ok else 1


# ---------------------------------------------------------------- 5. the search's trials per minute


def search(path: str, seconds: str) -> int:
    data = json.loads(Path(path).read_text())
    figure("search_device", f"{data.get('device', 'cpu')} {data.get('dtype', 'float32')}")
    figure("search_trials", data["trials"], "trials")
    figure("search_trials_per_minute", float(data["trials_per_minute"]), "trials/min")
    figure("search_measure_and_select_seconds", float(data["measure_and_select_seconds"]), "s")
    figure("search_seconds", float(seconds), "s (the whole benchmark)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["tests", "demo", "streamed", "auto", "search"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.step == "auto":
        return auto(args.args[0], args.device)
    return {"tests": tests, "demo": demo, "streamed": streamed, "search": search}[args.step](*args.args)


if __name__ == "__main__":
    sys.exit(main())
