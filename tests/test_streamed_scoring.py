"""Layer-streamed selection and evaluation equal the in-memory ones: the same choice, and figures within
the float32 bounds of tests/numerics.py, on the demo model and on GLM-4.5-Air's layout.

The bounds: both paths evaluate the same first-token logits z, so they differ by at most
delta = logits_rtol(layers, n, projections) |z| per entry (two projections per layer when a direction
is ablated), and every figure is a float64 function of the log-softmax with a bound in delta
(numerics.logodds_atol, kl_atol). A choice or a greedy token can only differ where two candidates lie
closer than those bounds: the tests check that they do not, and then that the choices agree.
"""

from __future__ import annotations

import pytest
import torch
from numerics import (
    accumulation_length,
    evaluation_bounds,
    first_token_delta,
    greedy_margin,
    kl_atol,
    logodds_atol,
    logprob_atol,
)
from tiny_chat_model import HARMFUL, HARMLESS, write_tiny_glm_air

from abliterate.check.evaluate import evaluate_model
from abliterate.config import Evaluation, Measurement, Runtime, Selection, Template
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.edit.ablate import ablate_checkpoint
from abliterate.edit.inference_edit import DirectionEdit
from abliterate.inference.loading import load_model, pad_token_id
from abliterate.inference.refusal import is_refusal
from abliterate.inference.runner import InMemoryForward, StreamedForward, stop_ids
from abliterate.measure.chat import encode_prompts
from abliterate.measure.direction_file import save_directions
from abliterate.measure.directions import compute_directions
from abliterate.measure.means import measure
from abliterate.measure.prompts import load_prompts
from abliterate.select.selection import select_direction

MEASURED = (Measurement(), Template())  # the sections that encode the prompts as measured
RUNTIME = Runtime(device="cpu", dtype="float32", batch_size=8)


def encode(tokenizer, prompts):
    return encode_prompts(tokenizer, prompts, Template(), "prompt")


def select(model, tokenizer, directions, harmful, harmless, selection=Selection(), runtime=RUNTIME):
    return select_direction(
        model,
        tokenizer,
        directions,
        harmful,
        harmless,
        *MEASURED,
        selection,
        Evaluation(),
        runtime,
        progress=False,
    )


def demo_prompts(kind: str, split: str, n: int) -> list[str]:
    return load_prompts(prompt_file("demo", kind, split))[:n]


def delta(model, encoded, direction, n: int) -> float:
    return first_token_delta(model, encoded, n, direction)


def assert_same_selection(model, tokenizer, directions, harmful_val, harmless_val, memory, streamed, n):
    """Same refusal tokens, every score within its bound, and the same choice where the bounds decide it."""
    assert memory.refusal_token_ids == streamed.refusal_token_ids
    assert (memory.refusal_tokens_source, memory.refusals_found) == (
        streamed.refusal_tokens_source,
        streamed.refusals_found,
    )
    assert [c.position for c in memory.candidates] == [c.position for c in streamed.candidates]
    assert memory.kl_prompts == streamed.kl_prompts
    harmful = encode(tokenizer, harmful_val)
    harmless = encode(tokenizer, harmless_val)
    everything = harmful + harmless
    d0 = delta(model, everything, None, n)
    assert abs(memory.baseline_refusal_score - streamed.baseline_refusal_score) <= logodds_atol(d0)
    forward = InMemoryForward(model)
    vectors = [None] + [directions.direction[c.position].float() for c in memory.candidates]
    variants = [None] + [DirectionEdit(r) for r in vectors[1:]]
    logprobs = {
        v: lp for v, label, lp in forward.first_token_logprobs({"harmless": harmless}, variants, 8, 0)
    }
    answered = ~torch.isin(logprobs[0].argmax(-1), torch.tensor(memory.refusal_token_ids))
    bounds = {}
    for v, (m, s) in enumerate(zip(memory.candidates, streamed.candidates, strict=True), start=1):
        dv = delta(model, everything, vectors[v], n)
        score_bound = logodds_atol(dv)
        kl_bound = kl_atol(d0, dv, logprobs[0][answered], logprobs[v][answered])
        assert abs(m.refusal_score - s.refusal_score) <= score_bound, (m, s, score_bound)
        assert abs(m.kl - s.kl) <= kl_bound, (m, s, kl_bound)
        bounds[m.position] = (score_bound, kl_bound)
    # The choice: the lowest refusal score under the KL threshold. It can only differ if a candidate lies
    # within the bounds of the threshold or of the winner's score.
    threshold = memory.kl_threshold
    allowed = [c for c in memory.candidates if c.kl <= threshold]
    assert all(abs(c.kl - threshold) > bounds[c.position][1] for c in memory.candidates), (
        bounds,
        memory.candidates,
    )
    best = min(allowed, key=lambda c: c.refusal_score)
    for c in allowed:
        if c is not best:
            assert c.refusal_score - best.refusal_score > bounds[c.position][0] + bounds[best.position][0], (
                c,
                best,
            )
    assert memory.position == streamed.position == best.position


