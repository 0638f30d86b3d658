"""The search's parts: the front and the choice, trial plans from kernels, MoE expert profiling exactly as
the router chooses, trial scores equal in memory and layer-streamed, and a study that resumes after a kill
and continues with more trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import nullcontext

import pytest
import torch
from fixtures import ROOT
from numerics import accumulation_length, kl_atol, logits_rtol

from abliterate.config import Ablation, Evaluation, Runtime, Search, Selection, Template
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.edit.ablate import load_inputs
from abliterate.edit.matching import configured_plan, plan_matches, resolve_plan
from abliterate.errors import AbliterateError
from abliterate.measure.prompts import load_prompts
from abliterate.search.scoring import TrialScore
from abliterate.search.space import MIN_SCALE, default_params, plan_for, search_space
from abliterate.search.study import choose, pareto, run_study, search_front, wilson_bounds


def record(trial: int, refusal: float, kl: float) -> dict:
    return {"trial": trial, "refusal_rate": refusal, "kl": kl, "parameters": {}}


def test_front_and_choice():
    records = [
        record(0, 0.0, 0.02),
        record(1, 0.1, 0.001),
        record(2, 0.0, 0.005),
        record(3, 0.2, 0.0005),
        record(4, 0.1, 0.002),
        record(5, 0.0, 0.005),
    ]
    assert [r["trial"] for r in pareto(records)] == [2, 5, 1, 3]  # 0 and 4 are beaten; 2 and 5 tie
    # fewest refusals under the bound, then the lower KL, earlier
    assert choose(records, Search(kl_max=0.01))["trial"] == 2
    assert choose(records, Search(kl_max=0.004))["trial"] == 1
    assert choose(records, Search(kl_max=0.01, trial=4))["trial"] == 4  # any complete trial by number
    with pytest.raises(AbliterateError, match="lowest is 0.0005"):
        choose(records, Search(kl_max=0.0001))
    with pytest.raises(AbliterateError, match="not a complete trial"):
        choose(records, Search(kl_max=0.01, trial=9))


def scored(trial: int, refusals: int, margin: float, kl: float, prompts: int = 36) -> dict:
    """A trial as the study records it: its objective is (refusals + margin) / prompts (scoring.py)."""
    score = TrialScore(refusals / prompts, kl, refusals, prompts, margin=margin)
    return {
        **record(trial, score.refusal_rate, kl),
        "objective": score.objective,
        "refusals": refusals,
        "prompts": prompts,
    }


def test_margin_ranks_trials_that_refuse_none_and_the_kl_bound_still_rules():
    """The objective keeps its resolution at zero refusals: between two trials without a refusal the one
    further from refusing wins unless its KL is over the bound; one refusal more always loses."""
    weak, strong, stronger = scored(1, 0, 0.30, 0.002), scored(2, 0, 0.02, 0.006), scored(3, 1, 0.01, 0.001)
    at_floor, cheaper = scored(4, 0, 0.01, 0.008), scored(5, 0, 0.01, 0.004)
    records = [weak, strong, stronger]
    assert choose(records, Search(kl_max=0.01))["trial"] == 2  # more margin, KL allowed
    assert choose(records, Search(kl_max=0.004))["trial"] == 1  # the bound forbids the stronger one
    assert [r["trial"] for r in search_front(records)] == [2, 1, 3]
    # every prompt under the floor: margin is the floor for both, the lower KL wins
    assert choose([at_floor, cheaper], Search())["trial"] == 5
    # a refusal weighs more than any margin
    assert scored(6, 1, 0.0, 0.0)["objective"] > scored(7, 0, 0.999, 0.0)["objective"]


def test_wilson_bounds():
    """The Wilson score interval: 0 of 36 at 95 % allows up to z^2 / (36 + z^2) = 0.0964 (z = 1.95996)."""
    z = 1.959963984540054
    assert wilson_bounds(0, 36, 0.95) == pytest.approx((0.0, z * z / (36 + z * z)), abs=1e-12)
    low, high = wilson_bounds(18, 36, 0.95)
    assert low == pytest.approx(1 - high, abs=1e-12) and high == pytest.approx(
        0.5 + z / (1 + z * z / 36) * (0.25 / 36 + z * z / (4 * 36 * 36)) ** 0.5, abs=1e-12
    )
    assert wilson_bounds(0, 0, 0.95) == (0.0, 1.0)


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    """The demo model with a directions file measured on a few prompts (selected position 3)."""
    from abliterate.config import Measurement
    from abliterate.measure.directions import compute_directions, write_directions
    from abliterate.measure.means import measure_checkpoint
    from abliterate.weights.checkpoint import build_inventory

    harmful = load_prompts(prompt_file("demo", "harmful", "train"))[:48]
    harmless = load_prompts(prompt_file("demo", "harmless", "train"))[:48]
    runtime = Runtime(device="cpu", dtype="float32", batch_size=16)
    measured = measure_checkpoint(
        str(DEMO_MODEL_DIR), harmful, harmless, Measurement(), Template(), runtime, False
    )
    path = write_directions(
        tmp_path_factory.mktemp("directions"),
        compute_directions(measured, "projected"),
        measured,
        build_inventory(DEMO_MODEL_DIR).fingerprint,
        3,
    )
    return path, load_inputs(DEMO_MODEL_DIR, path)


def test_trial_plans_follow_the_kernels_and_trial_zero_is_runs_choice(demo_inputs):
    _, inputs = demo_inputs
    space = search_space(
        inputs,
        Search(components=["default", "router_bias"], methods=["plain", "norm_preserving", "projected"]),
        Selection(skip_last_fraction=0.2),
        [(2, 6), (4, 5), (1, 3)],
    )
    assert space.positions == (
        1.0,
        4.0,
    )  # position 0 is zero on the demo (every prompt ends alike); 5 is skipped
    assert dict(space.groups)["mlp_down"] == (0,) and dict(space.groups)["expert_down"] == (1, 2, 3, 4)
    # trial 0: every group at 1 everywhere, the selected position, plain: the very tensors and scales of run's plan
    zero = resolve_plan(plan_for(default_params(space), space), inputs)
    run = configured_plan(inputs, Ablation(), "auto")
    edits = {m.tensor.name: (m.scale, m.method) for m in plan_matches(zero, inputs.inventory)}
    assert edits == {m.tensor.name: (m.scale, m.method) for m in plan_matches(run, inputs.inventory)}
    assert zero.direction_position == run.selected_position == 3

    params = {
        **default_params(space),
        "direction_position": 2.5,
        "method": "norm_preserving",
        "attn_out.center": 1.0,
        "attn_out.width": 0.5,
        "attn_out.peak": 1.2,
        "attn_out.floor": 0.0,
        "router.floor": 0.0,
        "router.width": 0.5,
        "router.center": 4.0,
        "router.peak": 0.6,
        "router_bias.experts": 2,
        "router_bias.shift": 0.4,
    }
    plan = plan_for(params, space)
    scales = plan.to_dict()["role_scales"]
    # exp(-((i - 1) / 0.5)^2 / 2) * 1.2: 1.2 at layer 1, 0.162 at 0 and 2, under MIN_SCALE beyond
    assert scales["attn_out"] == {"0": 0.1624, "1": 1.2, "2": 0.1624, "3": 0.0, "4": 0.0}
    assert scales["router"] == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0812, "4": 0.6}
    assert all(v == 0 or v >= MIN_SCALE for role in scales.values() for v in role.values())
    assert plan.direction_position == 2.5 and plan.method == "norm_preserving"
    assert plan.to_dict()["router_bias"] == {"2": {"6": -0.4}, "4": {"5": -0.4}}
    names = {m.tensor.name for m in plan_matches(resolve_plan(plan, inputs), inputs.inventory)}
    assert (
        "model.layers.3.self_attn.o_proj.weight" not in names
        and "model.layers.2.mlp.gate.weight" not in names
    )
    assert "model.layers.4.mlp.gate.e_score_correction_bias" in names


def glm_route(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int
) -> torch.Tensor:
    """GLM-4.5's expert choice written out from its definition (not transformers' code): sigmoid scores plus
    the correction bias; each group scored by the sum of its two best; the best `topk_group` groups kept;
    the `top_k` best experts of those. [T, top_k] expert indices."""
    scores = torch.sigmoid(hidden.detach().double() @ weight.detach().double().T) + bias.detach().double()
    tokens, experts = scores.shape
    per_group = experts // n_group
    chosen = []
    for t in range(tokens):
        groups = scores[t].view(n_group, per_group)
        group_score = groups.sort(descending=True).values[:, :2].sum(-1)
        kept = group_score.argsort(descending=True)[:topk_group]
        candidates = [
            (float(scores[t, g * per_group + e]), g * per_group + e)
            for g in kept.tolist()
            for e in range(per_group)
        ]
        chosen.append([e for _, e in sorted(candidates, reverse=True)[:top_k]])
    return torch.tensor(chosen)


def test_expert_profile_is_the_routers_own_choice(tmp_path):
    """The profile counts, per layer and expert, the real tokens whose chosen experts include it: equal to a
    direct computation of GLM's group-limited top-k with the correction bias on every prompt alone (no
    padding), and the same when the model is layer-streamed (one read of the weights)."""
    from tiny_chat_model import HARMFUL, HARMLESS, build_tiny_chat_model

    from abliterate.inference.loading import load_model
    from abliterate.inference.runner import InMemoryForward, StreamedForward
    from abliterate.measure.chat import encode_prompts
    from abliterate.search.experts import profile_experts
    from abliterate.weights.profiles import GLM4_MOE

    src = build_tiny_chat_model(
        tmp_path / "tiny", router_bias=True, n_routed_experts=8, n_group=4, topk_group=2
    )
    model, tokenizer = load_model(src)
    harmful, harmless = (
        encode_prompts(tokenizer, HARMFUL, Template(), "harmful"),
        encode_prompts(tokenizer, HARMLESS, Template(), "harmless"),
    )
    profile = profile_experts(
        InMemoryForward(model), tokenizer, harmful, harmless, GLM4_MOE, batch_size=3, progress=False
    )
    assert profile.layers == [1, 2] and profile.experts == 8 and profile.chosen == 2
    config = model.config
    for label, encoded, shares in (
        ("harmful", harmful, profile.harmful),
        ("harmless", harmless, profile.harmless),
    ):
        counts = torch.zeros(len(profile.layers), 8, dtype=torch.float64)
        inputs: dict[int, torch.Tensor] = {}

        def keep(i: int, store: dict = inputs):
            return lambda _m, args: store.__setitem__(i, args[0].reshape(-1, config.hidden_size))

        handles = [model.model.layers[i].mlp.gate.register_forward_pre_hook(keep(i)) for i in profile.layers]
        try:
            for ids in encoded:  # one prompt at a time: no padding at all
                with torch.inference_mode():
                    model(input_ids=torch.tensor([ids]))
                for row, i in enumerate(profile.layers):
                    gate = model.model.layers[i].mlp.gate
                    chosen = glm_route(
                        inputs[i],
                        gate.weight,
                        gate.e_score_correction_bias,
                        config.n_group,
                        config.topk_group,
                        config.num_experts_per_tok,
                    )
                    counts[row] += torch.bincount(chosen.flatten(), minlength=8).double()
        finally:
            for handle in handles:
                handle.remove()
        tokens = sum(len(ids) for ids in encoded)
        assert profile.tokens[label] == tokens
        assert torch.equal(torch.tensor(shares, dtype=torch.float64), counts / tokens), label
    assert float(profile.specificity().abs().sum()) > 0
    ranked = profile.most_specific()
    assert ranked == sorted(ranked, key=lambda r: (-r[2], r[0], r[1])) and all(r[2] > 0 for r in ranked)
    streamed = profile_experts(
        StreamedForward(src, "float32", "cpu"),
        tokenizer,
        harmful,
        harmless,
        GLM4_MOE,
        batch_size=3,
        progress=False,
    )
    assert (streamed.harmful, streamed.harmless) == (profile.harmful, profile.harmless)


def plan_delta(model, encoded, edit, n: int) -> float:
    """delta of tests/numerics.py for the model with a plan applied: logits_rtol with four projected writes
    and inputs per layer (attention, routed and shared experts, router) times the largest first-token |z|."""
    from abliterate.inference.loading import length_sorted_batches

    largest = 0.0
    with edit.applied(model) if edit is not None else nullcontext(), torch.inference_mode():
        for batch in length_sorted_batches(encoded, 8, 0):
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                logits_to_keep=1,
            ).logits[:, -1]
            largest = max(largest, float(logits.double().norm(dim=-1).max()))
    return logits_rtol(model.config.num_hidden_layers, n, 4) * largest


def test_trial_scores_are_equal_in_memory_and_layer_streamed(demo_inputs):
    """Two trials (run's choice, and norm-preserving kernels with suppressed experts) scored together in
    the streamed passes and one after the other in memory: the same refusals (every greedy reply token's
    margin is far above the rounding bound on the trained demo model) and KLs within kl_atol's bound."""
    from abliterate.edit.inference_edit import PlanEdit, storage_dtypes
    from abliterate.inference.loading import load_model
    from abliterate.inference.runner import InMemoryForward, StreamedForward
    from abliterate.inference.scores import first_token_logprobs
    from abliterate.search.scoring import TrialScorer
    from abliterate.weights.profiles import GLM4_MOE

    _, inputs = demo_inputs
    space = search_space(
        inputs,
        Search(components=["default", "router_bias"], methods=["plain", "norm_preserving"]),
        Selection(skip_last_fraction=0.2),
        [(2, 6), (4, 5)],
    )
    params = [
        default_params(space),
        {
            **default_params(space),
            "method": "norm_preserving",
            "direction_position": 2.5,
            "expert_down.peak": 1.3,
            "expert_down.floor": 0.4,
            "expert_down.width": 1.0,
            "router_bias.experts": 2,
            "router_bias.shift": 0.5,
        },
    ]
    storage = storage_dtypes(inputs.inventory)
    edits = [
        PlanEdit(resolve_plan(plan_for(p, space), inputs), inputs.directions, GLM4_MOE, storage)
        for p in params
    ]
    harmful = load_prompts(prompt_file("demo", "harmful", "val"))[:12]
    harmless = load_prompts(prompt_file("demo", "harmless", "val"))[:12]
    search = Search(reply_tokens=6)
    settings = (search, Evaluation(), Template(), Runtime(batch_size=8))
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    memory = TrialScorer(InMemoryForward(model), tokenizer, harmful, harmless, *settings)
    streamed_forward = StreamedForward(DEMO_MODEL_DIR, "float32", "cpu")
    streamed = TrialScorer(streamed_forward, tokenizer, harmful, harmless, *settings)
    reads = streamed_forward.weight_reads
    got, want = streamed.score(edits), memory.score(edits)
    # one pass for both trials' KL, one per reply token for both trials' replies (fewer: refusals stop early)
    assert streamed_forward.weight_reads - reads <= 1 + search.reply_tokens
    assert memory.baseline.refusals == streamed.baseline.refusals == len(harmful)
    n = accumulation_length(
        DEMO_MODEL_DIR, max(len(x) for x in memory.harmful + memory.harmless) + search.reply_tokens
    )
    d0 = plan_delta(model, memory.harmless, None, n)
    for edit, g, w in zip(edits, got, want, strict=True):
        assert (g.refusals, g.prompts) == (w.refusals, w.prompts)
        with edit.applied(model), torch.inference_mode():
            lp = first_token_logprobs(model, memory.harmless, 8, memory.pad_id)
        bound = kl_atol(d0, plan_delta(model, memory.harmless, edit, n), memory.baseline_logprobs, lp)
        assert abs(g.kl - w.kl) <= bound, (g, w, bound)
    assert want[0].refusals == 0 and want[0].kl > 0


def test_greedy_first_step_gives_the_first_token_logprobs_and_the_same_replies(demo_inputs):
    """The search reads the harmful prompts' first-token log-probabilities from the first step of its greedy
    replies instead of another pass: the replies are those of a plain `greedy_variants`, and the
    log-probabilities those of `first_token_logprobs` (the same batches and positions: equal on CPU), in
    memory and layer-streamed, for the model as it is and under a trial's edit."""
    from abliterate.edit.inference_edit import PlanEdit, storage_dtypes
    from abliterate.inference.loading import load_model, pad_token_id
    from abliterate.inference.runner import InMemoryForward, StreamedForward, stop_ids
    from abliterate.measure.chat import encode_prompts
    from abliterate.weights.profiles import GLM4_MOE

    _, inputs = demo_inputs
    space = search_space(inputs, Search(), Selection(skip_last_fraction=0.2))
    edit = PlanEdit(
        resolve_plan(plan_for(default_params(space), space), inputs),
        inputs.directions,
        GLM4_MOE,
        storage_dtypes(inputs.inventory),
    )
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    prompts = load_prompts(prompt_file("demo", "harmful", "val"))[:20]
    encoded = encode_prompts(tokenizer, prompts, Template(), "harmful", new_tokens=4)
    pad = pad_token_id(tokenizer)
    for forward in (InMemoryForward(model), StreamedForward(DEMO_MODEL_DIR, "float32", "cpu")):
        stops = stop_ids(forward.generation_eos, tokenizer)
        plain = forward.greedy_variants(encoded, [None, edit], 4, 8, pad, stops)
        replies, firsts = forward.greedy_variants(
            encoded, [None, edit], 4, 8, pad, stops, first_logprobs=True
        )
        assert replies == plain and plain[0] != plain[1]
        for v, _, lp in forward.first_token_logprobs({"harmful": encoded}, [None, edit], 8, pad):
            assert firsts[v].dtype == torch.float64 and torch.equal(firsts[v], lp)


STUDY_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from abliterate.search import study as search
    from abliterate.demo import DEMO_MODEL_DIR, prompt_file
    from abliterate.measure.prompts import load_prompts
    harmful = load_prompts(prompt_file("demo", "harmful", "val"))[:6]
    harmless = load_prompts(prompt_file("demo", "harmless", "val"))[:6]
    from abliterate.config import Evaluation, Runtime, Search, Selection, Template
    settings = Search(trials=int(sys.argv[3]), components=["attn_out", "expert_down", "router"],
                      methods=["plain", "projected"], startup_trials=3, study="killed", reply_tokens=3)
    score, calls = search.TrialScorer.score, []
    def paced(self, edits):  # after three trials, a pause inside the fourth, while it is running: the kill lands there
        calls.append(1)
        if len(calls) == 5:  # the unmodified model's score is the first call
            print("scoring", flush=True)
            time.sleep(600)
        return score(self, edits)
    search.TrialScorer.score = paced
    search.run_study(DEMO_MODEL_DIR, sys.argv[1], harmful, harmless, settings, Selection(), Template(),
                     Evaluation(), Runtime(batch_size=8), sys.argv[2],
                     on_trial=lambda result: print("trial", result.number, flush=True))
""")


@pytest.mark.slow
def test_a_killed_search_resumes_and_a_rerun_continues(demo_inputs, tmp_path):
    """A search in a subprocess, killed (SIGKILL) after a few trials, resumes from the stored trials: the
    finished ones are kept as they are, the one it was running is marked failed and its parameters are
    tried again, and the study ends with the trials asked for; a rerun with more trials adds exactly those."""
    import optuna
    from optuna.trial import TrialState

    path, _ = demo_inputs
    root = tmp_path / "mlruns"
    script = tmp_path / "study.py"
    script.write_text(STUDY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(root), "40"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    deadline = time.monotonic() + 600
    while "scoring" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "the search exited early"
        seen.append(line.split(" ")[0].strip())
    assert seen.count("trial") == 3 and seen[-1] == "scoring", seen
    proc.send_signal(
        signal.SIGKILL
    )  # while the fourth trial is scored: its parameters drawn, its score not told
    proc.wait(timeout=60)
    storage = f"sqlite:///{root / 'search.db'}"
    before = optuna.load_study(study_name="killed", storage=storage).get_trials()
    finished = {t.number: (t.values, t.params) for t in before if t.state == TrialState.COMPLETE}
    running = [t for t in before if t.state == TrialState.RUNNING]
    assert len(finished) == 3 and finished[0][1]["method"] == "plain"  # trial 0: run's automatic choice
    assert len(running) == 1 and running[0].params

    harmful = load_prompts(prompt_file("demo", "harmful", "val"))[:6]
    harmless = load_prompts(prompt_file("demo", "harmless", "val"))[:6]
    settings = Search(
        trials=len(finished) + 2,
        components=["attn_out", "expert_down", "router"],
        methods=["plain", "projected"],
        startup_trials=3,
        study="killed",
        reply_tokens=3,
    )
    sections = (Selection(), Template(), Evaluation(), Runtime(batch_size=8))
    result = run_study(DEMO_MODEL_DIR, path, harmful, harmless, settings, *sections, root)
    assert result["resumed_from"] == len(finished) and len(result["trials"]) == len(finished) + 2
    assert result["stale_trials"] == [t.number for t in running]
    after = optuna.load_study(study_name="killed", storage=storage).get_trials()
    for number, (values, params) in finished.items():
        assert (after[number].values, after[number].params) == (values, params)  # kept as they were
    for stale in running:
        assert after[stale.number].state == TrialState.FAIL
        retried = [t for t in after if t.number > stale.number and t.state == TrialState.COMPLETE]
        assert any(t.params == stale.params for t in retried)  # its parameters were tried again

    settings = settings.model_copy(update={"trials": len(finished) + 4})
    more = run_study(DEMO_MODEL_DIR, path, harmful, harmless, settings, *sections, root)
    assert len(more["new_trials"]) == 2 and len(more["trials"]) == len(finished) + 4
    assert json.dumps(more["trials"][: len(result["trials"])], sort_keys=True) == json.dumps(
        result["trials"], sort_keys=True
    )
    # the same study name for another search (other reply lengths: scores that would not compare) is refused
    with pytest.raises(AbliterateError, match="made by another search \\(scoring differ\\)"):
        run_study(
            DEMO_MODEL_DIR,
            path,
            harmful,
            harmless,
            settings.model_copy(update={"reply_tokens": 5}),
            *sections,
            root,
        )
