"""Property-based reliability cases: any mutation of a header, a config or a plan is one error line
or a correct run that validates.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from checkpoint_guard import unchanged
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from abliterate.cli import main
from abliterate.measure.direction_file import save_directions

from .common import POSITIONS, SHARDS, H, ablate_args, rewrite_header

# Any JSON value (YAML for plans): what a careless edit, a bad tool or a corrupt download leaves behind.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=4,
)


PROPERTY = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _quiet_cli(*args: str | Path) -> tuple[int | str, list[str]]:
    """`abliterate ARGS` with its output captured; an exception escaping main is a crash."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code: int | str = main([str(a) for a in args])
        except Exception as exc:  # noqa: BLE001 - a traceback is what this property forbids
            code = f"crash: {type(exc).__name__}: {exc}"
    return code, err.getvalue().strip().splitlines()


def _one_line_or_a_correct_run(model: Path, directions: Path, work: Path, *extra: str | Path) -> str:
    """The property: `inventory` and `ablate` exit 2 with one error line, or succeed; a successful
    ablation's output passes `abliterate validate` against the (mutated) input. Returns the outcome."""
    code, err = _quiet_cli("inventory", model)
    assert code in (0, 2), (code, err)
    if code == 2:
        assert len([line for line in err if line.startswith("abliterate inventory: error: ")]) == 1, err
    out = work / "out"
    code, err = _quiet_cli(*ablate_args(model, directions, out, "--force", *extra))
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [line for line in err if line.startswith("abliterate ablate: error: ")]
        assert len(lines) == 1 and "\n" not in lines[0], err
        return "error"
    code, err = _quiet_cli(
        "validate", model, out, "--quiet", "--directions", directions, "--out", work / "report.json"
    )
    assert code == 0, json.loads((work / "report.json").read_text())["failures"] if code == 1 else (code, err)
    return "run"


def _mutated_copy(model: Path, work: Path) -> Path:
    copy = work / "model"
    shutil.copytree(model, copy)
    return copy


@st.composite
def header_mutations(draw):
    return (
        draw(st.sampled_from(SHARDS)),
        draw(st.sampled_from(["target", "first", "last", "__metadata__", "new"])),
        draw(
            st.sampled_from(
                [
                    "entry",
                    "dtype",
                    "shape",
                    "data_offsets",
                    "nudge offsets",
                    "nudge shape",
                    "delete",
                    "extra key",
                ]
            )
        ),
        draw(JSON_VALUES),
        draw(st.integers(-64, 64)),
    )


def _mutate_header(header: dict, which: str, kind: str, value, delta: int) -> dict:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    name = {
        "target": next((n for n in names if n.endswith("o_proj.weight")), names[0]),
        "first": names[0],
        "last": names[-1],
        "__metadata__": "__metadata__",
        "new": "model.extra.weight",
    }[which]
    entry = header.get(name)
    if kind == "delete":
        header.pop(name, None)
    elif kind == "entry" or not isinstance(entry, dict) or name == "__metadata__":
        header[name] = value
    elif kind in ("dtype", "shape", "data_offsets"):
        entry[kind] = value
    elif kind == "nudge offsets":
        entry["data_offsets"] = [entry["data_offsets"][0] + delta, entry["data_offsets"][1] + delta]
    elif kind == "nudge shape":
        entry["shape"] = [entry["shape"][0] + delta, *entry["shape"][1:]] if entry["shape"] else [delta]
    else:
        entry["extra"] = value
    return header


@pytest.mark.slow
@PROPERTY
@given(mutation=header_mutations())
def test_any_header_mutation_is_one_line_or_a_correct_run(base, mutation):
    """C26 (property): a shard header mutated in type or value, or a tensor moved by a few bytes, gives
    exit 2 with one line or a run whose output validates; never a traceback, never a changed input."""
    model, directions, _ = base
    shard, which, kind, value, delta = mutation
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy = _mutated_copy(model, work)
        rewrite_header(copy / shard, lambda h: _mutate_header(h, which, kind, value, delta))
        with unchanged(copy):
            event(_one_line_or_a_correct_run(copy, directions, work))


