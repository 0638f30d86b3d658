"""Layer-streamed forward passes, for models larger than memory: `LayerStream`, on which the
measurement (`abliterate.measure.streamed`) and the selection and evaluation passes of
`abliterate.inference.runner.StreamedForward` run.

All prompts go through the model one decoder layer at a time. Only one layer's weights are in
memory at once: they are read from the shards (exact byte ranges from the inventory, in chunks,
never memory-mapped), converted to the layout transformers' layer module holds in memory
(per-expert tensors on disk are written into the fused expert tensors, following transformers'
own conversion mapping), run on the stored hidden states of every prompt, and dropped again.
Every weight byte of the main decoder is read once per pass; the MTP layer never; the final norm
and the LM head only by passes that need logits (selection, evaluation).

The computation is transformers' own: the model is built on the meta device, its decoder's
forward pass runs once per batch with recording stand-ins for the layers (so the embedding,
causal mask and rotary embeddings are exactly what the model computes), then each real layer
module is called with the arguments the model would pass it. Batches are the ones of the
in-memory passes, so streamed and in-memory results agree to float rounding. The layers run on one device (`abliterate.inference.devices.stream_device`:
a GPU when there is one and the device is `cuda` or `auto`): weights go there layer by layer.

Memory: the largest of {one decoder layer, the input embedding, the LM head} in the compute dtype,
plus the activations: the full hidden states of every prompt, kept between layers because
attention needs every token up to the measured one (attention is causal: later tokens are cut
off): sum over batches of batch_size x padded_length x hidden x bytes per element (4 in float32),
plus one attention mask and rotary table per batch.
"""

from __future__ import annotations

import gc
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate.errors import AbliterateError
from abliterate.inference.devices import DTYPES, available_memory, resolve_dtype
from abliterate.inference.loading import Batch, length_sorted_batches
from abliterate.inference.threads import apply_threads
from abliterate.vocabulary import STREAMING_MODES
from abliterate.weights import fp8
from abliterate.weights.checkpoint import Inventory, TensorInfo, build_inventory, read_config

DISK_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
READ_CHUNK_BYTES = 64 << 20  # bounds the transient copy of a large (fused) tensor
GC_BYTES = 64 << 20  # release() collects garbage after freeing at least this much
_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


# ---------------------------------------------------------------- memory: when to stream


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the main model's weights in the compute dtype (MTP layers excluded)."""

    total: int
    largest_layer: int
    embedding: int


def weight_bytes(
    model_dir: str | Path, dtype: str = "float32", inventory: Inventory | None = None
) -> WeightBytes:
    """Weight bytes from the safetensors headers alone, at `dtype`'s element size."""
    inventory = inventory or build_inventory(model_dir)
    num_layers = int(read_config(model_dir).get("num_hidden_layers", 0)) or None
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    total, per_layer, embedding = 0, {}, 0
    for t in inventory.tensors.values():
        nbytes = math.prod(t.shape) * size
        layer = _layer_of(t.name)
        if layer is not None and num_layers is not None and layer >= num_layers:
            continue  # MTP layers: transformers drops them, and so do we
        total += nbytes
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + nbytes
        elif t.name.endswith("embed_tokens.weight"):
            embedding += nbytes
    return WeightBytes(total, max(per_layer.values(), default=0), embedding)


def choose_streaming(
    model_dir: str | Path,
    budget_bytes: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    mode: str = "auto",
) -> bool:
    """Whether to work layer-streamed. mode "always"/"never" decide alone; "auto" streams when the
    model's weights in `dtype` exceed the budget (default: the free memory of `device` now, see
    `abliterate.inference.devices.available_memory`)."""
    if mode not in STREAMING_MODES:
        raise AbliterateError(
            f"streaming mode {mode!r} is unknown: choose one of {', '.join(STREAMING_MODES)}"
        )
    if mode != "auto":
        return mode == "always"
    budget = available_memory(device) if budget_bytes is None else budget_bytes
    return weight_bytes(model_dir, resolve_dtype(dtype, device, model_dir)).total > budget


# ---------------------------------------------------------------- the layer stream


