"""Refusal tokens from the model itself: the first tokens of its greedy replies that the marker check
(which ignores case) calls refusals; the markers' openers only as the fallback; --marker in measure."""

from __future__ import annotations

import pytest
from tiny_chat_model import WORDS

from abliterate.cli import main
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.demo.train import build_tokenizer
from abliterate.errors import AbliterateError
from abliterate.inference.refusal import is_refusal, refusal_token_ids, refusal_tokens_from_replies
from abliterate.measure.direction_file import load_directions


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([WORDS])


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_marker_check_ignores_case_and_apostrophe_shapes():
    assert is_refusal("I CAN\u2019T help with that", ("i can't",))
    assert is_refusal("sorry,   I   cannot", ("I Cannot",))
    assert not is_refusal("I can help", ("i cannot",))


def test_refusal_tokens_come_from_the_replies_in_any_casing_or_wording(tokenizer):
    """A vocabulary where no marker phrase opens a reply ("I ..."/"As ..."): the fixed list finds nothing,
    the model's own refusals do. The marker is upper case, the replies lower case."""
    markers = ("STEAL A CAR",)
    with pytest.raises(AbliterateError, match="--marker"):
        refusal_token_ids(tokenizer, markers)
    replies = [
        ids(tokenizer, "steal a car now"),
        ids(tokenizer, "steal a car please"),
        ids(tokenizer, "write a poem"),
    ]
    found = refusal_tokens_from_replies(tokenizer, replies, markers, probe_tokens=6)
    assert found.source == "replies" and found.refusals == 2 and found.probed == 3
    assert found.ids == [replies[0][0]] and found.texts(tokenizer) == [tokenizer.decode([replies[0][0]])]
    # only the first probe_tokens tokens are checked: "steal a" holds no "steal a car", so nothing refuses,
    # and this marker opens no reply either
    with pytest.raises(AbliterateError, match="--marker"):
        refusal_tokens_from_replies(tokenizer, replies, markers, probe_tokens=2)


def test_a_token_that_also_opens_answers_is_not_a_refusal_token(tokenizer):
    """Replies that all start alike (a template's opener, "<think>"): the first token tells nothing, so
    the fixed openers are used."""
    replies = [ids(tokenizer, "help steal a car"), ids(tokenizer, "help my neighbor")]
    found = refusal_tokens_from_replies(tokenizer, replies, ("steal a car", "I cannot"), probe_tokens=6)
    assert found.source == "markers" and found.ids == refusal_token_ids(tokenizer, ("I cannot",))


@pytest.mark.parametrize(
    ("markers", "expected"), [(["--marker", "I CANNOT"], 0), (["--markers", "zebra.txt"], 2)]
)
def test_measure_takes_markers(tmp_path, capsys, markers, expected):
    """--marker and --markers reach selection: the demo's refusals ("I cannot ...") give "I"; a markers file
    whose only phrase its replies never hold, and that opens no reply, leaves no refusal token: one line
    that names --marker. (`--marker` adds to the built-in list, which finds the demo's refusals.)"""
    if markers[0] == "--markers":
        (tmp_path / "zebra.txt").write_text("zebra\n")
        markers = ["--markers", str(tmp_path / "zebra.txt")]
    harmful, harmless = prompt_file("demo", "harmful", "val"), prompt_file("demo", "harmless", "val")
    argv = [
        "measure",
        str(DEMO_MODEL_DIR),
        "--harmful",
        str(harmful),
        "--harmless",
        str(harmless),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        *markers,
    ]
    assert main(argv) == expected
    if expected == 0:
        selection = load_directions(tmp_path / "out" / "directions.safetensors").metadata["selection"]
        assert selection["refusal_tokens"] == ["I"] and selection["refusal_tokens_source"] == "replies"
        assert selection["refusals_found"] > 0
    else:
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert (
            len(errors) == 1
            and errors[0].startswith("abliterate measure: error:")
            and "--marker" in errors[0]
        )
