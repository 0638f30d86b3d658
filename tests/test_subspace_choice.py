"""Refusal as a subspace, chosen (issue 25): selection and the search treat the rank k and the subspace
method as a choice scored by the same refusal and KL figures, rank 1 the default, a subspace kept only
where it earns its KL; the choice reaches the plan, the console and MLflow.

The demo model refuses along one direction: there selection and the search keep rank 1. Subspaces here
are built by hand (`orthonormal_rows`: row 0 the measured direction, the rest what a test needs), so the
choice is checked against rows whose effect is known: random rows earn nothing, and a row 0 that misses
refusal with the measured direction as row 1 earns rank 2.

The ranks are scored only as far as they can still earn (issue 24): the rule is checked on every count
(`refusal_limit`, hypothesis), the demo skips the rank pass (one direction leaves no refusal), and on the
two-category model (one direction leaves `deception` refusing) the choice and the figures of the ranks left
equal scoring every rank on every prompt (`rank_elimination` off), bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from fixtures import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from numerics import accumulation_length, first_token_delta, logodds_atol

from abliterate.check.evaluate import model_behaviour
from abliterate.config import Ablation, Evaluation, Measurement, Runtime, Search, Selection, Template
from abliterate.demo import DATA_DIR, DEMO_MODEL_DIR, TWO_CATEGORY_MODEL_DIR, prompt_file
from abliterate.edit.ablate import load_inputs
from abliterate.edit.inference_edit import DirectionEdit
from abliterate.edit.matching import configured_plan, resolve_plan
from abliterate.inference.loading import load_model
from abliterate.inference.runner import StreamedForward
from abliterate.inference.scores import first_token_kl, wilson_bounds
from abliterate.measure.chat import encode_prompts
from abliterate.measure.direction_file import load_directions, save_directions
from abliterate.measure.directions import compute_directions, directions_metadata, write_directions
from abliterate.measure.means import measure
from abliterate.measure.prompts import load_prompts
from abliterate.search.space import default_params, plan_for, search_space, trial_rank
from abliterate.search.study import choose as choose_trial
from abliterate.search.study import decide, record_rank, run_study, search_front
from abliterate.select.selection import (
    DirectionShare,
    RankScore,
    beats_one_direction,
    choose_rank,
    describe_rank,
    rank_edits,
    rank_rounds,
    refusal_limit,
    select_direction,
)
from abliterate.vocabulary import SUBSPACE_METHODS
from abliterate.weights.checkpoint import build_inventory
from abliterate_flows.runtime import tracking_uri
from abliterate_flows.stages import log_rank_choice
from abliterate_flows.tracking import tracked_run

RUNTIME = Runtime(device="cpu", dtype="float32")


def rank(k: int, method: str | None, refusals: int, kl: float, earns: bool, prompts: int = 40) -> RankScore:
    upper = wilson_bounds(refusals, prompts, 0.95)[1]
    return RankScore(k, method, -float(k), kl, refusals, prompts, upper, earns)


def test_choose_rank_keeps_one_direction_unless_a_subspace_earns_it():
    one = rank(1, None, 20, 0.01, False)
    assert choose_rank([one]) is one
    assert choose_rank([one, rank(2, "pca", 0, 0.5, False)]) is one  # refuses less, KL over: not earned
    # the earning ones: fewest refusals, then the lower rank, then the lower KL, then the vocabulary's order
    a, b = rank(3, "pca", 1, 0.02, True), rank(2, "clusters", 1, 0.03, True)
    c, d = rank(2, "categories", 1, 0.01, True), rank(4, "pca", 0, 0.05, True)
    assert choose_rank([one, a, b, c, d]) is d
    assert choose_rank([one, a, b, c]) is c
    e = rank(2, "pca", 1, 0.01, True)
    assert choose_rank([one, c, e]) is e


def test_the_rule_is_one_directions_rate_above_the_subspaces_wilson_upper_bound():
    """The rule `score_ranks` applies, in figures: 0 of 40 has the upper bound z^2 / (40 + z^2) = 0.0876 at
    95 %, so one direction refusing 4 of 40 (0.1) is beaten by a subspace refusing none, 3 of 40 is not."""
    z = 1.959963984540054
    upper = wilson_bounds(0, 40, 0.95)[1]
    assert upper == pytest.approx(z * z / (40 + z * z), abs=1e-12)
    assert 4 / 40 > upper > 3 / 40


def orthonormal_rows(first: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """[1 + len(others), H] float32: `first` made unit, then each of `others` orthonormalised against the
    rows before it (Gram-Schmidt in float64, twice), as the directions file holds a subspace."""
    rows = [first.double() / first.double().norm()]
    for v in others:
        v = v.double()
        for _ in range(2):
            v = v - sum((v @ r) * r for r in rows)
        rows.append(v / v.norm())
    return torch.stack(rows).float()


def test_rank_edits_lists_each_held_rank():
    q = torch.zeros(3, 4, 5)
    q[1] = torch.eye(4, 5)
    subspaces = {"clusters": q[:, :2].clone(), "pca": q.clone()}
    assert rank_edits(subspaces, 1, 3) == [(2, "pca"), (3, "pca"), (2, "clusters")]  # the vocabulary's order
    assert rank_edits(subspaces, 0, 4) == []  # nothing measured where the direction is zero
    assert rank_edits(subspaces, 1, 1) == []  # max_rank 1: one direction, nothing more scored


# ------------------------------------------------------------------ the elimination rule, exactly


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 200),
    data=st.data(),
    confidence=st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99, 0.999]),
)
def test_a_rank_dropped_on_its_partial_count_never_earns(n, data, confidence):
    """`score_ranks` drops a rank once its refusals on the prompts seen so far exceed `refusal_limit`: for
    every way the rest of its prompts could go (its final count anywhere from that count up to that count
    plus the prompts left), it then never beats one direction; one it keeps still can (the rest refusing
    none). No rank can earn (limit -1) exactly where one direction's rate is at or below the Wilson upper
    bound of 0 refusals: the pass is skipped only where nothing could be chosen."""
    single_refusals = data.draw(st.integers(0, n))
    single = RankScore(1, None, 0.0, 0.0, single_refusals, n, 0.0, False)
    limit = refusal_limit(single, confidence)
    assert (limit < 0) == (single_refusals / n <= wilson_bounds(0, n, confidence)[1])
    seen = data.draw(st.integers(0, n))
    count = data.draw(st.integers(0, seen))
    finals = range(count, count + n - seen + 1)
    if count > limit:
        assert not any(beats_one_direction(final, single, confidence) for final in finals)
    else:
        assert beats_one_direction(count, single, confidence)


def test_the_limit_is_every_count_that_earns():
    """The Wilson upper bound never falls as the count grows (every count of every prompt count up to 300, at
    four levels), so the counts that beat one direction are exactly 0..limit (every one-direction count of
    every prompt count up to 80 at the default level)."""
    for confidence in (0.5, 0.9, 0.95, 0.99):
        for n in range(1, 301):
            uppers = [wilson_bounds(c, n, confidence)[1] for c in range(n + 1)]
            assert uppers == sorted(uppers), (n, confidence)
    for n in range(1, 81):
        for single_refusals in range(n + 1):
            single = RankScore(1, None, 0.0, 0.0, single_refusals, n, 0.0, False)
            beats = [c for c in range(n + 1) if beats_one_direction(c, single, 0.95)]
            assert beats == list(range(refusal_limit(single, 0.95) + 1))


def test_rank_rounds_grow_by_whole_batches():
    assert rank_rounds(69, 8, 16) == [16, 32, 69]  # GLM-4.5-Air's 69: not a pass for the last 5 prompts
    assert rank_rounds(64, 8, 8) == [8, 16, 32, 64]
    assert rank_rounds(98, 8, 16) == [16, 32, 64, 98]
    assert rank_rounds(10, 8, 16) == [10]
    assert rank_rounds(32, 8, 16) == [16, 32]
    assert rank_rounds(24, 20, 4) == [24]  # 20, then 4 left: fewer than the first round's
    assert rank_rounds(44, 20, 4) == [20, 44]


def test_a_basis_edit_removes_every_row_and_one_row_is_the_direction_edit():
    generator = torch.Generator().manual_seed(0)
    q = orthonormal_rows(torch.randn(16, generator=generator), [torch.randn(16, generator=generator)])
    hidden = torch.randn(3, 7, 16, generator=generator)
    both = DirectionEdit(q).embedded(hidden)
    assert float((both @ q.T).abs().max()) <= 16 * 2.0**-23 * float(hidden.abs().max())
    one_then_other = DirectionEdit(q[1]).embedded(DirectionEdit(q[0]).embedded(hidden))
    torch.testing.assert_close(both, one_then_other, rtol=0, atol=64 * 2.0**-24 * float(hidden.abs().max()))
    # one row: the single-direction edit exactly, as [H] or [1, H]
    assert torch.equal(DirectionEdit(q[:1]).embedded(hidden), DirectionEdit(q[0]).embedded(hidden))


# ------------------------------------------------------------------ the demo model: rank 1 is kept


def measured_model(model_dir, load):
    """(model, tokenizer, measurement, directions) of `model_dir` measured on its training prompts
    (`load(kind, split)` gives a prompt set) with the default settings."""
    model, tokenizer = load_model(model_dir)
    measured = measure(
        model,
        tokenizer,
        load("harmful", "train"),
        load("harmless", "train"),
        Measurement(),
        Template(),
        RUNTIME,
        progress=False,
    )
    return model, tokenizer, measured, compute_directions(measured, Measurement().direction_method)


@pytest.fixture(scope="module")
def demo():
    load = lambda kind, split: load_prompts(prompt_file("demo", kind, split))  # noqa: E731
    model, tokenizer, measured, directions = measured_model(DEMO_MODEL_DIR, load)
    return model, tokenizer, measured, directions, load("harmful", "val"), load("harmless", "val")


def random_subspace(directions, k: int, seed: int) -> torch.Tensor:
    """[P, k, H]: at every position with a direction, that direction and k - 1 random orthonormal rows."""
    generator = torch.Generator().manual_seed(seed)
    P, H = directions.direction.shape
    out = torch.zeros(P, k, H)
    for p in directions.defined:
        out[p] = orthonormal_rows(
            directions.direction[p], [torch.randn(H, generator=generator) for _ in range(k - 1)]
        )
    return out


def choose(fixture, directions, subspaces, selection=Selection(), position=None):
    """Selection on a model fixture (`demo` or `two_category`: model and tokenizer first, the harmful
    and harmless validation prompts last)."""
    model, tokenizer, *_, harmful_val, harmless_val = fixture
    return select_direction(
        model,
        tokenizer,
        directions,
        harmful_val,
        harmless_val,
        Measurement(),
        Template(),
        selection,
        Evaluation(),
        RUNTIME,
        position,
        progress=False,
        subspaces=subspaces,
    )


def test_demo_selection_keeps_rank_one_and_scores_no_rank(demo, tmp_path, monkeypatch):
    """One direction leaves 0 of 118 harmful validation prompts opening with a refusal token: at or below the
    Wilson upper bound of a subspace refusing none, so no rank can earn its KL and none is scored; the one
    direction carries the whole drop of the refusal score (share 1). Scoring every rank on every prompt
    (`rank_elimination` false) keeps rank 1 too."""
    directions = demo[3]
    subspaces = {"pca": random_subspace(directions, 4, 0), "clusters": random_subspace(directions, 2, 1)}
    chosen = choose(demo, directions, subspaces)
    assert (chosen.rank, chosen.subspace) == (1, None)
    one = chosen.ranks[0]
    n = len(demo[4])
    assert (one.rank, one.subspace, one.refusals, one.prompts) == (1, None, 0, n)  # none refuses
    assert chosen.ranks == [one]  # nothing else scored
    floor = wilson_bounds(0, n, 0.95)[1]
    rank_pass = chosen.rank_pass
    assert (rank_pass.state, rank_pass.floor, rank_pass.limit, rank_pass.rounds) == ("skipped", floor, -1, [])
    candidate = next(c for c in chosen.candidates if c.position == chosen.position)
    assert (one.refusal_score, one.kl) == (candidate.refusal_score, candidate.kl)
    drop = chosen.baseline_refusal_score - one.refusal_score
    assert drop > 0 and chosen.shares == [DirectionShare(None, 0, one.refusal_score, drop, 1.0)]
    line = describe_rank(chosen)
    print(line)
    assert line.startswith(f"rank 1 kept (one direction: 0 of {n} ")
    assert (
        f"none scored (one direction's rate 0.000 is at or below {floor:.3f}, the Wilson upper bound" in line
    )
    # no pass: the same reads of the weights as one direction alone (max_rank 1: nothing to score)
    alone = choose(demo, directions, subspaces, Selection(max_rank=1))
    assert alone.ranks == [one] and alone.rank_pass.state == "none" and describe_rank(alone) is None
    assert alone.shares == chosen.shares
    # the subspaces measurement keeps (pca and k-means clusters of the harmful prompts): skipped too
    measured = choose(demo, directions, directions.subspaces)
    assert sorted(directions.subspaces) == ["clusters", "pca"]
    assert (measured.rank, measured.subspace, measured.rank_pass.state) == (1, None, "skipped")
    # every rank on every prompt (the rule before elimination): each scored, none earns, rank 1 kept
    every = choose(demo, directions, subspaces, Selection(rank_elimination=False))
    assert (every.rank, every.subspace, every.ranks[0]) == (1, None, one)
    assert [(r.rank, r.subspace) for r in every.ranks[1:]] == [
        (2, "pca"),
        (3, "pca"),
        (4, "pca"),
        (2, "clusters"),
    ]
    assert all(r.kl is not None and r.prompts == n and not r.earns for r in every.ranks)
    rounds = [(r.candidates, r.harmful_prompts, r.harmless_prompts) for r in every.rank_pass.rounds]
    assert every.rank_pass.state == "scored" and rounds == [(4, n, len(demo[5]))]  # one pass, both sets
    assert (
        describe_rank(every).startswith(f"rank 1 kept (one direction: 0 of {n}")
        and every.shares == chosen.shares
    )
    # MLflow: the pass skipped, the bound, the one direction's share
    monkeypatch.setenv("ABLITERATE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracked_run("abliterate/subspace-test", "skipped") as run:
        log_rank_choice(run, chosen)
    client = MlflowClient(tracking_uri())
    logged = client.get_run(run.run_id).data
    assert logged.params["rank_pass"] == "skipped" and logged.params["selected_subspace"] == "none"
    assert logged.metrics["selection/rank_floor"] == floor
    assert logged.metrics["selection/rank_one_direction_rate"] == 0.0
    assert logged.metrics["selection/rank_limit"] == -1 and logged.metrics["selection/rank_passes"] == 0
    history = client.get_metric_history(run.run_id, "selection/share.none")
    assert {m.step: m.value for m in history} == {0: 1.0}


def missed(directions, p: int = 3):
    """Row 0 a random direction (it stops no refusal), row 1 the measured direction made orthogonal to it, at
    position `p`: (the directions with that row 0 there, that [P, 2, H] subspace)."""
    generator = torch.Generator().manual_seed(2)
    weak = torch.randn(directions.direction.shape[1], generator=generator, dtype=torch.float64)
    weak /= weak.norm()
    rows = orthonormal_rows(weak, [directions.direction[p]])
    direction = directions.direction.clone()
    direction[p] = rows[0].double()
    subspace = torch.zeros(directions.num_positions, 2, directions.direction.shape[1])
    subspace[p] = rows
    return dataclasses.replace(directions, direction=direction), subspace


@pytest.fixture(scope="module")
def earned(demo):
    """`missed` at position 3: (the directions with that row 0, the subspace, the selection at position 3)."""
    weak, subspace = missed(demo[3])
    return weak, {"categories": subspace}, choose(demo, weak, {"categories": subspace}, position=3)


def test_a_subspace_that_earns_its_kl_is_kept(demo, earned):
    """Rank 2 stops the refusals one direction leaves, at a KL within the threshold: selection keeps it."""
    missed, subspaces, chosen = earned
    one, two = chosen.ranks
    assert one.refusals == one.prompts  # a random direction leaves every harmful prompt refusing
    assert (two.rank, two.subspace, two.refusals, two.earns) == (2, "categories", 0, True)
    assert two.kl <= Selection().kl_threshold
    assert (chosen.rank, chosen.subspace) == (2, "categories")
    assert chosen.rank_pass.state == "scored" and chosen.rank_pass.dropped == 0
    assert describe_rank(chosen).startswith("rank 2 (categories): 0 of")
    # the chosen edit's directions: row 0 (its score known) and row 1 removed alone
    assert [(d.subspace, d.index) for d in chosen.shares] == [("categories", 0), ("categories", 1)]
    shares = {d.index: d.share for d in chosen.shares}
    assert shares[1] > 0.99  # the measured direction carries the refusal score's drop
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    # the same scores, a stricter threshold than the subspace's KL: one direction is kept
    strict = choose(demo, missed, subspaces, Selection(kl_threshold=two.kl / 2), position=3)
    assert strict.rank == 1 and not strict.ranks[1].earns


def test_mlflow_shows_the_rank_and_each_directions_share(earned, tmp_path, monkeypatch):
    monkeypatch.setenv("ABLITERATE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    chosen = earned[2]
    with tracked_run("abliterate/subspace-test", "rank") as run:
        log_rank_choice(run, chosen)
    client = MlflowClient(tracking_uri())
    logged = client.get_run(run.run_id).data
    assert logged.params["selected_rank"] == "2" and logged.params["selected_subspace"] == "categories"
    assert logged.params["rank_pass"] == "scored" and logged.metrics["selection/ranks_dropped"] == 0
    assert logged.metrics["selection/rank"] == 2
    history = client.get_metric_history(run.run_id, "selection/share.categories")
    assert {m.step: m.value for m in history} == {d.index: d.share for d in chosen.shares}
    refusals = client.get_metric_history(run.run_id, "selection/rank_refusals.categories")
    assert {m.step: m.value for m in refusals} == {1: chosen.ranks[0].refusals, 2: 0}


# ------------------------------------------------------------------ the plan and the search


@pytest.fixture(scope="module")
def demo_file(demo, tmp_path_factory):
    """A directions file of the demo with pca (rank 3) and categories (rank 2) subspaces, selected position 3
    and the selection's record naming `rank` and `subspace` (as `abliterate measure` writes them)."""
    _, _, measured, directions, _, _ = demo
    subspaces = {"pca": random_subspace(directions, 3, 0), "categories": random_subspace(directions, 2, 1)}

    def write(name: str, selection: dict) -> str:
        meta = directions_metadata(
            dataclasses.replace(directions, subspaces={}, subspace_info={}),  # the hand-made ones below
            measured,
            build_inventory(DEMO_MODEL_DIR).fingerprint,
            3,
            {"selection": selection},
        )
        path = tmp_path_factory.mktemp(name) / "directions.safetensors"
        save_directions(
            path,
            directions.direction,
            meta,
            directions.harmful_mean,
            directions.harmless_mean,
            subspaces=subspaces,
        )
        return str(path)

    return write("rank1", {"rank": 1, "subspace": None}), write(
        "rank2", {"rank": 2, "subspace": "categories"}
    )


