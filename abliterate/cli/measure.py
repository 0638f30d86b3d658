"""`abliterate measure`: mean residuals, refusal directions, and the direction to ablate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from abliterate.errors import AbliterateError

HELP = "measure refusal directions of a model and choose the one to ablate"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "measure",
        help=HELP,
        description=(
            "Run the model on harmful and harmless prompts (rendered with its chat template and "
            "generation prompt; one forward pass per batch, no generation), take the residual stream "
            "at one token at every residual position (position i = input of decoder layer i; position "
            "L = output of the last layer, before the final norm), and compute per position the "
            "refusal direction from the difference of the two sets' mean residuals. Then choose the "
            "direction to ablate: each candidate position (all but the last fifth of the layers) has its "
            "direction removed from the residual stream at inference time on validation prompts; the one "
            "that most lowers the log-odds of a refusal as first reply token, while the first-token KL on "
            "harmless prompts stays under a threshold, wins. Writes OUT/directions.safetensors (read by "
            "`abliterate ablate`) and OUT/directions.json (statistics and candidate scores)."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="local Hugging Face model directory")
    parser.add_argument("--harmful", required=True, metavar="FILE", help="harmful prompts file")
    parser.add_argument("--harmless", required=True, metavar="FILE", help="harmless prompts file")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument(
        "--position",
        default="last",
        metavar="last|-N",
        help="token whose residual is measured, counted from the end of the rendered prompt: "
        "`last` (= -1, the last token of the generation prompt, where the reply starts) or -N",
    )
    parser.add_argument(
        "--system-prompt", default=None, metavar="TEXT", help="system message for every prompt"
    )
    parser.add_argument(
        "--chat-template-kwargs",
        action="append",
        default=[],
        metavar="JSON|KEY=VALUE",
        help="extra chat-template variables, as a JSON object or KEY=VALUE (repeatable; VALUE is read as "
        "JSON when it parses, e.g. enable_thinking=false for GLM's non-thinking mode)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="prompts per forward pass (default 16)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default float32)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--stream",
        default="auto",
        choices=["auto", "always", "never"],
        help="layer-streamed measurement: read and run one decoder layer at a time, so memory holds one "
        "layer's weights plus the activations instead of the whole model (same results). `auto` (default) "
        "streams when the weights in --dtype exceed --memory-budget. Automatic selection needs the whole "
        "model: with streaming use --select N (recorded unscored) or --select none",
    )
    parser.add_argument(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="memory the model may take for --stream auto, e.g. 64GiB or 500MB (default: the free memory "
        "of --device now)",
    )
    parser.add_argument(
        "--direction-method",
        "--method",
        dest="method",
        default="projected",
        choices=["mean_diff", "projected"],
        help="mean_diff: normalised mean difference; projected: the same, minus its component along "
        "the harmless mean, which disturbs harmless prompts less (default projected)",
    )
    parser.add_argument(
        "--select",
        default="auto",
        metavar="auto|N|none",
        help="direction to ablate: `auto` (score candidates by inference-time ablation, default), a "
        "residual position N (scored too, for the record; unscored when streaming), or `none` (only measure)",
    )
    parser.add_argument("--harmful-val", metavar="FILE", help="harmful validation prompts for selection")
    parser.add_argument("--harmless-val", metavar="FILE", help="harmless validation prompts for selection")
    parser.add_argument(
        "--validation-fraction",
        "--val-fraction",
        dest="val_fraction",
        type=float,
        default=0.25,
        metavar="F",
        help="without --harmful-val/--harmless-val, this seeded fraction of each set is held out for "
        "selection and not measured (default 0.25, as in `abliterate run`)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (default 0)")
    parser.add_argument(
        "--kl-threshold",
        type=float,
        default=0.1,
        metavar="NATS",
        help="largest mean first-token KL on harmless prompts a selected direction may cause (default 0.1)",
    )
    parser.add_argument(
        "--skip-last-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="fraction of the last residual positions that are not candidates (default 0.2)",
    )
    parser.add_argument(
        "--max-candidates",
        type=int,
        default=None,
        metavar="N",
        help="score at most N evenly spaced positions",
    )
    parser.set_defaults(func=run)


def parse_position(text: str) -> int:
    if text == "last":
        return -1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value >= 0:
        raise AbliterateError(f"--position {text!r}: use `last` or a negative token index such as -2")
    return value


def parse_template_kwargs(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                value = json.loads(item)
            except json.JSONDecodeError as exc:
                raise AbliterateError(f"--chat-template-kwargs {item!r} is not valid JSON ({exc})") from exc
            if not isinstance(value, dict):
                raise AbliterateError(f"--chat-template-kwargs {item!r} must be a JSON object")
            out.update(value)
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise AbliterateError(f"--chat-template-kwargs {item!r}: expected a JSON object or KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def parse_select(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise AbliterateError(f"--select {text!r}: use `auto`, `none` or a residual position 0..L")
    return value


def run(args: argparse.Namespace) -> int:
    from abliterate.checkpoint import check_output_location, fingerprint
    from abliterate.directions import compute_directions, write_directions
    from abliterate.measure import MeasureSettings, load_model, measure
    from abliterate.prompts import load_prompts, split_prompts
    from abliterate.selection import SelectionSettings, select_direction
    from abliterate.streaming import choose_streaming, measure_streamed, parse_size

    check_output_location(args.model, args.out)  # never write into the input checkpoint
    select = parse_select(args.select)
    settings = MeasureSettings.create(
        chat_template_kwargs=parse_template_kwargs(args.chat_template_kwargs),
        position=parse_position(args.position),
        system_prompt=args.system_prompt,
        batch_size=args.batch_size,
        dtype=args.dtype,
    )
    stream = choose_streaming(args.model, parse_size(args.memory_budget), args.dtype, args.device, args.stream)
    if stream and select == "auto":
        why = "--stream always" if args.stream == "always" else "the model does not fit the memory budget"
        raise AbliterateError(
            f"{why}, so it is measured layer-streamed, but automatic selection scores directions with the "
            "whole model in memory: pass --select N to record position N unscored, --select none to only "
            "measure (or --stream never, given the memory)"
        )
    fixed = stream and isinstance(select, int)  # recorded as chosen, without inference-time scores
    harmful, harmless = load_prompts(args.harmful), load_prompts(args.harmless)
    harmful_val = harmless_val = None
    if select is not None and not fixed:
        if (args.harmful_val is None) != (args.harmless_val is None):
            raise AbliterateError(
                "give both --harmful-val and --harmless-val, or neither (to split them off)"
            )
        if args.harmful_val is not None:
            harmful_val, harmless_val = load_prompts(args.harmful_val), load_prompts(args.harmless_val)
        else:
            harmful_val, harmful = split_prompts(harmful, args.val_fraction, args.seed)
            harmless_val, harmless = split_prompts(harmless, args.val_fraction, args.seed)

    if stream:
        measurement = measure_streamed(args.model, harmful, harmless, settings, args.device)
    else:
        model, tokenizer = load_model(args.model, args.dtype, args.device)
        measurement = measure(model, tokenizer, harmful, harmless, settings)
    directions = compute_directions(measurement, args.method)
    selected, extra = None, {}
    if fixed:
        if not 0 <= select < directions.num_positions or select not in directions.defined:
            raise AbliterateError(
                f"--select {select}: residual positions with a direction are {directions.defined}"
            )
        selected = select
    elif select is not None:
        selection = select_direction(
            model,
            tokenizer,
            directions,
            harmful_val,
            harmless_val,
            settings,
            SelectionSettings(
                kl_threshold=args.kl_threshold,
                skip_last_fraction=args.skip_last_fraction,
                max_candidates=args.max_candidates,
                batch_size=args.batch_size,
            ),
            position=None if select == "auto" else select,
        )
        selected, extra = selection.position, {"selection": selection.as_dict()}
    path = write_directions(args.out, directions, measurement, fingerprint(args.model), selected, extra)

    print(f"wrote {path} and {Path(args.out) / 'directions.json'}")
    print(f"{'pos':>4} {'diff norm':>10} {'snr':>7} {'refusal':>8} {'kl':>8}")
    scores = {c["position"]: c for c in extra.get("selection", {}).get("candidates", [])}
    for p in range(directions.num_positions):
        row = f"{p:>4} {float(directions.mean_diff_norm[p]):>10.4g} {float(directions.snr[p]):>7.3f}"
        if p in scores:
            row += f" {scores[p]['refusal_score']:>8.3f} {scores[p]['kl']:>8.4f}"
        print(row + ("  <- selected" if p == selected else ""))
    if extra:
        print(f"baseline refusal score (no ablation): {extra['selection']['baseline_refusal_score']:.3f}")
    return 0
