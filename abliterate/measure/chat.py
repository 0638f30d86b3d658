"""Prompts as the model reads them: rendered with its own chat template, ending in the assistant's
turn, and tokenised. `encode_prompts` is the one encoder of measurement, selection, search and
evaluation, so every stage feeds the model the same tokens for the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from abliterate import config
from abliterate.errors import AbliterateError
from abliterate.measure.prompts import describe_prompt

# tokenizer.model_max_length is a huge sentinel (1e30) when the tokenizer does not know its limit.
_SANE_CONTEXT = 10_000_000


def render_chat(
    tokenizer, prompts: list[str], system_prompt: str | None = None, **template_kwargs
) -> list[str]:
    """Each prompt as one user turn (after an optional system turn), with the generation prompt.

    template_kwargs go to the template (e.g. enable_thinking=False for GLM-4.5).
    """
    return [
        render_conversation(tokenizer, [("user", prompt)], system_prompt, **template_kwargs)
        for prompt in prompts
    ]


def render_conversation(
    tokenizer, turns: Sequence[tuple[str, str]], system_prompt: str | None = None, **template_kwargs
) -> str:
    """A conversation of (role, text) turns (after an optional system turn), with the generation prompt:
    what the model reads before its next reply. One user turn is what every stage measures; several
    are `abliterate chat`'s conversations."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model folder"
        raise AbliterateError(
            f"tokenizer of {name} has no chat template: add chat_template.jinja to the model folder "
            "(or a 'chat_template' entry in tokenizer_config.json)"
        )
    messages = [{"role": role, "content": text} for role, text in turns]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **template_kwargs
    )


def encode_conversation(
    tokenizer: Any, turns: Sequence[tuple[str, str]], template: config.Template
) -> list[int]:
    """Token ids of `render_conversation` (the rendered text holds the template's special tokens, so
    none are added), as `encode_prompts` encodes a single prompt."""
    text = render_conversation(
        tokenizer, turns, system_prompt=template.system_prompt, **template.chat_template_kwargs
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def context_length(model: Any, tokenizer: Any = None) -> int | None:
    """The longest sequence the model takes: the smaller of its config's and (when given) the
    tokenizer's limit, ignoring the sentinels of a limit nobody knows. `model`: a loaded model or
    a forward (`abliterate.inference.runner`), anything with a `config`."""
    limits = [
        getattr(getattr(model, "config", None), "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    sane = [int(x) for x in limits if isinstance(x, int) and 0 < x < _SANE_CONTEXT]
    return min(sane) if sane else None


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    template: config.Template,
    label: str,
    context: int | None = None,
    new_tokens: int = 0,
    measurement: config.Measurement | None = None,
) -> list[list[int]]:
    """Token ids of each prompt rendered with the chat template and generation prompt.

    The rendered text already holds the template's special tokens, so none are added again. Each
    prompt plus `new_tokens` generated tokens must fit in `context` (`context_length`); with
    `measurement`, also in its `max_length`, and its measured token must exist.
    """
    if len(prompts) == 0:
        raise AbliterateError(f"the {label} prompt set is empty: give at least one prompt")
    limit = context
    if measurement is not None and measurement.max_length is not None:
        limit = measurement.max_length if limit is None else min(limit, measurement.max_length)
    need = -measurement.token_position if measurement is not None else 1
    texts = render_chat(
        tokenizer, list(prompts), system_prompt=template.system_prompt, **template.chat_template_kwargs
    )
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    for index, ids in enumerate(encoded):
        where = describe_prompt(prompts[index], f"#{index}")  # its file and line when read from a file
        if limit is not None and len(ids) + new_tokens > limit:
            if new_tokens:
                raise AbliterateError(
                    f"{label} prompt {where} is {len(ids)} tokens after chat rendering; with {new_tokens} "
                    f"new tokens it exceeds the model's context of {limit}: shorten it or generate fewer "
                    "tokens (--max-new-tokens, --reply-tokens)"
                )
            raise AbliterateError(
                f"{label} prompt {where} is {len(ids)} tokens long after chat rendering, more than the "
                f"model's context of {limit} tokens: shorten or remove it"
            )
        if len(ids) < need:
            raise AbliterateError(
                f"{label} prompt {where} has only {len(ids)} tokens; token position {-need} does not exist in it"
            )
    return encoded