def test_the_plan_takes_the_selected_rank_at_auto(demo_file):
    one, two = (load_inputs(DEMO_MODEL_DIR, path) for path in demo_file)
    plan = configured_plan(one, Ablation(), "auto")
    assert plan.rank == 1 and "rank" not in plan.to_dict() and plan.origin is None
    plan = configured_plan(two, Ablation(), "auto")
    assert (plan.rank, plan.subspace, plan.selected_position) == (2, "categories", 3)
    assert plan.to_dict()["origin"] == {"selection": {"rank": 2, "subspace": "categories"}}
    # an explicit rank is kept as given, 1 included (one direction on purpose); an explicit position
    # is no selection
    assert configured_plan(two, Ablation(rank=3, subspace="pca"), "auto").rank == 3
    forced = configured_plan(two, Ablation(rank=1), "auto")
    assert forced.rank == 1 and forced.origin is None and "rank" not in forced.to_dict()
    assert configured_plan(two, Ablation(), 3).rank == 1


def test_search_space_holds_rank_and_subspace_and_trial_zero_is_rank_one(demo_file):
    inputs = load_inputs(DEMO_MODEL_DIR, demo_file[0])
    space = search_space(inputs, Search(), Selection())
    assert space.subspaces == (("pca", 3), ("categories", 2)) and space.max_rank == 3
    zero = default_params(space)
    assert (zero["rank"], zero["subspace"]) == (1, "pca")
    plan = resolve_plan(plan_for(zero, space), inputs)
    assert plan.rank == 1 and "rank" not in plan.to_dict()
    # rank 2 of categories: the position rounded to a whole one, the file's rows
    params = {**zero, "rank": 2, "subspace": "categories", "direction_position": 2.6}
    plan = resolve_plan(plan_for(params, space), inputs)
    assert (plan.rank, plan.subspace, plan.direction_position) == (2, "categories", 3.0)
    assert plan.to_dict()["rank"] == 2
    # a rank above the method's K is that K
    assert trial_rank({**params, "rank": 3}, space) == (2, "categories")
    assert trial_rank({**params, "rank": 3, "subspace": "pca"}, space) == (3, "pca")
    # without subspaces the space (and so the study's name) is as before
    plain = dataclasses.replace(space, subspaces=())
    assert "subspaces" not in plain.to_json() and "rank" not in default_params(plain)
    assert set(SUBSPACE_METHODS) >= {m for m, _ in space.subspaces}


