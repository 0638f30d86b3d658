"""Layer-streamed measurement equals the in-memory one, on every on-disk expert layout."""

from __future__ import annotations

import shutil

import pytest
import torch
from numerics import (
    U32,
    accumulation_length,
    assert_stats_close,
    direction_bound,
    longest_prompt,
    position_rtol,
    sample_rms,
)
from safetensors.torch import load_file, save_file
from tiny_chat_model import (
    HARMFUL,
    HARMLESS,
    WORDS,
    build_tiny_chat_model,
    measure_sections,
    tiny_air_layout,
    write_tiny_glm_air,
)

from abliterate.cli import main
from abliterate.config import Runtime, parse_size
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.demo.train import build_tokenizer
from abliterate.errors import AbliterateError
from abliterate.inference.loading import load_model
from abliterate.inference.streaming import choose_streaming, weight_bytes
from abliterate.measure.direction_file import load_directions
from abliterate.measure.means import Measurement, measure_checkpoint
from abliterate.measure.prompts import load_prompts
from abliterate.measure.streamed import measure_streamed
from abliterate.pipeline import decide_streaming, measure_stage
from abliterate.weights.synthetic import glm_tensor_specs

DEMO_READY = (DEMO_MODEL_DIR / "model.safetensors.index.json").is_file()
SETTINGS = measure_sections(batch_size=3, system_prompt="Be concise.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A transformers-saved tiny GLM-4.5-MoE model: per-expert keys on disk (the default)."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("stream") / "per-expert")


@pytest.fixture(scope="module")
def tiny_fused(tiny, tmp_path_factory):
    """The same model saved by transformers with fused expert tensors (save_original_format=False)."""
    out = tmp_path_factory.mktemp("stream") / "fused"
    model, tokenizer = load_model(tiny)
    model.save_pretrained(out, save_original_format=False)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["per-expert", "fused"])
def glm_air(request, tmp_path_factory):
    """GLM-4.5-Air's exact tensor names at small widths, sharded, with a chat tokenizer."""
    return write_tiny_glm_air(tmp_path_factory.mktemp("stream") / "glm-air", request.param, torch.bfloat16)


def terms(model_dir, settings: tuple, prompts: list[str] = HARMFUL + HARMLESS) -> int:
    """n of tests/numerics.py: the most terms any sum in a decoder layer of this model has
    (`settings`: the measurement's sections)."""
    return accumulation_length(model_dir, longest_prompt(model_dir, prompts, settings[1]))


def assert_same_measurement(streamed: Measurement, in_memory: Measurement, n: int) -> None:
    """Equal up to the rounding of two float32 evaluations of the same layers (tests/numerics.py:
    at residual position i, 2 i STAGES_PER_LAYER n 2^-24 of each prompt's residual): the streamed path
    runs other kernels (one layer at a time, fused or per-expert weights, the sequence cut after the
    measured token)."""
    assert (streamed.num_layers, streamed.hidden_size, streamed.record()) == (
        in_memory.num_layers,
        in_memory.hidden_size,
        in_memory.record(),
    )
    for label in ("harmful", "harmless"):
        s, m = getattr(streamed, label), getattr(in_memory, label)
        assert (s.count, s.tokens, s.sha256) == (m.count, m.tokens, m.sha256)
        assert s.mean.dtype == torch.float64 and s.mean.shape == m.mean.shape
        assert_stats_close(s, m, position_rtol(in_memory.num_positions, n, m.count), label)


@pytest.mark.parametrize(("dtype", "position"), [("float32", -1), ("float32", -3), ("bfloat16", -1)])
def test_streamed_equals_in_memory_per_expert_keys(tiny, dtype, position):
    """Tokens after the measured one are cut off (causal attention): in float32 that changes only
    rounding. In bfloat16 a shorter sequence rounds differently (a stage's output rounds to 2^-8,
    far above the float32 bound), so only -1 there: both paths then run the same shapes in the same
    order, and bfloat16 kernels accumulate in float32, so the float32 bound applies."""
    settings = measure_sections(
        batch_size=3, system_prompt="Be concise.", dtype=dtype, token_position=position
    )
    streamed = measure_streamed(tiny, HARMFUL, HARMLESS, *settings, progress=False)
    in_memory = measure_checkpoint(tiny, HARMFUL, HARMLESS, *settings, progress=False)
    assert_same_measurement(streamed, in_memory, terms(tiny, settings))