CONFIG_KEYS = [
    "hidden_size",
    "num_hidden_layers",
    "n_routed_experts",
    "n_shared_experts",
    "first_k_dense_replace",
    "num_nextn_predict_layers",
    "tie_word_embeddings",
    "model_type",
    "architectures",
    "vocab_size",
    "max_position_embeddings",
    "num_attention_heads",
    "rope_theta",
    "torch_dtype",
]


@PROPERTY
@given(
    key=st.sampled_from(CONFIG_KEYS) | st.text(max_size=5),
    value=JSON_VALUES | st.integers(0, 12),
    delete=st.booleans(),
)
@pytest.mark.slow
def test_any_config_mutation_is_one_line_or_a_correct_run(base, key, value, delete):
    """C27 (property): config.json with any key set to any JSON value (null, NaN, strings, lists,
    absurd numbers) or removed: exit 2 with one line, or a run whose output validates."""
    model, directions, _ = base
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy = _mutated_copy(model, work)
        config = json.loads((copy / "config.json").read_text())
        if delete:
            config.pop(key, None)
        else:
            config[key] = value
        (copy / "config.json").write_text(json.dumps(config))
        with unchanged(copy):
            event(_one_line_or_a_correct_run(copy, directions, work))


PLAN_KEYS = [
    "layers",
    "scale",
    "embed_scale",
    "num_layers",
    "targets",
    "direction_position",
    "selected_position",
    "method",
    "mtp",
    "biases",
    "layer_spec",
    "scale_spec",
    "format",
]


PLAN_VALUES = (
    JSON_VALUES
    | st.sampled_from(["plain", "norm_preserving", "projected", "skip", "own", "selected", "embed"])
    | st.lists(st.integers(0, 4), max_size=4)
    | st.lists(st.sampled_from(["attn_out", "router", "embed"]), max_size=3)
    | st.dictionaries(
        st.sampled_from(["0", "1", "2", "3"]), st.floats(-1, 3) | st.floats(0, 1e-20), min_size=4, max_size=4
    )
)