def trial(number: int, refusals: int, kl: float, rank: int = 1, prompts: int = 40) -> dict:
    """A complete trial as the study records it (objective: refusals plus a margin at the floor)."""
    plan = {"rank": rank, "subspace": "pca"} if rank > 1 else {}
    return {
        "trial": number,
        "refusal_rate": refusals / prompts,
        "objective": (refusals + 0.01) / prompts,
        "kl": kl,
        "refusals": refusals,
        "prompts": prompts,
        "parameters": {},
        "plan": plan,
    }


def test_the_search_writes_a_subspace_only_where_it_earns_its_kl():
    search = Search(kl_max=0.01)
    # a rank-2 trial refusing as little as the rank-1 choice, at a lower KL, is on the front, yet not written
    assert choose_trial([trial(0, 0, 0.004), trial(1, 0, 0.001, rank=2)], search)["trial"] == 0
    # one direction leaves 8 of 40 refusing (0.2), above the 0.0876 bound of rank 2's 0 of 40: written
    assert choose_trial([trial(0, 8, 0.004), trial(1, 0, 0.006, rank=2)], search)["trial"] == 1
    # 3 of 40 (0.075) is within that bound: the rank-1 trial is written
    assert choose_trial([trial(0, 3, 0.004), trial(1, 0, 0.006, rank=2)], search)["trial"] == 0
    # no rank-1 trial within the KL bound: the rank-2 choice stands; a named trial is written as named
    assert choose_trial([trial(0, 0, 0.02), trial(1, 1, 0.006, rank=3)], search)["trial"] == 1
    assert choose_trial([trial(0, 0, 0.004), trial(1, 0, 0.001, rank=2)], Search(trial=1))["trial"] == 1


