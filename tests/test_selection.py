"""Automatic direction selection: scores, candidates, the choice, the CLI, and the demo figures."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_chat_model import HARMFUL, HARMLESS, build_tiny_chat_model

from abliterate.cli import main
from abliterate.config import Evaluation, Measurement, Runtime, Selection, Template
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.edit.inference_edit import DirectionEdit
from abliterate.errors import AbliterateError
from abliterate.inference.loading import load_model, pad_token_id
from abliterate.inference.refusal import is_refusal, refusal_token_ids
from abliterate.inference.scores import first_token_kl, first_token_logprobs, refusal_score
from abliterate.measure.chat import encode_prompts, render_chat
from abliterate.measure.direction_file import load_directions
from abliterate.measure.directions import DirectionSet, compute_directions
from abliterate.measure.means import measure
from abliterate.measure.prompts import load_prompts
from abliterate.select.selection import candidate_positions, select_direction

DEMO_READY = (DEMO_MODEL_DIR / "model.safetensors.index.json").is_file()
RUNTIME = Runtime(device="cpu", dtype="float32")
# the sections that encode the prompts as measured, then those that choose
MEASURED = (Measurement(), Template())


def choose(model, tokenizer, directions, harmful, harmless, selection=Selection(), position=None):
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
        position,
        progress=False,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tokenizer = load_model(tiny_dir)
    directions = compute_directions(
        measure(model, tokenizer, HARMFUL, HARMLESS, *MEASURED, RUNTIME, progress=False),
        Measurement().direction_method,
    )
    return model, tokenizer, directions


def test_refusal_score_is_mean_log_odds():
    probs = torch.tensor([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]], dtype=torch.float64)
    # refusal tokens 0 and 2: p = 0.5 (log-odds 0) and p = 0.75 (log-odds log 3)
    assert refusal_score(probs.log(), [0, 2]) == pytest.approx(math.log(3) / 2)


def test_first_token_kl():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64).log()
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64).log()
    expected = (0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) / 2
    assert first_token_kl(p, q) == pytest.approx(expected)
    assert first_token_kl(p, p) == 0.0


def test_refusal_tokens_are_reply_openers(tiny):
    _, tokenizer, _ = tiny
    # The tiny vocabulary knows "I" but not "As"; unknown words are skipped.
    assert refusal_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("▁I")]
    with pytest.raises(AbliterateError, match="no refusal marker"):
        refusal_token_ids(tokenizer, ["cannot provide", "as a zebra"])


def test_candidates_skip_the_last_fifth_and_undefined_positions():
    direction = torch.eye(11, 16, dtype=torch.float64)
    direction[0] = 0  # position 0 undefined
    zeros = torch.zeros(11)
    d = DirectionSet(direction, direction, direction, "mean_diff", zeros, zeros)
    assert candidate_positions(d, 0.2, None) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert candidate_positions(d, 0.2, 3) == [1, 5, 8]
    assert candidate_positions(d, 0.0, None)[-1] == 10


def test_scores_match_a_direct_computation(tiny):
    model, tokenizer, directions = tiny
    selection = choose(model, tokenizer, directions, HARMFUL, HARMLESS, position=2)
    assert (
        selection.explicit and selection.position == 2 and [c.position for c in selection.candidates] == [2]
    )
    encoded = encode_prompts(tokenizer, HARMLESS, Template(), "harmless")
    # The batches selection runs (same shapes, same kernels), so only float64 sums can differ: V terms
    # over N prompts, at most (V + N + 2) 2^-53 of sum |terms| on each side. (Other batch sizes differ
    # by float32 rounding, whose bound is above a KL this small: test_evaluate checks batching.)
    batch = RUNTIME.batch_size
    base = first_token_logprobs(model, encoded, batch, pad_token_id(tokenizer))
    with DirectionEdit(directions.direction[2].float()).applied(model):
        ablated = first_token_logprobs(model, encoded, batch, pad_token_id(tokenizer))
    (score,) = selection.candidates
    terms = base.exp() * (base - ablated)
    bound = 2 * (terms.shape[-1] + terms.shape[0] + 2) * 2.0**-53 * float(terms.abs().sum(-1).mean())
    assert abs(score.kl - first_token_kl(base, ablated)) <= bound
    assert score.kl > 0
    assert selection.kl_prompts == len(HARMLESS)  # the random model refuses none of them


def test_auto_picks_lowest_refusal_under_the_kl_threshold(tiny):
    model, tokenizer, directions = tiny
    selection = choose(model, tokenizer, directions, HARMFUL, HARMLESS, Selection(kl_threshold=1e9))
    assert not selection.explicit
    assert [c.position for c in selection.candidates] == [1, 2]  # L = 3: position 3 is in the last fifth
    assert selection.position == min(selection.candidates, key=lambda c: c.refusal_score).position
    assert selection.as_dict()["candidates"][0].keys() == {"position", "refusal_score", "kl"}
    with pytest.raises(AbliterateError, match="raise the KL threshold"):  # every candidate's KL is > 0
        choose(model, tokenizer, directions, HARMFUL, HARMLESS, Selection(kl_threshold=0))


def test_explicit_position_must_hold_a_direction(tiny):
    model, tokenizer, directions = tiny
    for position, message in ((0, "is zero"), (9, "out of range")):
        with pytest.raises(AbliterateError, match=message):
            choose(model, tokenizer, directions, HARMFUL, HARMLESS, position=position)


def test_cli_writes_directions(tiny_dir, tmp_path, capsys):
    files = {}
    for name, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(prompts) + "\n")
    common = [
        "measure",
        str(tiny_dir),
        "--harmful",
        str(files["harmful"]),
        "--harmless",
        str(files["harmless"]),
    ]
    out = tmp_path / "out"
    args = ["--out", str(out), "--batch-size", "3", "--chat-template-kwargs", "enable_thinking=false"]
    assert (
        main(
            [
                *common,
                *args,
                "--direction-position",
                "auto",
                "--kl-threshold",
                "1e9",
                "--harmful-val",
                str(files["harmful"]),
                "--harmless-val",
                str(files["harmless"]),
            ]
        )
        == 0
    )
    loaded = load_directions(out / "directions.safetensors")
    assert loaded.num_positions == 4 and loaded.selected_position in (1, 2)
    assert loaded.metadata["template"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert len(loaded.metadata["selection"]["candidates"]) == 2
    assert (out / "directions.json").is_file()
    assert "<- selected" in capsys.readouterr().out
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "none"),
                "--direction-position",
                "none",
                "--token-position",
                "-2",
            ]
        )
        == 0
    )
    loaded = load_directions(tmp_path / "none" / "directions.safetensors")
    assert loaded.selected_position is None and loaded.metadata["position"] == -2
    # Without validation files, a seeded fifth of each set is held out for selection.
    assert main([*common, "--out", str(tmp_path / "split"), "--kl-threshold", "1e9"]) == 0
    meta = load_directions(tmp_path / "split" / "directions.safetensors").metadata
    assert (meta["n_harmful"], meta["n_harmless"]) == (3, 3)
    assert main([*common, "--out", str(out), "--token-position", "3"]) == 2
    assert "--token-position" in capsys.readouterr().err
    assert main([*common, "--out", str(out), "--position", "3"]) == 2  # the older name still works
    assert "less than 0 (got 3)" in capsys.readouterr().err


def greedy_replies(model, tokenizer, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    texts = render_chat(tokenizer, prompts)
    batch = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tokenizer)
        )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.skipif(not DEMO_READY, reason="the demo model is not built")
def test_demo_auto_selected_direction_removes_refusals():
    model, tokenizer = load_model(DEMO_MODEL_DIR)
    load = lambda kind, split: load_prompts(prompt_file("demo", kind, split))  # noqa: E731
    directions = compute_directions(
        measure(
            model,
            tokenizer,
            load("harmful", "train"),
            load("harmless", "train"),
            *MEASURED,
            RUNTIME,
            progress=False,
        ),
        Measurement().direction_method,
    )
    selection = choose(model, tokenizer, directions, load("harmful", "val"), load("harmless", "val"))
    harmful_test, harmless_test = load("harmful", "test"), load("harmless", "test")
    before = [is_refusal(r) for r in greedy_replies(model, tokenizer, harmful_test)]
    encoded = encode_prompts(tokenizer, harmless_test, Template(), "harmless")
    base = first_token_logprobs(model, encoded, 16, pad_token_id(tokenizer))
    with DirectionEdit(directions.direction[selection.position].float()).applied(model):
        after = [is_refusal(r) for r in greedy_replies(model, tokenizer, harmful_test)]
        ablated = first_token_logprobs(model, encoded, 16, pad_token_id(tokenizer))
    kl = first_token_kl(base, ablated)
    print(
        f"selected {selection.position}: refusals {sum(before)}/{len(before)} -> {sum(after)}/{len(after)}, KL {kl:.4f}"
    )
    assert sum(before) / len(before) > 0.8
    assert sum(after) / len(after) < 0.1
    assert kl < 0.05


def test_direction_edit_is_the_plan_of_every_writer_at_scale_one(tiny, tiny_dir, tmp_path):
    """What selection scores a candidate with equals the ablation plan of every writer (embedding,
    attention, MLP and experts, with their biases) at scale 1 applied at inference time, to float32
    rounding: the plan's hooks project each expert's write, the direction edit their sum."""
    from abliterate.config import Ablation
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.inference_edit import PlanEdit, storage_dtypes
    from abliterate.edit.matching import resolve_plan
    from abliterate.edit.plan import build_plan
    from abliterate.measure.direction_file import save_directions
    from abliterate.vocabulary import OPTIONAL_TARGETS, WRITER_ROLES
    from abliterate.weights.checkpoint import choose_profile

    model, tokenizer, directions = tiny
    path = save_directions(tmp_path / "d.safetensors", directions.direction.float(), {"selected_position": 2})
    inputs = load_inputs(tiny_dir, path)
    writers = Ablation(
        targets=[r for r in WRITER_ROLES if r != "embed"] + list(OPTIONAL_TARGETS), biases=True
    )
    s = inputs.structure
    plan = resolve_plan(build_plan(s.num_layers, s.mtp_layers, writers, "auto"), inputs)
    edit = PlanEdit(plan, inputs.directions, choose_profile(tiny_dir), storage_dtypes(inputs.inventory))
    encoded = encode_prompts(tokenizer, HARMFUL + HARMLESS, Template(), "prompt")
    pad = pad_token_id(tokenizer)
    base = first_token_logprobs(model, encoded, 8, pad)
    with edit.applied(model):
        planned = first_token_logprobs(model, encoded, 8, pad)
    with DirectionEdit(directions.direction[2].float()).applied(model):
        ablated = first_token_logprobs(model, encoded, 8, pad)
    assert float((planned - ablated).abs().max()) < 1e-6 < 1e-2 < float((base - ablated).abs().max())
