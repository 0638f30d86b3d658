"""Activation measurement: mean residual of harmful and harmless prompts at every residual position.

Residual position i is the input of decoder layer i; position L is the raw output of the last
decoder layer, before the final norm. For each prompt we keep only one token (by default the
last prompt token, i.e. where the reply starts), never whole sequences.

The pieces are separate on purpose, so the layer-streamed measurement (`abliterate.measure.streamed`)
reuses them: `encode_prompts` (abliterate.measure.chat) and `length_sorted_batches`
(abliterate.inference.loading) render and batch, `ResidualAccumulator` keeps float64 statistics per
position; `capture_residuals` is one forward pass of a whole model.

The settings are the configuration's sections: `config.Measurement` (token position, longest
prompt), `config.Template` (system prompt, chat-template variables) and `config.Runtime`, resolved
for the model (batch size, concrete device and dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate import config
from abliterate.errors import AbliterateError
from abliterate.inference.devices import input_device
from abliterate.inference.loading import (
    Batch,
    decoder_layers,
    length_sorted_batches,
    load_model,
    pad_token_id,
)
from abliterate.measure.chat import context_length, encode_prompts
from abliterate.measure.prompts import prompts_sha256
from abliterate.measure.subspace import SubspaceCollector, subspace_collector


def measured_with(
    measurement: config.Measurement, template: config.Template, runtime: config.Runtime
) -> dict[str, Any]:
    """The settings that decide a measurement's numbers, JSON-ready: recorded in the directions file
    and keyed by the measurement's cache. Not the direction method (it acts on the means), nor the
    device (equal results to rounding); the batch size changes results at float rounding level."""
    return {
        "position": measurement.token_position,
        **template.model_dump(mode="json"),  # every template setting changes the rendered prompts
        # sorted: the same variables in another order render the same prompts
        "chat_template_kwargs": dict(sorted(template.chat_template_kwargs.items())),
        "batch_size": runtime.batch_size,
        "dtype": runtime.dtype,
        "max_length": measurement.max_length,
        "subspace_rank": measurement.subspace_rank,
    }


def check_resolved(runtime: config.Runtime) -> None:
    """A measurement computes with a concrete dtype: the runtime is resolved for the model first
    (`abliterate.inference.devices.resolve_runtime`), so records and cache keys hold what ran."""
    if runtime.dtype == "auto":
        raise AbliterateError("the compute dtype is still `auto`: resolve the runtime for the model first")


# ---------------------------------------------------------------- float64 statistics per position


class ResidualAccumulator:
    """Running mean and variance per residual position, in float64.

    Batches are merged with Chan's parallel update (exact batch mean and sum of squared
    deviations, then combined), which stays accurate where sum-of-squares would cancel.
    """

    def __init__(self, num_positions: int, hidden_size: int):
        self.count = 0
        self.mean = torch.zeros(num_positions, hidden_size, dtype=torch.float64)
        self.m2 = torch.zeros(num_positions, hidden_size, dtype=torch.float64)

    def add(self, batch: torch.Tensor) -> None:
        """batch: [num_positions, B, H] activations of B prompts."""
        x = batch.to(torch.float64)
        n = x.shape[1]
        if n == 0:
            return
        batch_mean = x.mean(dim=1)
        batch_m2 = ((x - batch_mean.unsqueeze(1)) ** 2).sum(dim=1)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    def variance(self) -> torch.Tensor:
        """Per-dimension sample variance (ddof=1; zeros for a single prompt)."""
        if self.count < 2:
            return torch.zeros_like(self.m2)
        return self.m2 / (self.count - 1)


@dataclass
class SetStats:
    """Statistics of one prompt set: float64 [L+1, H] mean and per-dimension variance."""

    mean: torch.Tensor
    variance: torch.Tensor
    count: int
    tokens: int  # prompt tokens processed (without padding)
    sha256: str


@dataclass
class Measurement:
    """Both prompt sets measured, with the sections that decided it (`runtime` resolved; `record()`
    is what decides the numbers). The direction method of `settings` plays no part here: the
    directions are computed with the method the direction stage is given."""

    harmful: SetStats
    harmless: SetStats
    settings: config.Measurement
    template: config.Template
    runtime: config.Runtime
    num_layers: int
    hidden_size: int
    # What the subspace bases are made of (`abliterate.measure.subspace`): per method, each position's
    # candidate directions [M, H] (float64), and how they were found; empty when subspace_rank is 1.
    subspace: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    subspace_provenance: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def num_positions(self) -> int:
        return self.num_layers + 1

    def record(self) -> dict[str, Any]:
        """`measured_with` of this measurement's settings."""
        return measured_with(self.settings, self.template, self.runtime)


# ---------------------------------------------------------------- the whole-model forward pass


def describe_position(position: int, num_layers: int) -> str:
    if position == 0:
        return "residual position 0 (output of the embedding layer)"
    if position == num_layers:
        return f"residual position {position} (output of the last decoder layer {position - 1}, before the final norm)"
    return f"residual position {position} (output of decoder layer {position - 1}, input of layer {position})"


