"""`abliterate chat` in a terminal: a pseudo-terminal drives the real command on the demo model and its
ablated output; the original refuses a harmful request, the ablated model beside it does not."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from fixtures import CLI, ROOT

from abliterate.cli import main
from abliterate.cli.chat import PROMPT, SEPARATOR
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.inference.refusal import is_refusal

HARMFUL = (ROOT / "abliterate/data/demo/harmful_test.txt").read_text().splitlines()[0]


class Terminal:
    """A command on a pseudo-terminal: type lines, read what it shows."""

    def __init__(self, *args: str, columns: int = 150, env: dict[str, str] | None = None):
        master, slave = pty.openpty()
        env = {**os.environ, "COLUMNS": str(columns), "LINES": "50", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-c", CLI, *args], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT
        )
        os.close(slave)
        self.master, self.seen = master, ""

    def read_until(self, marker: str, timeout: float = 300) -> str:
        """What the terminal shows from the last read until `marker` appears (line ends as \\n)."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            assert time.monotonic() < deadline, f"no {marker!r} in {self.seen!r}"
            if select.select([self.master], [], [], 1)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace").replace("\r\n", "\n")
                except OSError:  # the command ended
                    raise AssertionError(f"ended before {marker!r}: {self.seen!r}") from None
        shown, _, self.seen = self.seen.partition(marker)
        return shown + marker

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        os.close(self.master)
        return code


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    """The demo model with its refusal direction (measured and selected by the CLI) projected out."""
    root = tmp_path_factory.mktemp("chat")
    assert main(["measure", str(DEMO_MODEL_DIR), "--out", str(root / "m"), "--quiet"]) == 0
    directions = root / "m" / "directions.safetensors"
    assert (
        main(
            [
                "ablate",
                str(DEMO_MODEL_DIR),
                "--directions",
                str(directions),
                "--out",
                str(root / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    return root / "out"


def columns(shown: str) -> tuple[str, str]:
    """The two replies of a side-by-side answer: the text under each model's label."""
    lines = shown.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("ablated"))
    at = lines[header].index(SEPARATOR)
    assert lines[header][at + len(SEPARATOR) :].strip() == "original"
    body = [line for line in lines[header + 2 :] if not line.startswith(PROMPT)]
    left = " ".join(line[:at].strip() for line in body).strip()
    right = " ".join(line[at + len(SEPARATOR) :].strip() for line in body).strip()
    return left, right


@pytest.mark.slow
def test_chat_side_by_side_in_a_terminal(ablated):
    term = Terminal("chat", str(ablated), "--baseline", str(DEMO_MODEL_DIR), "--device", "cpu")
    banner = term.read_until(PROMPT)
    assert "greedy replies" in banner and "/quit" in banner
    assert "Loading weights" not in banner  # no loading bars on the chat's screen
    term.type(HARMFUL)
    after, before = columns(term.read_until(PROMPT))
    assert is_refusal(before), before  # the original demo model refuses
    assert after and not is_refusal(after), after  # the ablated one answers
    # /reset forgets both conversations: the same question gets the same replies again.
    term.type("/reset")
    assert "a new conversation" in term.read_until(PROMPT)
    term.type(HARMFUL)
    assert columns(term.read_until(PROMPT)) == (after, before)
    term.type("/quit")
    assert term.close() == 0


@pytest.mark.slow
def test_chat_alone_sampled_ends_on_ctrl_d(ablated):
    term = Terminal("chat", str(ablated), "--sample", "--temperature", "0.8", "--sample-seed", "1")
    assert "sampled (temperature 0.8" in term.read_until(PROMPT)
    term.type(HARMFUL)
    reply = term.read_until(PROMPT)
    assert SEPARATOR not in reply and not is_refusal(reply)
    os.write(term.master, b"\x04")  # Ctrl-D
    assert term.close() == 0


def test_bad_chat_arguments_are_one_line_errors(tmp_path, capsys):
    from fixtures import assert_error, cli

    assert_error(cli(capsys, "chat", tmp_path / "nowhere"), "chat", "nowhere")
    assert_error(cli(capsys, "chat", str(DEMO_MODEL_DIR), "--temperature", "0"), "chat", "--temperature")


def test_chat_is_listed(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "chat" in capsys.readouterr().out
