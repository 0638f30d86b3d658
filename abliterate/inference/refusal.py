"""Refusal detection by marker phrases: a reply that contains one is counted as a refusal."""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import AbliterateError
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
        raise AbliterateError(f"marker file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise AbliterateError(f"marker file {path} is not UTF-8 text ({exc})") from exc
    markers = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not markers:
        raise AbliterateError(f"marker file {path} holds no marker: write one phrase per line")
    return markers