# ------------------------------------------------------------------ the demo model


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    measured = measure(
        model,
        tokenizer,
        demo_prompts("harmful", "train", 64),
        demo_prompts("harmless", "train", 64),
        *MEASURED,
        RUNTIME,
        progress=False,
    )
    return model, tokenizer, compute_directions(measured, Measurement().direction_method)


def demo_terms(tokenizer, prompts) -> int:
    longest = max(len(ids) for ids in encode(tokenizer, prompts))
    return accumulation_length(DEMO_MODEL_DIR, longest)


def test_streamed_selection_equals_in_memory_on_demo(demo):
    model, tokenizer, directions = demo
    harmful_val, harmless_val = demo_prompts("harmful", "val", 32), demo_prompts("harmless", "val", 32)
    three = Selection(shortlist="3")  # three candidates scored on every prompt: three to compare
    memory = select(model, tokenizer, directions, harmful_val, harmless_val, three)
    streamed = select(
        StreamedForward(DEMO_MODEL_DIR, "float32", "cpu"),
        tokenizer,
        directions,
        harmful_val,
        harmless_val,
        three,
    )
    # the demo model's own refusals start with "I": found from its replies, not from the fixed list
    assert memory.refusal_tokens == ["I"] and memory.refusal_tokens_source == "replies"
    assert memory.refusals_found == len(harmful_val)
    assert (streamed.streamed, memory.streamed) == (True, False)
    # One pass over the weights per probe token until every reply refuses or ends (the demo says "I
    # cannot ..." : 2 tokens; the first also gives the baseline's harmful first tokens), then one per
    # scoring round: the baseline's harmless prompts and all 4 candidates on the first prompts, then the
    # shortlist's 3 on the rest (tests/test_shortlist.py).
    encoded = encode(tokenizer, harmful_val)
    stops = stop_ids(model.generation_config.eos_token_id, tokenizer)
    replies = InMemoryForward(model).greedy(
        encoded, Evaluation().refusal_probe_tokens, 8, pad_token_id(tokenizer), stops
    )
    needed = max(
        next((k for k in range(1, len(r) + 1) if is_refusal(tokenizer.decode(r[:k]))), len(r))
        for r in replies
    )
    assert needed == 2 < Evaluation().refusal_probe_tokens
    assert streamed.weight_reads == needed + 2 and len(streamed.candidates) == 3
    n = demo_terms(tokenizer, harmful_val + harmless_val)
    assert_same_selection(model, tokenizer, directions, harmful_val, harmless_val, memory, streamed, n)


