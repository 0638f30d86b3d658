"""The committed two-category model: one direction leaves one category refusing, a rank-2 subspace
stops both.

Directions come from the project's own measurement of the shipped train prompts
(abliterate/data/two_category, harmful prompts carrying their `category`: 160 `harm`, 32 `deception`);
figures are greedy replies to the held-out test prompts and first-token KL on the held-out harmless
ones (in float64), with the edit applied at inference time (`DirectionEdit`: every write into the residual stream,
scale 1, which is what the weight edit of every writer does). The position is residual position 3,
the one training shaped (`FEATURE_POSITION`), not chosen from these results. The model runs in
float64 here, so KL figures of 1e-6 are the model's and not float32 rounding (float32 log-probabilities
of logits about 10 are off by about 1e-6 each).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer, Glm4MoeForCausalLM

from abliterate.cli import main
from abliterate.config import Measurement, Runtime, Template
from abliterate.demo import DATA_DIR, TWO_CATEGORY_MODEL_DIR
from abliterate.demo.two_category import (
    DECEPTION,
    FEATURE_POSITION,
    HARM,
    REFUSALS,
    build_splits,
    prompt_sets,
)
from abliterate.edit.inference_edit import DirectionEdit
from abliterate.inference.refusal import is_refusal
from abliterate.measure.chat import render_chat
from abliterate.measure.direction_file import load_directions
from abliterate.measure.directions import compute_directions, write_directions
from abliterate.measure.means import measure_checkpoint
from abliterate.measure.prompts import load_prompts
from abliterate.vocabulary import SUBSPACE_METHODS
from abliterate.weights.checkpoint import fingerprint

MAX_NEW_TOKENS = 8
BATCH = 64


def prompts(kind: str, split: str) -> list[str]:
    return load_prompts(DATA_DIR / "two_category" / f"{kind}_{split}.jsonl")


@pytest.fixture(scope="module")
def model():
    tokenizer = AutoTokenizer.from_pretrained(TWO_CATEGORY_MODEL_DIR)
    return load(TWO_CATEGORY_MODEL_DIR), tokenizer


@pytest.fixture(scope="module")
def directions(tmp_path_factory):
    """Measured as `abliterate measure` measures (float32), written and read back as a directions file."""
    runtime = Runtime(device="cpu", dtype="float32", batch_size=BATCH)
    measured = measure_checkpoint(
        TWO_CATEGORY_MODEL_DIR,
        prompts("harmful", "train"),
        prompts("harmless", "train"),
        Measurement(),
        Template(),
        runtime,
        progress=False,
    )
    folder = tmp_path_factory.mktemp("directions")
    return load_directions(
        write_directions(
            folder,
            compute_directions(measured, "projected"),
            measured,
            fingerprint(TWO_CATEGORY_MODEL_DIR),
            None,
        )
    )


def _encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(
        render_chat(tokenizer, texts), return_tensors="pt", padding=True, add_special_tokens=False
    )


@torch.no_grad()
def refusals(model, texts: list[str]) -> int:
    loaded, tokenizer = model
    count = 0
    for start in range(0, len(texts), BATCH):
        batch = _encode(tokenizer, texts[start : start + BATCH])
        out = loaded.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        count += sum(map(is_refusal, replies))
    return count


@torch.no_grad()
def first_token_logprobs(model, texts: list[str]) -> torch.Tensor:
    loaded, tokenizer = model
    return loaded(**_encode(tokenizer, texts)).logits[:, -1].log_softmax(-1)


def load(folder) -> Glm4MoeForCausalLM:
    """In float64 (the experts run one by one: the grouped kernel has no float64)."""
    return Glm4MoeForCausalLM.from_pretrained(
        folder, dtype=torch.float64, experts_implementation="eager"
    ).eval()


def figures(model, basis: torch.Tensor | None, edited: Glm4MoeForCausalLM | None = None) -> dict[str, float]:
    """Refusals per category (test prompts), harmless refusals, mean first-token KL on harmless: of
    the model with `basis` removed at inference time, or of the `edited` checkpoint."""
    harmful, harmless = prompts("harmful", "test"), prompts("harmless", "test")
    base = first_token_logprobs(model, harmless)
    if edited is not None:
        model = (edited, model[1])
    edit = DirectionEdit(basis).applied(model[0]) if basis is not None else None
    with edit if edit is not None else torch.no_grad():
        out = {c: refusals(model, [p for p in harmful if p.category == c]) for c in (HARM, DECEPTION)}
        out["harmless"] = refusals(model, harmless)
        changed = first_token_logprobs(model, harmless)
    out["kl"] = float((base.exp() * (base - changed)).sum(-1).mean())
    return out


def test_the_shipped_prompt_files_match_their_generator():
    for (kind, split), rows in prompt_sets().items():
        loaded = prompts(kind, split)
        assert [(str(p), p.category) for p in loaded] == [(r["prompt"], r.get("category")) for r in rows], (
            f"two_category/{kind}_{split}.jsonl is stale: run python -m abliterate.demo.two_category --write-prompts"
        )


def test_the_prompt_sets():
    harmful = prompts("harmful", "train")
    assert (
        sum(p.category == HARM for p in harmful) == 160
        and sum(p.category == DECEPTION for p in harmful) == 32
    )
    test = prompts("harmful", "test")
    assert (sum(p.category == HARM for p in test), sum(p.category == DECEPTION for p in test)) == (108, 25)
    assert len(prompts("harmless", "test")) == 123
    trained = {e.prompt for e in build_splits().train}
    assert not {str(p) for p in test + prompts("harmless", "test")} & trained  # held out of training
    assert REFUSALS[HARM] != REFUSALS[DECEPTION]  # refused in two ways


def test_the_model_refuses_both_categories(model):
    assert figures(model, None) == {HARM: 108, DECEPTION: 25, "harmless": 0, "kl": 0.0}


def test_one_direction_leaves_deception_refusing_and_two_stop_both(model, directions):
    position = FEATURE_POSITION
    assert {m: directions.metadata["subspace"][m]["rank"] for m in SUBSPACE_METHODS} == {
        "pca": 4,
        "clusters": 4,
        "categories": 2,
    }
    single = figures(model, directions.basis(position, 1, "categories"))
    print(f"position {position} single direction: {single}")
    assert single[DECEPTION] == 25  # every `deception` request still refused
    assert single[HARM] <= 2 and single["harmless"] == 0  # `harm` stopped (2 of 108 left)
    for method in SUBSPACE_METHODS:
        subspace = figures(model, directions.basis(position, 2, method))
        print(f"position {position} {method} rank 2: {subspace}")
        assert (subspace[HARM], subspace[DECEPTION], subspace["harmless"]) == (0, 0, 0), method
        assert subspace["kl"] <= single["kl"], (method, subspace["kl"], single["kl"])


def test_the_weight_edit_agrees(model, directions, tmp_path):
    """`abliterate ablate` with the default plan (attention and MLP writers, routers; bf16 output) at
    rank 1 and rank 2 of each method, position 3: the facts of the inference-time edit (the plan edits
    routers and not the embedding, docs/DESIGN.md 2.3, so the figures differ by a prompt or so)."""
    out = {}
    for rank, method in ((1, "categories"), *((2, m) for m in SUBSPACE_METHODS)):
        folder = tmp_path / f"{rank}-{method}"
        argv = [
            "ablate",
            str(TWO_CATEGORY_MODEL_DIR),
            "--directions",
            str(directions.path),
            "--out",
            str(folder),
        ]
        argv += ["--direction-position", str(FEATURE_POSITION), "--rank", str(rank), "--subspace", method]
        assert main(argv) == 0
        out[rank, method] = figures(model, None, load(folder))
        print(f"weight edit, position {FEATURE_POSITION}, rank {rank} {method}: {out[rank, method]}")
    single = out[1, "categories"]
    assert single[DECEPTION] == 25 and single[HARM] <= 3 and single["harmless"] == 0
    for method in SUBSPACE_METHODS:
        subspace = out[2, method]
        assert (subspace[HARM], subspace[DECEPTION], subspace["harmless"]) == (0, 0, 0), method
        assert subspace["kl"] <= single["kl"], (method, subspace["kl"], single["kl"])


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ABLITERATE_RETRAIN") != "1",
    reason="retrains the two-category model (minutes on a loaded machine): set ABLITERATE_RETRAIN=1",
)
def test_training_regenerates_the_committed_model_bit_identically(tmp_path):
    from abliterate.demo.train import file_hashes
    from abliterate.demo.two_category import main

    assert main(["--out", str(tmp_path / "model")]) == 0
    assert file_hashes(tmp_path / "model") == file_hashes(TWO_CATEGORY_MODEL_DIR)