@pytest.mark.slow
@PROPERTY
@given(key=st.sampled_from(PLAN_KEYS) | st.text(max_size=5), value=PLAN_VALUES, delete=st.booleans())
def test_any_plan_mutation_is_one_line_or_a_correct_run(base, key, value, delete):
    """P18 (property): a plan file with any key set to any value (a string where a list or a boolean
    belongs, NaN, nested structures, other layers, scales, roles, methods) or removed: exit 2 with one
    line, or a run whose output validates."""
    model, directions, _ = base
    from abliterate.config import Ablation
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import configured_plan

    data = configured_plan(load_inputs(model, directions), Ablation(), "auto").to_dict()
    if delete:
        data.pop(key, None)
    else:
        data[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plan = work / "plan.yaml"
        plan.write_text(yaml.safe_dump(data))
        with unchanged(model):
            event(_one_line_or_a_correct_run(model, directions, work, "--plan", plan))


@PROPERTY
@given(
    scales=st.lists(st.floats(0, 2) | st.floats(0, 1e-12) | st.just(0.0), min_size=4, max_size=4),
    method=st.sampled_from(["plain", "norm_preserving", "projected"]),
    targets=st.lists(
        st.sampled_from(["attn_out", "mlp_down", "expert_down", "shared_expert_down", "router", "embed"]),
        min_size=1,
        max_size=6,
        unique=True,
    ),
)
@pytest.mark.slow
def test_any_valid_plan_runs_and_validates(base, tmp_path_factory, scales, method, targets):
    """P19 (property): every valid plan, including scales so small that the edit rounds away, runs to an
    output that validates, or is refused in one line (a plan matching no tensor; one that would leave
    every byte unchanged); never a silent no-op reported as success."""
    model, directions, _ = base
    means = tmp_path_factory.getbasetemp() / "means.safetensors"
    if not means.exists():
        gen = torch.Generator().manual_seed(7)
        save_directions(
            means,
            torch.randn(POSITIONS, H, generator=gen),
            {"selected_position": 2},
            harmful_mean=torch.randn(POSITIONS, H, generator=gen),
            harmless_mean=torch.randn(POSITIONS, H, generator=gen),
        )
    from abliterate.config import Ablation
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import configured_plan

    data = configured_plan(load_inputs(model, means, force=True), Ablation(), "auto").to_dict()
    data.update(
        scale={str(i): v for i, v in zip(data["layers"], scales, strict=True)}, method=method, targets=targets
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plan = work / "plan.yaml"
        plan.write_text(yaml.safe_dump(data))
        with unchanged(model):
            event(_one_line_or_a_correct_run(model, means, work, "--plan", plan))


# ------------------------------------------------------------------ FP8 configs and scale tensors

FP8_KEYS = ("weight_block_size", "quant_method", "scale_fmt", "config_groups", "activation_scheme")
FP8_SCALE = "model.layers.1.mlp.experts.1.down_proj.weight_scale_inv"  # [4, 2]


@PROPERTY
@given(
    key=st.sampled_from(FP8_KEYS),
    value=JSON_VALUES | st.lists(st.integers(-2, 70), max_size=3),
    shape=st.none() | st.lists(st.integers(0, 9), max_size=3),
)
def test_any_fp8_config_or_scale_shape_is_one_line_or_a_correct_run(fp8_base, key, value, shape):
    """C31: `quantization_config` with any key replaced by any JSON value (block sizes of every length and
    sign among them), and the scale of one expert given any shape: `inventory` and `ablate` exit 2 with one
    line, or run, and the output validates (the recomputation with the scales as read)."""
    model, directions, _ = fp8_base
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy = _mutated_copy(model, work)
        config = json.loads((copy / "config.json").read_text())
        config["quantization_config"][key] = value
        (copy / "config.json").write_text(json.dumps(config))
        if shape is not None:
            index = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
            shard = copy / index[FP8_SCALE]

            def reshape(header):
                header[FP8_SCALE]["shape"] = shape
                return header

            rewrite_header(shard, reshape)
        with unchanged(copy):
            event(_one_line_or_a_correct_run(copy, directions, work))


# ------------------------------------------------------------------ study names


@PROPERTY
@given(name=st.text(max_size=12) | st.sampled_from(["/../../x", "..", ".", "a/b", "x" * 101, "a\0b"]))
def test_any_study_name_is_refused_or_locks_inside_the_home(name):
    """S3: any `--study` name is refused in one line (the setting's check) or names a lock file directly
    in the tool's home, never elsewhere."""
    from abliterate.config import Search
    from abliterate.errors import AbliterateError
    from abliterate.search.study import study_lock

    try:
        Search(study=name)
    except AbliterateError as exc:
        assert str(exc).startswith("--study (search.study): ") and "\n" not in str(exc), str(exc)
        event("refused")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "home" / "mlruns"
        with study_lock(root, name):
            pass
        made = [p for p in Path(tmp).rglob("*") if p.is_file()]
        assert made == [root / f".{name}.lock"], made
    event("locked")


# ------------------------------------------------------------------ prompt files

PROMPT_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=12)


@PROPERTY
@given(
    prompts=st.lists(PROMPT_TEXT, max_size=6), end=st.sampled_from(["\n", "\r\n", "\r"]), final=st.booleans()
)
def test_any_prompt_file_reads_one_prompt_per_line(prompts, end, final):
    """Q14: a .txt prompt file of any lines (any characters but line ends, U+2028, form feeds, control
    characters included) joined by any line end reads back as exactly its lines, stripped, blank ones and
    duplicates dropped, in order; or, with none left, the one-line 'no prompts' error."""
    from abliterate.errors import AbliterateError
    from abliterate.measure.prompts import load_prompts

    expected = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.txt"
        path.write_bytes((end.join(prompts) + (end if final else "")).encode())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not expected:
                with pytest.raises(AbliterateError, match="no prompts"):
                    load_prompts(path)
                return
            read = load_prompts(path)
    assert [str(p) for p in read] == expected
