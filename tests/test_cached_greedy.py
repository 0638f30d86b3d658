"""Layer-streamed greedy decoding with each layer's keys and values cached between the passes gives the
tokens of decoding without a cache (every step recomputes the whole sequence in memory: the runner's
`first_token_logprobs` of prompt + reply so far) and of `model.generate` in memory, for the unmodified
model and under an inference-time edit, on the trained demo model and on GLM-4.5-Air's layout (random
weights, per-expert and fused checkpoints); one read of the weights per new token.

Equal tokens are asserted where the arithmetic says they cannot differ: up to the first step of a reply
whose recomputed top-two margin is within twice the log-probability bound of two float32 evaluations
(tests/numerics.py: a rounding tie, which either path may break either way), so a failure is a wrong
cache; most tokens are decided so (the trained demo model: all of them; the random GLM layout: 85 % under
the edit, every one unedited).
"""

from __future__ import annotations

import pytest
import torch
from numerics import accumulation_length, first_token_delta, greedy_margin, logprob_atol
from tiny_chat_model import HARMFUL, HARMLESS, write_tiny_glm_air

from abliterate.config import Template
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.edit.inference_edit import DirectionEdit
from abliterate.inference.loading import load_model, pad_token_id
from abliterate.inference.runner import InMemoryForward, StreamedForward, stop_ids
from abliterate.measure.chat import encode_prompts
from abliterate.measure.prompts import load_prompts

STEPS = 6


def recomputed(model, encoded, steps, stops, edit, batch_size):
    """Greedy replies without a cache: each step runs prompt + reply so far through the whole model (the
    runner's first-token pass); also each reply's top-two margin at each step, and the first step's
    log-probabilities."""
    forward = InMemoryForward(model)
    replies: list[list[int]] = [[] for _ in encoded]
    margins: list[list[float]] = [[] for _ in encoded]
    live = list(range(len(encoded)))
    first = None
    for _ in range(steps):
        if not live:
            break
        sets = {"x": [list(encoded[i]) + replies[i] for i in live]}
        ((_, _, logprobs),) = list(forward.first_token_logprobs(sets, [edit], batch_size, 0))
        first = logprobs if first is None else first
        still = []
        for i, token, margin in zip(
            live, logprobs.argmax(-1).tolist(), greedy_margin(logprobs).tolist(), strict=True
        ):
            margins[i].append(margin)
            if token in stops:
                continue
            replies[i].append(int(token))
            still.append(i)
        live = still
    return replies, margins, first


def assert_cached_equals_uncached(model_dir, prompts, vector, batch_size):
    model, tokenizer = load_model(model_dir)
    encoded = encode_prompts(tokenizer, prompts, Template(), "prompt")
    stops = stop_ids(model.generation_config.eos_token_id, tokenizer)
    pad = pad_token_id(tokenizer)
    edits = [None, DirectionEdit(vector)]
    streamed = StreamedForward(model_dir, "float32", "cpu")
    cached, firsts = streamed.greedy_variants(
        encoded, edits, STEPS, batch_size, pad, stops, first_logprobs=True
    )
    steps_run = max(len(r) for replies in cached for r in replies)
    assert streamed.weight_reads == min(STEPS, steps_run + 1)  # one read per new token
    generated = InMemoryForward(model).greedy_variants(encoded, edits, STEPS, batch_size, pad, stops)
    n = accumulation_length(model_dir, max(len(x) for x in encoded) + STEPS)
    shares = []
    for v, edit in enumerate(edits):
        replies, margins, first = recomputed(model, encoded, STEPS, stops, edit, batch_size)
        whole = [list(x) + r for x, r in zip(encoded, replies, strict=True)]
        bound = logprob_atol(first_token_delta(model, whole, n, None if edit is None else vector, batch_size))
        decided = 0
        for i, reply in enumerate(replies):
            # the steps before the first rounding tie: every path must take the same tokens
            k = next((s for s, m in enumerate(margins[i]) if m <= 2 * bound), len(margins[i]))
            assert cached[v][i][:k] == reply[:k] == generated[v][i][:k], (v, i, k)
            if k == len(margins[i]):
                assert cached[v][i] == reply == generated[v][i], (v, i)
            decided += k
        shares.append(decided / sum(len(m) for m in margins))
        assert shares[-1] >= 0.75, (v, shares)  # random GLM layout, edited: 0.85 seen
        # the first step is the prompts' first-token pass: its log-probabilities within the bound
        assert float((firsts[v] - first).abs().max()) <= bound
    return cached, shares


def test_cached_streamed_greedy_equals_uncached_on_demo():
    prompts = [
        p for kind in ("harmful", "harmless") for p in load_prompts(prompt_file("demo", kind, "val"))[:8]
    ]
    model, _ = load_model(DEMO_MODEL_DIR)
    vector = torch.nn.functional.normalize(
        torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)), dim=0
    )
    replies, decided = assert_cached_equals_uncached(DEMO_MODEL_DIR, prompts, vector, 8)
    assert decided == [1.0, 1.0]  # the trained model has no rounding tie: every token decided
    assert any(len(r) == STEPS for r in replies[0])  # replies long enough to use the cache


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_cached_streamed_greedy_equals_uncached_on_glm_air_layout(tmp_path, fused):
    """GLM-4.5-Air's names and structure at small widths, sharded: grouped-query attention with q/k/v
    biases and partial rotary, so the cache holds fewer key/value heads than queries; batches of 3 over
    8 prompts of different lengths (left padding in the cache)."""
    out = write_tiny_glm_air(tmp_path / "glm-air", fused)
    vector = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(1)), dim=0)
    replies, _ = assert_cached_equals_uncached(out, HARMFUL + HARMLESS, vector, 3)
    assert all(len(r) == STEPS for r in replies[0])  # random weights: no reply ends early


def test_evaluation_replies_of_a_streamed_model_are_the_cached_greedy_ones():
    """Evaluation's full replies of a layer-streamed model (`measure_behaviour` with full replies always)
    come from the runner's cached greedy: the tokens of `generate` in memory on the trained demo model
    (which has no rounding tie, above), both test sets in one generation: at most one read of the weights
    per new token, plus the first-token pass."""
    from abliterate.check.evaluate import measure_behaviour
    from abliterate.config import Evaluation, Runtime

    harmful = load_prompts(prompt_file("demo", "harmful", "test"))[:6]
    harmless = load_prompts(prompt_file("demo", "harmless", "test"))[:6]
    evaluation = Evaluation(max_new_tokens=STEPS, full_replies="always")
    runtime = Runtime(device="cpu", dtype="float32", batch_size=4)
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    settings = (evaluation, Template(), runtime, False, [0])
    memory = measure_behaviour(model, tokenizer, harmful, harmless, *settings)
    streamed = StreamedForward(DEMO_MODEL_DIR, "float32", "cpu")
    layered = measure_behaviour(streamed, tokenizer, harmful, harmless, *settings)
    assert layered.streamed and not memory.streamed
    assert (
        layered.harmful_replies == memory.harmful_replies
        and layered.harmful_refused == memory.harmful_refused
    )
    assert layered.harmless_replies == memory.harmless_replies
    assert any(memory.harmful_refused) and any(len(r.split()) > 1 for r in memory.harmless_replies)
    assert streamed.weight_reads <= STEPS + 1
