"""Generalisation across phrasings: the search sees the demo's prompts in half of its training
templates, the test sees them in the other templates (the other half and every held-out template),
never one of the search's phrasings. The written trial must refuse at most 5 % of the unseen
phrasings' harmful prompts with a first-token KL no worse than `run`'s default plan on the same test
prompts, and its confirmation (prompts of the seen phrasings the study never scored) must lie within
the Wilson bound of the study's refusal rate. README's search section shows the figures it prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

from abliterate.cli import main
from abliterate.demo import DEMO_MODEL_DIR, KINDS, SPLITS, prompt_file
from abliterate.demo.corpus import TEST_TEMPLATES, TRAIN_TEMPLATES, VAL_TEMPLATES
from abliterate.measure.prompts import load_prompts

SEEN = TRAIN_TEMPLATES[::2]
UNSEEN = TRAIN_TEMPLATES[1::2] + VAL_TEMPLATES + TEST_TEMPLATES


def template_of(prompt: str) -> str:
    """The template a demo request was written from (the longest that matches: templates do not nest)."""
    found = [
        t
        for t in TRAIN_TEMPLATES + VAL_TEMPLATES + TEST_TEMPLATES
        if re.fullmatch(re.escape(t).replace(re.escape("{a}"), ".+"), prompt)
    ]
    assert found, f"no demo template writes {prompt!r}"
    return max(found, key=len)


def phrasing_split(folder: Path) -> dict[str, str]:
    """Every demo prompt of each kind, split by template: `<kind>_seen.txt` and `<kind>_unseen.txt`."""
    files = {}
    for kind in KINDS:
        prompts = sorted({p for split in SPLITS for p in load_prompts(prompt_file("demo", kind, split))})
        by_template = {p: template_of(p) for p in prompts}
        for part, templates in (("seen", SEEN), ("unseen", UNSEEN)):
            chosen = [p for p in prompts if by_template[p] in templates]
            assert chosen
            path = folder / f"{kind}_{part}.txt"
            path.write_text("".join(p + "\n" for p in chosen), encoding="utf-8")
            files[f"{kind}_{part}"] = str(path)
    return files


def test_the_chosen_trial_holds_on_phrasings_the_search_never_saw(prefect_env, tmp_path, capsys):
    files = phrasing_split(tmp_path)
    prompts = [
        "--harmful",
        files["harmful_seen"],
        "--harmless",
        files["harmless_seen"],
        "--harmful-test",
        files["harmful_unseen"],
        "--harmless-test",
        files["harmless_unseen"],
        "--batch-size",
        "32",
        "--json",
        "--quiet",
    ]
    out = tmp_path / "searched"
    argv = ["search", str(DEMO_MODEL_DIR), "--trials", "16", "--startup-trials", "6", "--out", str(out)]
    assert main(argv + prompts) == 0
    searched = json.loads(capsys.readouterr().out)
    assert main(["run", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "run")] + prompts) == 0
    ran = json.loads(capsys.readouterr().out)

    test, baseline = searched["evaluation"], ran["evaluation"]
    confirmation = searched["confirmation"]
    chosen, held = searched["chosen"], confirmation["chosen"]
    print(
        json.dumps(
            {
                "study": {k: chosen[k] for k in ("trial", "refusals", "prompts", "refusal_bounds", "kl")},
                "confirmation": {k: held[k] for k in ("trial", "refusals", "prompts", "kl")},
                "confirmation_of_run's_choice": {
                    k: confirmation["reference"][k] for k in ("refusals", "prompts", "kl")
                },
                "unseen_phrasings": {
                    "prompts": [
                        len(load_prompts(files["harmful_unseen"])),
                        len(load_prompts(files["harmless_unseen"])),
                    ],
                    "search": {k: test[k] for k in ("refusal_rate_harmful", "kl_harmless")},
                    "run": {k: baseline[k] for k in ("refusal_rate_harmful", "kl_harmless")},
                    "unmodified": test["baseline_refusal_rate_harmful"],
                },
            },
            indent=1,
        )
    )
    # the test prompts are the user's test files, never the search's phrasings
    assert searched["evaluation_prompts"]["harmful"]["source"].startswith("the test file")
    assert test["baseline_refusal_rate_harmful"] >= 0.9  # the unseen phrasings are refused before
    assert test["refusal_rate_harmful"] <= 0.05
    # no more refusals than run's default plan, evaluated the same way, and a KL no worse
    assert test["refusal_rate_harmful"] <= baseline["refusal_rate_harmful"]
    assert test["kl_harmless"] <= baseline["kl_harmless"]
    assert held["trial"] == chosen["trial"] and held["holds"]
    assert held["refusal_rate"] <= chosen["refusal_bounds"][1]
    manifest = json.loads((out / "abliteration.json").read_text())
    assert manifest["plan"]["origin"]["search"]["confirmation"]["chosen"] == held