def test_streamed_equals_in_memory_fused_keys(tiny, tiny_fused):
    streamed = measure_streamed(tiny_fused, HARMFUL, HARMLESS, *SETTINGS, progress=False)
    n = terms(tiny, SETTINGS)
    assert_same_measurement(
        streamed, measure_checkpoint(tiny_fused, HARMFUL, HARMLESS, *SETTINGS, progress=False), n
    )
    # both on-disk layouts hold the same model
    assert_same_measurement(streamed, measure_streamed(tiny, HARMFUL, HARMLESS, *SETTINGS, progress=False), n)


def test_streamed_equals_in_memory_on_glm_air_layout(glm_air):
    """Dense layer 0, MoE layers with fp32 routers and correction bias, q/k/v biases, 3 shards;
    the MTP layer (index num_hidden_layers) is ignored as transformers ignores it."""
    settings = measure_sections(batch_size=2, token_position=-2)
    streamed = measure_streamed(glm_air, HARMFUL, HARMLESS, *settings, progress=False)
    in_memory = measure_checkpoint(glm_air, HARMFUL, HARMLESS, *settings, progress=False)
    assert_same_measurement(streamed, in_memory, terms(glm_air, settings))
    assert streamed.num_layers == 4 and streamed.harmful.mean.shape == (5, 16)


@pytest.mark.skipif(not DEMO_READY, reason="the demo model is not built yet")
def test_streamed_equals_in_memory_on_demo_model():
    harmful = load_prompts(prompt_file("demo", "harmful", "train"))[:24]
    harmless = load_prompts(prompt_file("demo", "harmless", "train"))[:24]
    settings = measure_sections(batch_size=8)
    streamed = measure_streamed(DEMO_MODEL_DIR, harmful, harmless, *settings, progress=False)
    in_memory = measure_checkpoint(DEMO_MODEL_DIR, harmful, harmless, *settings, progress=False)
    assert_same_measurement(streamed, in_memory, terms(DEMO_MODEL_DIR, settings, harmful + harmless))


def test_weight_bytes_count_the_main_model_without_mtp(glm_air):
    layout = tiny_air_layout(False, len(build_tokenizer([WORDS])))
    numel: dict[int | None, int] = {}  # decoder layer (None: outside the layers) -> elements
    for name, shape, _dtype in glm_tensor_specs(layout):
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer is None or layer < layout.num_layers:  # the MTP layer is not part of the main model
            numel[layer] = numel.get(layer, 0) + torch.Size(shape).numel()
    got = weight_bytes(glm_air, "float32")
    assert got.total == 4 * sum(numel.values())
    assert got.largest_layer == 4 * numel[1] > 4 * numel[0]  # a MoE layer, not the dense layer 0
    assert got.embedding == 4 * layout.vocab_size * layout.hidden_size
    assert weight_bytes(glm_air, "bfloat16").total == 2 * sum(numel.values())


def test_auto_mode_streams_only_over_budget(tiny):
    total = weight_bytes(tiny, "float32").total
    assert choose_streaming(tiny, total - 1)
    assert not choose_streaming(tiny, total)
    assert not choose_streaming(tiny, total, dtype="bfloat16") and choose_streaming(
        tiny, total // 2 - 1, "bfloat16"
    )
    over, fits = Runtime(memory_budget=str(total - 1)), Runtime(memory_budget=str(total))
    assert decide_streaming(tiny, over) and not decide_streaming(tiny, fits)
    streamed = measure_stage(
        tiny, HARMFUL, HARMLESS, *SETTINGS, stream=decide_streaming(tiny, over), progress=False
    )
    in_memory = measure_stage(
        tiny, HARMFUL, HARMLESS, *SETTINGS, stream=decide_streaming(tiny, fits), progress=False
    )
    assert_same_measurement(streamed, in_memory, terms(tiny, SETTINGS))
    with pytest.raises(AbliterateError, match="streaming.*sometimes"):
        Runtime(streaming="sometimes")


def test_missing_expert_tensor_names_the_layer(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        AbliterateError, match=r"decoder layer 2: .*model\.layers\.2\.mlp\.experts\.gate_up_proj"
    ):
        measure_streamed(broken, HARMFUL, HARMLESS, *SETTINGS, progress=False)


