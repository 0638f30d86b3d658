"""--device and --dtype: what `auto` means on this (GPU-less) machine, accelerate device maps, offloading,
and that every command, flow and deployment takes both. CPU only: nothing here needs a GPU."""

from __future__ import annotations

import gc
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import ROOT, assert_error, console
from numerics import accumulation_length, logits_rtol

from abliterate.config import Runtime, Template
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.errors import AbliterateError
from abliterate.inference.devices import (
    check_device,
    checkpoint_dtype,
    device_map,
    input_device,
    resolve_device,
    resolve_dtype,
    resolve_runtime,
)
from abliterate.inference.loading import load_model
from abliterate.inference.runner import InMemoryForward
from abliterate.inference.streaming import weight_bytes
from abliterate.measure.chat import encode_prompts
from abliterate.weights.synthetic import GlmLayout, write_glm_layout

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="what auto means without a GPU")
ONLY_GPU = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs it there)"
)


@NO_GPU
def test_auto_is_the_cpu_in_float32_without_a_gpu():
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "auto", DEMO_MODEL_DIR) == "float32"  # the demo is bf16 on disk
    assert resolve_dtype("bfloat16", "cpu", DEMO_MODEL_DIR) == "bfloat16"  # as asked
    runtime = Runtime()
    assert (runtime.device, runtime.dtype) == ("auto", "auto")
    resolved = resolve_runtime(runtime, DEMO_MODEL_DIR)
    assert (resolved.device, resolved.dtype) == ("cpu", "float32")
    for bad, fragment in (("tpu", "cpu | cuda"), ("cuda:0", "no CUDA device"), ("gpu", "cpu | cuda")):
        with pytest.raises(ValueError, match=fragment):
            check_device(bad)
        with pytest.raises(AbliterateError, match="--device"):
            Runtime(device=bad)


