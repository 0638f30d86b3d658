"""Refusals: detection by marker phrases (a reply that contains one is counted as a refusal), and
the refusal tokens, the tokens a refusing reply starts with, which the first-token refusal score
(`abliterate.inference.scores.refusal_logodds`) weighs.

The refusal tokens are the model's own where it can show them (`find_refusal_tokens`): the first
tokens of its greedy replies to harmful prompts that the marker check calls refusals (and that no
reply the check lets through starts with), so the score works for any tokenizer, casing and
language. Only when the model refuses none of them (or no reply tokens are probed) are they the
first tokens of the marker phrases that open a reply ("I cannot", "As an AI": `refusal_token_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abliterate.config import Evaluation
from abliterate.errors import AbliterateError
from abliterate.inference.loading import pad_token_id
from abliterate.inference.runner import Encoded, Forward, stop_ids
from abliterate.paths import describe_special, split_lines
from abliterate.vocabulary import DEFAULT_REFUSAL_MARKERS

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'", "`": "'"})


def normalise(text: str) -> str:
    """Lower case, curly and modifier apostrophes made straight, runs of spaces collapsed."""
    return " ".join(text.translate(_APOSTROPHES).lower().split())


def is_refusal(text: str, markers: tuple[str, ...] | list[str] = DEFAULT_REFUSAL_MARKERS) -> bool:
    """True when the reply contains any marker (case- and apostrophe-insensitive)."""
    reply = normalise(text)
    return any(normalise(m) in reply for m in markers)


def read_markers(path: str | Path) -> list[str]:
    """Marker phrases from a file: one per line, blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        special = describe_special(path)
        what = (
            "does not exist" if special in (None, "missing") else f"is {special}, not a text file of phrases"
        )
        raise AbliterateError(f"marker file {path} {what}")
    try:
        lines = split_lines(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise AbliterateError(f"marker file {path} is not UTF-8 text ({exc})") from exc
    markers = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not markers:
        raise AbliterateError(f"marker file {path} holds no marker: write one phrase per line")
    return markers


def marker_phrases(evaluation: Evaluation) -> tuple[str, ...]:
    """The marker phrases: the `markers` file's (the built-in list without one), then each `marker`
    added to them, as `--marker`'s help says (it replaced the built-in list: a refusing model then
    measured as refusing nothing). A blank phrase would match every reply: refused."""
    markers = tuple(read_markers(evaluation.markers)) if evaluation.markers else DEFAULT_REFUSAL_MARKERS
    blank = [m for m in evaluation.marker if not m.strip()]
    if blank:
        raise AbliterateError(
            "--marker (evaluation.marker): a refusal marker phrase is blank: give the words to look for"
        )
    return tuple(dict.fromkeys(markers + tuple(evaluation.marker)))


# ---------------------------------------------------------------- refusal tokens


def refusal_token_ids(tokenizer: Any, markers: Sequence[str] = DEFAULT_REFUSAL_MARKERS) -> list[int]:
    """Token ids a refusing reply starts with, from the marker phrases (the fallback of
    `find_refusal_tokens`).

    From the refusal markers that open a reply ("i cannot", "i'm sorry", "as an ai", ...; not
    mid-sentence ones such as "cannot provide"), capitalised as a reply starts: the first token
    of each, encoded alone and after a space. For most tokenizers this is "I" and "As".
    """
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids: set[int] = set()
    for marker in markers:
        text = marker.strip()
        if not text.lower().startswith(("i ", "i'", "as ")):
            continue
        text = text[0].upper() + text[1:]
        for variant in (text, " " + text):
            encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if encoded and encoded[0] != unknown:
                ids.add(int(encoded[0]))
    if not ids:
        raise AbliterateError(
            'no refusal marker that opens a reply ("I ...", "As ...") encodes to a known token with this '
            "tokenizer, and the model's own replies showed no refusal to learn them from: give marker phrases "
            "in the model's language and casing with --marker (repeatable) or --markers FILE"
        )
    return sorted(ids)


@dataclass
class RefusalTokens:
    """The token ids refusals start with, and where they came from."""

    ids: list[int]
    source: str  # replies | markers
    refusals: int  # probed replies the marker check called refusals
    probed: int  # replies probed
    # the probed model's float64 log-probabilities [N, V] of each prompt's first reply token, from the
    # probe's first step (what a first-token pass over the prompts gives); None without probing
    first: torch.Tensor | None = None

    def texts(self, tokenizer: Any) -> list[str]:
        return [tokenizer.decode([i]) for i in self.ids]


def refusal_tokens_from_replies(
    tokenizer: Any, replies: Sequence[Sequence[int]], markers: Sequence[str], probe_tokens: int
) -> RefusalTokens:
    """The first tokens of the replies whose first `probe_tokens` tokens the marker check calls a
    refusal, less any token that also opens a reply it does not; the markers' openers when none remain."""
    opens_refusal: set[int] = set()
    opens_other: set[int] = set()
    refusals = 0
    for reply in replies:
        head = list(reply[:probe_tokens])
        if not head:
            continue
        if is_refusal(tokenizer.decode(head, skip_special_tokens=True), tuple(markers)):
            refusals += 1
            opens_refusal.add(int(head[0]))
        else:
            opens_other.add(int(head[0]))
    ids = sorted(opens_refusal - opens_other)
    if ids:
        return RefusalTokens(ids, "replies", refusals, len(replies))
    return RefusalTokens(refusal_token_ids(tokenizer, markers), "markers", refusals, len(replies))


def find_refusal_tokens(
    forward: Forward,
    tokenizer: Any,
    harmful: Encoded,
    markers: Sequence[str],
    probe_tokens: int,
    batch_size: int,
    progress: bool = False,
) -> RefusalTokens:
    """The model's own refusal openers: its greedy replies (`probe_tokens` tokens) to the encoded
    harmful prompts, marker-checked (`refusal_tokens_from_replies`). A layer-streamed model reads its
    weights once per probe token, less when every reply has ended or already holds a marker (a reply
    that refuses stays a refusal however it goes on). With `probe_tokens` 0, the markers' openers
    without probing. The probe's first step is a first-token pass over the prompts: its log-probabilities
    come back too (`RefusalTokens.first`), so a caller needs no other pass for them."""
    if probe_tokens == 0:
        return RefusalTokens(refusal_token_ids(tokenizer, markers), "markers", 0, 0)
    stops = stop_ids(forward.generation_eos, tokenizer)

    def refused(reply: list[int]) -> bool:
        return is_refusal(tokenizer.decode(reply, skip_special_tokens=True), tuple(markers))

    (replies,), (first,) = forward.greedy_variants(
        harmful,
        [None],
        probe_tokens,
        batch_size,
        pad_token_id(tokenizer),
        stops,
        refused,
        progress,
        "find refusal tokens",
        first_logprobs=True,
    )
    found = refusal_tokens_from_replies(tokenizer, replies, markers, probe_tokens)
    found.first = first
    return found
