"""Third pass, B (runtime): the cheap checks of the command line, as a hostile user types it
(docs/RELIABILITY.md, section `Third pass, B: runtime`, classes B1-B5). Every case runs through
`abliterate.cli.main` on fresh files and fails in one line before any model loads or any server starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from fixtures import assert_error, cli

from abliterate.demo import DEMO_MODEL_DIR

DEMO = str(DEMO_MODEL_DIR)
# Where no server answers: a flow started by mistake would fail with "does not answer", not the case's line.
NO_SERVER = "http://127.0.0.1:9/api"


@pytest.fixture
def offline_flows(restored_environment, tmp_path, monkeypatch):
    """A fresh tool home, and a Prefect API that does not answer: a case that reached a flow would say so."""
    monkeypatch.setenv("ABLITERATE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", NO_SERVER)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def weights_loaded(monkeypatch):
    """How many times transformers loaded a model's weights (a spy on the third-party loader)."""
    from transformers import AutoModelForCausalLM

    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        calls.append(args[:1])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    return calls


@pytest.fixture
def no_tokenizer(tmp_path):
    """The demo model without its tokenizer files (a partial copy of a checkpoint)."""
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(DEMO_MODEL_DIR, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    return folder


# ------------------------------------------------------------------ B1: empty paths


@pytest.mark.parametrize(
    "args, flag",
    [
        (["run", DEMO, "--out", ""], "--out"),
        (["run", DEMO, "--out", "o", "--work-dir", ""], "--work-dir"),
        (["run", DEMO, "--out", "o", "--markers", ""], "--markers"),
        (["run", DEMO, "--out", "o", "--harmful-test", " "], "--harmful-test"),
        (["measure", DEMO, "--out", "  "], "--out"),
        (["measure", DEMO, "--out", "m", "--harmful", ""], "--harmful"),
        (["evaluate", DEMO, "--report", ""], "--report"),
        (["evaluate", DEMO, "--baseline", ""], "--baseline"),
        (["ablate", "", "--directions", "d", "--out", "o"], "MODEL"),
        (["ablate", DEMO, "--directions", "", "--out", "o"], "--directions"),
        (["sweep", DEMO, "--out", "o", "--variants", ""], "--variants"),
        (["search", DEMO, "--out", ""], "--out"),
        (["chat", ""], "MODEL"),
    ],
)
def test_an_empty_path_is_one_line_before_any_work(offline_flows, capsys, args, flag):
    """B1: `--out ""` (an unset shell variable) meant "no output" to `run`: it measured, started the server
    and ended in a TypeError traceback; `--markers ""` silently took the built-in list. Every file or
    folder argument given empty or blank is one line naming it."""
    command = args[0]
    assert_error(cli(capsys, *args), command, f"{flag} is empty", "give a file or folder path")
    assert not (offline_flows / "home").exists()


# ------------------------------------------------------------------ B2: inputs that are not files


@pytest.mark.parametrize(
    "option, value, what",
    [
        ("--markers", "DIR", "is a directory, not a text file of phrases"),
        ("--markers", "/dev/null", "is a character device, not a text file of phrases"),
        ("--harmful", "DIR", "is a directory, not a prompt file"),
        ("--harmless", "/dev/null", "is a character device, not a prompt file"),
        ("--harmful-test", "DIR/x.txt", "prompt file not found"),
    ],
)
def test_an_input_file_that_is_no_file_is_named_for_what_it_is(offline_flows, capsys, option, value, what):
    """B2: a marker file that is a directory was reported as missing; a prompt file that is a directory or
    /dev/null as of an "unsupported prompt file type ''": the line now says what the path is."""
    folder = offline_flows / "prompts"
    folder.mkdir()
    value = value.replace("DIR", str(folder))
    assert_error(cli(capsys, "run", DEMO, "--out", "o", option, value), "run", value, what)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["chat", "MISSING"], ["model directory MISSING does not exist", "checkpoint folder"]),
        (["chat", "FILE"], ["model directory FILE is a file, not a folder"]),
        (["evaluate", DEMO, "--baseline", "MISSING"], ["--baseline model directory MISSING does not exist"]),
        (
            ["validate", DEMO, "MISSING"],
            ["ablated model directory MISSING does not exist", "abliterate ablate"],
        ),
        (["chat", DEMO, "--baseline", "NO_TOKENIZER"], ["cannot load a tokenizer from NO_TOKENIZER"]),
        (["chat", "NO_TOKENIZER"], ["cannot load a tokenizer from NO_TOKENIZER", "copy the tokenizer files"]),
        (["measure", "NO_TOKENIZER", "--out", "m"], ["cannot load a tokenizer from NO_TOKENIZER"]),
    ],
)
def test_model_folders_and_tokenizers_are_checked_before_any_weights_load(
    offline_flows, capsys, weights_loaded, no_tokenizer, args, fragments
):
    """B3: `chat` on a folder without tokenizer files printed its line only after the model had loaded
    (minutes for a large one), and with `--baseline` such a folder after the first model had; a missing
    chat model got a tokenizer's line about repository ids; `evaluate --baseline MISSING` loaded the model
    first. Every model folder is checked to be one, and every tokenizer loaded, before any weights."""
    names = {"MISSING": str(offline_flows / "nope"), "FILE": str(DEMO_MODEL_DIR / "config.json")}
    names["NO_TOKENIZER"] = str(no_tokenizer)
    args = [names.get(a, a) for a in args]
    line = assert_error(cli(capsys, *args), args[0])
    for fragment in fragments:
        for key, value in names.items():
            fragment = fragment.replace(key, value)
        assert fragment in line, line
    assert weights_loaded == [], "a model's weights were loaded before the cheap check failed"


