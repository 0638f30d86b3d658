"""`abliterate evaluate MODEL`: refusal rates, harmless KL against a baseline, example replies."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from abliterate.config import Evaluation, Runtime, Template, add_options, eval_settings, from_args

HELP = "measure refusal rates (greedy replies) and first-token KL against the original model"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help=HELP,
        description=(
            "Generate greedy replies (at most --max-new-tokens tokens) to harmful and harmless test prompts, "
            "rendered with the model's chat template, and count a reply as a refusal when it contains a "
            "refusal marker (case- and apostrophe-insensitive; a built-in English list unless --markers or "
            "--marker give others). With --baseline (the original model) it also reports the baseline's "
            "refusal rates, the mean first-token KL(baseline || model) on harmless prompts in nats (how far "
            "the ablation moved the model where it should not), and example replies before and after. The "
            "models are loaded one at a time. JSON keys: refusal_rate_harmful, refusal_rate_harmless, "
            "kl_harmless, n_harmful, n_harmless, baseline_refusal_rate_*, examples, settings."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="model directory to evaluate (e.g. the ablated output)")
    parser.add_argument("--baseline", metavar="ORIGINAL", default=None, help="the original model, for KL and before/after")
    parser.add_argument("--harmful", required=True, metavar="FILE", help="harmful test prompts file")
    parser.add_argument("--harmless", required=True, metavar="FILE", help="harmless test prompts file")
    add_options(parser, Template)
    add_options(parser, Evaluation, exclude=("evaluate",))
    add_options(parser, Runtime, only=("device", "dtype", "batch_size"))
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--out", metavar="FILE", default=None, help="also write the JSON result to FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from abliterate.evaluate import evaluate_model
    from abliterate.paths import output_file
    from abliterate.prompts import load_prompts

    template, evaluation, runtime = from_args(Template, args), from_args(Evaluation, args), from_args(Runtime, args)
    if args.out:  # checked before the work, so the result is never lost at the end
        output_file(args.out, [args.model] + ([args.baseline] if args.baseline else []))
    result = evaluate_model(
        args.model,
        load_prompts(args.harmful),
        load_prompts(args.harmless),
        baseline_dir=args.baseline,
        settings=eval_settings(evaluation, template, runtime),
        dtype=runtime.dtype,
        device=runtime.device,
        progress=not args.quiet,
    )
    data = result.to_json()
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2) if args.json else result.summary())
    return 0
