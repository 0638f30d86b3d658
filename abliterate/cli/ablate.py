"""`abliterate ablate MODEL --directions FILE --out DIR`: project the refusal direction out of the weights."""

from __future__ import annotations

import argparse
import sys

from abliterate.cli import THREAD_SETTINGS
from abliterate.cli.inventory import add_profile_options
from abliterate.config import Ablation, Runtime, Selection, add_options, from_args
from abliterate.edit.ablate import ablate_checkpoint, load_inputs
from abliterate.edit.matching import configured_plan, describe_matches, plan_matches, resolve_plan
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.paths import input_file
from abliterate.weights.checkpoint import choose_profile

HELP = "write a copy of a checkpoint with the refusal direction projected out of its weights"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write DIR: MODEL with the refusal direction r removed from every targeted weight, shard by shard.\n"
            "Writers (attn_out, mlp_down, expert_down, shared_expert_down) become W - s r (r^T W); routers\n"
            "(which read the residual stream) and embedding rows become W - s (W r) r^T. Each edit runs\n"
            "in float32 and is rounded once to the tensor's own dtype; every other tensor, the shard headers,\n"
            "the index and every non-weight file (config, tokenizer, chat template, remote code) are copied\n"
            "verbatim. With --rank k (k > 1) the first k orthonormal directions Q of the directions file's\n"
            "subspace (--subspace) are removed together: W - s Q^T (Q W), routers and embedding W - s (W Q^T) Q.\n"
            "Memory stays at about one tensor. DIR/abliteration.json, written last, records the\n"
            "plan, the directions, every edited tensor and the fingerprints.\n\n"
            "A killed run, rerun with the same arguments, finishes the missing shards; the result is\n"
            "bit-identical to an uninterrupted run. The input is never written to.\n\n"
            "MTP layers (GLM-4.5's next-token-prediction layer, used for speculative decoding) are ablated\n"
            "like the last decoder layer by default (--mtp ablate): the MTP layer reads the last layer's\n"
            "output, and drafts from an unedited MTP layer would keep proposing refusals."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="Hugging Face checkpoint directory (safetensors), or a Hub id org/name[@revision]",
    )
    parser.add_argument(
        "--directions",
        required=True,
        metavar="FILE",
        help="directions.safetensors from `abliterate measure`, or a hand-written safetensors file holding only "
        "a float32 `direction` tensor [L+1, H] (one per residual position; without metadata, name the position "
        "with --direction-position) or [H] (one for every layer)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="output directory (required unless --dry-run; no default)"
    )
    add_options(parser, Ablation)
    add_options(parser, Selection, only=("direction_position",))
    # the ablation method's older switches
    parser.add_argument(
        "--norm-preserving",
        action="store_const",
        dest="ablation_method",
        const="norm_preserving",
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--projected",
        action="store_const",
        dest="ablation_method",
        const="projected",
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    add_options(parser, Runtime, only=("workers", *THREAD_SETTINGS))
    parser.add_argument(
        "--plan",
        metavar="YAML",
        help="read the whole plan from a YAML file (overrides the options above; default: none, the plan "
        "the options describe)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and every tensor it matches; write nothing"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the contents of a non-empty output directory (an unfinished or finished output of "
        "this same run is resumed, not replaced)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="accept a directions file measured on a checkpoint with another fingerprint",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no plan on stderr")
    add_profile_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ablation, runtime = from_args(Ablation, args), from_args(Runtime, args)
    position = from_args(Selection, args).direction_position
    if position == "none":
        raise AbliterateError("--direction-position none: give auto (the file's selected position), own or N")
    profile = choose_profile(args.model, args.family, args.map)
    inputs = load_inputs(args.model, args.directions, args.force, profile)
    if args.plan:
        plan = resolve_plan(AblationPlan.from_yaml(_read(args.plan), f"plan file {args.plan}"), inputs)
    else:
        plan = configured_plan(inputs, ablation, position)
    if args.dry_run:
        for warning in inputs.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(describe_matches(plan, plan_matches(plan, inputs.inventory, inputs.structure)))
        return 0
    if not args.out:
        raise AbliterateError("--out DIR is required (or pass --dry-run to only list the matched tensors)")
    if not args.quiet:
        print(plan.to_yaml(), file=sys.stderr)
    manifest = ablate_checkpoint(
        args.model,
        args.directions,
        args.out,
        plan,
        overwrite=args.overwrite,
        force=args.force,
        workers=runtime.workers,
        progress=not args.quiet,
        log=lambda line: print(line, file=sys.stderr),
        inputs=inputs,
    )
    counts = ", ".join(f"{role} {n}" for role, n in manifest["counts"].items())
    print(f"wrote {manifest['output']['path']}: edited {counts}")
    return 0


def _read(path: str) -> str:
    try:
        data = input_file(path, "plan file", "give the path of a plan (YAML)").read_bytes()
    except OSError as exc:
        raise AbliterateError(f"cannot read plan file {path}: {exc.strerror}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise AbliterateError(
            f"plan file {path} is not valid UTF-8 at byte offset {exc.start} (line {line}); re-save it as UTF-8"
        ) from None
