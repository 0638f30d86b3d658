"""THE forward runner: every pass over a model that scores variants of it, on a model in memory or
layer-streamed. Selection, the search, expert profiling and evaluation all run here.

A variant is the model as it is (None) or the model under an inference-time edit (`Edit`: a plan
applied at inference time, `abliterate.edit.inference_edit`). Operations, each with the same meaning
on both kinds of model:

- `first_token_logprobs(sets, edits)`: float64 log-probabilities [N, V] of the first reply token of
  every prompt of every set, once per variant (`sets`: one mapping for every variant, or one per
  variant). Yields `(variant, set label, logprobs)` in the order variant 0's sets, variant 1's sets, ...
- `greedy(encoded, max_new_tokens, ...)`: greedy continuations of one variant (token ids, cut at an
  end token); `greedy_variants(encoded, edits, ...)`: the same for several variants, and with
  `first_logprobs` also each variant's float64 log-probabilities [N, V] of the first reply token,
  read from the first step of the decoding (what `first_token_logprobs` of the prompts gives, without
  another pass over them).
- `run_with_hooks(sets, hooks, on_batch)`: every prompt through every decoder layer with the caller's
  hooks on each layer (expert profiling reads the routers' choices this way).

`InMemoryForward` runs a loaded model (on one device, or spread by accelerate's device map) once
per variant. `StreamedForward` reads the weights once per call, one decoder layer at a time,
whatever the number of variants: every variant's hidden states of every batch go through each
layer while it is loaded, under that variant's edit of the layer, so scoring K variants costs one
read of the weights, not K. Memory: one decoder layer (or the embedding, or the LM head), plus the
hidden states of every prompt for every variant (variants x prompts x padded length x hidden x the
dtype's bytes). Greedy decoding streamed reads the weights once per new token (for every variant
together) and keeps every layer's keys and values between those reads, so only the first read runs the
prompts and each later one runs one token per reply (the cache: layers x variants x prompts x tokens x
key/value width); in memory it is `model.generate` with its cache. Both give the same tokens.

Both give the same numbers up to float rounding: the streamed pass runs the same modules, batches
and edits one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from abliterate.inference.devices import input_device, stream_device
from abliterate.inference.loading import (
    Batch,
    decoder_layers,
    length_sorted_batches,
    load_model,
    load_tokenizer,
)
from abliterate.inference.scores import first_token_logprobs
from abliterate.inference.streaming import LayerStream, layer_output

Encoded = Sequence[Sequence[int]]
# Prompt sets by label: the same for every variant (a mapping), or one mapping per variant.
VariantSets = Mapping[str, Encoded] | Sequence[Mapping[str, Encoded]]


def each_variant(sets: VariantSets, count: int) -> list[Mapping[str, Encoded]]:
    """One mapping of prompt sets per variant (the same object where `sets` is one mapping)."""
    if isinstance(sets, Mapping):
        return [sets] * count
    if len(sets) != count:
        raise ValueError(f"{len(sets)} prompt-set mappings for {count} variants: give one per variant")
    return list(sets)


class Edit(Protocol):
    """What an inference-time edit gives the runner (`abliterate.edit.inference_edit`)."""

    def applied(self, model: Any) -> AbstractContextManager[None]:
        """Within the block, a loaded model computes the edited model."""

    def embedded(self, hidden: torch.Tensor) -> torch.Tensor:
        """The embedding output of the edited model, from the unedited one's."""

    def on_layer(self, index: int, layer: torch.nn.Module) -> AbstractContextManager[None]:
        """Within the block, decoder layer `index` (loaded) computes the edited layer."""


# Called with each decoder layer (index, module) while it is loaded: the hook handles to remove after it.
LayerHooks = Callable[[int, torch.nn.Module], list[Any]]


def stop_ids(generation_eos: Any, tokenizer: Any) -> set[int]:
    """End-of-reply token ids: the generation config's, else the tokenizer's."""
    eos = tokenizer.eos_token_id if generation_eos is None else generation_eos
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}


