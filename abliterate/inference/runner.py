"""The forward passes selection and evaluation need, on a model in memory or layer-streamed.

Two operations, each with the same meaning on both kinds of model:

- `first_token_logprobs(sets, directions)`: float64 log-probabilities [N, V] of the first reply
  token of every prompt of every set, once per entry of `directions` (None: the model as it is; a
  vector r: r removed from the residual stream at inference time, see `abliterate.inference.intervention`).
  Yields `(variant, set label, logprobs)` in the order variant 0's sets, variant 1's sets, ...
- `greedy(encoded, max_new_tokens)`: greedy continuations (token ids, cut at an end token).

`InMemoryForward` runs a loaded model (on one device, or spread by accelerate's device map) once
per variant. `StreamedForward` reads the weights once per call, one decoder layer at a time,
whatever the number of variants: every variant's hidden states of every batch go through each
layer while it is loaded, with the same hooks on the layer's attention and MLP as the in-memory
ablation (`abliterate.inference.intervention.project_out`), so scoring K candidate directions costs one
read of the weights, not K. Memory: one decoder layer (or the embedding, or the LM head), plus the
hidden states of every prompt for every variant (variants x prompts x padded length x hidden x the
dtype's bytes). Greedy decoding streamed recomputes the whole sequence for each new token, so it
reads the weights once per token; in memory it is `model.generate` with its cache.

Both give the same numbers up to float rounding: the streamed pass runs the same modules, batches
and hooks one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate.inference.devices import input_device
from abliterate.inference.intervention import directional_ablation, project_out
from abliterate.measure.means import length_sorted_batches

Encoded = Sequence[Sequence[int]]


def stop_ids(generation_eos: Any, tokenizer: Any) -> set[int]:
    """End-of-reply token ids: the generation config's, else the tokenizer's."""
    eos = tokenizer.eos_token_id if generation_eos is None else generation_eos
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}


def cut_at_stop(tokens: Sequence[int], stops: set[int]) -> list[int]:
    """The tokens before the first end token (what follows is padding, whatever the pad token is)."""
    end = next((k for k, tok in enumerate(tokens) if tok in stops), len(tokens))
    return list(tokens[:end])


class InMemoryForward:
    """A loaded transformers causal LM."""

    streamed = False

    def __init__(self, model: Any):
        self.model = model
        self.config = model.config
        self.weight_reads = 0  # a model in memory is read from disk once, at loading

    @property
    def generation_eos(self) -> Any:
        return self.model.generation_config.eos_token_id

    def first_token_logprobs(
        self,
        sets: Mapping[str, Encoded],
        directions: Sequence[torch.Tensor | None],
        batch_size: int,
        pad_id: int,
        progress: bool = False,
    ) -> Iterator[tuple[int, str, torch.Tensor]]:
        from abliterate.select.selection import first_token_logprobs

        bar = tqdm(total=len(directions), desc="score directions", unit="variant", disable=not progress)
        for variant, direction in enumerate(directions):
            ablation = (
                nullcontext() if direction is None else directional_ablation(self.model, direction.float())
            )
            with ablation:
                for label, encoded in sets.items():
                    yield variant, label, first_token_logprobs(self.model, encoded, batch_size, pad_id)
            bar.update(1)
        bar.close()

    def greedy(
        self,
        encoded: Encoded,
        max_new_tokens: int,
        batch_size: int,
        pad_id: int,
        stops: set[int],
        progress: bool = False,
        label: str = "prompts",
        finished: Callable[[list[int]], bool] | None = None,
    ) -> list[list[int]]:
        """Greedy replies in prompt order, batches of similar length, left padded. (`finished`, which lets
        the streamed version stop early, changes nothing here: `generate` is cheap in memory.)"""
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=sorted(stops) or None,
        )
        device = input_device(self.model)
        out: list[list[int] | None] = [None] * len(encoded)
        bar = tqdm(total=len(encoded), desc=f"greedy replies: {label}", unit="prompt", disable=not progress)
        with torch.inference_mode():
            for batch in length_sorted_batches(encoded, batch_size, pad_id):
                generated = self.model.generate(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),
                    generation_config=config,
                )
                new = generated[:, batch.input_ids.shape[1] :].cpu()
                for row, index in enumerate(batch.indices):
                    out[index] = cut_at_stop(new[row].tolist(), stops)
                bar.update(len(batch.indices))
        bar.close()
        return out  # type: ignore[return-value]


class StreamedForward:
    """A checkpoint read one decoder layer at a time (`abliterate.inference.streaming.LayerStream`)."""

    streamed = True

    def __init__(self, model_dir: str | Path, dtype: str, device: str):
        from transformers import AutoConfig

        from abliterate.inference.devices import stream_device

        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.device = stream_device(device)
        self.config = AutoConfig.from_pretrained(str(self.model_dir))
        self.weight_reads = 0  # passes over the decoder's weights so far
        self._stream: Any = None

    def stream(self) -> Any:
        """The layer stream, built once (its modules hold no weights between passes)."""
        from abliterate.inference.streaming import LayerStream

        if self._stream is None:
            self._stream = LayerStream(self.model_dir, self.dtype, self.device)
        return self._stream

    @property
    def generation_eos(self) -> Any:
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(str(self.model_dir)).eos_token_id
        except OSError:  # no generation_config.json
            return getattr(self.config, "eos_token_id", None)

    def first_token_logprobs(
        self,
        sets: Mapping[str, Encoded],
        directions: Sequence[torch.Tensor | None],
        batch_size: int,
        pad_id: int,
        progress: bool = False,
    ) -> Iterator[tuple[int, str, torch.Tensor]]:
        from abliterate.inference.streaming import layer_output

        stream = self.stream()
        batches = stream.embed({k: [list(x) for x in v] for k, v in sets.items()}, batch_size, -1, pad_id)
        units = [None if d is None else (d.detach().float().flatten() / d.float().norm()) for d in directions]
        # hidden[v][b]: variant v's input of the next layer for batch b; the embedding output is a write
        # into the residual stream like any other, so the ablation projects it first.
        hidden = [
            [item.hidden if r is None else project_out(item.hidden, r) for item in batches] for r in units
        ]
        current: list[torch.Tensor | None] = [None]

        def hook(_module, _inputs, output):
            r = current[0]
            if r is None:
                return output
            if isinstance(output, tuple):
                return (project_out(output[0], r), *output[1:])
            return project_out(output, r)

        desc = f"score {len(directions)} variants (layer-streamed)"
        for index, layer in stream.each_layer(desc, progress):
            handles = [layer.self_attn.register_forward_hook(hook), layer.mlp.register_forward_hook(hook)]
            try:
                with torch.inference_mode():
                    for variant, r in enumerate(units):
                        current[0] = r
                        for b, item in enumerate(batches):
                            args, kwargs = item.layer_args[index]
                            hidden[variant][b] = layer_output(layer(hidden[variant][b], *args, **kwargs))
            finally:
                current[0] = None
                for handle in handles:
                    handle.remove()
        self.weight_reads += 1
        sizes = {label: len(encoded) for label, encoded in sets.items()}
        with stream.head() as logits_of:
            for variant in range(len(units)):
                for label in sets:
                    out: list[torch.Tensor | None] = [None] * sizes[label]
                    for b, item in enumerate(batches):
                        if item.label != label:
                            continue
                        logits = logits_of(hidden[variant][b][:, -1, :])
                        logprobs = torch.log_softmax(logits.double(), dim=-1).cpu()
                        for row, prompt in enumerate(item.batch.indices):
                            out[prompt] = logprobs[row]
                    yield variant, label, torch.stack(out)  # type: ignore[arg-type]
                hidden[variant] = []  # this variant is done: free its hidden states

    def greedy(
        self,
        encoded: Encoded,
        max_new_tokens: int,
        batch_size: int,
        pad_id: int,
        stops: set[int],
        progress: bool = False,
        label: str = "prompts",
        finished: Callable[[list[int]], bool] | None = None,
    ) -> list[list[int]]:
        """Greedy replies, one streamed pass over the weights per new token (the whole sequence is
        run again each time: no cache between passes). A reply stops at an end token, or as soon as
        `finished(reply so far)` says nothing after it matters; when every reply has stopped, so do the
        passes."""
        out: list[list[int]] = [[] for _ in encoded]
        active = list(range(len(encoded)))
        bar = tqdm(
            total=max_new_tokens,
            desc=f"greedy replies: {label} (layer-streamed)",
            unit="token",
            disable=not progress,
        )
        for _step in range(max_new_tokens):
            if not active:
                break
            sequences = {"greedy": [list(encoded[i]) + out[i] for i in active]}
            ((_, _, logprobs),) = list(self.first_token_logprobs(sequences, [None], batch_size, pad_id))
            still = []
            for i, token in zip(active, logprobs.argmax(dim=-1).tolist(), strict=True):
                if token in stops:
                    continue
                out[i].append(int(token))
                if finished is None or not finished(out[i]):
                    still.append(i)
            active = still
            bar.update(1)
        bar.close()
        return out


Forward = InMemoryForward | StreamedForward


def as_forward(model: Any) -> Forward:
    """A loaded model wrapped as an `InMemoryForward`; a forward as it is."""
    return model if isinstance(model, InMemoryForward | StreamedForward) else InMemoryForward(model)
