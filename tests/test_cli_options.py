"""Every sub-command's options come from abliterate/config.py: one name, one default, one check per
concept. Flag by flag through the real parser; then `run`, `demo` and `sweep` end to end through the CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from abliterate.cli import build_parser, main
from abliterate.cli.run import FLOW_SECTIONS, flow_sections
from abliterate.cli.search import SEARCH_SECTIONS
from abliterate.config import SECTIONS, Ablation, Prompts, Runtime, Section, Selection
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.errors import AbliterateError

# A valid value other than the default for every setting: (what to type, what the section holds).
SAMPLES: dict[str, tuple[list[str], object]] = {
    "harmful": (["h.txt"], "h.txt"),
    "harmless": (["n.txt"], "n.txt"),
    "harmful_test": (["ht.txt"], "ht.txt"),
    "harmless_test": (["nt.txt"], "nt.txt"),
    "prompt_set": (["general"], "general"),
    "validation_fraction": (["0.4"], 0.4),
    "seed": (["7"], 7),
    "system_prompt": (["Be brief."], "Be brief."),
    "chat_template_kwargs": (["enable_thinking=false"], {"enable_thinking": False}),
    "token_position": (["-2"], -2),
    "direction_method": (["mean_diff"], "mean_diff"),
    "max_length": (["128"], 128),
    "subspace_rank": (["2"], 2),
    "direction_position": (["3"], "3"),
    "kl_threshold": (["0.05"], 0.05),
    "skip_last_fraction": (["0.3"], 0.3),
    "max_candidates": (["4"], 4),
    "shortlist": (["all"], "all"),
    "shortlist_prompts": (["4"], 4),
    "max_rank": (["2"], 2),
    "rank_confidence": (["0.9"], 0.9),
    "rank_elimination": ([], False),
    "prefilter": (["all"], "all"),
    "layers": (["1-3"], "1-3"),
    "scale": (["0.8"], "0.8"),
    "targets": (["attn_out,router"], ["attn_out", "router"]),
    "ablation_method": (["norm_preserving"], "norm_preserving"),
    "mtp": (["skip"], "skip"),
    "biases": ([], True),
    "rank": (["2"], "2"),
    "subspace": (["clusters"], "clusters"),
    "evaluate": ([], False),
    "full_replies": (["always"], "always"),
    "max_new_tokens": (["12"], 12),
    "examples": (["2"], 2),
    "markers": (["m.txt"], "m.txt"),
    "marker": (["nope"], ["nope"]),
    "refusal_probe_tokens": (["3"], 3),
    "device": (["cpu"], "cpu"),  # the one device every machine has (the default is auto)
    "dtype": (["bfloat16"], "bfloat16"),
    "batch_size": (["4"], 4),
    "memory_budget": (["2GiB"], "2GiB"),
    "streaming": (["never"], "never"),
    "threads": (["1"], "1"),
    "interop_threads": (["3"], "3"),
    "workers": (["3"], 3),
    "dask_address": (["tcp://127.0.0.1:8786"], "tcp://127.0.0.1:8786"),
    "dask_workers": (["2"], 2),
    "trials": (["7"], 7),
    "kl_max": (["0.05"], 0.05),
    "trial": (["3"], 3),
    "search_seed": (["5"], 5),
    "components": (["attn_out,router_bias"], ["attn_out", "router_bias"]),
    "methods": (["plain,projected"], ["plain", "projected"]),
    "reply_tokens": (["8"], 8),
    "max_prompts": (["16"], 16),
    "router_experts": (["4"], 4),
    "startup_trials": (["3"], 3),
    "parallel_trials": (["2"], 2),
    "study": (["my-study"], "my-study"),
    "refusal_floor": (["0.001"], 0.001),
    "confirm_fraction": (["0.3"], 0.3),
    "confidence": (["0.9"], 0.9),
    "on_confirm_failure": (["refuse"], "refuse"),
    "sample": ([], True),
    "temperature": (["0.5"], 0.5),
    "top_p": (["0.9"], 0.9),
    "sample_seed": (["3"], 3),
    "max_reply_tokens": (["64"], 64),
}
FLOW_FIELDS = sorted(f for cls in FLOW_SECTIONS for f in cls.model_fields)
# booleans that default to true are switched off
NEGATED = {"evaluate": "--no-evaluate", "rank_elimination": "--no-rank-elimination"}


def flag(field: str) -> str:
    return NEGATED.get(field, "--" + field.replace("_", "-"))


def subparser(command: str):
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[command]


def test_every_setting_has_a_sample():
    fields = {name for cls in SECTIONS.values() for name in cls.model_fields}
    assert fields == set(SAMPLES), fields ^ set(SAMPLES)


@pytest.mark.parametrize("command", ["run", "demo"])
@pytest.mark.parametrize("field", FLOW_FIELDS)
def test_run_and_demo_take_every_setting(command, field):
    typed, expected = SAMPLES[field]
    argv = [command, *(["MODEL", "--out", "OUT"] if command == "run" else []), flag(field), *typed]
    sections = flow_sections(build_parser().parse_args(argv))
    owner = next(cls.section for cls in FLOW_SECTIONS if field in cls.model_fields)
    assert getattr(sections[owner], field) == expected
    for cls in FLOW_SECTIONS:  # and nothing else moved off its default
        others = {k: v for k, v in sections[cls.section].model_dump().items() if k != field}
        defaults = {k: v for k, v in cls().model_dump().items() if k != field}
        assert others == defaults, cls.section


def test_sweep_takes_every_setting_but_the_ablation_ones():
    sweep = subparser("sweep")
    dests = {a.dest for a in sweep._actions}
    for cls in FLOW_SECTIONS:
        for field in cls.model_fields:
            assert (field in dests) == (cls is not Ablation), field  # variants carry the ablation settings


@pytest.mark.parametrize("field", sorted(f for cls in SEARCH_SECTIONS for f in cls.model_fields))
def test_search_takes_every_setting_but_the_ablation_ones(field):
    typed, expected = SAMPLES[field]
    sections = flow_sections(
        build_parser().parse_args(["search", "MODEL", flag(field), *typed]), SEARCH_SECTIONS
    )
    owner = next(cls.section for cls in SEARCH_SECTIONS if field in cls.model_fields)
    assert getattr(sections[owner], field) == expected
    dests = {a.dest for a in subparser("search")._actions}
    assert not dests & set(Ablation.model_fields)  # the search decides those


def test_one_name_and_default_per_concept_across_commands():
    """A setting that several sub-commands take has the same flag and help (with its default) in each.
    (`evaluate --harmful/--harmless` name its test files; `measure` requires its prompt files.)"""
    seen: dict[str, tuple] = {}
    for command in ("measure", "ablate", "evaluate", "run", "demo", "sweep", "search"):
        for action in subparser(command)._actions:
            if (
                action.dest not in SAMPLES
                or action.help == argparse.SUPPRESS
                or action.dest in ("harmful", "harmless")
            ):
                continue
            shape = (action.option_strings[0], action.help)
            assert seen.setdefault(action.dest, shape) == shape, (command, action.dest)
    assert {
        "token_position",
        "direction_position",
        "ablation_method",
        "device",
        "dtype",
        "batch_size",
    } <= set(seen)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["--position", "-2"], ["--token-position", "-2"]),
        (["--select", "4"], ["--direction-position", "4"]),
        (["--stream", "always"], ["--streaming", "always"]),
        (["--val-fraction", "0.3"], ["--validation-fraction", "0.3"]),
    ],
)
def test_older_flag_names_are_hidden_aliases(old, new):
    base = ["measure", "M", "--harmful", "h", "--harmless", "n", "--out", "o"]
    assert vars(build_parser().parse_args(base + old)) == vars(build_parser().parse_args(base + new))
    assert f"{old[0]} " not in subparser("measure").format_help()  # hidden from --help


def test_ablate_method_switches_and_direction_layer_alias():
    args = build_parser().parse_args(
        ["ablate", "M", "--directions", "d", "--norm-preserving", "--direction-layer", "own"]
    )
    assert (args.ablation_method, args.direction_position) == ("norm_preserving", "own")


@pytest.mark.parametrize(
    ("cls", "values", "fragment"),
    [
        (Prompts, {"validation_fraction": 1.5}, "--validation-fraction"),
        (Selection, {"direction_position": "middle"}, "auto, own, none or a residual position"),
        (Ablation, {"targets": ""}, "the target set is empty"),
        (Ablation, {"layers": [1, 2]}, "--layers"),
        (Runtime, {"memory_budget": "lots"}, "memory budget 'lots'"),
        (Runtime, {"batch_size": 0}, "--batch-size"),
        (
            Runtime,
            {"device": "cuda:0"} if not __import__("torch").cuda.is_available() else {"device": "tpu"},
            "--device",
        ),
    ],
)
def test_bad_settings_are_one_line_errors(cls: type[Section], values, fragment):
    with pytest.raises(AbliterateError, match=fragment) as info:
        cls(**values)
    assert "\n" not in str(info.value)


def test_bad_setting_on_the_command_line_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(DEMO_MODEL_DIR), "--out", str(out), "--scale", "x", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size" in err[0] and not out.exists()


# ------------------------------------------------------------------ end to end through the CLI


@pytest.mark.slow
def test_demo_run_and_sweep_through_the_cli(prefect_env, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--out",
        str(out),
        "--layers",
        "0-4",
        "--scale",
        "1.0",
        "--no-evaluate",
        "--batch-size",
        "8",
        "--threads",
        "1",
    ]
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["plan"]["layer_spec"] == "0-4" and summary["validation_ok"] and "evaluation" not in summary
    assert summary["prefect.flow_run_id"] and summary["mlflow_run_id"]
    lines = captured.err.splitlines()
    for stage in ("inventory", "measurement", "directions", "ablation", "validation"):
        assert any(line.split()[:1] == [stage] for line in lines), (stage, lines)
    assert any(line.startswith("  threads      1 torch thread (--threads); ") for line in lines), lines
    from abliterate_flows.tracking import client

    params = client().get_run(summary["mlflow_run_id"]).data.params
    assert (params["runtime.threads"], params["threads.intra"]) == ("1", "1")

    # the same model through `run`: the measurement is reused, and the console says so
    assert (
        main(
            [
                "run",
                str(DEMO_MODEL_DIR),
                "--out",
                str(tmp_path / "run"),
                "--layers",
                "1-4",
                "--no-evaluate",
                "--batch-size",
                "8",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "run",
                str(DEMO_MODEL_DIR),
                "--out",
                str(tmp_path / "run2"),
                "--layers",
                "2-4",
                "--no-evaluate",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    stages = {
        line.split()[0]: line.split()[1]
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("  ")
    }
    assert stages["inventory"] == stages["measurement"] == stages["directions"] == "cached", stages
    assert stages["ablation"] != "cached"

    variants = tmp_path / "variants.yaml"
    variants.write_text("- {name: full, layers: all}\n- {name: half, layers: all, scale: 0.5}\n")
    assert (
        main(
            [
                "sweep",
                str(DEMO_MODEL_DIR),
                "--variants",
                str(variants),
                "--out",
                str(tmp_path / "sweep"),
                "--batch-size",
                "8",
                "--max-new-tokens",
                "8",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in result["variants"]] == ["full", "half"] and result["front"]
