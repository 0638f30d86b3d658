"""Every output folder carries a model card (README.md with Hugging Face front matter) saying how it
was made: written by the ablation, read back by huggingface_hub's ModelCard, never the input's own
README copied over it, listed in the manifest (so --overwrite may remove it), updated by the flow's
checks, and the command it shows reproduces the run."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
from huggingface_hub import ModelCard

from abliterate.cli import build_parser, main
from abliterate.cli.run import flow_sections
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.edit.model_card import card_text, reproduce_command, update_model_card
from abliterate.vocabulary import MANIFEST_FILE, MODEL_CARD_FILE

INPUT_CARD = """---
license: apache-2.0
language: [en]
base_model: someone/else
---

# The input's own card: must never reach the output
"""


@pytest.fixture(scope="module")
def directions(tmp_path_factory):
    """The demo model's directions file, measured by the CLI (direction position 3, scored alone)."""
    out = tmp_path_factory.mktemp("measured")
    assert (
        main(["measure", str(DEMO_MODEL_DIR), "--out", str(out), "--direction-position", "3", "--quiet"]) == 0
    )
    return out / "directions.safetensors"


@pytest.fixture(scope="module")
def licensed_input(tmp_path_factory):
    """A copy of the demo model whose README.md declares a license."""
    path = tmp_path_factory.mktemp("input") / "licensed-demo"
    shutil.copytree(DEMO_MODEL_DIR, path)
    (path / MODEL_CARD_FILE).write_text(INPUT_CARD)
    return path


def ablate(model, directions, out, *extra: str) -> int:
    return main(["ablate", str(model), "--directions", str(directions), "--out", str(out), "--quiet", *extra])


def test_an_ablation_writes_a_card_that_huggingface_hub_loads(directions, tmp_path, capsys):
    out = tmp_path / "out"
    assert ablate(DEMO_MODEL_DIR, directions, out, "--layers", "0-3") == 0
    card = ModelCard.load(out / MODEL_CARD_FILE)
    assert card.data.base_model is None  # a local folder is no Hub id: the Hub would reject a path
    assert f"`{DEMO_MODEL_DIR.resolve()}`" in card.text  # the text names the folder
    assert "abliterated" in card.data.tags and card.data.library_name == "transformers"
    assert card.data.to_dict().get("license") is None  # the demo model declares none
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert MODEL_CARD_FILE in manifest["files"]  # the run's own file: --overwrite may delete it
    text = card.text
    assert "residual position 3" in text and "direction method `projected`" in text
    assert "layers 0-3" in text and manifest["tool"]["version"] in text
    assert "layer_spec: 0-3" in text  # the plan itself, as `ablate --plan` reads it
    # Validation accepts the card as the output's own record, not a stray file.
    capsys.readouterr()
    assert main(["validate", str(DEMO_MODEL_DIR), str(out), "--quiet"]) == 0
    assert "README.md" not in capsys.readouterr().out


def test_the_cards_command_rewrites_the_same_weights(directions, tmp_path):
    """The card's `abliterate ablate ... --plan plan.yaml` command, with the card's plan, gives the
    same bytes."""
    out = tmp_path / "out"
    assert ablate(DEMO_MODEL_DIR, directions, out, "--layers", "1-3", "--scale", "0.9") == 0
    text = (out / MODEL_CARD_FILE).read_text()
    plan = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "plan.yaml").write_text(plan)
    command = next(line for line in text.splitlines() if line.startswith("abliterate ablate "))
    args = shlex.split(command)[1:]
    again = tmp_path / "again"
    args[args.index("--out") + 1] = str(again)
    args[args.index("--plan") + 1] = str(tmp_path / "plan.yaml")
    assert main([*args, "--quiet"]) == 0
    for shard in json.loads((out / MANIFEST_FILE).read_text())["shards"]:
        assert (out / shard).read_bytes() == (again / shard).read_bytes()


def test_license_comes_from_the_input_and_its_readme_is_never_copied(directions, licensed_input, tmp_path):
    out = tmp_path / "out"
    assert ablate(licensed_input, directions, out, "--force") == 0  # another folder: another fingerprint
    card = ModelCard.load(out / MODEL_CARD_FILE)
    assert card.data.license == "apache-2.0"
    assert card.data.base_model is None  # the input is no Hub repo; not the input's own base_model
    assert "must never reach the output" not in card.text
    assert (licensed_input / MODEL_CARD_FILE).read_text() == INPUT_CARD  # the input untouched


def test_overwrite_removes_the_card_of_an_earlier_run(directions, tmp_path):
    out = tmp_path / "out"
    assert ablate(DEMO_MODEL_DIR, directions, out, "--layers", "0-3") == 0
    first = (out / MODEL_CARD_FILE).read_text()
    assert ablate(DEMO_MODEL_DIR, directions, out, "--layers", "2-3", "--overwrite") == 0
    second = (out / MODEL_CARD_FILE).read_text()
    assert "layers 0-3" in first and "layers 2-3" in second and "layers 0-3" not in second


def test_the_flows_update_adds_the_checks_and_the_command(directions, tmp_path):
    """What the flow adds after validation and evaluation: the verdict, the figures labelled before and
    after with significant digits, and the `abliterate run` command of its settings."""
    out = tmp_path / "out"
    assert ablate(DEMO_MODEL_DIR, directions, out) == 0
    sections = flow_sections(
        build_parser().parse_args(["run", "M", "--out", "O", "--layers", "0-3", "--marker", "no way"])
    )
    command = reproduce_command("run", "abliterate/demo/model", str(out), list(sections.values()))
    assert command == f"abliterate run abliterate/demo/model --out {out} --layers 0-3 --marker 'no way'"
    figures = {
        "refusal_rate_harmful": 0.0,
        "baseline_refusal_rate_harmful": 1.0,
        "kl_harmless": 4.3e-07,
        "n_harmful": 189,
        "n_harmless": 129,
    }
    update_model_card(out, figures, True, command)
    card = ModelCard.load(out / MODEL_CARD_FILE)
    assert "**Validation**: passed" in card.text
    assert "refusal rate on harmful prompts (full replies): 1 before, 0 after" in card.text
    assert "4.3e-07 nats" in card.text and "189 harmful and 129 harmless" in card.text
    assert command in card.text
    # The same manifest always gives the same card (no time in it).
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert card_text(manifest, figures, True, command) == (out / MODEL_CARD_FILE).read_text()


@pytest.mark.parametrize(
    ("saved_from", "expected"),
    [("acme/tiny-chat", "acme/tiny-chat"), ("/home/someone/models/tiny", None), ("", None), (7, None)],
)
def test_base_model_is_the_hub_id_the_input_was_saved_from(directions, tmp_path, saved_from, expected):
    """A local folder that transformers saved from a Hub model names it in config.json's
    `_name_or_path`: that id is the card's base_model; a path, nothing or a non-string is none."""
    model = tmp_path / "tiny-chat"
    shutil.copytree(DEMO_MODEL_DIR, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "_name_or_path": saved_from}))
    out = tmp_path / "out"
    assert ablate(model, directions, out, "--force", "--layers", "0-3") == 0
    card = ModelCard.load(out / MODEL_CARD_FILE)
    assert card.data.base_model == expected
    assert card.text.splitlines()[1] == "# tiny-chat, abliterated"
    assert f"`{expected or model.resolve()}`" in card.text
