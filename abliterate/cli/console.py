"""What every command shares on the terminal: help texts wrapped on spaces only, older option names
kept as hidden aliases with a deprecation note, and progress bars switched off (`--quiet`, and the
flows, whose console is one line per stage). Numbers are written by `abliterate.vocabulary.figure`.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    """Lines of at most `width` characters, broken at spaces only: never inside a word, a flag or a
    name such as attn_out (a word longer than the line stays whole)."""
    return textwrap.wrap(
        " ".join(text.split()),
        max(width, 11),
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, but lines break at spaces only."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return _wrap(text, width) or [""]

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(_wrap(text, width, indent))


class RawDescriptionHelpFormatter(HelpFormatter):
    """Descriptions and epilogs as written (their own line breaks); option help wrapped at spaces."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def use_formatters(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and its sub-commands the space-only formatters (raw descriptions stay raw)."""
    raw = issubclass(
        parser.formatter_class, (argparse.RawDescriptionHelpFormatter, RawDescriptionHelpFormatter)
    )
    parser.formatter_class = RawDescriptionHelpFormatter if raw else HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                use_formatters(sub)


class _Deprecated(argparse.Action):
    """An older option name: stores like the new one and says once, on stderr, which name to use."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(
            f"{parser.prog}: note: {option_string} is deprecated, use {self.new} (same meaning)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept `old` as `new` (same destination), hidden from --help, with a deprecation note when used."""
    parser.add_argument(
        old,
        dest=dest,
        action=_Deprecated,
        new=new,
        help=argparse.SUPPRESS,
        default=argparse.SUPPRESS,
        **kwargs,
    )


def progress_bars_off() -> None:
    """No progress bars from the libraries either: tqdm's default (TQDM_DISABLE), transformers' loading
    bars and huggingface_hub's download bars. The project's own bars follow each command's `progress`."""
    os.environ["TQDM_DISABLE"] = "1"
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    disable_progress_bars()