def test_demo_search_keeps_rank_one(demo, tmp_path):
    """The study draws ranks and subspaces from what the measured file holds (pca and clusters, rank 4 each);
    trial 0 is rank 1, and on the demo model, which one direction already stops, the written choice is rank 1."""
    _, _, measured, directions, _, _ = demo
    path = write_directions(
        tmp_path / "directions", directions, measured, build_inventory(DEMO_MODEL_DIR).fingerprint, 3
    )
    harmful = load_prompts(prompt_file("demo", "harmful", "val"))[:24]
    harmless = load_prompts(prompt_file("demo", "harmless", "val"))[:24]
    settings = Search(trials=14, startup_trials=8, reply_tokens=6)
    sections = (Selection(), Template(), Evaluation(), Runtime(batch_size=8))
    result = run_study(DEMO_MODEL_DIR, path, harmful, harmless, settings, *sections, tmp_path / "mlruns")
    assert [tuple(s) for s in result["space"]["subspaces"]] == [("pca", 4), ("clusters", 4)]
    trials = result["trials"]
    zero = next(t for t in trials if t["trial"] == 0)
    assert zero["reference"] == "run" and zero["parameters"]["rank"] == 1 and "rank" not in zero["plan"]
    ranks = {record_rank(t) for t in trials}
    assert ranks > {1}, ranks  # the study tried subspaces
    decision = decide(trials, settings)
    print(
        "demo search:",
        [(t["trial"], record_rank(t), t["refusals"], f"{t['kl']:.2g}") for t in trials],
        "chosen",
        decision.chosen["trial"],
    )
    assert record_rank(decision.chosen) == 1
    assert decision.chosen_plan(settings).rank == 1
    # where the front's best at KL <= kl_max removes more directions (all refuse none here, so the lower KL
    # would win), the rank-1 choice is written: one direction's 0 refusals leave nothing to earn
    best = min(
        (t for t in search_front(trials) if t["kl"] <= settings.kl_max),
        key=lambda t: (t["objective"], t["kl"]),
    )
    print("the front's best:", best["trial"], "rank", record_rank(best))


