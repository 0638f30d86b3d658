"""Selection with a prefilter and a shortlist: candidates left out by their measured separation before
any scoring, then ranked out by successive halving on growing prompt subsets, the rest scored on every
validation prompt. The defaults (prefilter 4, shortlist 1) and every smaller prefilter choose what scoring
every candidate on every prompt chooses on the demo model and on the shifted demo. The choice equals scoring every candidate (`shortlist`
all) on the demo model (refusal position 3), on the demo's layers behind one layer that writes nothing
(refusal position 4), and on a random model whose choice lies elsewhere; fewer candidates are scored
on every prompt, and the ones left out are recorded with the round and the prompts that ranked them out.
"""

from __future__ import annotations

import pytest
import torch
from tiny_chat_model import HARMFUL, HARMLESS, build_tiny_chat_model
from transformers import AutoTokenizer, Glm4MoeConfig, Glm4MoeForCausalLM

from abliterate.config import Evaluation, Measurement, Runtime, Selection, Template
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.errors import AbliterateError
from abliterate.inference.loading import load_model
from abliterate.inference.runner import StreamedForward
from abliterate.measure.directions import compute_directions
from abliterate.measure.means import measure
from abliterate.measure.prompts import load_prompts, split_prompts
from abliterate.select.selection import (
    candidate_positions,
    halving_rounds,
    prefilter,
    select_direction,
    separation,
)

RUNTIME = Runtime(device="cpu", dtype="float32")
MEASURED = (Measurement(), Template())
EVERYTHING = {"shortlist": "all", "prefilter": "all"}  # every candidate scored on every prompt


def choose(model, tokenizer, directions, harmful, harmless, selection):
    return select_direction(
        model,
        tokenizer,
        directions,
        harmful,
        harmless,
        *MEASURED,
        selection,
        Evaluation(),
        RUNTIME,
        progress=False,
    )


def demo_split() -> tuple[list[str], list[str], list[str], list[str]]:
    """The flow's prompts for the demo model: a seeded quarter of each training set is validation."""
    load = lambda kind: load_prompts(prompt_file("demo", kind, "train"))  # noqa: E731
    harmful_val, harmful = split_prompts(load("harmful"), 0.25, 0)
    harmless_val, harmless = split_prompts(load("harmless"), 0.25, 0)
    return harmful, harmless, harmful_val, harmless_val


def directions_of(model, tokenizer, harmful, harmless):
    measured = measure(model, tokenizer, harmful, harmless, *MEASURED, RUNTIME, progress=False)
    return compute_directions(measured, Measurement().direction_method)


def scored_prompts(rounds) -> int:
    """Candidate-prompt pairs the rounds score (each round its candidates on its new prompts)."""
    total, done = 0, 0
    for plan in rounds:
        upto = plan.harmful_prompts + plan.harmless_prompts
        total, done = total + plan.candidates * (upto - done), upto
    return total


def test_halving_rounds():
    # GLM-4.5-Air with the general prompt set: 36 candidates, 69 + 69 validation prompts
    rounds = halving_rounds(36, 69, 69, Selection(shortlist="3"))
    assert [(r.candidates, r.harmful_prompts, r.keep) for r in rounds] == [
        (36, 8, 18),
        (18, 16, 9),
        (9, 32, 5),
        (5, 64, 3),
        (3, 69, 3),
    ]
    assert scored_prompts(rounds) == 2 * (36 * 8 + 18 * 8 + 9 * 16 + 5 * 32 + 3 * 5) == 1502 < 36 * 138
    # the defaults: the prefilter's 4 candidates, halved down to 1 (202 candidate prompts)
    default = halving_rounds(4, 69, 69, Selection())
    assert [(r.candidates, r.harmful_prompts, r.keep) for r in default] == [(4, 8, 2), (2, 16, 1), (1, 69, 1)]
    assert scored_prompts(default) == 2 * (4 * 8 + 2 * 8 + 53) == 202
    assert halving_rounds(36, 69, 69, Selection(shortlist="all"))[0].candidates == 36
    assert len(halving_rounds(36, 69, 69, Selection(shortlist="all"))) == 1
    assert (
        len(halving_rounds(3, 69, 69, Selection(shortlist="3"))) == 1
    )  # no more candidates than the shortlist
    assert (
        len(halving_rounds(36, 8, 8, Selection(shortlist="3"))) == 1
    )  # the first round would take every prompt
    # sets of different sizes: a set's prompts stop at its size while the other grows
    assert [
        (r.harmful_prompts, r.harmless_prompts) for r in halving_rounds(8, 4, 40, Selection(shortlist="1"))
    ] == [
        (4, 8),
        (4, 16),
        (4, 32),
        (4, 40),
    ]
    with pytest.raises(AbliterateError, match="--shortlist .* use all or a number of candidates >= 1"):
        Selection(shortlist="0")
    assert Selection(shortlist=" ALL ").shortlist == "all" and Selection(shortlist=2).shortlist == "2"


