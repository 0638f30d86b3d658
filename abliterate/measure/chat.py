"""Render prompts with the model's own chat template, ending in the assistant's turn."""

from __future__ import annotations

from abliterate.errors import AbliterateError


def render_chat(
    tokenizer, prompts: list[str], system_prompt: str | None = None, **template_kwargs
) -> list[str]:
    """Each prompt as one user turn (after an optional system turn), with the generation prompt.

    template_kwargs go to the template (e.g. enable_thinking=False for GLM-4.5).
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model folder"
        raise AbliterateError(
            f"tokenizer of {name} has no chat template: add chat_template.jinja to the model folder "
            "(or a 'chat_template' entry in tokenizer_config.json)"
        )
    rendered = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        rendered.append(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **template_kwargs
            )
        )
    return rendered
