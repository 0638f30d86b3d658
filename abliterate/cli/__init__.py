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
import sys

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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    try:
        if any(hasattr(args, k) for k in THREAD_SETTINGS):  # the commands that compute
            apply_threads(Runtime(**{k: getattr(args, k) for k in THREAD_SETTINGS if hasattr(args, k)}))
        if getattr(args, "quiet", False):
            progress_bars_off()
        if args.command not in FLOW_COMMANDS:
            resolve_model_arguments(args)
        return int(args.func(args) or 0)
    except AbliterateError as exc:
        print(f"abliterate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the conventional exit code 128 + SIGINT
        print(
            f"abliterate {args.command}: interrupted; files already finished are kept and nothing partial carries a "
            "final name: rerun the same command to continue",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except (
        OSError
    ) as exc:  # the filesystem (a full or read-only home, a link loop): one line, never a traceback
        print(f"abliterate {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Prefect's temporary server that did not start in time or went away mid-run, a PREFECT_API_URL
        # that does not answer, an SQLite store (MLflow's, Prefect's) on a full or read-only home, a
        # filesystem error a library wrapped: one line that says what to do instead of a traceback.
        from abliterate_flows.runtime import runtime_error

        translated = runtime_error(exc)
        if translated is None:
            raise
        print(f"abliterate {args.command}: error: {translated}", file=sys.stderr)
        return 2


def resolve_model_arguments(args: argparse.Namespace) -> None:
    """Hub ids among the model arguments become their snapshot folders in huggingface_hub's cache."""
    from abliterate.weights.hub import parse_hub_id, resolve_model

    for name in MODEL_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str) and parse_hub_id(value) is not None:
            setattr(args, name, resolve_model(value))


if __name__ == "__main__":
    sys.exit(main())
