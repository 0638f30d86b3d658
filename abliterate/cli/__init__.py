"""`abliterate` command line: one sub-command per pipeline stage, plus the full run.

Each sub-command lives in its own module with `register(subparsers)`; the module sets
`func` on its parser. Bad input raises AbliterateError: printed as one line, exit code 2; so is a
Prefect server that cannot be started or reached (abliterate_flows.runtime.server_start_error). Ctrl-C is
one line too, exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from abliterate.errors import AbliterateError

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
]  # run.py also adds `demo`
# Arguments that name an input model: a folder, or a Hub id `org/name[@revision]` (abliterate.weights.hub). The
# flows (`run`, `sweep`) resolve the id themselves, so their runs record it as typed.
MODEL_ARGUMENTS = ("model", "model_dir", "original", "baseline")
FLOW_COMMANDS = ("run", "sweep", "search", "demo")


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
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    try:
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
    except Exception as exc:
        # Prefect's temporary server that did not start in time, or a PREFECT_API_URL that does not
        # answer: one line that says what to do instead of Prefect's traceback.
        from abliterate_flows.runtime import server_start_error

        translated = server_start_error(exc)
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