def assert_same_choice(every, short, candidates):
    assert short.position == every.position
    assert len(short.candidates) < len(every.candidates) == len(candidates)
    fully = [c.position for c in short.candidates]
    assert sorted(fully + [r.position for r in short.ranked_out]) == candidates
    assert len(short.rounds) > 1 and short.rounds[-1].candidates == len(fully)
    # a ranked-out candidate was scored on the prompts of the round that left it out, fewer than all
    for r in short.ranked_out:
        plan = short.rounds[r.round]
        assert (r.harmful_prompts, r.harmless_prompts) == (plan.harmful_prompts, plan.harmless_prompts)
        assert (
            r.harmful_prompts < short.rounds[-1].harmful_prompts
            or r.harmless_prompts < short.rounds[-1].harmless_prompts
        )
    # the shortlist's candidates are scored on every prompt: the scores of `all` (up to the float32
    # rounding of other batches: the prompts go through in subsets)
    full = {c.position: c for c in every.candidates}
    for c in short.candidates:
        assert c.refusal_score == pytest.approx(full[c.position].refusal_score, rel=1e-4)
        assert c.kl == pytest.approx(full[c.position].kl, rel=1e-2, abs=1e-9)


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    harmful, harmless, harmful_val, harmless_val = demo_split()
    return model, tokenizer, directions_of(model, tokenizer, harmful, harmless), harmful_val, harmless_val


def test_demo_shortlist_chooses_as_all(demo):
    model, tokenizer, directions, harmful_val, harmless_val = demo
    candidates = candidate_positions(directions, 0.2, None)
    every = choose(model, tokenizer, directions, harmful_val, harmless_val, Selection(**EVERYTHING))
    assert every.position == 3 and candidates == [1, 2, 3, 4] and not every.ranked_out
    for shortlist in ("3", "2", "1"):
        short = choose(
            model, tokenizer, directions, harmful_val, harmless_val, Selection(shortlist=shortlist)
        )
        assert_same_choice(every, short, candidates)
        assert len(short.candidates) == int(shortlist)
    default = choose(model, tokenizer, directions, harmful_val, harmless_val, Selection(shortlist="3"))
    assert [r.position for r in default.ranked_out] == [4] and default.ranked_out[0].round == 0
    assert default.as_dict()["ranked_out"][0].keys() == {
        "position",
        "refusal_score",
        "kl",
        "round",
        "harmful_prompts",
        "harmless_prompts",
    }


def test_demo_shortlist_streamed_reads_once_per_round(demo):
    """Layer-streamed, each round is one pass over the weights for all its candidates (the first with the
    unmodified model on every prompt), after the probe's passes; the same choice as in memory."""
    model, tokenizer, directions, harmful_val, harmless_val = demo
    selection = Selection(shortlist="1")
    memory = choose(model, tokenizer, directions, harmful_val, harmless_val, selection)
    forward = StreamedForward(DEMO_MODEL_DIR, "float32", "cpu")
    streamed = choose(forward, tokenizer, directions, harmful_val, harmless_val, selection)
    every = choose(forward, tokenizer, directions, harmful_val, harmless_val, Selection(**EVERYTHING))
    assert streamed.position == memory.position == every.position == 3
    assert [r.position for r in streamed.ranked_out] == [r.position for r in memory.ranked_out]
    probe = every.weight_reads - 1  # everything: the probe's passes and one scoring pass
    assert streamed.weight_reads == probe + len(streamed.rounds) == probe + 3


