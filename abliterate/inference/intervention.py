"""Inference-time directional ablation: remove one direction from everything that writes
into the residual stream.

The residual stream is the sum of the embedding output and of every attention and MLP output
(for MoE layers: routed experts plus shared expert), so projecting each of those writes is
exactly what orthogonalising the embedding, o_proj, down_proj and every expert's down_proj
does to the weights. Projecting only whole decoder-layer outputs would not be: inside a layer
the MLP would still read the direction its attention just wrote. Used to score candidate
directions before editing weights (router edits, which act on the normed stream, are not
modelled here).

The layer-streamed scoring (`abliterate.inference.runner.StreamedForward`) puts the same `project_out` on
the same outputs (the embedding's, then each layer's `self_attn` and `mlp`), one layer at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def project_out(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """`hidden - (hidden . r) r` for a unit vector r, in the hidden states' dtype and device."""
    r = unit.to(device=hidden.device, dtype=hidden.dtype)
    return hidden - (hidden @ r).unsqueeze(-1) * r


@contextmanager
def directional_ablation(model: torch.nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Within the block, `model` runs with the component along `direction` [H] removed.

    Works for transformers causal LMs laid out as model.model.embed_tokens and
    model.model.layers[i].self_attn / .mlp (GLM-4.5, Llama, Qwen, Mistral). Hooks are removed on exit.
    """
    unit = direction.detach().float().flatten()
    unit = unit / unit.norm()

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (project_out(output[0], unit), *output[1:])
        return project_out(output, unit)

    base = model.model
    handles = [base.embed_tokens.register_forward_hook(hook)]
    try:
        for layer in base.layers:
            handles += [layer.self_attn.register_forward_hook(hook), layer.mlp.register_forward_hook(hook)]
        yield
    finally:
        for h in handles:
            h.remove()
