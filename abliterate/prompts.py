"""Prompt sets: read them from plain files, hash them, split them reproducibly.

Formats, chosen by the file extension:
- .txt: one prompt per line;
- .jsonl: one JSON value per line: an object with a `prompt` or `text` field (or `column`), or a string;
- .json: a list of strings, or a list of such objects;
- .csv and .parquet: a column named `column`, else `prompt`, else `text`.

Prompts are stripped and blank ones dropped. Duplicates are dropped with a warning that
counts them, so that a repeated prompt does not weigh twice in a mean.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import warnings
from pathlib import Path

from abliterate.errors import AbliterateError

DEFAULT_COLUMNS = ("prompt", "text")
FORMATS = (".txt", ".jsonl", ".json", ".csv", ".parquet")


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """The file's prompts, stripped, blanks and duplicates dropped, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise AbliterateError(f"{path}: unsupported prompt file type {suffix!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise AbliterateError(f"{path}: prompt file not found")
    if suffix == ".parquet":
        raw = _read_parquet(path, column)
    else:
        text = _read_text(path)
        if suffix == ".txt":
            raw = text.splitlines()
        elif suffix == ".jsonl":
            raw = _read_jsonl(path, text, column)
        elif suffix == ".json":
            raw = _read_json(path, text, column)
        else:
            raw = _read_csv(path, text, column)
    return _clean(path, raw)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise AbliterateError(
            f"{path}: not valid UTF-8 at byte offset {exc.start} (line {line}); re-save the file as UTF-8"
        ) from exc


def _pick_column(path: Path, present: list[str], column: str | None) -> str:
    wanted = [column] if column else list(DEFAULT_COLUMNS)
    for name in wanted:
        if name in present:
            return name
    shown = ", ".join(repr(c) for c in present) or "none"
    ask = f"column {column!r}" if column else "a 'prompt' or 'text' column"
    raise AbliterateError(f"{path}: no {ask}; columns present: {shown}. Pass the right column name.")


def _field(path: Path, item: object, column: str | None, where: str) -> object:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return item[_pick_column(path, list(item), column)]
    raise AbliterateError(f"{path}: {where} is a {type(item).__name__}; expected a string or an object")


def _read_jsonl(path: Path, text: str, column: str | None) -> list[object]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AbliterateError(f"{path}: line {n} is not valid JSON ({exc.msg})") from exc
        out.append(_field(path, item, column, f"line {n}"))
    return out


def _read_json(path: Path, text: str, column: str | None) -> list[object]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AbliterateError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, list):
        raise AbliterateError(f"{path}: expected a JSON list of strings or objects, got {type(data).__name__}")
    return [_field(path, item, column, f"item {i}") for i, item in enumerate(data)]


def _read_csv(path: Path, text: str, column: str | None) -> list[object]:
    reader = csv.DictReader(io.StringIO(text))
    name = _pick_column(path, list(reader.fieldnames or []), column)
    return [row[name] for row in reader]


def _read_parquet(path: Path, column: str | None) -> list[object]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise AbliterateError(f"{path}: cannot read as parquet ({exc})") from exc
    name = _pick_column(path, table.column_names, column)
    return table.column(name).to_pylist()


def _clean(path: Path, raw: list[object]) -> list[str]:
    prompts: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    for value in raw:
        if value is None:
            continue
        if not isinstance(value, str):
            raise AbliterateError(f"{path}: prompt {value!r} is a {type(value).__name__}, not text")
        prompt = value.strip()
        if not prompt:
            continue
        if prompt in seen:
            duplicates += 1
            continue
        seen.add(prompt)
        prompts.append(prompt)
    if not prompts:
        raise AbliterateError(f"{path}: no prompts (the file is empty or holds only blank entries)")
    if duplicates:
        warnings.warn(f"{path}: dropped {duplicates} duplicate prompt(s); {len(prompts)} remain", stacklevel=3)
    return prompts


def prompts_sha256(prompts: list[str]) -> str:
    """Stable hash of the ordered list (JSON-encoded, so no separator can be forged)."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()


def split_prompts(prompts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with `seed`, return (first `fraction` of them, the rest); both keep at least one."""
    if not 0.0 < fraction < 1.0:
        raise AbliterateError(f"split fraction must lie strictly between 0 and 1, got {fraction}")
    if len(prompts) < 2:
        raise AbliterateError(f"cannot split {len(prompts)} prompt(s) in two: give at least 2")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    k = min(max(1, round(len(order) * fraction)), len(order) - 1)
    return order[:k], order[k:]