def _copy_token(hidden: torch.Tensor, token_index: int) -> torch.Tensor:
    # A copy, not a view: a view would keep the layer's whole [B, T, H] hidden states alive.
    return hidden[:, token_index, :].to(torch.float32, copy=True)


def capture_residuals(model: Any, batch: Batch, token_index: int) -> torch.Tensor:
    """One forward pass (no generation, no LM head); returns [L+1, B, H] residuals at one token.

    Hooks copy only the chosen token of each layer's input (positions 0..L-1) and of the last
    layer's output (position L), so memory stays at one token per prompt and position.
    """
    layers = decoder_layers(model)
    captured: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def pre_hook(position: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[position] = _copy_token(hidden, token_index)

        return hook

    def last_hook(_module, _args, _kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured[len(layers)] = _copy_token(hidden, token_index)

    handles = [
        layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    handles.append(layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    device = input_device(model)
    try:
        with torch.inference_mode():
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
            decoder(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device),
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    if any(x is None for x in captured):
        missing = [i for i, x in enumerate(captured) if x is None]
        raise AbliterateError(f"the forward pass did not reach residual positions {missing}")
    # A model spread over several GPUs (device `auto`) leaves each position on its layer's device.
    first = captured[0].device  # type: ignore[union-attr]
    return torch.stack([c.to(first) for c in captured]).cpu()  # type: ignore[union-attr]  # one sync per batch


def check_finite(
    residuals: torch.Tensor, batch: Batch, label: str, num_layers: int, first_position: int = 0
) -> None:
    """Name the first residual position (and so the layer) where NaN or Inf appears.

    `residuals`: [P, B, H] at positions `first_position` .. `first_position` + P - 1."""
    finite = torch.isfinite(residuals).all(dim=-1)  # [P, B]
    if bool(finite.all()):
        return
    offset, row = (int(x) for x in (~finite).nonzero()[0])
    raise AbliterateError(
        f"NaN or Inf activations at {describe_position(first_position + offset, num_layers)} for {label} "
        f"prompt #{batch.indices[row]}: the weights of that layer (or the dtype) are broken; try dtype float32"
    )


def measure_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    measurement: config.Measurement,
    template: config.Template,
    runtime: config.Runtime,
    label: str,
    progress: bool = True,
    collector: SubspaceCollector | None = None,
) -> SetStats:
    """Statistics of one prompt set on a loaded model, `runtime.batch_size` prompts per forward pass;
    each prompt's activations also go to `collector` (the harmful set's, for the subspaces)."""
    context = context_length(model, tokenizer)
    encoded = encode_prompts(tokenizer, prompts, template, label, context, measurement=measurement)
    num_layers = len(decoder_layers(model))
    acc = ResidualAccumulator(num_layers + 1, model.config.hidden_size)
    tokens = 0
    bar = tqdm(total=len(encoded), desc=f"measure {label}", unit="prompt", disable=not progress)
    for batch in length_sorted_batches(encoded, runtime.batch_size, pad_token_id(tokenizer)):
        residuals = capture_residuals(model, batch, measurement.token_position)
        check_finite(residuals, batch, label, num_layers)
        acc.add(residuals)
        if collector is not None:
            for position in range(num_layers + 1):
                collector.add(position, residuals[position], batch.indices)
        tokens += int(batch.attention_mask.sum())
        bar.update(len(batch.indices))
    bar.close()
    return SetStats(acc.mean, acc.variance(), acc.count, tokens, prompts_sha256(list(prompts)))


def measure(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    measurement: config.Measurement,
    template: config.Template,
    runtime: config.Runtime,
    progress: bool = True,
) -> Measurement:
    """Mean residuals at every position for both prompt sets (model already loaded, in `runtime.dtype`)."""
    check_resolved(runtime)
    num_layers, hidden_size = len(decoder_layers(model)), int(model.config.hidden_size)
    collector = subspace_collector(measurement, harmful, num_layers + 1, hidden_size)
    sets = {"harmful": (harmful, collector), "harmless": (harmless, None)}
    stats = {
        label: measure_prompts(
            model, tokenizer, prompts, measurement, template, runtime, label, progress, collects
        )
        for label, (prompts, collects) in sets.items()
    }
    result = Measurement(
        harmful=stats["harmful"],
        harmless=stats["harmless"],
        settings=measurement,
        template=template,
        runtime=runtime,
        num_layers=num_layers,
        hidden_size=hidden_size,
    )
    if collector is not None:
        for position in range(num_layers + 1):
            collector.finish(position, result.harmless.mean[position])
        collector.attach(result)
    return result


def measure_checkpoint(
    model_dir: str | Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    measurement: config.Measurement,
    template: config.Template,
    runtime: config.Runtime,
    progress: bool = True,
) -> Measurement:
    """Load the model (in `runtime.dtype`, on `runtime.device`) and measure both prompt sets."""
    check_resolved(runtime)
    model, tokenizer = load_model(model_dir, runtime.dtype, runtime.device)
    return measure(model, tokenizer, harmful, harmless, measurement, template, runtime, progress)