def test_streamed_rank_scores_equal_in_memory(demo):
    """Layer-streamed, the ranks are scored in one more pass over the weights per round of the rank pass
    (the harmful rounds, then the harmless prompts for the ranks left) and one for the chosen edit's shares,
    with the same figures within the float32 bounds of tests/numerics.py (an edit of rank k: k projections of
    each of the two writes of a layer), the same ranks dropped and the same choice. Position 3 holds a random
    row 0 (`missed`): one direction refuses every prompt, so the pass runs; `pca`'s random rows refuse every
    prompt too and are dropped, `categories` rank 2 is kept."""
    model, tokenizer, _, directions, harmful_val, harmless_val = demo
    harmful_val, harmless_val = harmful_val[:24], harmless_val[:24]
    weak, subspace = missed(directions)
    subspaces = {"pca": random_subspace(weak, 3, 0), "categories": subspace}
    settings = Selection(shortlist="all", max_candidates=2)
    sections = (
        Measurement(),
        Template(),
        settings,
        Evaluation(),
        Runtime(device="cpu", dtype="float32", batch_size=8),
    )

    def select(forward, subspaces):
        return select_direction(
            forward,
            tokenizer,
            weak,
            harmful_val,
            harmless_val,
            *sections,
            position=3,
            progress=False,
            subspaces=subspaces,
        )

    memory = select(model, subspaces)
    streamed = select(StreamedForward(DEMO_MODEL_DIR, "float32", "cpu"), subspaces)
    without = select(StreamedForward(DEMO_MODEL_DIR, "float32", "cpu"), None)
    rounds = [
        (r.candidates, r.harmful_prompts, r.harmless_prompts, r.keep) for r in streamed.rank_pass.rounds
    ]
    assert rounds == [(3, 8, 0, 3), (3, 16, 0, 3), (3, 24, 0, 1), (1, 24, 24, 1)]
    assert streamed.weight_reads == without.weight_reads + len(rounds) + 1  # + the shares of rank 2's rows
    assert (memory.rank, memory.subspace) == (streamed.rank, streamed.subspace) == (2, "categories")
    assert [r.dropped for r in streamed.ranks] == [False, True, True, False]  # pca 2 and 3: 24 of 24
    everything = encode_prompts(tokenizer, harmful_val + harmless_val, Template(), "prompt")
    n = accumulation_length(DEMO_MODEL_DIR, max(len(ids) for ids in everything))
    for m, s in zip(memory.ranks, streamed.ranks, strict=True):
        assert (m.rank, m.subspace, m.refusals, m.prompts, m.dropped) == (
            s.rank,
            s.subspace,
            s.refusals,
            s.prompts,
            s.dropped,
        )
        basis = subspaces[m.subspace or "categories"][3, : m.rank]
        delta = first_token_delta(model, everything, n, basis)
        assert abs(m.refusal_score - s.refusal_score) <= logodds_atol(delta), (m, s, delta)