def shifted_demo(out_dir):
    """The demo model behind one more dense layer that writes nothing (zero attention output and down
    projection): every residual position moves up by one, so its refusal direction sits at position 4."""
    demo = Glm4MoeForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    config = Glm4MoeConfig(
        **{
            **demo.config.to_dict(),
            "num_hidden_layers": demo.config.num_hidden_layers + 1,
            "first_k_dense_replace": demo.config.first_k_dense_replace + 1,
        }
    )
    model = Glm4MoeForCausalLM(config).eval()
    state = {}
    for name, value in demo.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers.") :].split(".", 1)
            state[f"model.layers.{int(index) + 1}.{rest}"] = value
            if index == "0":
                silent = rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
                state[f"model.layers.0.{rest}"] = torch.zeros_like(value) if silent else value
        else:
            state[name] = value
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(out_dir)
    return out_dir


def test_shifted_demo_shortlist_chooses_as_all(tmp_path):
    model, tokenizer = load_model(shifted_demo(tmp_path / "shifted"))
    harmful, harmless, harmful_val, harmless_val = demo_split()
    directions = directions_of(model, tokenizer, harmful, harmless)
    candidates = candidate_positions(directions, 0.2, None)
    assert candidates == [2, 3, 4]  # positions 0 and 1 hold the embedding alone: every prompt ends alike
    every = choose(model, tokenizer, directions, harmful_val, harmless_val, Selection(**EVERYTHING))
    assert every.position == 4
    for shortlist in ("2", "1"):
        short = choose(
            model, tokenizer, directions, harmful_val, harmless_val, Selection(shortlist=shortlist)
        )
        assert_same_choice(every, short, candidates)


def test_random_model_shortlist_chooses_as_all(tmp_path):
    """A random 8-layer model (refusal tokens from the markers): its scores follow no pattern over the
    positions, and its choice is not the demo's position; one prompt per set in the first round."""
    model, tokenizer = load_model(build_tiny_chat_model(tmp_path / "tiny", num_layers=8, seed=3))
    directions = directions_of(model, tokenizer, HARMFUL, HARMLESS)
    candidates = candidate_positions(directions, 0.2, None)
    assert candidates == [1, 2, 3, 4, 5, 6]
    # no prefilter: a random model's separations say nothing about its scores (the halving alone here)
    loose = {"kl_threshold": 1e9, "shortlist_prompts": 1, "prefilter": "all"}
    every = choose(model, tokenizer, directions, HARMFUL, HARMLESS, Selection(shortlist="all", **loose))
    assert every.position != 3
    for shortlist in ("3", "2", "1"):
        short = choose(
            model, tokenizer, directions, HARMFUL, HARMLESS, Selection(shortlist=shortlist, **loose)
        )
        assert_same_choice(every, short, candidates)


