"""`abliterate chat MODEL [--baseline ORIGINAL]`: talk to a model in the terminal, before keeping it.

Each line typed is one user turn; the model answers with its chat template (the same rendering as
every stage: `abliterate.measure.chat`), greedy (the runner's `greedy`) or sampled (the `chat`
settings). With --baseline, the original model answers the same turns and the two replies are
printed side by side: the ablated model on the left, the original on the right, each continuing
its own conversation. /reset starts a new conversation, /quit (or Ctrl-D) ends.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

from abliterate.cli import THREAD_SETTINGS
from abliterate.cli.console import progress_bars_off
from abliterate.config import Chat, Runtime, Template, add_options, from_args
from abliterate.errors import AbliterateError

COMMANDS = {"/quit": "end the chat (Ctrl-D too)", "/reset": "forget the conversation", "/help": "this list"}
PROMPT = "you> "
SEPARATOR = " | "


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "chat",
        help="chat with a model in the terminal; with --baseline, the original's replies beside it",
        description=(
            "An interactive chat with MODEL (typically an ablated output) in the terminal: each line you type "
            "is a user turn, rendered with the model's own chat template (and --system-prompt, "
            "--chat-template-kwargs, as every stage renders prompts). Replies are greedy, or sampled with "
            "--sample. With --baseline ORIGINAL, the original model answers the same turns and the replies are "
            "shown side by side (left: MODEL, right: ORIGINAL), each model continuing its own conversation; both "
            "are held in memory at once. Commands: /reset (a new conversation), /quit (or Ctrl-D)."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="the model to chat with (e.g. the ablated output folder), or a Hub id org/name[@revision]",
    )
    parser.add_argument(
        "--baseline",
        metavar="ORIGINAL",
        default=None,
        help="the original model (folder or Hub id), whose replies are shown beside MODEL's (default: none)",
    )
    add_options(parser, Chat)
    add_options(parser, Template)
    add_options(parser, Runtime, only=("device", "dtype", *THREAD_SETTINGS))
    parser.set_defaults(func=run)


@dataclass
class Speaker:
    """One model in the chat and its side of the conversation."""

    label: str
    model: Any
    tokenizer: Any
    turns: list[tuple[str, str]] = field(default_factory=list)


def load_speakers(folders: list[tuple[str, str]], runtime: Runtime) -> list[Speaker]:
    """The models of the chat, each (label, folder). Every folder's cheap checks (its device and dtype,
    its tokenizer: seconds) run before the first model loads (minutes): a folder without tokenizer files,
    the baseline's included, fails before any weights are read."""
    from abliterate.inference.devices import resolve_runtime
    from abliterate.inference.loading import load_model, load_tokenizer

    resolved = []
    for _label, model_dir in folders:
        resolved.append(resolve_runtime(runtime, model_dir))
        load_tokenizer(model_dir)
    speakers = []
    for (label, model_dir), settings in zip(folders, resolved, strict=True):
        print(f"loading {label} {model_dir} ({settings.device}, {settings.dtype})", file=sys.stderr)
        model, tokenizer = load_model(model_dir, settings.dtype, settings.device)
        speakers.append(Speaker(label, model, tokenizer))
    return speakers


def reply(speaker: Speaker, text: str, chat: Chat, template: Template) -> str:
    """The speaker's answer to the user turn `text`, given the conversation so far (both kept)."""
    import torch

    from abliterate.inference.devices import input_device
    from abliterate.inference.loading import pad_token_id
    from abliterate.inference.runner import InMemoryForward, cut_at_stop, stop_ids
    from abliterate.measure.chat import context_length, encode_conversation

    turns = [*speaker.turns, ("user", text)]
    ids = encode_conversation(speaker.tokenizer, turns, template)
    limit = context_length(speaker.model, speaker.tokenizer)
    room = chat.max_reply_tokens if limit is None else min(chat.max_reply_tokens, limit - len(ids))
    if room < 1:
        raise ConversationFull(
            f"the conversation is {len(ids)} tokens, {speaker.label}'s context {limit}: /reset to start again"
        )
    forward = InMemoryForward(speaker.model)
    stops, pad = stop_ids(forward.generation_eos, speaker.tokenizer), pad_token_id(speaker.tokenizer)
    if not chat.sample:
        (tokens,) = forward.greedy([ids], room, 1, pad, stops)
    else:
        from transformers import GenerationConfig

        torch.manual_seed(chat.sample_seed + len(speaker.turns))  # a conversation replays identically
        config = GenerationConfig(
            max_new_tokens=room,
            do_sample=True,
            temperature=chat.temperature,
            top_p=chat.top_p,
            top_k=0,
            pad_token_id=pad,
            eos_token_id=sorted(stops) or None,
        )
        with torch.inference_mode():
            inputs = torch.tensor([ids], device=input_device(speaker.model))
            generated = speaker.model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config
            )
        tokens = cut_at_stop(generated[0, len(ids) :].tolist(), stops)
    answer = speaker.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    speaker.turns = [*turns, ("assistant", answer)]
    return answer


class ConversationFull(AbliterateError):
    """The conversation no longer fits a model's context: the chat says so and goes on."""


def side_by_side(speakers: list[Speaker], replies: list[str], width: int) -> str:
    """The replies in columns of equal width, each under its model's label, wrapped at spaces."""
    if len(speakers) == 1:
        return "\n".join(textwrap.wrap(replies[0], max(width, 20)) or [""])
    column = max((width - len(SEPARATOR)) // 2, 20)
    columns = [
        [s.label, "-" * min(column, len(s.label))] + (textwrap.wrap(r, column) or [""])
        for s, r in zip(speakers, replies, strict=True)
    ]
    return "\n".join(
        f"{left:<{column}}{SEPARATOR}{right}".rstrip() for left, right in zip_longest(*columns, fillvalue="")
    )


def run(args: argparse.Namespace) -> int:
    chat, template, runtime = from_args(Chat, args), from_args(Template, args), from_args(Runtime, args)
    progress_bars_off()  # the chat's own screen: no loading bars
    folders = [("ablated" if args.baseline else "model", args.model)]
    if args.baseline:
        folders.append(("original", args.baseline))
    speakers = load_speakers(folders, runtime)
    mode = (
        f"sampled (temperature {chat.temperature}, top-p {chat.top_p}, seed {chat.sample_seed})"
        if chat.sample
        else "greedy"
    )
    print(
        f"chat with {args.model}"
        + (f" (left) and {args.baseline} (right)" if args.baseline else "")
        + f": {mode} replies of up to {chat.max_reply_tokens} tokens; /reset starts again, /quit ends",
        flush=True,
    )
    while True:
        try:
            text = input(PROMPT)
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat too
            print()
            return 130
        command = text.strip()
        if not command:
            continue
        try:  # bytes that are not UTF-8 arrive as lone surrogates, which the tokenizer cannot take
            text.encode("utf-8")
        except UnicodeEncodeError:
            print("(that line is not valid UTF-8: type or paste it as UTF-8 text)", flush=True)
            continue
        if command == "/quit":
            return 0
        if command == "/reset":
            for speaker in speakers:
                speaker.turns = []
            print("(a new conversation)", flush=True)
            continue
        if command.startswith("/"):
            print("commands: " + "; ".join(f"{k} {v}" for k, v in COMMANDS.items()), flush=True)
            continue
        try:
            replies = [reply(speaker, text, chat, template) for speaker in speakers]
        except ConversationFull as exc:
            print(f"({exc})", flush=True)
            continue
        print(side_by_side(speakers, replies, shutil.get_terminal_size().columns), flush=True)
