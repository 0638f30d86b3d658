"""`abliterate measure`: mean residuals, refusal directions, and the direction to ablate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abliterate.cli import THREAD_SETTINGS
from abliterate.config import (
    Evaluation,
    Measurement,
    Prompts,
    Runtime,
    Selection,
    Template,
    add_options,
    from_args,
)
from abliterate.errors import AbliterateError
from abliterate.figures import figure
from abliterate.inference.devices import resolve_runtime

MEASURE_RUNTIME = ("device", "dtype", "batch_size", "memory_budget", "streaming", *THREAD_SETTINGS)

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
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="model folder (safetensors), or a Hugging Face Hub id "
        "org/name[@revision] (read from or downloaded into the Hugging Face cache)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    add_options(
        parser,
        Prompts,
        only=("harmful", "harmless", "prompt_set", "validation_fraction", "seed"),
    )
    val = parser.add_argument_group("validation prompts (instead of the split)")
    val.add_argument(
        "--harmful-val", metavar="FILE", help="harmful validation prompts for selection (default: the split)"
    )
    val.add_argument(
        "--harmless-val",
        metavar="FILE",
        help="harmless validation prompts for selection (default: the split)",
    )
    add_options(parser, Template)
    add_options(parser, Measurement)
    add_options(parser, Selection)
    add_options(
        parser,
        Evaluation,
        only=("markers", "marker", "refusal_probe_tokens"),
        title="refusal tokens (from the model's own refusals, found by marker phrases)",
    )
    add_options(parser, Runtime, only=MEASURE_RUNTIME)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from abliterate.measure.directions import write_directions
    from abliterate.pipeline import (
        PromptSets,
        check_settings,
        decide_streaming,
        direction_stage,
        measure_stage,
        scores_directions,
    )
    from abliterate.select.selection import describe_rank
    from abliterate.weights.checkpoint import check_output_location, fingerprint
    from abliterate.weights.hub import hub_origin

    check_output_location(args.model, args.out)  # never write into the input checkpoint
    prompts, template = from_args(Prompts, args), from_args(Template, args)
    measurement, selection = from_args(Measurement, args), from_args(Selection, args)
    runtime = resolve_runtime(from_args(Runtime, args), args.model)
    evaluation = from_args(Evaluation, args)
    check_settings(evaluation)  # the markers file, before the model loads
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise AbliterateError(f"--out {args.out} is a file: give a directory (created if missing)")
    if (args.harmful_val is None) != (args.harmless_val is None):
        raise AbliterateError("give both --harmful-val and --harmless-val, or neither (to split them off)")
    stream = decide_streaming(args.model, runtime)
    sets = PromptSets.load(
        args.model,
        prompts,
        args.harmful_val,
        args.harmless_val,
        split=scores_directions(args.model, selection.direction_position, stream),
    )
    harmful, harmless, harmful_val, harmless_val = (
        sets.harmful,
        sets.harmless,
        sets.harmful_val,
        sets.harmless_val,
    )
    progress = not args.quiet
    where = "layer-streamed" if stream else "in memory"
    print(f"model {args.model}: {where}, device {runtime.device}, dtype {runtime.dtype}", file=sys.stderr)
    measured = measure_stage(args.model, harmful, harmless, measurement, template, runtime, stream, progress)
    directions, chosen = direction_stage(
        args.model,
        measured,
        measurement.direction_method,
        selection.direction_position,
        harmful_val,
        harmless_val,
        selection,
        evaluation,
        runtime.device,
        stream,
        progress,
    )
    if chosen is not None and chosen.scored and not args.quiet:  # timings on the console, not in the file
        print(
            f"selection: {chosen.seconds_probe:.1f} s finding refusal tokens, {chosen.seconds_scoring:.1f} s scoring",
            file=sys.stderr,
        )
    extra = {"selection": chosen.record()} if chosen else None
    origin = hub_origin(args.model)
    if origin:
        extra = {**(extra or {}), "hub": origin}
    selected = chosen.position if chosen else None
    path = write_directions(args.out, directions, measured, fingerprint(args.model), selected, extra)

    print(f"wrote {path} and {Path(args.out) / 'directions.json'}")
    print(
        f"{'pos':>4} {'diff norm':>10} {'snr':>7} {'refusal':>8} {'kl':>8}   (pos: residual position = input of that layer)"
    )
    scores = {c.position: c for c in chosen.candidates} if chosen else {}
    for p in range(directions.num_positions):
        row = (
            f"{p:>4} {figure(float(directions.mean_diff_norm[p])):>10} {figure(float(directions.snr[p])):>7}"
        )
        if p in scores:
            row += f" {figure(scores[p].refusal_score):>8} {figure(scores[p].kl):>8}"
        print(row + ("  <- selected" if p == selected else ""))
    if chosen is not None and chosen.scored:
        print(f"baseline refusal score (no ablation): {figure(chosen.baseline_refusal_score)}")
        print(
            f"refusal tokens ({chosen.refusal_tokens_source}, {chosen.refusals_found} refusals among the harmful "
            f"validation replies): {chosen.refusal_tokens}"
        )
        rank = describe_rank(chosen)
        if rank:
            print(rank)
        if chosen.prefiltered_out:
            print(
                f"prefilter {chosen.prefilter}: {len(chosen.prefiltered_out)} candidates never scored, the measured "
                f"separation |mean harmful - mean harmless| / |mean harmless| ranks them below the {chosen.prefilter} "
                f"kept ({', '.join(f'{r.position} rank {r.rank}' for r in chosen.prefiltered_out)})"
            )
        if chosen.ranked_out:
            print(
                f"shortlist {chosen.shortlist}: {len(chosen.candidates)} candidates scored on every prompt, "
                f"{len(chosen.ranked_out)} ranked out in {len(chosen.rounds) - 1} rounds on the first prompts "
                f"({', '.join(f'{r.position} after {r.harmful_prompts}+{r.harmless_prompts}' for r in chosen.ranked_out)})"
            )
        if chosen.streamed:
            print(
                f"scored layer-streamed: {chosen.weight_reads} reads of the weights for {len(chosen.candidates)} "
                f"candidates (one per refusal-probe token, one per scoring round: {len(chosen.rounds)})"
            )
    return 0