def test_cli_records_the_ranked_out_candidates(tmp_path, capsys):
    """`abliterate measure` on the demo model: directions.json holds the candidate the prefilter left out
    (with its rank by separation), the rounds and the candidates ranked out (with the prompts that left
    them out); the console says so."""
    import json

    from abliterate.cli import main

    out = tmp_path / "out"
    argv = ["measure", str(DEMO_MODEL_DIR), "--out", str(out), "--shortlist", "1", "--prefilter", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    selection = json.loads((out / "directions.json").read_text())["selection"]
    assert selection["position"] == 3 and selection["shortlist"] == "1" and selection["prefilter"] == "3"
    assert selection["prefiltered_out"] == [
        {"position": 4, "separation": pytest.approx(1.129, abs=1e-3), "rank": 4}
    ]
    assert [c["position"] for c in selection["candidates"]] == [3]
    assert sorted(r["position"] for r in selection["ranked_out"]) == [1, 2]
    assert [(r["candidates"], r["keep"]) for r in selection["rounds"]] == [(3, 2), (2, 1), (1, 1)]
    assert "prefilter 3: 1 candidates never scored" in printed and "(4 rank 4)" in printed
    assert "shortlist 1: 1 candidates scored on every prompt, 2 ranked out in 2 rounds" in printed


def assert_prefilter_chooses_as_everything(
    model, tokenizer, directions, harmful_val, harmless_val, candidates
):
    """The defaults, and every prefilter down to one candidate, against every candidate on every prompt:
    the same position; the candidates left out are the ones the separation ranks last."""
    every = choose(model, tokenizer, directions, harmful_val, harmless_val, Selection(**EVERYTHING))
    values = separation(directions)
    by_separation = sorted(candidates, key=lambda p: -float(values[p]))
    assert by_separation[0] == every.position  # the measured statistic ranks the scored choice first
    default = choose(model, tokenizer, directions, harmful_val, harmless_val, Selection())
    assert default.position == every.position and (default.prefilter, default.shortlist) == ("4", "1")
    for keep in range(1, len(candidates)):
        short = choose(
            model,
            tokenizer,
            directions,
            harmful_val,
            harmless_val,
            Selection(prefilter=str(keep), shortlist="1"),
        )
        assert short.position == every.position, keep
        assert [r.position for r in sorted(short.prefiltered_out, key=lambda r: r.rank)] == by_separation[
            keep:
        ]
        assert [r.rank for r in sorted(short.prefiltered_out, key=lambda r: r.rank)] == list(
            range(keep + 1, len(candidates) + 1)
        )
        scored = {c.position for c in short.candidates} | {r.position for r in short.ranked_out}
        assert scored == set(by_separation[:keep])  # the prefiltered never reach scoring
    return every, default


def test_prefilter(demo):
    _, _, directions, _, _ = demo
    assert prefilter(directions, [1, 2, 3, 4], "all") == ([1, 2, 3, 4], [])
    assert prefilter(directions, [1, 2, 3, 4], "4") == ([1, 2, 3, 4], [])
    kept, out = prefilter(directions, [1, 2, 3, 4], "2")
    assert kept == [2, 3] and [(r.position, r.rank) for r in out] == [(1, 3), (4, 4)]
    # |mean harmful - mean harmless| / |mean harmless| at each position, from the measured means
    expected = (directions.harmful_mean - directions.harmless_mean).norm(
        dim=-1
    ) / directions.harmless_mean.norm(dim=-1)
    for position in (1, 2, 3, 4):
        assert float(separation(directions)[position]) == pytest.approx(float(expected[position]), rel=1e-12)
    with pytest.raises(AbliterateError, match="--prefilter .* use all or a number of candidates >= 1"):
        Selection(prefilter="0")


def test_demo_prefilter_chooses_as_everything(demo):
    model, tokenizer, directions, harmful_val, harmless_val = demo
    candidates = candidate_positions(directions, 0.2, None)
    every, default = assert_prefilter_chooses_as_everything(
        model, tokenizer, directions, harmful_val, harmless_val, candidates
    )
    assert every.position == default.position == 3


def test_shifted_demo_prefilter_chooses_as_everything(tmp_path):
    model, tokenizer = load_model(shifted_demo(tmp_path / "shifted"))
    harmful, harmless, harmful_val, harmless_val = demo_split()
    directions = directions_of(model, tokenizer, harmful, harmless)
    candidates = candidate_positions(directions, 0.2, None)
    every, default = assert_prefilter_chooses_as_everything(
        model, tokenizer, directions, harmful_val, harmless_val, candidates
    )
    assert every.position == default.position == 4


@pytest.mark.parametrize("probe_tokens", [6, 0])
def test_baseline_from_the_probe_or_the_first_round(demo, probe_tokens):
    """The unmodified model's harmful refusal score: from the probe's first step (its greedy replies), or,
    without a probe (`refusal_probe_tokens` 0), from the first scoring round; either way the score a
    first-token pass over the harmful prompts gives (in memory: `generate`'s first step, the same batches:
    exactly)."""
    from abliterate.inference.loading import pad_token_id
    from abliterate.inference.runner import InMemoryForward
    from abliterate.inference.scores import refusal_score
    from abliterate.measure.chat import encode_prompts

    model, tokenizer, directions, harmful_val, harmless_val = demo
    chosen = select_direction(
        model,
        tokenizer,
        directions,
        harmful_val,
        harmless_val,
        *MEASURED,
        Selection(),
        Evaluation(refusal_probe_tokens=probe_tokens),
        RUNTIME,
        progress=False,
    )
    assert chosen.refusal_tokens_source == ("replies" if probe_tokens else "markers")
    encoded = encode_prompts(tokenizer, harmful_val, Template(), "harmful", measurement=Measurement())
    pad = pad_token_id(tokenizer)
    ((_, _, logprobs),) = list(
        InMemoryForward(model).first_token_logprobs({"harmful": encoded}, [None], RUNTIME.batch_size, pad)
    )
    expected = refusal_score(logprobs, chosen.refusal_token_ids)
    # the same batches through the same modules: the same float32 arithmetic, so the same number
    assert chosen.baseline_refusal_score == expected
    assert chosen.position == 3


def test_a_failing_finalist_hands_on_to_the_next_candidates(demo):
    """The finalist over the KL threshold: selection goes on to the next candidates (ranked out, then
    prefiltered, in that order, each on the prompts it has not seen) instead of stopping, so a small
    shortlist or prefilter completes every run that scoring every candidate completes. The demo's
    directions with the ones at positions 3 and 2 (the two largest separations: the prefilter's first)
    replaced by their harmless means' directions, which damage every harmless reply; the means, hence the
    separations, stay the measured ones."""
    import dataclasses

    model, tokenizer, directions, harmful_val, harmless_val = demo
    direction = directions.direction.clone()
    for p in (3, 2):
        direction[p] = torch.nn.functional.normalize(directions.harmless_mean[p], dim=0)
    damaging = dataclasses.replace(directions, direction=direction)
    values = separation(damaging)
    assert sorted([1, 2, 3, 4], key=lambda p: -float(values[p])) == [3, 2, 1, 4]
    threshold = {"kl_threshold": 1e-3}
    every = choose(
        model, tokenizer, damaging, harmful_val, harmless_val, Selection(**EVERYTHING, **threshold)
    )
    full = {c.position: c for c in every.candidates}
    assert all(full[p].kl > 1e-3 for p in (2, 3)) and all(full[p].kl <= 1e-3 for p in (1, 4))
    assert every.position == 1

    def short(prefilter, settings=threshold):
        return choose(
            model,
            tokenizer,
            damaging,
            harmful_val,
            harmless_val,
            Selection(prefilter=prefilter, shortlist="1", **settings),
        )

    # prefilter 1: the finalist (3) fails, then the prefiltered go on by separation, one per pass, until
    # one is under the threshold (2 fails, 1 passes); 4 is never scored
    alone = short("1")
    assert alone.position == every.position
    assert [(r.candidates, r.fallback) for r in alone.rounds] == [(1, False), (1, True), (1, True)]
    assert [c.position for c in alone.candidates] == [1, 2, 3] and [
        r.position for r in alone.prefiltered_out
    ] == [4]
    # prefilter 2: 3 and 2 halved to one finalist; it fails, the ranked-out one goes on with the prompts it
    # has not seen and fails, then the prefiltered 1 passes
    halved = short("2")
    assert halved.position == every.position
    assert [(r.candidates, r.fallback) for r in halved.rounds] == [
        (2, False),
        (1, False),
        (1, True),
        (1, True),
    ]
    assert not halved.ranked_out and [c.position for c in halved.candidates] == [1, 2, 3]
    for chosen in (alone, halved):  # each scored on every prompt, as scoring everything scores it
        for c in chosen.candidates:
            assert c.refusal_score == pytest.approx(full[c.position].refusal_score, rel=1e-4)
            assert c.kl == pytest.approx(full[c.position].kl, rel=1e-2, abs=1e-9)
    # every candidate over the threshold: the fallback scores them all and stops as scoring everything does
    tight = {"kl_threshold": 1e-12}
    message = "every candidate direction changes harmless replies too much"
    with pytest.raises(AbliterateError, match=message) as everything_failed:
        choose(model, tokenizer, damaging, harmful_val, harmless_val, Selection(**EVERYTHING, **tight))
    with pytest.raises(AbliterateError, match=message) as shortlist_failed:
        short("1", tight)
    position = lambda e: str(e.value).split("(position ")[1].split(")")[0]  # noqa: E731
    assert position(shortlist_failed) == position(everything_failed)
