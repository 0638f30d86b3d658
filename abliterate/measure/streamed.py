"""The measurement of a model larger than memory, one decoder layer at a time (`LayerStream`).

Every prompt's hidden states go through the layers in order; at each residual position the
measured token (the last one: the batches are cut after it) is added to the same float64
statistics as the in-memory measurement (`abliterate.measure.means`), so both give the same
`Measurement` to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from abliterate import config
from abliterate.inference.devices import stream_device
from abliterate.inference.loading import load_tokenizer, pad_token_id
from abliterate.inference.streaming import LayerStream, PromptBatch, layer_output
from abliterate.measure.chat import context_length, encode_prompts
from abliterate.measure.means import (
    Measurement,
    ResidualAccumulator,
    SetStats,
    check_finite,
    check_resolved,
)
from abliterate.measure.prompts import prompts_sha256
from abliterate.measure.subspace import SubspaceCollector, subspace_collector


def measure_streamed(
    model_dir: str | Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    measurement: config.Measurement,
    template: config.Template,
    runtime: config.Runtime,
    progress: bool = True,
) -> Measurement:
    """Mean residuals at every position for both prompt sets, one decoder layer in memory at a time
    (on `abliterate.inference.devices.stream_device` of `runtime.device`)."""
    check_resolved(runtime)
    stream = LayerStream(model_dir, runtime.dtype, stream_device(runtime.device))
    tokenizer = load_tokenizer(model_dir)
    num_layers, hidden_size = stream.num_layers, int(stream.config.hidden_size)

    sets = {"harmful": harmful, "harmless": harmless}
    context = context_length(stream.model, tokenizer)
    encoded = {
        label: encode_prompts(tokenizer, prompts, template, label, context, measurement=measurement)
        for label, prompts in sets.items()
    }
    accumulators = {
        label: [ResidualAccumulator(1, hidden_size) for _ in range(num_layers + 1)] for label in sets
    }
    # The harmful prompts' activations of one position at a time: its candidates are found as soon
    # as the layer has seen every prompt, then they are freed.
    collector = subspace_collector(measurement, harmful, num_layers + 1, hidden_size)
    collects = {"harmful": collector, "harmless": None}

    def finish(position: int) -> None:
        if collector is not None:
            collector.finish(position, accumulators["harmless"][position].mean[0])

    batches = stream.embed(encoded, runtime.batch_size, measurement.token_position, pad_token_id(tokenizer))
    for index, layer in stream.each_layer("measure (layer-streamed)", progress):
        with torch.inference_mode():
            for item in batches:
                _accumulate(accumulators[item.label][index], item, index, num_layers, collects[item.label])
                args, kwargs = item.layer_args[index]
                item.hidden = layer_output(layer(item.hidden, *args, **kwargs))
        finish(index)
    for item in batches:
        _accumulate(accumulators[item.label][num_layers], item, num_layers, num_layers, collects[item.label])
    finish(num_layers)

    def stats(label: str) -> SetStats:
        accs = accumulators[label]
        tokens = sum(item.tokens for item in batches if item.label == label)
        return SetStats(
            mean=torch.cat([a.mean for a in accs]),
            variance=torch.cat([a.variance() for a in accs]),
            count=accs[0].count,
            tokens=tokens,
            sha256=prompts_sha256(list(sets[label])),
        )

    result = Measurement(
        harmful=stats("harmful"),
        harmless=stats("harmless"),
        settings=measurement,
        template=template,
        runtime=runtime,
        num_layers=num_layers,
        hidden_size=hidden_size,
    )
    if collector is not None:
        collector.attach(result)
    return result


def _accumulate(
    acc: ResidualAccumulator,
    item: PromptBatch,
    position: int,
    num_layers: int,
    collector: SubspaceCollector | None,
) -> None:
    """Add the residual at the measured (now the last) token of every prompt of the batch at one position
    (and, for the subspaces, to `collector`)."""
    residual = item.hidden[:, -1, :].detach().float().cpu().unsqueeze(0)
    check_finite(residual, item.batch, item.label, num_layers, position)
    acc.add(residual)
    if collector is not None:
        collector.add(position, residual[0], item.batch.indices)
