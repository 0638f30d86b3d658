"""`abliterate evaluate MODEL`: refusal rates, harmless KL against a baseline, example replies."""

from __future__ import annotations

import argparse
import json

from abliterate.cli import THREAD_SETTINGS
from abliterate.cli.console import deprecated_alias
from abliterate.config import Evaluation, Prompts, Runtime, Template, add_options, from_args
from abliterate.inference.devices import resolve_runtime

HELP = "measure refusal rates (greedy replies) and first-token KL against the original model"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help=HELP,
        description=(
            "Generate greedy replies (at most --max-new-tokens tokens) to harmful and harmless test prompts, "
            "rendered with the model's chat template, and count a reply as a refusal when it contains a "
            "refusal marker (case- and apostrophe-insensitive; a built-in English list unless --markers or "
            "--marker give others). First-token figures come from one forward pass per prompt: the refusal "
            "score (mean log-odds that the reply starts with a refusal token: the tokens the baseline's own "
            "refusals start with) and the share of prompts whose greedy first token is one. With --baseline "
            "(the original model) it also reports the baseline's figures, the mean first-token KL(baseline "
            "|| model) on harmless prompts in nats (how far the ablation moved the model where it should not), "
            "and example replies before and after. The models are loaded one at a time; a model over the "
            "memory budget is read one decoder layer at a time (first-token figures: one read of its weights), "
            "and makes full replies only with --full-replies always (layer-streamed, one read of the weights per new token; the cost is printed first). "
            "JSON keys: refusal_rate_harmful, refusal_rate_harmless, kl_harmless, refusal_score_harmful, "
            "first_token_refusal_rate_*, n_harmful, n_harmless, baseline_*, examples, settings."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="model directory to evaluate (e.g. the ablated output), or a Hub id org/name[@revision]",
    )
    parser.add_argument(
        "--baseline",
        metavar="ORIGINAL",
        default=None,
        help="the original model (folder or Hub id), for KL, before/after figures and the refusal tokens its "
        "own refusals start with (default: none, the model's figures alone)",
    )
    add_options(
        parser,
        Prompts,
        only=("harmful_test", "harmless_test", "prompt_set"),
        title="test prompts (default: the prompt set's test split, as `abliterate run` uses)",
    )
    deprecated_alias(parser, "--harmful", "--harmful-test", "harmful_test", metavar="FILE")
    deprecated_alias(parser, "--harmless", "--harmless-test", "harmless_test", metavar="FILE")
    add_options(parser, Template)
    add_options(parser, Evaluation, exclude=("evaluate",))
    add_options(
        parser,
        Runtime,
        only=("device", "dtype", "batch_size", "memory_budget", "streaming", *THREAD_SETTINGS),
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument(
        "--report", metavar="FILE", default=None, help="also write the JSON result to FILE (default: none)"
    )
    deprecated_alias(parser, "--out", "--report", "report", metavar="FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from abliterate.check.evaluate import REPORT_KEYS, evaluate_model, replies_cost
    from abliterate.paths import output_file, write_text_atomic
    from abliterate.pipeline import PromptSets, decide_streaming

    template, evaluation = from_args(Template, args), from_args(Evaluation, args)
    runtime = resolve_runtime(from_args(Runtime, args), args.model)
    if args.report:  # checked before the work, so the result is never lost at the end
        output_file(
            args.report, [args.model] + ([args.baseline] if args.baseline else []), "--report", REPORT_KEYS
        )
    # The test sets `run` evaluates on: the files given, else the prompt set of the original model.
    sets = PromptSets.load(args.baseline or args.model, from_args(Prompts, args), split=False)
    harmful, harmless = sets.harmful_test, sets.harmless_test
    stream = decide_streaming(args.model, runtime)
    where = (
        "layer-streamed (first-token figures: one read of the weights per model)" if stream else "in memory"
    )
    print(f"evaluating {where}, device {runtime.device}, dtype {runtime.dtype}", file=sys.stderr)
    cost = replies_cost(args.model, len(harmful) + len(harmless), evaluation, runtime, stream)
    if cost:
        print(cost + (" (for each of the two models)" if args.baseline else ""), file=sys.stderr)
    result = evaluate_model(
        args.model,
        harmful,
        harmless,
        evaluation,
        template,
        runtime,
        stream,
        baseline_dir=args.baseline,
        progress=not args.quiet,
    )
    data = result.to_json()
    if args.report:
        write_text_atomic(args.report, json.dumps(data, indent=2) + "\n")  # never an empty report
    print(json.dumps(data, indent=2) if args.json else result.summary())
    return 0
