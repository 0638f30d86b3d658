"""Helpers shared by the test files (fixtures themselves live in conftest.py): where the repository
is, and the CLI driven in process or in a fresh interpreter, with its one-line errors."""

from __future__ import annotations

from pathlib import Path

from abliterate.cli import main

ROOT = Path(__file__).resolve().parents[1]

# `abliterate ARGS` in a fresh interpreter: python -c CLI ARGS
CLI = "import sys; from abliterate.cli import main; sys.exit(main(sys.argv[1:]))"


def cli(capsys, *args: str | Path) -> tuple[int | str, list[str]]:
    """Exit code and stderr lines of `abliterate ARGS`; an exception escaping main is a crash."""
    try:
        code: int | str = main([str(a) for a in args])
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line and exit 2, never a traceback
        code = f"crash: {type(exc).__name__}: {exc}"
    return code, capsys.readouterr().err.strip().splitlines()


def console(capsys, *args: str | Path) -> tuple[int | str, list[str]]:
    """`cli` as the console script runs it: argparse's SystemExit (a bad option value) is the exit code."""
    try:
        return cli(capsys, *args)
    except SystemExit as exit:
        return exit.code, capsys.readouterr().err.strip().splitlines()


def assert_error(result: tuple[int | str, list[str]], command: str, *fragments: str) -> str:
    """Exit 2 and one line `abliterate COMMAND: error: ...` holding every fragment (what, where, what to do)."""
    code, err = result
    assert code == 2, f"expected exit 2, got {code}"
    lines = [line for line in err if line.startswith(f"abliterate {command}: error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]