# ------------------------------------------------------------------ B4: cheap checks before the server


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--work-dir", "FILE"], ["--work-dir", "is a file, not a folder"]),
        (["--work-dir", "FILE/deeper"], ["FILE/deeper", "Not a directory"]),
        (["--out", "FILE/x"], ["FILE/x", "Not a directory"]),
    ],
)
def test_folders_to_write_under_a_file_fail_before_any_work(offline_flows, capsys, extra, fragments):
    """B4: `run --work-dir FILE` measured for two minutes, then failed writing the directions file."""
    file = offline_flows / "notes.txt"
    file.write_text("mine\n")
    extra = [e.replace("FILE", str(file)) for e in extra]
    args = ["run", DEMO, *(["--out", "o"] if "--out" not in extra else []), *extra]
    line = assert_error(cli(capsys, *args), "run")
    for fragment in fragments:
        assert fragment.replace("FILE", str(file)) in line, line
    assert file.read_text() == "mine\n"


@pytest.mark.parametrize(
    "variants, fragments",
    [
        ("[]\n", ["the sweep has no variants"]),
        ("- {name: a, layers: all}\n- {name: a, layers: all}\n", ["name 'a' must be unique"]),
        ("- {name: a, layers: all, bogus: 1}\n", ["unknown keys ['bogus']"]),
        ("- {name: a, layers: '999'}\n", ["layer 999 is out of range"]),
        ("- {name: a, scale: .nan}\n", ["not finite"]),
        ("- {name: ../up, layers: all}\n", ["name '../up' must be unique"]),
    ],
)
def test_sweep_variants_are_checked_before_the_server_starts(offline_flows, capsys, variants, fragments):
    """B4: an empty, duplicate, unknown or out-of-range variant failed only inside the flow, after the
    temporary server had started (80-100 s on a busy machine). The flow's own checks (`check_sweep`) now run
    first in the CLI: with no server answering, the line is the variant's, not the server's."""
    path = offline_flows / "variants.yaml"
    path.write_text(variants)
    assert_error(
        cli(capsys, "sweep", DEMO, "--out", offline_flows / "out", "--variants", path, "--quiet"),
        "sweep",
        *fragments,
    )
    assert not (offline_flows / "out").exists()


