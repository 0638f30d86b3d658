"""`abliterate sweep MODEL --variants FILE --out DIR`: several ablation variants, one measurement."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from abliterate.cli.run import (
    FLOW_SECTIONS,
    add_flow_options,
    check_before_server,
    flow_sections,
    prepare_flows,
)
from abliterate.errors import AbliterateError
from abliterate.figures import figure
from abliterate.paths import describe_special
from abliterate.weights.hub import parse_hub_id

SWEEP_SECTIONS = tuple(cls for cls in FLOW_SECTIONS if cls.section != "ablation")  # the variants hold those


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sweep",
        help="ablate several variants (layers, scales, methods) against one cached measurement",
        description=(
            "Run the Prefect flow `abliterate-sweep`: measure MODEL once (cached), then ablate, validate and "
            "evaluate each variant of FILE into OUT/<name>, each a nested MLflow run under one parent run. "
            "Prints each variant's refusal rate and harmless KL, and which variants lie on the "
            "refusal-vs-KL front (no other variant is better on both)."
        ),
        epilog="FILE (YAML or JSON): a list of mappings, e.g.\n"
        "  - {name: late, layers: 20-40}\n  - {name: soft, layers: all, scale: 0.5}\n"
        "  - {name: np, layers: all, ablation_method: norm_preserving}\n"
        "Keys: name, direction_position and the ablation options (layers, scale, targets, ablation_method, mtp, biases).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", metavar="MODEL", help="Hugging Face checkpoint directory, or a Hub id org/name[@revision]"
    )
    parser.add_argument("--variants", required=True, metavar="FILE", help="YAML or JSON list of variants")
    parser.add_argument("--out", required=True, help="parent directory of the variants' outputs")
    add_flow_options(parser, SWEEP_SECTIONS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.variants)
    if not path.is_file():
        special = describe_special(path)
        found = "not found" if special in (None, "missing") else f"is {special}, not a YAML or JSON file"
        raise AbliterateError(f"variants file {path} {found}")
    try:
        variants = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise AbliterateError(f"{path} is not valid YAML/JSON: {exc}") from exc
    sections = flow_sections(args, SWEEP_SECTIONS)
    # the parent folder of the variants' outputs and the variants themselves are checked by the flow
    check_before_server(args.model, None, sections, work_dir=args.work_dir)
    from abliterate_flows.variants import check_sweep  # no Prefect: before configure()

    if parse_hub_id(args.model) is None:  # the variants before the server starts (a Hub id: in the flow)
        check_sweep(
            args.model,
            args.out,
            variants if isinstance(variants, list) else [variants],
            sections["selection"],
            sections["measurement"],
            sections["evaluation"],
            args.overwrite,
            args.work_dir,
        )
    prepare_flows(args.quiet)
    from abliterate_flows.sweep import sweep_flow

    result = sweep_flow(
        model=args.model,
        out=args.out,
        variants=variants if isinstance(variants, list) else [variants],
        overwrite=args.overwrite,
        force=args.force,
        work_dir=args.work_dir,
        **sections,
    )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"{'variant':<20} {'refusal':>8} {'KL':>9}  front")
    for p in result["variants"]:
        print(
            f"{p['name']:<20} {figure(p['refusal_rate']):>8} {figure(p['kl']):>9}  {'*' if p['on_front'] else ''}"
        )
    print(f"parent MLflow run {result['mlflow_run_id']}")
    return 0
