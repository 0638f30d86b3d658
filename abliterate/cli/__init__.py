"""`abliterate` command line: one sub-command per pipeline stage, plus the full run.

Each sub-command lives in its own module with `register(subparsers)`; the module sets
`func` on its parser. Bad input raises AbliterateError: printed as one line, exit code 2; so is a
filesystem error, a Prefect server that cannot be started or reached or goes away mid-run, and a store
that cannot be written (abliterate_flows.runtime.runtime_error). Ctrl-C is one line too, exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from abliterate.cli.console import progress_bars_off, use_formatters
from abliterate.config import Runtime
from abliterate.errors import AbliterateError
from abliterate.inference.threads import apply_threads
from abliterate.paths import describe_os_error

# Order is the order shown in --help.
COMMANDS = [
    "inventory",
    "measure",
    "ablate",
    "validate",
    "evaluate",
    "run",
    "sweep",
    "search",
    "chat",
]  # run.py also adds `demo`
# Arguments that name an input model: a folder, or a Hub id `org/name[@revision]` (abliterate.weights.hub). The
# flows (`run`, `sweep`) resolve the id themselves, so their runs record it as typed.
MODEL_ARGUMENTS = ("model", "model_dir", "original", "baseline")
FLOW_COMMANDS = ("run", "sweep", "search", "demo")
# Arguments that name a file or folder: an empty value (`--out "$UNSET"`) is refused where it is read; it
# meant "no output" (a traceback after the server started), "the built-in markers" or "the default folder".
PATH_ARGUMENTS = (
    *MODEL_ARGUMENTS,
    "ablated",
    "out",
    "work_dir",
    "report",
    "directions",
    "plan",
    "variants",
    "markers",
    "harmful",
    "harmless",
    "harmful_test",
    "harmless_test",
    "harmful_val",
    "harmless_val",
)
# The Runtime settings of torch's CPU threads: every command that computes offers them (abliterate.inference.threads).
THREAD_SETTINGS = ("threads", "interop_threads")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abliterate",
        description=(
            "Remove the refusal direction from a chat model's weights. Stages: inventory "
            "(read safetensors headers, classify every tensor), measure (mean residuals of "
            "harmful and harmless prompts, refusal directions), ablate (project the direction "
            "out of every matched weight, shard by shard), validate (structural diff and "
            "projection residuals), evaluate (refusal rate and KL). `run` chains them as a "
            "Prefect flow tracked in MLflow; `demo` runs it on the built-in demo model; `search` finds the "
            "refusal-vs-KL front of the ablation's parameters."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"abliterate.cli.{name}").register(sub)
    use_formatters(parser)  # help wrapped at spaces only, in every sub-command
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler, `docker stop`): ended like Ctrl-C, its cleanup run (the temporary
    server stopped, locks and temporary files released, the tracked run closed), exit code 143. Python's
    default ended the process at once: no line, a run left `RUNNING` in MLflow and Prefect."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread while a command runs (where nothing else handles it)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    with sigterm_as_interrupt():
        return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        refuse_empty_paths(parser, args)
        if any(hasattr(args, k) for k in THREAD_SETTINGS):  # the commands that compute
            apply_threads(Runtime(**{k: getattr(args, k) for k in THREAD_SETTINGS if hasattr(args, k)}))
        if getattr(args, "quiet", False):
            progress_bars_off()
        if args.command not in FLOW_COMMANDS:
            resolve_model_arguments(args)
        return int(args.func(args) or 0)
    except AbliterateError as exc:
        print(f"abliterate {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (SIGTERM): one line, exit code 128 + the signal
        terminated = isinstance(exc, Terminated)
        print(
            f"abliterate {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; files already "
            "finished are kept and nothing partial carries a final name: rerun the same command to continue",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except (
        OSError
    ) as exc:  # the filesystem (a full or read-only home, a link loop): one line, never a traceback
        print(f"abliterate {args.command}: error: {one_line(describe_os_error(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Prefect's temporary server that did not start in time or went away mid-run, a PREFECT_API_URL
        # that does not answer, an SQLite store (MLflow's, Prefect's) on a full or read-only home, a
        # filesystem error a library wrapped: one line that says what to do instead of a traceback.
        from abliterate_flows.runtime import runtime_error

        translated = runtime_error(exc)
        if translated is None:
            raise
        print(f"abliterate {args.command}: error: {one_line(translated)}", file=sys.stderr)
        return 2


def one_line(error: object) -> str:
    """The error's text on one line: a library's reason quoted inside it may span several (a YAML parser's
    context and caret, a tokenizer's list of causes), which left the last line of stderr a caret."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(error)).strip()


def refuse_empty_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A file or folder argument given as an empty or blank string is one line, before anything runs."""
    names = {}  # dest -> how the user wrote it: the option, or the positional's metavar
    for sub in getattr(parser, "_actions", ()):
        if isinstance(sub, argparse._SubParsersAction) and args.command in sub.choices:
            for action in sub.choices[args.command]._actions:
                names.setdefault(  # the first name: later ones are hidden older aliases
                    action.dest,
                    action.option_strings[0]
                    if action.option_strings
                    else (action.metavar or action.dest).upper(),
                )
    for dest in PATH_ARGUMENTS:
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            name = names.get(dest, "--" + dest.replace("_", "-"))
            raise AbliterateError(f"{name} is empty ({value!r}): give a file or folder path")


def resolve_model_arguments(args: argparse.Namespace) -> None:
    """Hub ids among the model arguments become their snapshot folders in huggingface_hub's cache; then every
    model folder (the baseline's too) is checked to be a folder before the command loads any model: a
    missing baseline failed after the model it is compared with had loaded, a missing chat model with a
    tokenizer's message about repository ids."""
    from abliterate.paths import describe_special
    from abliterate.weights.hub import parse_hub_id, resolve_model

    for name in MODEL_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str) and parse_hub_id(value) is not None:
            setattr(args, name, resolve_model(value))
    for name in (*MODEL_ARGUMENTS, "ablated"):
        value = getattr(args, name, None)
        if isinstance(value, str | Path) and (special := describe_special(Path(value))) != "a directory":
            what = {"ablated": "ablated model directory", "baseline": "--baseline model directory"}.get(
                name, "model directory"
            )
            fix = (
                "the output folder of `abliterate ablate`"
                if name == "ablated"
                else "a checkpoint folder or a Hub id"
            )
            found = "does not exist" if special == "missing" else f"is {special or 'a file'}, not a folder"
            raise AbliterateError(f"{what} {value} {found}: give {fix}")


if __name__ == "__main__":
    sys.exit(main())