# ------------------------------------------------------------------ B5: Prefect's client fails fast


CLIENT_RETRIES = """
import os, sys
os.environ["ABLITERATE_HOME"] = sys.argv[1]
from abliterate_flows.runtime import configure
configure()
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES
print(PREFECT_CLIENT_MAX_RETRIES.value())
"""


@pytest.mark.parametrize(
    "env, retries",
    [({}, 2), ({"PREFECT_API_URL": NO_SERVER}, 5), ({"PREFECT_CLIENT_MAX_RETRIES": "7"}, 7)],
)
def test_prefect_client_retries_are_few_against_the_temporary_server(tmp_path, env, retries):
    """B5: after the temporary server was killed, Prefect's client retried each request 5 times with
    backoff (2+4+8+16+32 s) before the run's one line (R12: 20 s to 2 minutes). Against the temporary
    server, a child of this process, it retries twice (2 s, 4 s); a user's server keeps Prefect's 5, and
    a user's own setting wins."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_RETRIES, str(tmp_path / "home")],
        capture_output=True,
        env={**clean, "PREFECT_HOME": str(tmp_path / "prefect"), **env},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert int(done.stdout.decode().split()[-1]) == retries


@pytest.mark.parametrize("command", ["run", "sweep", "search"])
def test_a_prefect_server_that_does_not_answer_is_one_line_before_the_flows_load(
    offline_flows, capsys, command
):
    """B5: PREFECT_API_URL naming a server that accepts no connection: the line came after the flows were
    imported and called (93 s on a busy machine); a TCP connection is tried first (13 s, imports included)."""
    variants = offline_flows / "variants.yaml"
    variants.write_text("- {name: a, layers: all}\n")
    extra = {
        "run": ["--out", "o"],
        "sweep": ["--out", "o", "--variants", variants],
        "search": ["--trials", "1"],
    }
    assert_error(
        cli(capsys, command, DEMO, "--quiet", *extra[command]),
        command,
        f"the Prefect server at PREFECT_API_URL={NO_SERVER} does not answer (Connection refused)",
        "prefect server start",
    )
    assert not (offline_flows / "o").exists()


def test_a_prefect_home_that_is_a_file_is_one_line_before_the_server_starts(
    offline_flows, capsys, monkeypatch
):
    """B5: PREFECT_HOME a file: the temporary server could not create its database, and the run waited out
    the 300 s start-up bound in silence (then SIGTERM from the user's timeout). Now one line at once."""
    home = offline_flows / "prefect-home"
    home.write_text("not a folder\n")
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_HOME", str(home))
    assert_error(
        cli(capsys, "run", DEMO, "--out", "o", "--quiet"), "run", "PREFECT_HOME", f"{home} is a file"
    )
    assert home.read_text() == "not a folder\n"


def test_the_default_results_folder_as_a_file_is_named_as_such(offline_flows, capsys):
    """The default work folder (ABLITERATE_HOME/results) being a file was reported as `--work-dir`, an
    option the user never gave."""
    (offline_flows / "home").mkdir()
    (offline_flows / "home" / "results").write_text("x")
    assert_error(
        cli(capsys, "run", DEMO, "--out", "o", "--quiet"),
        "run",
        "the results folder (ABLITERATE_HOME/results)",
    )


def test_a_library_reason_over_several_lines_is_printed_on_one(offline_flows, capsys):
    """B9: a variants file that is no YAML: the parser's reason (context, the line, a caret under it) made
    the error four lines, the last a lone `^`. The CLI prints every error on one line."""
    path = offline_flows / "variants.yaml"
    path.write_text(": : :\n\t- [\n")
    code, err = cli(capsys, "sweep", DEMO, "--out", offline_flows / "out", "--variants", path, "--quiet")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("abliterate sweep: error: ") and "is not valid YAML/JSON" in err[0], err