@dataclass
class PromptBatch:
    label: str  # harmful | harmless
    batch: Batch  # cut after the measured token
    tokens: int  # prompt tokens of the whole rendered prompts (without padding)
    hidden: torch.Tensor  # [B, T, H] input of the next layer, compute dtype
    # what the model passes each decoder layer besides the hidden states: (args, kwargs) per layer
    layer_args: list[tuple[tuple, dict]]


class LayerStream:
    """A model read one decoder layer at a time: transformers' own modules, built on the meta device,
    whose weights are read from the shards when a layer runs and dropped after it.

    `embed` runs the model's own forward pass up to the first decoder layer for every batch (the
    input embedding is in memory only then); `each_layer` loads, yields and releases the decoder
    layers in order; `head` holds the final norm and the LM head (or the tied embedding) for the
    logits. Every weight byte of the main decoder is read once per pass; the MTP layer never.
    """

    def __init__(self, model_dir: str | Path, dtype: str, device: str):
        self.model_dir = Path(model_dir)
        self.device = device
        self.inventory = build_inventory(self.model_dir)
        self.model = _skeleton(self.model_dir, dtype, device)
        self.config = self.model.config
        self.decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
        self.layers = _decoder_layers(self.decoder, self.model.config)
        self.loader = _WeightLoader(self.model, self.inventory, device)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(
        self, encoded: dict[str, list[list[int]]], batch_size: int, position: int, pad_id: int
    ) -> list[PromptBatch]:
        """Every batch's input of decoder layer 0 and the arguments each layer is called with; the
        sequences are cut after the token at `position` (-1: nothing is cut)."""
        return _embed_all(
            self.model, self.decoder, self.loader, encoded, batch_size, position, pad_id, self.device
        )

    @contextmanager
    def embedding(self) -> Iterator[Any]:
        """Within the block, the input embedding is in memory and the function given records one batch:
        `(input_ids, attention_mask, position_ids, cache)` -> (input of decoder layer 0, the (args, kwargs)
        of each layer), the layers then called with `cache` (a transformers `Cache`: the keys and values
        of the tokens before these) so they read and extend it: one step of cached decoding."""
        with _embedding(self.model, self.loader):
            yield lambda ids, mask, positions, cache: _recorded(
                self.decoder, ids, mask, positions, self.device, cache
            )

    def each_layer(self, desc: str, progress: bool = True) -> Iterator[tuple[int, torch.nn.Module]]:
        bar = tqdm(total=self.num_layers, desc=desc, unit="layer", disable=not progress)
        try:
            for index, layer in enumerate(self.layers):
                apply_threads()  # load that arrived since the last layer is seen (threads.RECHECK_S)
                self.loader.load_layer(index, layer)
                try:
                    yield index, layer
                finally:
                    self.loader.release(layer)
                bar.update(1)
        finally:
            bar.close()

    @contextmanager
    def head(self) -> Iterator[Any]:
        """A function from last-token hidden states [B, H] (the last layer's raw output) to logits [B, V]:
        the final norm, then the LM head, as the model's own forward pass computes them."""
        norm = getattr(self.decoder, "norm", None)
        head = self.model.get_output_embeddings()
        if not isinstance(norm, torch.nn.Module) or head is None:
            raise AbliterateError(
                f"cannot find the final norm and LM head of {type(self.model).__name__}: this architecture "
                "is not supported for layer-streamed scoring"
            )
        head_prefix = self.loader.names[id(head)] + "."
        tied = not any(name.startswith(head_prefix) for name in self.inventory.tensors)
        source = self.model.get_input_embeddings() if tied else head
        self.loader.load_module(norm)
        self.loader.load_module(source)

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            normed = norm(hidden.unsqueeze(1))[:, 0]
            if tied:
                return torch.nn.functional.linear(normed, source.weight)
            return head(normed)

        try:
            with torch.inference_mode():
                yield logits
        finally:
            self.loader.release(norm)
            self.loader.release(source)


