"""`abliterate validate ORIGINAL ABLATED`: is the output exactly the input with the planned edits?"""

from __future__ import annotations

import argparse
import json

from abliterate.cli import THREAD_SETTINGS
from abliterate.cli.console import deprecated_alias
from abliterate.cli.inventory import add_profile_options
from abliterate.config import Runtime, add_options
from abliterate.weights.checkpoint import choose_profile

HELP = (
    "check an ablated checkpoint against its original: structure, bytes, plan, NaN/Inf, projection residuals"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help=HELP,
        description=(
            "Compare the output of `abliterate ablate` (ABLATED) with its input (ORIGINAL): shard files, "
            "the index, every safetensors header (tensor names, shapes, dtypes, shard assignment) and every "
            "non-weight file must be identical; each tensor's bytes are hashed by streaming, and the changed "
            "tensors, grouped by role and layer, must be exactly the ones the manifest (abliteration.json) "
            "lists as edited. Changed tensors are scanned for NaN/Inf, and each edited tensor's projection "
            "residual (|r^T W'|/|W| for writers, |W' r|/|W| for routers and the embedding) is checked against "
            "a tolerance derived from its dtype (plain and projected edits at scale 1; other edits are "
            "reported only). Memory stays at a few chunks of one tensor, so it runs on checkpoints larger "
            "than RAM. Exit code: 0 valid, 1 validation failed (every failure is named), 2 bad input."
        ),
    )
    parser.add_argument(
        "original",
        metavar="ORIGINAL",
        help="the input checkpoint directory, or its Hub id org/name[@revision]",
    )
    parser.add_argument("ablated", metavar="ABLATED", help="the ablated output directory")
    parser.add_argument(
        "--directions",
        metavar="FILE",
        default=None,
        help="directions file used by the ablation (default: the path recorded in the manifest)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_profile_options(parser)  # the rules `abliterate ablate` was given for a model of an unknown type
    parser.add_argument(
        "--report", metavar="FILE", default=None, help="also write the JSON report to FILE (default: none)"
    )
    deprecated_alias(parser, "--out", "--report", "report", metavar="FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_options(parser, Runtime, only=THREAD_SETTINGS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from abliterate.check.validate import REPORT_KEYS, validate_output
    from abliterate.paths import output_file, write_text_atomic

    if args.report:  # checked before the work, so the report is never lost at the end
        output_file(args.report, [args.original, args.ablated], "--report", REPORT_KEYS)
    profile = choose_profile(args.original, args.family, args.map)
    report = validate_output(
        args.original, args.ablated, args.directions, progress=not args.quiet, profile=profile
    )
    data = report.to_json()
    if args.report:
        write_text_atomic(args.report, json.dumps(data, indent=2) + "\n")  # never an empty report
    print(json.dumps(data, indent=2) if args.json else report.summary())
    return 0 if report.ok else 1
