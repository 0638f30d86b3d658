"""The confirmation's failure path through the CLI: a search whose chosen trial refuses far more of the
prompts the study never scored than its study's Wilson bound allows.

The construction (the issue's motivating case, made deterministic): a harmful file whose prompts are
placed by the flow's own seeded splits, so that the measurement part and the confirmation slice hold
the demo's harmful training requests, while 40 of the 48 prompts the study scores are benign requests
the model never refused (a user's harmful file that is mostly not harmful). The study then cannot
tell a weak edit from a strong one; trial 4 of its seeded random start (the projected method at
direction position 1.29) refuses 3 of the 48 study prompts but 11 of the 16 confirmation prompts.
Trial 4 is named with --trial (the weak choice a study like this makes), and each `on_confirm_failure`
is checked: `refuse` writes nothing and exits with a one-line error, `keep` writes it with the loud
warning, `stronger` confirms the front's stronger trials in turn and writes the first that holds.
The written outputs are evaluated on the confirmation slice like run's default plan (trial 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abliterate.cli import main
from abliterate.config import Prompts, Search
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.measure.prompts import load_prompts, split_prompts
from abliterate.vocabulary import MANIFEST_FILE

WEAK_TRIAL = 4
STUDY_HARMFUL = 8  # of the study's 48 harmful prompts; the others are benign


def mostly_benign_study(folder: Path) -> tuple[str, list[str]]:
    """The harmful file described in the module docstring, and its confirmation slice."""
    harmful = load_prompts(prompt_file("demo", "harmful", "train"))
    benign = iter(load_prompts(prompt_file("demo", "harmless", "val")))
    prompts, search = Prompts(), Search()
    positions = [str(i) for i in range(len(harmful))]  # the splits shuffle positions, whatever the prompts
    val, train = split_prompts(positions, prompts.validation_fraction, prompts.seed)
    confirm, study = split_prompts(val, search.confirm_fraction, prompts.seed)
    real = iter(harmful)
    lines: list[str] = [""] * len(harmful)
    for i in train + confirm + study[:STUDY_HARMFUL]:
        lines[int(i)] = next(real)
    for i in study[STUDY_HARMFUL:]:
        lines[int(i)] = next(benign)
    path = folder / "harmful.txt"
    path.write_text("".join(p + "\n" for p in lines), encoding="utf-8")
    return str(path), [lines[int(i)] for i in confirm]


def search(capfd, path: str, out: Path, *extra: str) -> tuple[int, dict, str]:
    argv = [
        "search",
        str(DEMO_MODEL_DIR),
        "--harmful",
        path,
        "--harmless",
        str(prompt_file("demo", "harmless", "train")),
        "--trials",
        "10",
        "--reply-tokens",
        "8",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "32",
        "--refusal-floor",
        "1e-9",
        "--subspace-rank",  # one direction per position: the study's trials are the ones this test was built on
        "1",
        "--out",
        str(out),
        "--json",
        "--quiet",
        *extra,
    ]
    code = main(argv)
    captured = capfd.readouterr()
    return code, json.loads(captured.out) if code == 0 else {}, captured.err


@pytest.mark.slow
def test_a_choice_the_confirmation_refutes_is_replaced_kept_or_refused(prefect_env, tmp_path, capfd):
    path, confirm = mostly_benign_study(tmp_path)

    # refuse: nothing written, one line naming the failure, the exit code of an error
    code, _, err = search(
        capfd, path, tmp_path / "refused", "--trial", str(WEAK_TRIAL), "--on-confirm-failure", "refuse"
    )
    line = err.strip().splitlines()[-1]
    assert code != 0 and line.startswith("abliterate search: error:"), err[-2000:]
    assert f"trial {WEAK_TRIAL} refused" in line and "nothing written" in line
    assert not (tmp_path / "refused").exists()

    # keep: the refuted trial written anyway, with the warning in the result and the manifest
    code, kept, err = search(
        capfd, path, tmp_path / "kept", "--trial", str(WEAK_TRIAL), "--on-confirm-failure", "keep"
    )
    assert code == 0 and kept["resumed_from"] == 10 and kept["new_trials"] == 0  # the same study
    confirmation = kept["confirmation"]
    held, study = confirmation["chosen"], kept["chosen"]
    assert held["trial"] == study["trial"] == WEAK_TRIAL and not held["holds"]
    assert held["prompts"] == len(confirm) and kept["evaluation_prompts"]["harmful"]["prompts"] == confirm
    # clearly more than the study's bound, not a rounding matter
    assert held["refusal_rate"] > 2 * study["refusal_bounds"][1]
    assert "writing it anyway (on_confirm_failure keep)" in confirmation["warning"]
    assert "WARNING: the search's choice does not hold" in err
    manifest = json.loads((tmp_path / "kept" / MANIFEST_FILE).read_text())
    assert manifest["plan"]["origin"]["search"]["confirmation"] == confirmation

    # stronger: the front's stronger trials confirmed in turn, the first that holds written
    code, stronger, err = search(capfd, path, tmp_path / "stronger", "--trial", str(WEAK_TRIAL))
    assert code == 0
    confirmation = stronger["confirmation"]
    written = confirmation["written"]
    assert (
        confirmation["chose"] == WEAK_TRIAL
        and written != WEAK_TRIAL
        and stronger["chosen"]["trial"] == written
    )
    assert (
        confirmation["tried"]
        and confirmation["tried"][-1]["trial"] == written
        and confirmation["tried"][-1]["holds"]
    )
    assert all(not t["holds"] for t in confirmation["tried"][:-1])
    front = {p["trial"]: p for p in stronger["pareto"]}
    assert written in front and front[written]["kl"] > kept["chosen"]["kl"]
    assert (
        f"writing the next stronger trial of the front that holds: trial {written}" in confirmation["warning"]
    )
    assert "WARNING: the search's choice does not hold" in err
    manifest = json.loads((tmp_path / "stronger" / MANIFEST_FILE).read_text())
    assert manifest["plan"]["origin"]["search"]["trial"] == written

    # run's default plan (trial 0) written and evaluated the same way: the stronger trial refuses no
    # more of the held-out prompts than it does; the kept one refuses more (what its warning says)
    code, default, _ = search(capfd, path, tmp_path / "default", "--trial", "0")
    assert code == 0 and default["confirmation"]["chosen"]["holds"]
    assert default["evaluation_prompts"] == stronger["evaluation_prompts"] == kept["evaluation_prompts"]
    rate = default["evaluation"]["refusal_rate_harmful"]
    assert stronger["evaluation"]["refusal_rate_harmful"] <= rate < kept["evaluation"]["refusal_rate_harmful"]
