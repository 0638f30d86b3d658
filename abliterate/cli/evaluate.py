"""`abliterate evaluate MODEL`: refusal rates, harmless KL against a baseline, example replies."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from abliterate.errors import AbliterateError

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
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="reply length limit (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts per batch (default 16)")
    parser.add_argument(
        "--markers", metavar="FILE", default=None, help="refusal markers, one phrase per line (# starts a comment)"
    )
    parser.add_argument(
        "--marker", action="append", default=[], metavar="PHRASE", help="a refusal marker (repeatable; adds to --markers)"
    )
    parser.add_argument("--system-prompt", default=None, metavar="TEXT", help="system message for every prompt")
    parser.add_argument(
        "--chat-template-kwargs",
        action="append",
        default=[],
        metavar="JSON|KEY=VALUE",
        help="extra chat-template variables, as a JSON object or KEY=VALUE (repeatable); for GLM-4.5 pass "
        "enable_thinking=false, so that the bounded reply is the answer and not the start of its reasoning",
    )
    parser.add_argument("--examples", type=int, default=5, metavar="N", help="example rows per prompt kind (default 5)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype (default float32)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--out", metavar="FILE", default=None, help="also write the JSON result to FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def read_markers(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"marker file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise AbliterateError(f"marker file {path} is not UTF-8 text ({exc})") from exc
    markers = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not markers:
        raise AbliterateError(f"marker file {path} holds no marker: write one phrase per line")
    return markers


def run(args: argparse.Namespace) -> int:
    from abliterate.cli.measure import parse_template_kwargs
    from abliterate.evaluate import evaluate_model
    from abliterate.prompts import load_prompts
    from abliterate.refusal import DEFAULT_REFUSAL_MARKERS

    markers = (read_markers(args.markers) if args.markers else []) + args.marker
    result = evaluate_model(
        args.model,
        load_prompts(args.harmful),
        load_prompts(args.harmless),
        baseline_dir=args.baseline,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        markers=markers or DEFAULT_REFUSAL_MARKERS,
        system_prompt=args.system_prompt,
        chat_template_kwargs=parse_template_kwargs(args.chat_template_kwargs),
        n_examples=args.examples,
        dtype=args.dtype,
        device=args.device,
        progress=not args.quiet,
    )
    data = result.to_json()
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2) if args.json else result.summary())
    return 0