# ------------------------------------------------------------------ the two-category model: the subspace is needed

TWO_DATA = DATA_DIR / "two_category"
TWO_READY = (TWO_CATEGORY_MODEL_DIR / "config.json").is_file() and (TWO_DATA / "harmful_test.jsonl").is_file()


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def two_category():
    """The two-category model measured on its training prompts (categories kept): (model, tokenizer,
    directions, harmful validation prompts, harmless validation prompts)."""
    load = lambda kind, split: load_prompts(TWO_DATA / f"{kind}_{split}.jsonl")  # noqa: E731
    model, tokenizer, _, directions = measured_model(TWO_CATEGORY_MODEL_DIR, load)
    return model, tokenizer, directions, load("harmful", "val"), load("harmless", "val")


@pytest.mark.skipif(
    not TWO_READY, reason="the two-category model is not built (python -m abliterate.demo.two_category)"
)
def test_two_categories_choose_with_elimination_what_scoring_every_rank_chooses(
    two_category, tmp_path, monkeypatch
):
    """One direction leaves `deception` refusing (29 of 98 first tokens), so the rank pass runs. Its
    measured `pca` and `clusters` subspaces refuse none; `categories` is replaced by random rows beside the
    direction, which refuse as one direction does. With elimination the random ranks are dropped on the
    harmful prompts, never scored on the harmless ones; the choice (rank 2 of `clusters`) and every figure of
    the ranks left are those of scoring every rank on every prompt, bit for bit; the shares are those of the
    chosen edit's two directions, as MLflow shows them."""
    directions = two_category[2]
    subspaces = {
        "pca": directions.subspaces["pca"],
        "clusters": directions.subspaces["clusters"],
        "categories": random_subspace(directions, 3, 0),
    }
    fast = choose(two_category, directions, subspaces)
    every = choose(two_category, directions, subspaces, Selection(rank_elimination=False))
    one = fast.ranks[0]
    assert (one.refusals, one.prompts) == (29, 98) and every.ranks[0] == one  # `deception` left refusing
    assert fast.rank_pass.state == every.rank_pass.state == "scored"
    assert fast.rank_pass.limit == every.rank_pass.limit == refusal_limit(one, 0.95)
    assert (fast.rank, fast.subspace) == (every.rank, every.subspace) == (2, "clusters")
    assert [(r.rank, r.subspace) for r in fast.ranks] == [(r.rank, r.subspace) for r in every.ranks]
    dropped = [(f, e) for f, e in zip(fast.ranks, every.ranks, strict=True) if f.dropped]
    assert [(f.rank, f.subspace) for f, _ in dropped] == [(2, "categories"), (3, "categories")]
    assert fast.rank_pass.dropped == 2
    for f, e in zip(fast.ranks, every.ranks, strict=True):
        if f.dropped:  # its count so far already over the limit; scoring it everywhere: it does not earn
            assert fast.rank_pass.limit < f.refusals <= e.refusals and f.prompts <= e.prompts == 98
            assert not e.earns and e.kl is not None
        else:
            assert f == e  # the same figures, bit for bit
    print(describe_rank(fast))
    print("rank pass:", fast.rank_pass.rounds)
    assert "2 of 8 ranks dropped on the harmful prompts" in describe_rank(fast)
    # the chosen edit's two directions, removed alone: the same in both, summing to 1
    assert fast.shares == every.shares
    assert [(d.subspace, d.index) for d in fast.shares] == [("clusters", 0), ("clusters", 1)]
    assert sum(d.share for d in fast.shares) == pytest.approx(1.0, abs=1e-12)
    assert fast.shares[0].share > fast.shares[1].share > 0
    monkeypatch.setenv("ABLITERATE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracked_run("abliterate/subspace-test", "two-category") as run:
        log_rank_choice(run, fast)
    client = MlflowClient(tracking_uri())
    history = client.get_metric_history(run.run_id, "selection/share.clusters")
    assert {m.step: m.value for m in history} == {0: fast.shares[0].share, 1: fast.shares[1].share}
    kl = client.get_metric_history(run.run_id, "selection/rank_kl.categories")
    assert {m.step for m in kl} == {1}  # the dropped ranks have no KL: only rank 1 (every method's first)
    prompts = client.get_metric_history(run.run_id, "selection/rank_harmful_prompts.categories")
    assert {m.step: m.value for m in prompts} == {
        r.rank: r.prompts for r in fast.ranks if r.subspace in (None, "categories")
    }


@pytest.mark.slow
@pytest.mark.skipif(
    not TWO_READY, reason="the two-category model is not built (python -m abliterate.demo.two_category)"
)
def test_two_categories_need_the_subspace(tmp_path):
    """The README's commands as written: one direction (`--max-rank 1`, today's run) leaves the `deception`
    category refusing; the default run chooses a subspace at the same position and stops both categories, at a
    first-token KL on the harmless test prompts no worse than one direction's. Figures printed for the README."""
    from test_readme_commands import all_commands, bash, environment

    project = tmp_path / "checkout"
    project.mkdir()
    for name in (".venv", "abliterate", "flows", "tasks", "pyproject.toml", "README.md"):
        (project / name).symlink_to(ROOT / name)
    commands = [  # the README's runs on the model (not the line that retrains it)
        c for c in all_commands() if "abliterate/demo/two_category_model" in c and "abliterate.demo" not in c
    ]
    assert [c.split()[1] for c in commands] == ["measure", "measure", "ablate", "ablate"], commands
    for command in commands:
        done = bash(command, project, environment(project))
        print(f"$ {command}\n{done.stdout[-1500:]}{done.stderr[-800:]}")
    named = [re.search(r"--out (\S+)", c).group(1) for c in commands]
    assert [re.search(r"--directions (\S+)", c).group(1) for c in commands[2:]] == [
        f"{out}/directions.safetensors" for out in named[:2]
    ]
    outs = [project / out for out in named]
    one_sel, sub_sel = (load_directions(d / "directions.safetensors").metadata["selection"] for d in outs[:2])
    assert "--max-rank 1" in commands[0] and "--max-rank" not in commands[1]
    assert one_sel["position"] == sub_sel["position"]  # the same direction at the same position
    assert one_sel["rank"] == 1 and len(one_sel["ranks"]) == 1  # --max-rank 1: nothing else scored
    assert sub_sel["rank"] >= 2, sub_sel["ranks"]
    one_model, sub_model = outs[2:]
    manifest = json.loads((sub_model / "abliteration.json").read_text())
    assert manifest["plan"]["rank"] == sub_sel["rank"] and manifest["plan"]["subspace"] == sub_sel["subspace"]

    harmful = rows(TWO_DATA / "harmful_test.jsonl")
    harmless = [r["prompt"] for r in rows(TWO_DATA / "harmless_test.jsonl")]
    prompts = [r["prompt"] for r in harmful]
    category = [r["category"] for r in harmful]
    sections = (Evaluation(), Template(), RUNTIME, False)
    base = model_behaviour(TWO_CATEGORY_MODEL_DIR, prompts, harmless, *sections, None, False)
    figures = {}
    for label, model_dir in (("base", None), ("one", one_model), ("subspace", sub_model)):
        after = (
            base
            if model_dir is None
            else model_behaviour(model_dir, prompts, harmless, *sections, base.refusal_token_ids, False)
        )
        rates = {
            c: sum(f for f, k in zip(after.harmful_refused, category, strict=True) if k == c)
            / category.count(c)
            for c in sorted(set(category))
        }
        kl = first_token_kl(base.harmless_logprobs, after.harmless_logprobs)
        figures[label] = (rates, kl)
        print(
            f"{label}: refusal rate by category {rates} ({category.count('harm')} harm, "
            f"{category.count('deception')} deception), KL {kl:.3g} on {len(harmless)} harmless"
        )
    assert min(figures["base"][0].values()) > 0.9  # the model refuses both categories
    one_rates, one_kl = figures["one"]
    sub_rates, sub_kl = figures["subspace"]
    assert one_rates["harm"] <= 0.05 and one_rates["deception"] >= 0.5  # one category left refusing
    assert max(sub_rates.values()) <= 0.05  # both stopped
    assert sub_kl <= one_kl


@pytest.mark.slow
@pytest.mark.skipif(
    not TWO_READY, reason="the two-category model is not built (python -m abliterate.demo.two_category)"
)
def test_the_search_writes_a_subspace_on_two_categories(tmp_path):
    """The study on the two-category model (the file `abliterate measure` writes with subspaces): its rank-1
    trials all leave `deception` refusing, and the written trial removes several directions and refuses none."""
    from abliterate.cli import main

    args = []
    for kind in ("harmful", "harmless"):
        args += [f"--{kind}", str(TWO_DATA / f"{kind}_train.jsonl")]
        args += [f"--{kind}-val", str(TWO_DATA / f"{kind}_val.jsonl")]
    assert main(["measure", str(TWO_CATEGORY_MODEL_DIR), *args, "--out", str(tmp_path / "m"), "--quiet"]) == 0
    harmful = [r["prompt"] for r in rows(TWO_DATA / "harmful_val.jsonl")]
    harmless = [r["prompt"] for r in rows(TWO_DATA / "harmless_val.jsonl")]
    settings = Search(trials=30, startup_trials=10, reply_tokens=6)
    sections = (Selection(), Template(), Evaluation(), Runtime(batch_size=16))
    result = run_study(
        TWO_CATEGORY_MODEL_DIR,
        tmp_path / "m" / "directions.safetensors",
        harmful,
        harmless,
        settings,
        *sections,
        tmp_path / "mlruns",
    )
    trials = result["trials"]
    chosen = decide(trials, settings).chosen
    single = [t for t in trials if record_rank(t) == 1]
    print(
        f"two-category search: {len(trials)} trials; the best rank-1 trial refuses "
        f"{min(t['refusals'] for t in single)} of {len(harmful)}; written: trial {chosen['trial']}, rank "
        f"{record_rank(chosen)} ({chosen['parameters']['subspace']}), {chosen['refusals']} refusals, KL {chosen['kl']:.3g}"
    )
    assert min(t["refusals"] for t in single) > 0.25 * len(harmful)  # `deception` is a quarter of them
    assert record_rank(chosen) >= 2 and chosen["refusals"] == 0