def test_unknown_tensor_in_a_layer_is_an_error(tiny, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny, odd)
    tensors = load_file(odd / "model.safetensors")
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, odd / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        AbliterateError, match=r"decoder layer 1: .*'model\.layers\.1\.mlp\.extra\.weight'.*no place"
    ):
        measure_streamed(odd, HARMFUL, HARMLESS, *SETTINGS, progress=False)


def test_measure_cli_streams_on_request_or_over_budget(tiny, tmp_path, capsys):
    files = {}
    for name, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(prompts) + "\n")
    common = ["measure", str(tiny), "--harmful", str(files["harmful"]), "--harmless", str(files["harmless"])]
    common += ["--batch-size", "3"]
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "memory"),
                "--direction-position",
                "none",
                "--streaming",
                "never",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "stream"),
                "--direction-position",
                "none",
                "--streaming",
                "always",
            ]
        )
        == 0
    )
    budget = ["--memory-budget", "1KiB", "--direction-position", "none"]
    assert main([*common, "--out", str(tmp_path / "auto"), *budget]) == 0
    reference = load_directions(tmp_path / "memory" / "directions.safetensors")
    # The bound of tests/numerics.py, scaled by the residuals' size, which the file does not hold.
    template = reference.metadata["template"]
    settings = measure_sections(
        chat_template_kwargs=template["chat_template_kwargs"],
        system_prompt=template["system_prompt"],
        batch_size=3,
        token_position=reference.metadata["position"],
    )
    stats = measure_checkpoint(tiny, HARMFUL, HARMLESS, *settings, progress=False)
    rtol = position_rtol(stats.num_positions, terms(tiny, settings), len(HARMFUL))
    moved = {label: rtol * sample_rms(getattr(stats, label)) for label in ("harmful", "harmless")}
    harmful, harmless = reference.harmful_mean.double(), reference.harmless_mean.double()
    projected = reference.metadata["method"] == "projected"
    turned = direction_bound(harmful, harmless, moved["harmful"], moved["harmless"], projected)
    for name in ("stream", "auto"):
        streamed = load_directions(tmp_path / name / "directions.safetensors")
        # both files round the float64 means to float32 once: u |mean| each
        mean_error = (streamed.harmful_mean.double() - harmful).norm(dim=-1)
        assert bool((mean_error <= moved["harmful"] + 2 * U32 * harmful.norm(dim=-1)).all()), mean_error
        direction_error = (streamed.direction.double() - reference.direction.double()).norm(dim=-1)
        assert bool((direction_error <= turned.nan_to_num(0.0)).all()), (direction_error, turned)
    capsys.readouterr()
    # over the budget, the candidates are scored layer-streamed too: all of them in one pass over the weights
    assert (
        main([*common, "--out", str(tmp_path / "x"), "--memory-budget", "1KiB", "--kl-threshold", "1e9"]) == 0
    )
    printed = capsys.readouterr()
    assert (
        "layer-streamed" in printed.err
        and "scored layer-streamed" in printed.out
        and "<- selected" in printed.out
    )
    assert load_directions(tmp_path / "x" / "directions.safetensors").metadata["selection"]["streamed"]
    assert (
        main(
            [*common, "--out", str(tmp_path / "x"), "--memory-budget", "lots", "--direction-position", "none"]
        )
        == 2
    )
    assert "memory budget 'lots'" in capsys.readouterr().err
    # an explicit position is scored (layer-streamed) for the record and kept
    assert (
        main([*common, "--out", str(tmp_path / "fixed"), "--stream", "always", "--select", "2"]) == 0
    )  # older names
    fixed = load_directions(tmp_path / "fixed" / "directions.safetensors")
    assert fixed.selected_position == 2 and [
        c["position"] for c in fixed.metadata["selection"]["candidates"]
    ] == [2]


def test_memory_budget_sizes():
    assert parse_size("64GiB") == 64 << 30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("500mb") == 500_000_000
    assert parse_size("1024") == 1024
    assert parse_size(None) is None
    with pytest.raises(AbliterateError, match="memory budget '12 parsecs'"):
        parse_size("12 parsecs")


def test_nan_weights_name_the_residual_position(tiny, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(tiny, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AbliterateError, match=r"residual position 2 \(output of decoder layer 1"):
        measure_streamed(bad, HARMFUL, HARMLESS, *SETTINGS, progress=False)