def test_the_checkpoint_dtype_comes_from_config_then_from_the_headers(tmp_path):
    assert checkpoint_dtype(DEMO_MODEL_DIR) == "bfloat16"  # config.json "dtype"
    layout = write_glm_layout(
        tmp_path / "glm",
        GlmLayout(num_layers=2, n_routed_experts=4, num_experts_per_tok=2, dtype=torch.float16),
        num_shards=1,
    )
    assert checkpoint_dtype(layout) == "float16"  # "torch_dtype"
    config = json.loads((layout / "config.json").read_text())
    del config["torch_dtype"]
    (layout / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(layout) == "float16"  # most weight bytes (the fp32 routers are fewer)


def test_device_maps_place_one_decoder_layer_per_entry_then_spill_to_disk():
    everything = weight_bytes(DEMO_MODEL_DIR, "float32").total
    full = device_map(DEMO_MODEL_DIR, "float32", "cpu", budget=10 * everything)
    layers = [f"model.layers.{i}" for i in range(5)]
    assert list(full) == ["model.embed_tokens", *layers, "model.norm", "model.rotary_emb", "lm_head"]
    assert set(full.values()) == {"cpu"}
    assert set(device_map(DEMO_MODEL_DIR, "float32", "cpu", budget=0).values()) == {"disk"}
    half = device_map(DEMO_MODEL_DIR, "float32", "cpu", budget=everything // 2)
    places = list(half.values())
    assert places[0] == "cpu" and places[-1] == "disk" and places == sorted(places, key=["cpu", "disk"].index)


def test_an_offloaded_model_computes_what_the_loaded_one_does():
    """300 KiB of host memory for a 1.4 MiB model: accelerate reads the rest from disk, module by module."""
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    offloaded, _ = load_model(DEMO_MODEL_DIR, budget=300 << 10)
    assert "disk" in offloaded.hf_device_map.values() and "disk" in offloaded.abliterate_placement
    assert input_device(offloaded) == torch.device("cpu")
    prompts = ["how do I make a cake", "write a poem about the sea"]
    encoded = encode_prompts(tokenizer, prompts, Template(), "prompt")
    ((_, _, a),) = list(InMemoryForward(model).first_token_logprobs({"x": encoded}, [None], 2, 0))
    ((_, _, b),) = list(InMemoryForward(offloaded).first_token_logprobs({"x": encoded}, [None], 2, 0))
    with torch.inference_mode():
        z = model(input_ids=torch.tensor([encoded[0]])).logits[0, -1].double().norm()
        z = max(z, model(input_ids=torch.tensor([encoded[1]])).logits[0, -1].double().norm())
    n = accumulation_length(DEMO_MODEL_DIR, max(len(x) for x in encoded))
    # the same float32 modules on the same batches: logits within logits_rtol |z|, log-softmax twice that
    assert float((a - b).abs().max()) <= 2 * logits_rtol(5, n) * float(z)
    folder = Path(offloaded.abliterate_offload_dir)  # accelerate's offload folder goes with the model
    assert folder.is_dir()
    del offloaded
    gc.collect()
    assert not folder.exists()


@ONLY_GPU
def test_a_gpu_is_what_auto_uses_and_computes_what_the_cpu_does():
    """On a CUDA machine: `auto` keeps the GPUs and the checkpoint's dtype, and the demo model in float32
    on the GPU, held in memory and layer-streamed, gives the CPU's first-token log-probabilities within
    the float32 bound (the same bound as offloading above: kernels differ, the arithmetic does not)."""
    from abliterate.inference.runner import model_forward

    assert resolve_device("auto") == "auto" and resolve_device("cuda").startswith("cuda:")
    assert resolve_dtype("auto", "cuda", DEMO_MODEL_DIR) == "bfloat16"  # the demo is bf16 on disk
    assert resolve_runtime(Runtime(), DEMO_MODEL_DIR).dtype == "bfloat16"
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    prompts = ["how do I make a cake", "write a poem about the sea", "how do I make a bomb"]
    encoded = encode_prompts(tokenizer, prompts, Template(), "prompt")
    ((_, _, cpu),) = list(InMemoryForward(model).first_token_logprobs({"x": encoded}, [None], 2, 0))
    with torch.inference_mode():
        z = max(float(model(input_ids=torch.tensor([ids])).logits[0, -1].double().norm()) for ids in encoded)
    n = accumulation_length(DEMO_MODEL_DIR, max(len(x) for x in encoded))
    for stream in (False, True):
        forward, _ = model_forward(DEMO_MODEL_DIR, "float32", "cuda", stream, progress=False)
        if not stream:
            assert input_device(forward.model).type == "cuda"
        ((_, _, gpu),) = list(forward.first_token_logprobs({"x": encoded}, [None], 2, 0))
        assert float((gpu.double().cpu() - cpu.double()).abs().max()) <= 2 * logits_rtol(5, n) * z, stream
        del forward
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ every command, flow and deployment


def smallest_command_line(command: str, tmp_path: Path) -> list[str]:
    """`abliterate COMMAND` with its required arguments, each valid: what remains to fail is the runtime."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("how do I bake bread\n")
    variants = tmp_path / "variants.yaml"
    variants.write_text("- {name: full, layers: all}\n")
    model, out = str(DEMO_MODEL_DIR), ["--out", str(tmp_path / "out")]
    return {
        "measure": [model, "--harmful", str(prompts), "--harmless", str(prompts), *out],
        "evaluate": [model, "--harmful", str(prompts), "--harmless", str(prompts)],
        "run": [model, *out],
        "demo": [],
        "sweep": [model, "--variants", str(variants), *out],
        "search": [model, *out],
    }[command]


@pytest.mark.parametrize("command", ["measure", "evaluate", "run", "demo", "sweep", "search"])
def test_every_command_that_runs_the_model_takes_a_device_and_a_dtype(command, tmp_path, capsys):
    """A bad --device, --dtype, --streaming or --memory-budget is the command's own one-line error
    naming the option and its choices (not an unknown argument), before any work."""
    argv = [command, *smallest_command_line(command, tmp_path)]
    assert_error(console(capsys, *argv, "--device", "tpu"), command, "--device", "cpu | cuda | cuda:N | auto")
    assert_error(
        console(capsys, *argv, "--device", "cpu", "--dtype", "float8"),
        command,
        "--dtype",
        "'auto', 'bfloat16', 'float16', 'float32'",
    )
    # and where it streams
    assert_error(
        console(capsys, *argv, "--dtype", "float32", "--streaming", "sometimes"), command, "--streaming"
    )
    assert_error(
        console(capsys, *argv, "--device", "cpu", "--memory-budget", "lots"), command, "--memory-budget"
    )
    assert not (tmp_path / "out").exists()


def test_flows_and_deployments_take_a_device_and_a_dtype(restored_environment, monkeypatch, tmp_path):
    from prefect.utilities.callables import parameter_schema

    from abliterate_flows.main import abliterate_flow
    from abliterate_flows.search import search_flow
    from abliterate_flows.sweep import sweep_flow

    flows = {"abliterate_flow": abliterate_flow, "sweep_flow": sweep_flow, "search_flow": search_flow}
    for flow in flows.values():
        schema = parameter_schema(flow.fn).model_dump()
        runtime = schema["definitions"]["Runtime"]["properties"]
        assert runtime["device"]["default"] == "auto" and "cuda:N" in runtime["device"]["description"]
        assert runtime["dtype"]["enum"] == ["auto", "bfloat16", "float16", "float32"]
        # a bad value is refused in one line when Prefect checks the parameters, before the run
        for bad, fragment in (({"device": "tpu"}, "--device"), ({"dtype": "float8"}, "--dtype")):
            with pytest.raises(AbliterateError, match=fragment) as info:
                flow.validate_parameters({"model": "m", "out": "o", "runtime": bad})
            assert "\n" not in str(info.value)
    deployments = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in deployments} == {"demo", "demo-sweep", "demo-search"}
    for deployment in deployments:
        assert deployment["parameters"]["runtime"] == {"device": "auto", "dtype": "auto"}
        flow = flows[deployment["entrypoint"].rsplit(":", 1)[1]]
        assert flow.validate_parameters(deployment["parameters"])["runtime"] == Runtime()
    # the deployments that deployments/serve.py registers (importing it changes directory, sys.path
    # and the environment: all put back after the test)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ABLITERATE_HOME", str(tmp_path))  # serve.py's project folder: not the checkout
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("serve", ROOT / "deployments" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    served = serve.deployments()
    assert {d.name for d in served} == {"demo", "demo-sweep", "demo-search"}
    for deployment in served:
        assert deployment.parameters["runtime"] == {"device": "auto", "dtype": "auto"}


def test_measure_takes_cpu_and_bfloat16_as_asked(tmp_path):
    """The CLI end to end with an explicit device and dtype: the directions record the dtype."""
    from abliterate.cli import main
    from abliterate.measure.direction_file import load_directions

    harmful, harmless = tmp_path / "h.txt", tmp_path / "n.txt"
    harmful.write_text(
        "how do I make a bomb\ntell me how to steal a car\npoison my neighbor\nbuild a weapon now\n"
    )
    harmless.write_text(
        "how do I make a cake\ntell me how to wash a car\nhelp my neighbor\nwrite a poem about the sea\n"
    )
    model = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_DIR, model)
    argv = [
        "measure",
        str(model),
        "--harmful",
        str(harmful),
        "--harmless",
        str(harmless),
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "--direction-position",
        "none",
        "--quiet",
    ]
    assert main(argv) == 0
    assert (
        load_directions(tmp_path / "o" / "directions.safetensors").metadata["measure_settings"]["dtype"]
        == "bfloat16"
    )
