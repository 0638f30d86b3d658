"""Prompt sets: read them from plain files, hash them, split them reproducibly.

Formats, chosen by the file extension:
- .txt: one prompt per line;
- .jsonl: one JSON value per line: an object with a `prompt` or `text` field (or `column`), or a string;
- .json: a list of strings, or a list of such objects;
- .csv and .parquet: a column named `column`, else `prompt`, else `text`.

An object or row may also carry a `category` (text): the prompt keeps it (`Prompt.category`), and
the measurement then finds one direction per category (`abliterate.measure.subspace`).

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
from abliterate.paths import describe_special, split_lines

DEFAULT_COLUMNS = ("prompt", "text")
CATEGORY_FIELD = "category"
FORMATS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
CSV_FIELD_LIMIT = 1 << 30  # characters in one CSV field: any prompt a model could read


class Prompt(str):
    """A prompt's text that remembers where it was read (`where`: file and line, item or row), so
    that an error about one prompt names it there, even after the set was shuffled and split, and
    its `category` when the file gives one. It is a `str` in every other way: equal, hashed,
    serialised and tokenised as its text."""

    where: str | None
    category: str | None

    def __new__(cls, text: str, where: str | None = None, category: str | None = None) -> Prompt:
        prompt = super().__new__(cls, text)
        prompt.where = where
        prompt.category = category
        return prompt

    def __reduce__(self):
        return (Prompt, (str(self), self.where, self.category))


def describe_prompt(prompt: str, fallback: str) -> str:
    """`where` a prompt was read (`FILE line N`), or `fallback` for a prompt from elsewhere."""
    return getattr(prompt, "where", None) or fallback


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """The file's prompts, stripped, blanks and duplicates dropped, in file order; each a `Prompt`
    that knows its file and line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():  # first: a directory or a device is named as such, whatever its suffix
        special = describe_special(path)
        what = "prompt file not found" if special in (None, "missing") else f"is {special}, not a prompt file"
        raise AbliterateError(f"{path}: {what}")
    if suffix not in FORMATS:
        raise AbliterateError(
            f"{path}: unsupported prompt file type {suffix!r}; use one of {', '.join(FORMATS)}"
        )
    if suffix == ".parquet":
        raw = _read_parquet(path, column)
    else:
        text = _read_text(path)
        if suffix == ".txt":
            raw = [(line, f"line {n}", None) for n, line in enumerate(split_lines(text), start=1)]
        elif suffix == ".jsonl":
            raw = _read_jsonl(path, text, column)
        elif suffix == ".json":
            raw = _read_json(path, text, column)
        else:
            raw = _read_csv(path, text, column)
    return _clean(path, raw)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AbliterateError(f"{path}: cannot read ({exc.strerror})") from exc
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


def _field(path: Path, item: object, column: str | None, where: str) -> tuple[object, str, object]:
    if isinstance(item, str):
        return item, where, None
    if isinstance(item, dict):
        return item[_pick_column(path, list(item), column)], where, item.get(CATEGORY_FIELD)
    raise AbliterateError(f"{path}: {where} is a {type(item).__name__}; expected a string or an object")


def _read_jsonl(path: Path, text: str, column: str | None) -> list[tuple[object, str, object]]:
    out = []
    for n, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise AbliterateError(
                f"{path}: line {n} is not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})"
            ) from None
        out.append(_field(path, item, column, f"line {n}"))
    return out


def _read_json(path: Path, text: str, column: str | None) -> list[tuple[object, str, object]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AbliterateError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except RecursionError:
        raise AbliterateError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, list):
        raise AbliterateError(
            f"{path}: expected a JSON list of strings or objects, got {type(data).__name__}"
        )
    return [_field(path, item, column, f"item {i}") for i, item in enumerate(data)]


def _read_csv(path: Path, text: str, column: str | None) -> list[tuple[object, str, object]]:
    # A prompt may be longer than the csv module's default field limit (128 KiB); it is then
    # named with its line by the length check, not refused here as unreadable CSV.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.DictReader(io.StringIO(text))
    out = []
    try:
        name = _pick_column(path, list(reader.fieldnames or []), column)
        first = reader.line_num + 1
        for row in reader:
            out.append((row[name], f"line {first}", row.get(CATEGORY_FIELD)))
            first = reader.line_num + 1
    except csv.Error as exc:
        raise AbliterateError(f"{path}: line {reader.line_num} is not valid CSV ({exc})") from None
    return out


def _read_parquet(path: Path, column: str | None) -> list[tuple[object, str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise AbliterateError(f"{path}: cannot read as parquet ({exc})") from exc
    name = _pick_column(path, table.column_names, column)
    values = table.column(name).to_pylist()
    categories = (
        table.column(CATEGORY_FIELD).to_pylist()
        if CATEGORY_FIELD in table.column_names
        else [None] * len(values)
    )
    return [
        (value, f"row {i}", category)
        for i, (value, category) in enumerate(zip(values, categories, strict=True))
    ]


def _clean(path: Path, raw: list[tuple[object, str, object]]) -> list[str]:
    prompts: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    for value, where, category in raw:
        if value is None:
            continue
        if not isinstance(value, str):
            raise AbliterateError(f"{path}: {where}: prompt {value!r} is a {type(value).__name__}, not text")
        if category is not None and not isinstance(category, str):
            raise AbliterateError(
                f"{path}: {where}: category {category!r} is a {type(category).__name__}, not text: write it as text"
            )
        category = (category.strip() or None) if isinstance(category, str) else None
        prompt = value.strip()
        if not prompt:
            continue
        if prompt in seen:
            duplicates += 1
            continue
        seen.add(prompt)
        prompts.append(Prompt(prompt, f"{path} {where}", category))
    if not prompts:
        raise AbliterateError(f"{path}: no prompts (the file is empty or holds only blank entries)")
    if duplicates:
        warnings.warn(
            f"{path}: dropped {duplicates} duplicate prompt(s); {len(prompts)} remain", stacklevel=3
        )
    return prompts


def prompts_sha256(prompts: list[str]) -> str:
    """Stable hash of the ordered list (JSON-encoded, so no separator can be forged); with each prompt's
    category when any has one (a set without categories hashes as it always did)."""
    categories = [getattr(p, "category", None) for p in prompts]
    value: list = [str(p) for p in prompts]
    if any(c is not None for c in categories):
        value = [[p, c] for p, c in zip(value, categories, strict=True)]
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode("utf-8")).hexdigest()


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