def layer_output(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


# ---------------------------------------------------------------- the model without its weights


def _skeleton(model_dir: Path, dtype: str, device: str) -> Any:
    """The model with every parameter on the meta device and real buffers (rotary tables) on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise AbliterateError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    except (OSError, ValueError) as exc:
        raise AbliterateError(f"cannot build the model of {model_dir} from its config.json: {exc}") from exc
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    return model.eval()


def _decoder_layers(decoder: Any, config: Any) -> list[torch.nn.Module]:
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise AbliterateError(
            f"cannot find the decoder layers of {type(decoder).__name__} (expected `layers`): "
            "this architecture is not supported for layer-streamed measurement"
        )
    return list(layers)[: getattr(config, "num_hidden_layers", len(layers))]


class _StopForward(Exception):
    """Raised by the last recording stand-in: nothing after the decoder layers is needed."""


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer: records the arguments the model passes it."""

    def __init__(self, sink: list[tuple[tuple, dict]], last: bool):
        super().__init__()
        self.sink, self.last = sink, last
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.sink:
            self.hidden = hidden_states  # the first layer's input: residual position 0
        self.sink.append((args, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def _embed_all(
    model: Any,
    decoder: Any,
    loader: _WeightLoader,
    encoded: dict[str, list[list[int]]],
    batch_size: int,
    position: int,
    pad_id: int,
    device: str,
) -> list[PromptBatch]:
    """Run the model's own forward pass up to the first decoder layer for every batch (`_recorded`); the
    input embedding is in memory only for this pass."""
    out: list[PromptBatch] = []
    with _embedding(model, loader):
        for label, ids in encoded.items():
            for whole in length_sorted_batches(ids, batch_size, pad_id):
                # Left padding: every prompt's measured token sits at the same index; nothing after it
                # can change it (causal attention), so it is cut off.
                cut = whole.input_ids.shape[1] + position + 1
                batch = Batch(whole.input_ids[:, :cut], whole.attention_mask[:, :cut], whole.indices)
                hidden, sink = _recorded(
                    decoder, batch.input_ids, batch.attention_mask, batch.position_ids, device
                )
                tokens = int(whole.attention_mask.sum())
                out.append(PromptBatch(label, batch, tokens, hidden, sink))
    return out


@contextmanager
def _embedding(model: Any, loader: _WeightLoader) -> Iterator[None]:
    """The input embedding in memory within the block."""
    embedding = model.get_input_embeddings()
    loader.load_module(embedding)
    try:
        yield
    finally:
        loader.release(embedding)


def _recorded(
    decoder: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    device: str,
    cache: Any = None,
) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """(input of decoder layer 0, the (args, kwargs) the model passes each layer) for one batch: the
    decoder's own forward pass with the layers swapped for recorders, so the embedding, the causal mask
    and the rotary tables are what the model computes. With `cache` (a transformers `Cache` holding the
    earlier tokens' keys and values: a decoding step), the layers are called with it and update it."""
    real_layers = decoder.layers
    sink: list[tuple[tuple, dict]] = []
    stand_ins = [_Recorder(sink, i == len(real_layers) - 1) for i in range(len(real_layers))]
    decoder.layers = torch.nn.ModuleList(stand_ins)
    cached = {"use_cache": False} if cache is None else {"use_cache": True, "cache": cache}
    try:
        with torch.inference_mode():
            decoder(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                **cached,
            )
    except _StopForward:
        pass
    finally:
        decoder.layers = real_layers
    if stand_ins[0].hidden is None or len(sink) != len(real_layers):
        raise AbliterateError(
            f"the forward pass of {type(decoder).__name__} reached {len(sink)} of its "
            f"{len(real_layers)} decoder layers: this architecture is not supported for "
            "layer-streamed measurement"
        )
    return stand_ins[0].hidden, sink


# ---------------------------------------------------------------- reading one layer's weights


@dataclass(frozen=True)
class _Piece:
    """One checkpoint tensor and where it lands in a module's state dict."""

    info: TensorInfo
    target: str  # state-dict key relative to the module
    expert: int | None = None  # index along the fused tensor's first axis (per-expert keys)
    concat_offset: int = 0  # offset along the concatenated axis (gate then up in gate_up_proj)
    concat_dim: int | None = None  # that axis in the per-expert tensor


class _WeightLoader:
    """Finds, converts and reads the weights of one module (a decoder layer, the embedding)."""

    def __init__(self, model: Any, inventory: Inventory, device: str):
        self.model_dir = inventory.model_dir
        self.tensors = inventory.tensors
        self.fp8 = inventory.fp8  # FP8 weights: dequantized on load (fp8.py), their scales read with them
        self.fp8_scales = {scale for scale, _ in inventory.fp8.values()}
        self.device = torch.device(device)
        self.names = {id(module): name for name, module in model.named_modules()}
        self.renamings, self.converters, self.concatenating = _conversions(model)

    def load_module(self, module: torch.nn.Module) -> None:
        """Materialise the module's parameters on the device and fill them from the shards."""
        prefix = self.names[id(module)] + "."
        for name, param in list(module.named_parameters()):
            _set_parameter(module, name, torch.empty(param.shape, dtype=param.dtype, device=self.device))
        targets = module.state_dict()
        pieces = self._pieces(prefix, targets)
        by_shard: dict[str, list[_Piece]] = {}
        for piece in pieces:
            by_shard.setdefault(piece.info.shard, []).append(piece)
        for shard, shard_pieces in sorted(by_shard.items()):
            with open(self.model_dir / shard, "rb") as handle:
                for piece in sorted(shard_pieces, key=lambda p: p.info.start):
                    dest = _destination(targets[piece.target], piece)
                    if piece.info.name in self.fp8:
                        dest.copy_(self._dequantized(piece.info, tuple(dest.shape)))
                    else:
                        _read_into(handle, piece.info, dest)

    def _dequantized(self, info: TensorInfo, shape: tuple[int, ...]) -> torch.Tensor:
        """An FP8 weight and its scales (wherever they are stored), dequantized in float32."""
        if shape != info.shape:
            raise AbliterateError(
                f"tensor {info.name!r} in {info.shard} has shape {list(info.shape)}, the model expects "
                f"{list(shape)}: the checkpoint does not match config.json"
            )
        scale_name, block = self.fp8[info.name]
        scale = self.tensors[scale_name]
        q = fp8.read_tensor(self.model_dir / info.shard, info)
        return fp8.dequantize(q, fp8.read_tensor(self.model_dir / scale.shard, scale), block)

    def load_layer(self, index: int, layer: torch.nn.Module) -> None:
        try:
            self.load_module(layer)
        except AbliterateError as exc:
            raise AbliterateError(f"decoder layer {index}: {exc}") from exc

    def release(self, module: torch.nn.Module) -> None:
        """Send the parameters back to the meta device, so their memory is freed (a garbage collection
        makes sure of it where that is worth its time: a fraction of a second on a loaded interpreter)."""
        released = 0
        for name, param in list(module.named_parameters()):
            released += param.numel() * param.element_size()
            _set_parameter(module, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))
        if released >= GC_BYTES:
            gc.collect()

    def _pieces(self, prefix: str, targets: dict[str, torch.Tensor]) -> list[_Piece]:
        """Map every checkpoint tensor under `prefix` to its place; check that all targets are covered."""
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        names = [n for n in self.tensors if n.startswith(prefix) and n not in self.fp8_scales]
        if not names:
            raise AbliterateError(
                f"the checkpoint in {self.model_dir} holds no tensor named {prefix}*: its names do not match "
                "the model class transformers builds from config.json"
            )
        direct: list[_Piece] = []
        grouped: dict[tuple[str, str], list[str]] = {}  # (target, source pattern) -> per-expert keys
        for name in names:
            renamed, pattern = rename_source_key(
                name, self.renamings, list(dict.fromkeys(self.converters.values()))
            )
            target = renamed.removeprefix(prefix)
            if not renamed.startswith(prefix) or target not in targets:
                raise AbliterateError(
                    f"checkpoint tensor {name!r} (in {self.tensors[name].shard}) has no place in the model "
                    f"transformers builds (looked for {renamed!r}): unsupported checkpoint layout"
                )
            if pattern is None:
                direct.append(_Piece(self.tensors[name], target))
            else:
                grouped.setdefault((target, pattern), []).append(name)

        pieces = list(direct)
        covered = {p.target: math.prod(p.info.shape) for p in direct}
        for (target, pattern), keys in grouped.items():
            sources = self.converters[pattern].source_patterns
            dim = 0
            offset = sum(
                self.tensors[grouped[(target, s)][0]].shape[dim]
                for s in sources[: sources.index(pattern)]
                if (target, s) in grouped
            )
            # transformers stacks per-expert keys in natural order of their names
            for expert, name in enumerate(sorted(keys, key=dot_natural_key)):
                info = self.tensors[name]
                concat_dim = dim if pattern in self.concatenating else None
                pieces.append(_Piece(info, target, expert, offset, concat_dim))
                covered[target] = covered.get(target, 0) + math.prod(info.shape)
        for target, tensor in targets.items():
            if covered.get(target, 0) != tensor.numel():
                raise AbliterateError(
                    f"the checkpoint fills {covered.get(target, 0)} of the {tensor.numel()} values of "
                    f"{prefix}{target} {tuple(tensor.shape)}: tensors are missing or have other shapes"
                )
        return pieces


def _conversions(model: Any) -> tuple[list, dict[str, Any], set[str]]:
    """transformers' own key renamings and fusing converters for this model class.

    Only the converters that stack per-expert tensors (MergeModulelist on axis 0, then optionally
    Concatenate) are understood; a checkpoint that needs another one raises on its first key.
    """
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming

    renamings, converters, concatenating = [], {}, set()
    for transform in extract_weight_conversions_for_model(model) or []:
        if isinstance(transform, WeightRenaming):
            renamings.append(transform)
        elif isinstance(transform, WeightConverter):
            ops = transform.operations
            stacks = bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
            concat_ok = len(ops) == 1 or (
                len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1
            )
            if not (stacks and concat_ok):
                continue
            for pattern in transform.source_patterns:
                converters[pattern] = transform
                if len(ops) == 2:
                    concatenating.add(pattern)
    return renamings, converters, concatenating


def _destination(target: torch.Tensor, piece: _Piece) -> torch.Tensor:
    """The view of `target` that the checkpoint tensor of `piece` fills."""
    if piece.expert is None:
        return target
    view = target[piece.expert]
    if piece.concat_dim is not None:
        view = view.narrow(piece.concat_dim, piece.concat_offset, piece.info.shape[piece.concat_dim])
    return view


def _read_into(handle: Any, info: TensorInfo, dest: torch.Tensor) -> None:
    """Read one tensor's bytes in chunks of rows and copy (casting) them into `dest`."""
    disk_dtype = DISK_DTYPES.get(info.dtype)
    if disk_dtype is None:
        raise AbliterateError(
            f"tensor {info.name!r} in {info.shard} is stored as {info.dtype}: layer-streamed measurement reads "
            f"only {', '.join(DISK_DTYPES)} weights (dequantize the checkpoint first)"
        )
    if tuple(dest.shape) != info.shape:
        raise AbliterateError(
            f"tensor {info.name!r} in {info.shard} has shape {list(info.shape)}, the model expects "
            f"{list(dest.shape)}: the checkpoint does not match config.json"
        )
    if not info.shape:  # a scalar
        dest.copy_(_read_bytes(handle, info, info.start, info.nbytes).view(disk_dtype).view(()))
        return
    rows = info.shape[0]
    row_bytes = info.nbytes // max(rows, 1)
    step = max(1, READ_CHUNK_BYTES // max(row_bytes, 1))
    for first in range(0, rows, step):
        count = min(step, rows - first)
        chunk = _read_bytes(handle, info, info.start + first * row_bytes, count * row_bytes)
        dest[first : first + count].copy_(chunk.view(disk_dtype).view(count, *info.shape[1:]))


def _read_bytes(handle: Any, info: TensorInfo, start: int, size: int) -> torch.Tensor:
    buffer = torch.empty(size, dtype=torch.uint8)
    handle.seek(start)
    if size and handle.readinto(memoryview(buffer.numpy())) != size:
        raise AbliterateError(f"{info.shard} ends inside tensor {info.name!r}: the shard is truncated")
    return buffer


def _set_parameter(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, attr, torch.nn.Parameter(value, requires_grad=False))


def _layer_of(name: str) -> int | None:
    match = _LAYER_KEY.search("." + name)
    return int(match.group(1)) if match else None
