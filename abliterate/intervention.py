"""Inference-time directional ablation: remove one direction from the residual stream.

The residual stream is the sum of the embedding output and of every decoder layer's
writes, so projecting the embedding output and each decoder layer's output removes the
direction everywhere the model reads it. Used to choose a direction before editing weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _project_out(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    r = unit.to(device=hidden.device, dtype=hidden.dtype)
    return hidden - (hidden @ r).unsqueeze(-1) * r


@contextmanager
def directional_ablation(model: torch.nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Within the block, `model` runs with the component along `direction` [H] removed.

    Works for transformers causal LMs laid out as model.model.embed_tokens and
    model.model.layers[i] (GLM-4.5, Llama, Qwen, Mistral). Hooks are removed on exit.
    """
    unit = direction.detach().float().flatten()
    unit = unit / unit.norm()

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (_project_out(output[0], unit), *output[1:])
        return _project_out(output, unit)

    base = model.model
    handles = [base.embed_tokens.register_forward_hook(hook)]
    try:
        handles += [layer.register_forward_hook(hook) for layer in base.layers]
        yield
    finally:
        for h in handles:
            h.remove()