def test_streamed_greedy_replies_equal_generate(demo):
    """Greedy tokens, recomputed streamed per token, equal model.generate's wherever each step's top-two
    margin exceeds twice the log-probability bound (on the trained demo model: every step)."""
    model, tokenizer, _ = demo
    prompts = demo_prompts("harmful", "val", 8) + demo_prompts("harmless", "val", 8)
    encoded = encode(tokenizer, prompts)
    stops = stop_ids(model.generation_config.eos_token_id, tokenizer)
    memory = InMemoryForward(model).greedy(encoded, 6, 8, pad_token_id(tokenizer), stops)
    streamed = StreamedForward(DEMO_MODEL_DIR, "float32", "cpu").greedy(
        encoded, 6, 8, pad_token_id(tokenizer), stops
    )
    n = demo_terms(tokenizer, prompts) + 6
    forward = InMemoryForward(model)
    for step in range(6):
        prefixes = [
            ids + reply[:step] for ids, reply in zip(encoded, memory, strict=True) if len(reply) >= step
        ]
        ((_, _, logprobs),) = list(forward.first_token_logprobs({"x": prefixes}, [None], 8, 0))
        bound = logprob_atol(delta(model, prefixes, None, n))
        assert bool((greedy_margin(logprobs) > 2 * bound).all()), step
    assert memory == streamed
    assert all(tokenizer.decode(r).startswith("I") for r in memory[:8])  # the harmful ones are refused


@pytest.fixture(scope="module")
def demo_ablated(demo, tmp_path_factory):
    """The demo model with its selected direction projected out of the weights, by the engine."""
    model, tokenizer, directions = demo
    chosen = select(
        model, tokenizer, directions, demo_prompts("harmful", "val", 32), demo_prompts("harmless", "val", 32)
    )
    root = tmp_path_factory.mktemp("ablated")
    path = save_directions(
        root / "directions.safetensors", directions.direction.float(), {"selected_position": chosen.position}
    )
    ablate_checkpoint(DEMO_MODEL_DIR, path, root / "out", progress=False, log=lambda _: None)
    return root / "out"


def test_streamed_evaluation_equals_in_memory_on_demo(demo, demo_ablated):
    """Before and after first-token figures, from one streamed read of each model, against the in-memory
    evaluation; the refusal tokens are the baseline's own either way."""
    model, tokenizer, _ = demo
    harmful, harmless = demo_prompts("harmful", "test", 24), demo_prompts("harmless", "test", 24)
    settings = Evaluation(max_new_tokens=8), Template(), Runtime(device="cpu", dtype="float32", batch_size=8)
    memory = evaluate_model(
        demo_ablated, harmful, harmless, *settings, False, baseline_dir=DEMO_MODEL_DIR, progress=False
    )
    # full replies `auto`: none for a layer-streamed model
    streamed = evaluate_model(
        demo_ablated, harmful, harmless, *settings, True, baseline_dir=DEMO_MODEL_DIR, progress=False
    )
    assert memory.full_replies and not streamed.full_replies and streamed.streamed
    assert streamed.refusal_rate_harmful is None and not streamed.examples
    assert memory.refusal_tokens == streamed.refusal_tokens == ["I"]
    assert memory.refusal_tokens_source == streamed.refusal_tokens_source == "replies"
    bounds = evaluation_bounds(DEMO_MODEL_DIR, demo_ablated, harmful, harmless)
    for name, bound in bounds.items():
        assert abs(getattr(memory, name) - getattr(streamed, name)) <= bound, (name, bound)
    # the trained model's greedy first tokens are never close calls: its rates must agree exactly
    assert all(bounds[name] == 0 for name in bounds if "rate" in name)
    assert (
        memory.baseline_first_token_refusal_rate_harmful == 1.0
        and memory.first_token_refusal_rate_harmful == 0.0
    )


