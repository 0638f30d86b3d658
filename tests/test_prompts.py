"""Prompt loading in every format, its errors, hashing and splitting; the shipped sets."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from abliterate.demo import PROMPT_SETS, prompt_file
from abliterate.demo.prompt_sets import demo_sets, general_sets
from abliterate.errors import AbliterateError
from abliterate.measure.prompts import load_prompts, prompts_sha256, split_prompts

EXPECTED = ["How do I bake bread?", "Write a poem about rain.", "Why is the sky blue?"]


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_strips_and_drops_blank_lines(tmp_path):
    path = _write(
        tmp_path, "p.txt", "  How do I bake bread?\n\n\t\nWrite a poem about rain.  \nWhy is the sky blue?"
    )
    assert load_prompts(path) == EXPECTED


def test_jsonl_prompt_or_text_field_or_strings(tmp_path):
    lines = [json.dumps({"prompt": EXPECTED[0], "id": 1}), "", json.dumps(EXPECTED[1])]
    lines.append(json.dumps({"prompt": EXPECTED[2]}))
    assert load_prompts(_write(tmp_path, "p.jsonl", "\n".join(lines))) == EXPECTED
    text_field = "\n".join(json.dumps({"text": p}) for p in EXPECTED)
    assert load_prompts(_write(tmp_path, "t.jsonl", text_field)) == EXPECTED


def test_json_list_of_strings_and_of_objects_with_column(tmp_path):
    assert load_prompts(_write(tmp_path, "s.json", json.dumps(EXPECTED))) == EXPECTED
    objects = json.dumps([{"instruction": p, "prompt": "x"} for p in EXPECTED])
    assert load_prompts(_write(tmp_path, "o.json", objects), column="instruction") == EXPECTED


def test_csv_quoted_fields_and_column_choice(tmp_path):
    text = 'id,prompt\n1,"How do I bake bread?"\n2,"Write a poem about rain."\n3,Why is the sky blue?\n'
    assert load_prompts(_write(tmp_path, "p.csv", text)) == EXPECTED
    multiline = 'goal,other\n"line one\nline two",x\n'
    assert load_prompts(_write(tmp_path, "m.csv", multiline), column="goal") == ["line one\nline two"]


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": EXPECTED + [None], "n": [1, 2, 3, 4]}), path)
    assert load_prompts(path) == EXPECTED


def test_duplicates_warn_with_count_and_are_dropped(tmp_path):
    path = _write(tmp_path, "d.txt", "a\nb\na\n a \nb\nc\n")
    with pytest.warns(UserWarning, match=r"dropped 3 duplicate prompt\(s\); 3 remain"):
        assert load_prompts(path) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("name", "text"),
    [("e.txt", ""), ("b.txt", "\n  \n"), ("e.jsonl", "\n"), ("e.json", "[]"), ("e.csv", "prompt\n")],
)
def test_empty_files_are_errors(tmp_path, name, text):
    with pytest.raises(AbliterateError, match="no prompts"):
        load_prompts(_write(tmp_path, name, text))


def test_missing_column_lists_columns_present(tmp_path):
    path = _write(tmp_path, "c.csv", "id,question\n1,hello\n")
    with pytest.raises(
        AbliterateError, match=r"no a 'prompt' or 'text' column; columns present: 'id', 'question'"
    ):
        load_prompts(path)
    with pytest.raises(AbliterateError, match=r"no column 'goal'; columns present: 'id', 'question'"):
        load_prompts(path, column="goal")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"q": ["x"]}), parquet)
    with pytest.raises(AbliterateError, match=r"columns present: 'q'"):
        load_prompts(parquet)
    jsonl = _write(tmp_path, "c.jsonl", json.dumps({"question": "x"}))
    with pytest.raises(AbliterateError, match=r"columns present: 'question'"):
        load_prompts(jsonl)


def test_non_utf8_names_file_offset_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"first\nsecond caf\xe9\n")
    with pytest.raises(AbliterateError, match=r"latin1\.txt: not valid UTF-8 at byte offset 16 \(line 2\)"):
        load_prompts(path)


def test_other_bad_inputs(tmp_path):
    (tmp_path / "p.xlsx").write_bytes(b"PK")
    with pytest.raises(AbliterateError, match="unsupported prompt file type '.xlsx'"):
        load_prompts(tmp_path / "p.xlsx")
    with pytest.raises(AbliterateError, match="not found"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(AbliterateError, match="line 2 is not valid JSON"):
        load_prompts(_write(tmp_path, "bad.jsonl", '"ok"\n{oops\n'))
    with pytest.raises(AbliterateError, match="expected a JSON list"):
        load_prompts(_write(tmp_path, "obj.json", '{"prompt": "x"}'))
    with pytest.raises(AbliterateError, match="item 0 is a int; expected a string or an object"):
        load_prompts(_write(tmp_path, "num.json", "[1]"))
    with pytest.raises(AbliterateError, match="prompt 7 is a int, not text"):
        load_prompts(_write(tmp_path, "num.jsonl", json.dumps({"prompt": 7})))
    with pytest.raises(AbliterateError, match="cannot read as parquet"):
        load_prompts(_write(tmp_path, "bad.parquet", "not parquet"))


def test_prompts_sha256_is_stable_and_order_sensitive():
    assert prompts_sha256(["a", "b"]) == prompts_sha256(["a", "b"])
    assert prompts_sha256(["a", "b"]) != prompts_sha256(["b", "a"])
    # A separator inside a prompt cannot make two lists collide.
    assert prompts_sha256(["a\nb"]) != prompts_sha256(["a", "b"])
    assert prompts_sha256(["a"]) == "0eb5b8d6f81bc677da8a08567cc4fa9a06a57e9ec8da85ed73a7f62727996002"


def test_split_prompts_is_seeded_and_partitions():
    prompts = [f"p{i}" for i in range(10)]
    first, rest = split_prompts(prompts, 0.7, seed=3)
    assert (first, rest) == split_prompts(prompts, 0.7, seed=3)
    assert len(first) == 7 and len(rest) == 3
    assert sorted(first + rest) == sorted(prompts)
    assert split_prompts(prompts, 0.7, seed=4) != (first, rest)
    assert [len(x) for x in split_prompts(["a", "b"], 0.99, seed=0)] == [1, 1]
    with pytest.raises(AbliterateError, match="strictly between 0 and 1"):
        split_prompts(prompts, 1.0, seed=0)
    with pytest.raises(AbliterateError, match="at least 2"):
        split_prompts(["a"], 0.5, seed=0)


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_shipped_sets_load_and_match_their_generator(name):
    generated = demo_sets() if name == "demo" else general_sets()
    for (kind, split), prompts in generated.items():
        loaded = load_prompts(prompt_file(name, kind, split))
        assert loaded == prompts, (
            f"{name}/{kind}_{split}.txt is stale: run python -m abliterate.demo.prompt_sets"
        )
        assert len(loaded) >= 80
    for kind in ("harmful", "harmless"):
        splits = [set(load_prompts(prompt_file(name, kind, s))) for s in ("train", "val", "test")]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])


def test_prompt_file_rejects_unknown_names():
    with pytest.raises(AbliterateError, match="unknown prompt split 'dev'"):
        prompt_file("demo", "harmful", "dev")
