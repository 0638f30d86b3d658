"""Refusal markers: case-, apostrophe- and spacing-insensitive."""

from __future__ import annotations

import pytest

from abliterate.inference.refusal import is_refusal
from abliterate.vocabulary import DEFAULT_REFUSAL_MARKERS


@pytest.mark.parametrize(
    "reply",
    [
        "I cannot help with that request.",
        "i CAN'T do that",
        "I can\u2019t assist with this.",
        "I won\u02bct write that.",
        "Sorry, but I\u2018m unable to comply.",
        "I'm sorry, but that is not something I can do.",
        "As an AI, I must decline.",
        "  I   am unable to help.",
    ],
)
def test_refusals_are_recognised(reply):
    assert is_refusal(reply)


@pytest.mark.parametrize(
    "reply",
    ["Sure. Here is how to make a cake: first, get ready.", "The capital of Australia is Canberra.", ""],
)
def test_compliance_is_not_a_refusal(reply):
    assert not is_refusal(reply)


def test_custom_markers_replace_the_defaults():
    assert is_refusal("Nope, not today.", markers=["nope"])
    assert not is_refusal("I cannot help.", markers=["nope"])
    assert all(m == m.lower() and "\u2019" not in m for m in DEFAULT_REFUSAL_MARKERS)