@pytest.mark.slow
def test_full_replies_of_an_over_budget_model_run_layer_streamed(demo, demo_ablated, tmp_path):
    """Asked for, full replies of a streamed model come from the runner's cached layer-streamed greedy:
    the same replies and refusal rates as in memory, and what they read stated."""
    harmful, harmless = demo_prompts("harmful", "test", 6), demo_prompts("harmless", "test", 6)
    evaluation, template = Evaluation(max_new_tokens=8, full_replies="always"), Template()
    runtime = Runtime(device="cpu", dtype="float32", batch_size=8)
    memory = evaluate_model(
        demo_ablated,
        harmful,
        harmless,
        evaluation,
        template,
        runtime,
        False,
        baseline_dir=DEMO_MODEL_DIR,
        progress=False,
    )
    offloaded = evaluate_model(
        demo_ablated,
        harmful,
        harmless,
        evaluation,
        template,
        runtime.model_copy(update={"memory_budget": str(300 << 10)}),
        True,
        baseline_dir=DEMO_MODEL_DIR,
        progress=False,
    )
    assert offloaded.full_replies and offloaded.streamed
    assert memory.replies_cost is None and "at most 8 passes" in offloaded.replies_cost
    assert [(r.response_before, r.response_after) for r in offloaded.examples] == [
        (r.response_before, r.response_after) for r in memory.examples
    ]
    assert (offloaded.refusal_rate_harmful, offloaded.baseline_refusal_rate_harmful) == (0.0, 1.0)
    assert (memory.refusal_rate_harmful, memory.baseline_refusal_rate_harmful) == (0.0, 1.0)


# ------------------------------------------------------------------ GLM-4.5-Air's layout


@pytest.fixture(scope="module", params=[False, True], ids=["per-expert", "fused"])
def glm_air(request, tmp_path_factory):
    """GLM-4.5-Air's names and structure (dense layer 0, sigmoid routers with correction bias, shared
    expert, q/k/v biases, MTP layer) at small widths, sharded, with a chat tokenizer."""
    return write_tiny_glm_air(tmp_path_factory.mktemp("glm-scoring") / "glm-air", request.param)


def test_streamed_selection_equals_in_memory_on_glm_air_layout(glm_air):
    """Random weights refuse nothing, so the refusal tokens are the markers' openers ("I"); every
    candidate's scores within the bounds, and the same choice."""
    model, tokenizer = load_model(glm_air)
    measured = measure(model, tokenizer, HARMFUL, HARMLESS, *MEASURED, RUNTIME, progress=False)
    directions = compute_directions(measured, Measurement().direction_method)
    chooser = Selection(kl_threshold=1e9, skip_last_fraction=0.0)
    runtime = RUNTIME.model_copy(update={"batch_size": 3})
    memory = select(model, tokenizer, directions, HARMFUL, HARMLESS, chooser, runtime)
    streamed = select(
        StreamedForward(glm_air, "float32", "cpu"), tokenizer, directions, HARMFUL, HARMLESS, chooser, runtime
    )
    assert memory.refusal_tokens_source == "markers" and memory.refusal_tokens == ["I"]
    assert len(memory.candidates) == 4  # positions 1-4 (position 0: every prompt ends in the same token)
    n = accumulation_length(glm_air, max(len(x) for x in encode(tokenizer, HARMFUL + HARMLESS)))
    assert_same_selection(model, tokenizer, directions, HARMFUL, HARMLESS, memory, streamed, n)


def test_streamed_evaluation_equals_in_memory_on_glm_air_layout(glm_air, tmp_path):
    """Before (the layout) and after (the engine's output for a random direction), streamed and in memory:
    every first-token figure within its bound; the random model refuses nothing, so the refusal tokens
    are the markers' openers for both."""
    direction = torch.nn.functional.normalize(
        torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    path = save_directions(tmp_path / "directions.safetensors", direction, {"selected_position": 2})
    ablate_checkpoint(glm_air, path, tmp_path / "out", progress=False, log=lambda _: None, force=True)
    settings = Evaluation(max_new_tokens=4), Template(), Runtime(device="cpu", dtype="float32", batch_size=3)
    memory = evaluate_model(
        tmp_path / "out", HARMFUL, HARMLESS, *settings, False, baseline_dir=glm_air, progress=False
    )
    streamed = evaluate_model(
        tmp_path / "out", HARMFUL, HARMLESS, *settings, True, baseline_dir=glm_air, progress=False
    )
    assert (
        memory.refusal_tokens == streamed.refusal_tokens == ["I"]
        and streamed.refusal_tokens_source == "markers"
    )
    assert memory.kl_harmless > 0
    for name, bound in evaluation_bounds(glm_air, tmp_path / "out", HARMFUL, HARMLESS).items():
        assert abs(getattr(memory, name) - getattr(streamed, name)) <= bound, (name, bound)