def cut_at_stop(tokens: Sequence[int], stops: set[int]) -> list[int]:
    """The tokens before the first end token (what follows is padding, whatever the pad token is)."""
    end = next((k for k, tok in enumerate(tokens) if tok in stops), len(tokens))
    return list(tokens[:end])


def _applied(edit: Edit | None, model: Any) -> AbstractContextManager[None]:
    return nullcontext() if edit is None else edit.applied(model)


class FirstStep:
    """A logits processor of `generate` that keeps the logits of the first step (the first reply token of
    every prompt of the batch) and changes nothing."""

    def __init__(self) -> None:
        self.logits: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.logits is None:
            self.logits = scores.clone()
        return scores


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
        sets: VariantSets,
        edits: Sequence[Edit | None],
        batch_size: int,
        pad_id: int,
        progress: bool = False,
    ) -> Iterator[tuple[int, str, torch.Tensor]]:
        bar = tqdm(total=len(edits), desc="score variants", unit="variant", disable=not progress)
        for variant, (edit, own) in enumerate(zip(edits, each_variant(sets, len(edits)), strict=True)):
            with _applied(edit, self.model):
                for label, encoded in own.items():
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
        edit: Edit | None = None,
        first: list[torch.Tensor | None] | None = None,
    ) -> list[list[int]]:
        """Greedy replies in prompt order, batches of similar length, left padded. (`finished`, which lets
        the streamed version stop early, changes nothing here: `generate` is cheap in memory.) `first`
        (a list of one entry per prompt): filled with the float64 log-probabilities of each prompt's first
        reply token, from the logits `generate` chose it from."""
        from transformers import (  # heavy: only when replies are generated
            GenerationConfig,
            LogitsProcessorList,
        )

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
        with _applied(edit, self.model), torch.inference_mode():
            for batch in length_sorted_batches(encoded, batch_size, pad_id):
                step = FirstStep()
                generated = self.model.generate(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList([step] if first is not None else []),
                )
                new = generated[:, batch.input_ids.shape[1] :].cpu()
                for row, index in enumerate(batch.indices):
                    out[index] = cut_at_stop(new[row].tolist(), stops)
                if first is not None and step.logits is not None:
                    logprobs = torch.log_softmax(step.logits.double(), dim=-1).cpu()
                    for row, index in enumerate(batch.indices):
                        first[index] = logprobs[row]
                bar.update(len(batch.indices))
        bar.close()
        return out  # type: ignore[return-value]

    def greedy_variants(
        self,
        encoded: Encoded,
        edits: Sequence[Edit | None],
        max_new_tokens: int,
        batch_size: int,
        pad_id: int,
        stops: set[int],
        finished: Callable[[list[int]], bool] | None = None,
        progress: bool = False,
        label: str = "prompts",
        first_logprobs: bool = False,
    ) -> Any:
        """`greedy` of every variant, one after the other: the replies [variant][prompt], and with
        `first_logprobs` (replies, each variant's [N, V] first-token log-probabilities)."""
        replies, firsts = [], []
        for edit in edits:
            first: list[torch.Tensor | None] | None = [None] * len(encoded) if first_logprobs else None
            replies.append(
                self.greedy(
                    encoded, max_new_tokens, batch_size, pad_id, stops, progress, label, finished, edit, first
                )
            )
            if first is not None:
                firsts.append(torch.stack(first))  # type: ignore[arg-type]
        return (replies, firsts) if first_logprobs else replies

    def run_with_hooks(
        self,
        sets: Mapping[str, Encoded],
        batch_size: int,
        pad_id: int,
        hooks: LayerHooks,
        on_batch: Callable[[str, Batch], None],
        desc: str,
        progress: bool = False,
    ) -> None:
        """Every prompt through the model (logits of the last token only), with `hooks(index, layer)`'s
        hooks on every decoder layer; `on_batch(label, batch)` before each batch runs."""
        handles: list[Any] = []
        for index, layer in enumerate(decoder_layers(self.model)):
            handles += hooks(index, layer)
        device = input_device(self.model)
        try:
            with torch.inference_mode():
                for label, encoded in sets.items():
                    for batch in tqdm(
                        list(length_sorted_batches(encoded, batch_size, pad_id)),
                        desc=f"{desc}: {label}",
                        disable=not progress,
                    ):
                        on_batch(label, batch)
                        self.model(
                            input_ids=batch.input_ids.to(device),
                            attention_mask=batch.attention_mask.to(device),
                            position_ids=batch.position_ids.to(device),
                            use_cache=False,
                            logits_to_keep=1,
                        )
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class _Decoding:
    """One batch of one variant in cached greedy decoding (`StreamedForward.greedy_variants`)."""

    ids: torch.Tensor  # [B, T] the tokens the next pass runs: the prompts, then each reply's newest token
    mask: torch.Tensor  # [B, all tokens so far] attention mask (left padding 0)
    cache: Any  # transformers DynamicCache: every layer's keys and values of the tokens run so far
    live: list[int]  # rows whose replies go on


