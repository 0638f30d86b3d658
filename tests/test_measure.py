"""Measurement: agreement with a plain output_hidden_states computation, batching, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import accumulation_length, assert_stats_close, longest_prompt, position_rtol
from tiny_chat_model import HARMFUL, HARMLESS, build_tiny_chat_model, measure_sections

from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.errors import AbliterateError
from abliterate.inference.loading import length_sorted_batches, load_model
from abliterate.measure.chat import render_chat
from abliterate.measure.means import SetStats, measure, measure_prompts, measured_with
from abliterate.measure.prompts import load_prompts, prompts_sha256

DEMO_READY = (DEMO_MODEL_DIR / "model.safetensors.index.json").is_file()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


def reference_residuals(model, tokenizer, prompts, settings) -> torch.Tensor:
    """[N, L+1, H] float64, one unpadded forward per prompt: HF hidden_states[0..L-1], and the last
    decoder layer's raw output (HF's last hidden state is after the final norm)."""
    measurement, template, _ = settings
    texts = render_chat(
        tokenizer, prompts, system_prompt=template.system_prompt, **template.chat_template_kwargs
    )
    rows, seen = [], {}
    handle = model.model.layers[-1].register_forward_hook(lambda _m, _a, out: seen.update(last=out))
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
        assert len(hidden) == model.config.num_hidden_layers + 1
        assert not torch.allclose(hidden[-1], seen["last"])  # post-norm: not residual position L
        rows.append(torch.stack([*hidden[:-1], seen["last"]])[:, 0, measurement.token_position].double())
    handle.remove()
    return torch.stack(rows)


def assert_matches_reference(stats: SetStats, samples: torch.Tensor, model_dir, prompts, settings) -> None:
    """Batched, left-padded measurement vs one unpadded forward per prompt: the same float32 layers
    on other shapes, so equal up to the rounding bound of tests/numerics.py."""
    reference = SetStats(samples.mean(0), samples.var(0), samples.shape[0], tokens=0, sha256="")
    n = accumulation_length(model_dir, longest_prompt(model_dir, prompts, settings[1]))
    assert_stats_close(stats, reference, position_rtol(samples.shape[1], n, samples.shape[0]))


@pytest.mark.parametrize("position", [-1, -3])
def test_means_match_hidden_states_reference(tiny, tiny_dir, position):
    model, tokenizer = tiny
    settings = measure_sections(token_position=position, batch_size=3, system_prompt="Be concise and polite.")
    stats = measure_prompts(model, tokenizer, HARMFUL + HARMLESS, *settings, "prompt", progress=False)
    ref = reference_residuals(model, tokenizer, HARMFUL + HARMLESS, settings)
    assert stats.mean.shape == (4, 32) and stats.mean.dtype == torch.float64
    assert_matches_reference(stats, ref, tiny_dir, HARMFUL + HARMLESS, settings)
    assert stats.count == 8
    assert stats.sha256 == prompts_sha256(HARMFUL + HARMLESS)
    texts = render_chat(tokenizer, HARMFUL + HARMLESS, system_prompt="Be concise and polite.")
    assert stats.tokens == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def test_batch_size_changes_nothing_but_rounding(tiny, tiny_dir):
    model, tokenizer = tiny
    one = measure_prompts(
        model, tokenizer, HARMFUL, *measure_sections(batch_size=1), "harmful", progress=False
    )
    many = measure_prompts(
        model, tokenizer, HARMFUL, *measure_sections(batch_size=4), "harmful", progress=False
    )
    n = accumulation_length(tiny_dir, longest_prompt(tiny_dir, HARMFUL, measure_sections()[1]))
    assert_stats_close(many, one, position_rtol(one.mean.shape[0], n, one.count))


def test_template_kwargs_reach_the_template(tiny):
    model, tokenizer = tiny
    off = measure_prompts(model, tokenizer, HARMFUL, *measure_sections(), "harmful", progress=False)
    on = measure_prompts(
        model,
        tokenizer,
        HARMFUL,
        *measure_sections(chat_template_kwargs={"enable_thinking": True}),
        "harmful",
        progress=False,
    )
    assert on.tokens == off.tokens - 2 * len(HARMFUL)  # "<think>" instead of "<think></think>\n"
    assert not torch.allclose(on.mean, off.mean)


def test_measure_both_sets(tiny):
    model, tokenizer = tiny
    m = measure(model, tokenizer, HARMFUL, HARMLESS[:3], *measure_sections(), progress=False)
    assert (m.num_layers, m.hidden_size, m.harmful.count, m.harmless.count) == (3, 32, 4, 3)
    # Every prompt ends with the same generation-prompt token: equal embeddings at position 0.
    torch.testing.assert_close(m.harmful.mean[0], m.harmless.mean[0])


def test_batches_are_length_sorted_and_left_padded():
    encoded = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    batches = list(length_sorted_batches(encoded, batch_size=2, pad_id=0))
    assert [b.indices for b in batches] == [[1, 2], [0, 3]]
    assert batches[0].input_ids.tolist() == [[0, 8], [9, 10]]
    assert batches[0].attention_mask.tolist() == [[0, 1], [1, 1]]
    assert batches[1].position_ids.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]


def test_settings_record_is_order_free_and_serialisable():
    a = measured_with(
        *measure_sections(
            chat_template_kwargs={"enable_thinking": False, "a": 1}, token_position=-2, system_prompt="x"
        )
    )
    b = measured_with(
        *measure_sections(
            chat_template_kwargs={"a": 1, "enable_thinking": False}, token_position=-2, system_prompt="x"
        )
    )
    assert a == b and json.dumps(a) == json.dumps(b)
    assert a == {
        "position": -2,
        "system_prompt": "x",
        "chat_template_kwargs": {"a": 1, "enable_thinking": False},
        "batch_size": 16,
        "dtype": "float32",
        "max_length": None,
        "subspace_rank": 4,
    }
    with pytest.raises(AbliterateError, match="token-position"):
        measure_sections(token_position=3)
    model_free = measure_sections(dtype="auto")
    with pytest.raises(AbliterateError, match="resolve the runtime"):
        measure(None, None, HARMFUL, HARMLESS, *model_free, progress=False)


def test_empty_prompt_set(tiny):
    model, tokenizer = tiny
    with pytest.raises(AbliterateError, match="harmless prompt set is empty"):
        measure(model, tokenizer, HARMFUL, [], *measure_sections(), progress=False)


def test_prompt_longer_than_context(tiny):
    model, tokenizer = tiny  # context: 64 positions
    long = " ".join(["please"] * 80)
    with pytest.raises(AbliterateError, match=r"harmful prompt #2 is \d+ tokens long.*context of 64 tokens"):
        measure(model, tokenizer, [*HARMFUL[:2], long], HARMLESS, *measure_sections(), progress=False)
    with pytest.raises(AbliterateError, match="context of 10 tokens"):
        measure_prompts(
            model, tokenizer, HARMFUL, *measure_sections(max_length=10), "harmful", progress=False
        )


def test_position_beyond_prompt_start(tiny):
    model, tokenizer = tiny
    with pytest.raises(AbliterateError, match="token position -200 does not exist"):
        measure_prompts(
            model, tokenizer, HARMFUL, *measure_sections(token_position=-200), "harmful", progress=False
        )


def test_tokenizer_without_chat_template(tiny):
    model, tokenizer = tiny
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(AbliterateError, match="chat template"):
            measure_prompts(model, tokenizer, HARMFUL, *measure_sections(), "harmful", progress=False)
    finally:
        tokenizer.chat_template = template


def test_nan_activations_name_the_layer(tmp_path):
    model, tokenizer = load_model(build_tiny_chat_model(tmp_path))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    with pytest.raises(
        AbliterateError, match=r"residual position 2 \(output of decoder layer 1, input of layer 2\)"
    ):
        measure_prompts(model, tokenizer, HARMFUL, *measure_sections(), label="harmful", progress=False)


def test_missing_model_dir(tmp_path):
    with pytest.raises(AbliterateError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.skipif(not DEMO_READY, reason="the demo model is not built")
def test_demo_model_means_match_hidden_states_reference():
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    prompts = load_prompts(prompt_file("demo", "harmful", "val"))[:24]
    settings = measure_sections(batch_size=8)
    stats = measure_prompts(model, tokenizer, prompts, *settings, "harmful", progress=False)
    ref = reference_residuals(model, tokenizer, prompts, settings)
    assert_matches_reference(stats, ref, DEMO_MODEL_DIR, prompts, settings)
