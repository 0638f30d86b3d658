"""Behavioural evaluation: replies, refusal rates, first-token KL, examples, the CLI, the demo figures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from numerics import accumulation_length, logits_rtol
from tiny_chat_model import HARMFUL, HARMLESS, build_tiny_chat_model

from abliterate.check.evaluate import compare, evaluate_loaded, evaluate_model, measure_behaviour
from abliterate.check.validate import validate_output
from abliterate.cli import main
from abliterate.config import Evaluation, Runtime, Template
from abliterate.demo import DEMO_MODEL_DIR, KINDS, SPLITS, prompt_file
from abliterate.edit.ablate import ablate_checkpoint
from abliterate.errors import AbliterateError
from abliterate.inference.loading import load_model
from abliterate.inference.refusal import is_refusal
from abliterate.measure.chat import render_chat
from abliterate.measure.direction_file import save_directions
from abliterate.measure.prompts import load_prompts

CPU = Runtime(device="cpu", dtype="float32")
FAST = (Evaluation(max_new_tokens=6), Template(), CPU.model_copy(update={"batch_size": 3}))


def settings(batch_size: int = 16, **evaluation) -> tuple[Evaluation, Template, Runtime]:
    """The sections evaluation takes: Evaluation(**evaluation), the default template, the CPU in float32."""
    return Evaluation(**evaluation), Template(), CPU.model_copy(update={"batch_size": batch_size})


DEMO_READY = (DEMO_MODEL_DIR / "config.json").is_file()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """(original, ablated) tiny random GLM-4.5-MoE chat models; the ablated one by the engine."""
    root = tmp_path_factory.mktemp("evaluate")
    original = build_tiny_chat_model(root / "original")
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(4, 32, generator=gen)
    directions = save_directions(
        root / "directions.safetensors",
        direction / direction.norm(dim=-1, keepdim=True),
        {"selected_position": 2},
    )
    ablated = root / "ablated"
    ablate_checkpoint(original, directions, ablated, progress=False, log=lambda _: None)
    return original, ablated


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return load_model(tiny_dirs[0])


def unbatched_logprobs(model, tokenizer, prompts, logits_norms: list | None = None) -> torch.Tensor:
    """First reply-token log-probabilities, one prompt at a time, without padding (the logits' norms
    appended to `logits_norms`)."""
    rows = []
    for text in render_chat(tokenizer, prompts):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -1].double()
        rows.append(torch.log_softmax(logits, dim=-1))
        if logits_norms is not None:
            logits_norms.append((float(logits.norm()), ids.shape[1]))
    return torch.stack(rows)


def test_batching_changes_nothing(tiny):
    model, tokenizer = tiny
    batched = measure_behaviour(model, tokenizer, HARMFUL, HARMLESS, *FAST, progress=False)
    single = measure_behaviour(
        model, tokenizer, HARMFUL, HARMLESS, *settings(batch_size=1, max_new_tokens=6), progress=False
    )
    assert batched.harmful_replies == single.harmful_replies
    assert batched.harmless_replies == single.harmless_replies
    assert all(batched.harmful_replies) and len(batched.harmless_replies) == len(HARMLESS)
    # Padded batches vs single prompts: the same float32 layers on other shapes. Logits differ by at
    # most logits_rtol |logits| (tests/numerics.py); log_softmax at most doubles that.
    norms: list = []
    single_logprobs = unbatched_logprobs(model, tokenizer, HARMLESS, norms)
    n = accumulation_length(model.config.to_dict(), max(t for _, t in norms))
    atol = 2 * logits_rtol(model.config.num_hidden_layers, n) * max(z for z, _ in norms)
    torch.testing.assert_close(batched.harmless_logprobs, single_logprobs, rtol=0, atol=atol)


def test_refusal_rates_follow_the_markers(tiny):
    model, tokenizer = tiny
    behaviour = measure_behaviour(model, tokenizer, HARMFUL, HARMLESS, *FAST, progress=False)
    # A random model never says a default marker; pick a word some replies hold as the marker.
    marker = behaviour.harmful_replies[0].split()[0].upper()  # matching ignores case
    markers = (marker,)
    sections = settings(batch_size=3, max_new_tokens=6, marker=[marker])
    result = evaluate_loaded(model, tokenizer, HARMFUL, HARMLESS, *sections, progress=False)
    expected_harmful = sum(is_refusal(r, markers) for r in behaviour.harmful_replies) / len(HARMFUL)
    expected_harmless = sum(is_refusal(r, markers) for r in behaviour.harmless_replies) / len(HARMLESS)
    assert result.refusal_rate_harmful == expected_harmful >= 1 / len(HARMFUL)
    assert result.refusal_rate_harmless == expected_harmless
    default = evaluate_loaded(model, tokenizer, HARMFUL, HARMLESS, *FAST, progress=False)
    assert default.refusal_rate_harmful == 0.0 and default.kl_harmless is None


def test_kl_against_the_baseline(tiny_dirs):
    original, ablated = tiny_dirs
    sections = settings(max_new_tokens=4)
    same = evaluate_model(
        original, HARMFUL, HARMLESS, *sections, False, baseline_dir=original, progress=False
    )
    assert same.kl_harmless == 0.0
    result = evaluate_model(
        ablated, HARMFUL, HARMLESS, *sections, False, baseline_dir=original, progress=False
    )
    # The forward passes evaluate_model runs (same batches, same kernels), so only the formula is
    # checked: KL(baseline || model), mean over the harmless prompts, in nats. (Batched vs single
    # prompts is test_batching_changes_nothing: its rounding bound is above a KL this small.)
    before = measure_behaviour(
        *load_model(original), HARMFUL, HARMLESS, *sections, progress=False
    ).harmless_logprobs
    after = measure_behaviour(
        *load_model(ablated), HARMFUL, HARMLESS, *sections, progress=False
    ).harmless_logprobs
    terms = before.exp() * (before - after)
    expected = float(terms.sum(-1).mean())
    assert expected > 1e-6
    # float64 sums of V terms over N prompts, here and in the code: at most (V + N + 2) 2^-53 of
    # sum |terms| each
    bound = 2 * (terms.shape[-1] + terms.shape[0] + 2) * 2.0**-53 * float(terms.abs().sum(-1).mean())
    assert abs(result.kl_harmless - expected) <= bound
    assert result.n_harmful == len(HARMFUL) and result.n_harmless == len(HARMLESS)


def test_examples_table_and_json(tiny_dirs):
    original, ablated = tiny_dirs
    result = evaluate_model(
        ablated,
        HARMFUL,
        HARMLESS,
        *settings(max_new_tokens=4, examples=2),
        False,
        baseline_dir=original,
        progress=False,
    )
    rows = [vars(row) for row in result.examples]
    assert list(rows[0]) == [
        "prompt",
        "kind",
        "response_before",
        "response_after",
        "refused_before",
        "refused_after",
    ]
    assert [r["prompt"] for r in rows] == HARMFUL[:2] + HARMLESS[:2]
    assert [r["kind"] for r in rows] == ["harmful", "harmful", "harmless", "harmless"]
    assert all(isinstance(r["response_before"], str) and isinstance(r["response_after"], str) for r in rows)
    data = json.loads(json.dumps(result.to_json()))
    for key in ("refusal_rate_harmful", "refusal_rate_harmless", "kl_harmless", "n_harmful", "n_harmless"):
        assert key in data
    assert data["baseline_refusal_rate_harmful"] == 0.0 and data["model"] == str(ablated)
    assert set(result.metrics()) >= {"refusal_rate_harmful", "kl_harmless", "baseline_refusal_rate_harmless"}
    summary = result.summary()  # every figure labelled: before (the baseline) and after
    assert "refusal rate on harmful prompts (full replies): 0 before, " in summary
    assert " after" in summary.splitlines()[1]


def test_compare_needs_one_vocabulary(tiny):
    model, tokenizer = tiny
    behaviour = measure_behaviour(model, tokenizer, HARMFUL[:1], HARMLESS[:1], *FAST, progress=False)
    other = measure_behaviour(model, tokenizer, HARMFUL[:1], HARMLESS[:1], *FAST, progress=False)
    other.harmless_logprobs = other.harmless_logprobs[:, :-1]
    with pytest.raises(AbliterateError, match="vocabulary"):
        compare(HARMFUL[:1], HARMLESS[:1], behaviour, other, *FAST)


def test_bad_settings_and_prompts(tiny):
    model, tokenizer = tiny
    for section, kwargs, message in (
        (Evaluation, {"max_new_tokens": 0}, "max-new-tokens"),
        (Runtime, {"batch_size": 0}, "batch-size"),
        (Evaluation, {"marker": ["ok", " "]}, "marker phrase is blank"),
    ):
        with pytest.raises(AbliterateError, match=message):
            section(**kwargs)
    with pytest.raises(AbliterateError, match="harmless test prompt set is empty"):
        evaluate_loaded(model, tokenizer, HARMFUL, [], *FAST, progress=False)
    # The tiny model has 64 positions.
    with pytest.raises(
        AbliterateError, match="harmful test prompt #0 is .* exceeds the model's context of 64"
    ):
        evaluate_loaded(model, tokenizer, HARMFUL, HARMLESS, *settings(max_new_tokens=60), progress=False)


def test_cli(tiny_dirs, tmp_path, capsys):
    original, ablated = tiny_dirs
    harmful, harmless, markers = tmp_path / "harmful.txt", tmp_path / "harmless.txt", tmp_path / "markers.txt"
    harmful.write_text("\n".join(HARMFUL) + "\n")
    harmless.write_text("\n".join(HARMLESS) + "\n")
    markers.write_text("# one phrase per line\nzebra crossing\n")
    argv = ["evaluate", str(ablated), "--baseline", str(original), "--harmful", str(harmful)]
    argv += [
        "--harmless",
        str(harmless),
        "--max-new-tokens",
        "3",
        "--markers",
        str(markers),
        "--marker",
        "me",
    ]
    assert main(argv + ["--json", "--quiet", "--out", str(tmp_path / "eval.json")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads((tmp_path / "eval.json").read_text())
    assert data["settings"]["markers"] == ["zebra crossing", "me"]
    assert data["n_harmful"] == 4 and math.isfinite(data["kl_harmless"])
    assert (
        main(["evaluate", str(ablated), "--harmful", str(harmful), "--harmless", str(tmp_path / "none.txt")])
        == 2
    )


@pytest.mark.slow
@pytest.mark.skipif(not DEMO_READY, reason="the demo model is not built")
def test_demo_before_and_after_ablation(tmp_path):
    """The whole pipeline on the demo model: measure, ablate, validate, evaluate on the test split."""
    files = {(kind, split): str(prompt_file("demo", kind, split)) for kind in KINDS for split in SPLITS}
    measure_argv = ["measure", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "measure")]
    measure_argv += ["--harmful", files["harmful", "train"], "--harmless", files["harmless", "train"]]
    measure_argv += ["--harmful-val", files["harmful", "val"], "--harmless-val", files["harmless", "val"]]
    assert main(measure_argv) == 0
    directions = tmp_path / "measure" / "directions.safetensors"
    assert (
        main(
            [
                "ablate",
                str(DEMO_MODEL_DIR),
                "--directions",
                str(directions),
                "--out",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    report = validate_output(DEMO_MODEL_DIR, tmp_path / "out", progress=False)
    assert report.ok, report.failures
    result = evaluate_model(
        tmp_path / "out",
        load_prompts(files["harmful", "test"]),
        load_prompts(files["harmless", "test"]),
        Evaluation(),
        Template(),
        CPU,
        False,
        baseline_dir=DEMO_MODEL_DIR,
        progress=False,
    )
    print(result.summary())
    assert result.baseline_refusal_rate_harmful >= 0.95
    assert result.refusal_rate_harmful < 0.10
    assert result.kl_harmless < 0.05