class StreamedForward:
    """A checkpoint read one decoder layer at a time (`abliterate.inference.streaming.LayerStream`)."""

    streamed = True

    def __init__(self, model_dir: str | Path, dtype: str, device: str):
        from transformers import AutoConfig  # heavy: only when a model is read

        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.device = stream_device(device)
        self.config = AutoConfig.from_pretrained(str(self.model_dir))
        self.weight_reads = 0  # passes over the decoder's weights so far
        self._stream: LayerStream | None = None

    def stream(self) -> LayerStream:
        """The layer stream, built once (its modules hold no weights between passes)."""
        if self._stream is None:
            self._stream = LayerStream(self.model_dir, self.dtype, self.device)
        return self._stream

    @property
    def generation_eos(self) -> Any:
        from transformers import GenerationConfig  # heavy: only when a model is read

        try:
            return GenerationConfig.from_pretrained(str(self.model_dir)).eos_token_id
        except OSError:  # no generation_config.json
            return getattr(self.config, "eos_token_id", None)

    def first_token_logprobs(
        self,
        sets: VariantSets,
        edits: Sequence[Edit | None],
        batch_size: int,
        pad_id: int,
        progress: bool = False,
    ) -> Iterator[tuple[int, str, torch.Tensor]]:
        desc = f"score {len(edits)} variants (layer-streamed)"
        variant_sets = each_variant(sets, len(edits))
        yield from self._last_logprobs(variant_sets, edits, batch_size, pad_id, desc, progress)

    def _last_logprobs(
        self,
        variant_sets: Sequence[Mapping[str, Encoded]],
        edits: Sequence[Edit | None],
        batch_size: int,
        pad_id: int,
        desc: str,
        progress: bool = False,
    ) -> Iterator[tuple[int, str, torch.Tensor]]:
        """One pass over the weights: variant v (edit v) runs on its own prompt sets `variant_sets[v]`
        (embedded once where variants share the same mapping); float64 log-probabilities [N, V] of the
        token after each prompt, as `(variant, label, logprobs)`."""
        stream = self.stream()
        embedded: dict[int, list] = {}
        batches = []
        for sets in variant_sets:
            if id(sets) not in embedded:
                embedded[id(sets)] = stream.embed(
                    {label: [list(x) for x in encoded] for label, encoded in sets.items()},
                    batch_size,
                    -1,
                    pad_id,
                )
            batches.append(embedded[id(sets)])
        # hidden[v][b]: variant v's input of the next layer for batch b; the embedding output is a write
        # into the residual stream like any other, so the edit changes it first.
        hidden = [
            [item.hidden if edit is None else edit.embedded(item.hidden) for item in batches[v]]
            for v, edit in enumerate(edits)
        ]
        for index, layer in stream.each_layer(desc, progress):
            for v, edit in enumerate(edits):
                on_layer = nullcontext() if edit is None else edit.on_layer(index, layer)
                with on_layer, torch.inference_mode():
                    for b, item in enumerate(batches[v]):
                        args, kwargs = item.layer_args[index]
                        hidden[v][b] = layer_output(layer(hidden[v][b], *args, **kwargs))
        self.weight_reads += 1
        with stream.head() as logits_of:
            for v in range(len(edits)):
                for label, encoded in variant_sets[v].items():
                    rows: list[torch.Tensor | None] = [None] * len(encoded)
                    for b, item in enumerate(batches[v]):
                        if item.label != label:
                            continue
                        logprobs = torch.log_softmax(logits_of(hidden[v][b][:, -1, :]).double(), dim=-1).cpu()
                        for row, prompt in enumerate(item.batch.indices):
                            rows[prompt] = logprobs[row]
                    yield v, label, torch.stack(rows)  # type: ignore[arg-type]
                hidden[v] = []  # this variant is done: free its hidden states

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
        edit: Edit | None = None,
    ) -> list[list[int]]:
        """Greedy replies, one streamed pass over the weights per new token (`greedy_variants`: the
        prompts in the first, then each reply's new token against the layers' cached keys and values). A reply stops at an end token, or as soon as
        `finished(reply so far)` says nothing after it matters; when every reply has stopped, so do the
        passes."""
        (replies,) = self.greedy_variants(
            encoded, [edit], max_new_tokens, batch_size, pad_id, stops, finished, progress, label
        )
        return replies

    def greedy_variants(
        self,
        encoded: Encoded,
        edits: Sequence[Edit | None],
        max_new_tokens: int,
        batch_size: int,
        pad_id: int,
        stops: set[int],
        finished: Callable[[list[int]], bool] | None = None,
        progress: bool = False,
        label: str = "prompts",
        first_logprobs: bool = False,
    ) -> Any:
        """Greedy replies of every variant: one pass over the weights per new token for all of them
        together, each layer's keys and values kept between passes (a transformers `DynamicCache` per variant
        and batch), so the first pass runs the prompts and each later one only the new token of every reply.
        A reply stops at an end token or when `finished(reply so far)`; a batch leaves the passes when all its
        replies have stopped, the passes stop when every batch has. With `first_logprobs`: (replies, each
        variant's [N, V] log-probabilities of the first step, where every prompt is live).

        Batches are fixed at the first pass (length-sorted, left padded, as `generate` in memory gets them).
        Memory: the caches, layers x variants x prompts x (prompt + reply tokens) x 2 x key/value width x the
        dtype's bytes, besides one layer's weights."""
        from transformers import DynamicCache  # heavy: only when replies are generated

        stream = self.stream()
        batches = list(length_sorted_batches(encoded, batch_size, pad_id))
        out: list[list[list[int]]] = [[[] for _ in encoded] for _ in edits]
        firsts: list[list[torch.Tensor | None]] = [[None] * len(encoded) for _ in edits]
        # per (variant, batch): the tokens to run next, the attention mask so far, the cache, the live rows
        state = {
            (v, b): _Decoding(
                batch.input_ids, batch.attention_mask, DynamicCache(), list(range(len(batch.indices)))
            )
            for v in range(len(edits))
            for b, batch in enumerate(batches)
        }
        bar = tqdm(
            total=max_new_tokens,
            desc=f"greedy replies: {label} (layer-streamed, cached)",
            unit="token",
            disable=not progress,
        )
        for step in range(max_new_tokens):
            running = [key for key, d in state.items() if d.live]
            if not running:
                break
            hidden: dict[tuple[int, int], torch.Tensor] = {}
            layer_args: dict[tuple[int, int], list[tuple[tuple, dict]]] = {}
            with stream.embedding() as record:
                for key in running:
                    d = state[key]
                    positions = (d.mask.cumsum(-1) - 1).clamp(min=0)[:, -d.ids.shape[1] :]
                    embedded, layer_args[key] = record(d.ids, d.mask, positions, d.cache)
                    edit = edits[key[0]]
                    hidden[key] = embedded if edit is None else edit.embedded(embedded)
            for index, layer in stream.each_layer(f"greedy step {step + 1} of {len(edits)} variants", False):
                for v, edit in enumerate(edits):
                    keys = [key for key in running if key[0] == v]
                    if not keys:
                        continue
                    on_layer = nullcontext() if edit is None else edit.on_layer(index, layer)
                    with on_layer, torch.inference_mode():
                        for key in keys:
                            args, kwargs = layer_args[key][index]
                            hidden[key] = layer_output(layer(hidden[key], *args, **kwargs))
            self.weight_reads += 1
            with stream.head() as logits_of:
                for v, b in running:
                    d, batch = state[v, b], batches[b]
                    logprobs = torch.log_softmax(logits_of(hidden[v, b][:, -1, :]).double(), dim=-1).cpu()
                    tokens = logprobs.argmax(dim=-1)
                    if step == 0 and first_logprobs:
                        for row, i in enumerate(batch.indices):
                            firsts[v][i] = logprobs[row]
                    still = []
                    for row in d.live:
                        reply, token = out[v][batch.indices[row]], int(tokens[row])
                        if token in stops:
                            continue
                        reply.append(token)
                        if finished is None or not finished(reply):
                            still.append(row)
                    d.live = still
                    d.ids = tokens[:, None]
                    d.mask = torch.cat([d.mask, torch.ones_like(d.mask[:, :1])], dim=1)
            bar.update(1)
        bar.close()
        if first_logprobs:  # no step at all (no token or no prompt): none, as in memory
            return out, [torch.stack(rows) for rows in firsts] if max_new_tokens and encoded else []  # type: ignore[arg-type]
        return out

    def run_with_hooks(
        self,
        sets: Mapping[str, Encoded],
        batch_size: int,
        pad_id: int,
        hooks: LayerHooks,
        on_batch: Callable[[str, Batch], None],
        desc: str,
        progress: bool = False,
    ) -> None:
        """Every prompt through every decoder layer (one read of the weights, no LM head), with
        `hooks(index, layer)`'s hooks on each layer while it is loaded; `on_batch(label, batch)` before
        each batch runs through a layer."""
        stream = self.stream()
        batches = stream.embed(
            {label: [list(x) for x in encoded] for label, encoded in sets.items()}, batch_size, -1, pad_id
        )
        for index, layer in stream.each_layer(f"{desc} (layer-streamed)", progress):
            handles = hooks(index, layer)
            try:
                with torch.inference_mode():
                    for item in batches:
                        on_batch(item.label, item.batch)
                        args, kwargs = item.layer_args[index]
                        item.hidden = layer_output(layer(item.hidden, *args, **kwargs))
            finally:
                for handle in handles:
                    handle.remove()
        self.weight_reads += 1


Forward = InMemoryForward | StreamedForward


def as_forward(model: Any) -> Forward:
    """A loaded model wrapped as an `InMemoryForward`; a forward as it is."""
    return model if isinstance(model, InMemoryForward | StreamedForward) else InMemoryForward(model)


def model_forward(
    model_dir: str | Path, dtype: str, device: str, stream: bool, progress: bool = True
) -> tuple[Forward, Any]:
    """(forward, tokenizer): the model loaded (`device` cpu, cuda:N, or auto's device map) or read one
    decoder layer at a time (`stream`), for selection, the search and evaluation."""
    if stream:
        return StreamedForward(model_dir, dtype, device), load_tokenizer(model_dir)
    model, tokenizer = load_model(model_dir, dtype, device)
    return InMemoryForward(model), tokenizer
