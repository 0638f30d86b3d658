"""Loading a model and its tokenizer, and the batches every forward pass runs on.

`load_model` holds a checkpoint in memory (one device, or spread by accelerate's device map with
offloading); `length_sorted_batches` makes left-padded batches of similar length, so the last
prompt token is at index -1 in every row; `decoder_layers` finds the main decoder layers of a
loaded model (without extra layers such as GLM's MTP layer).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abliterate.errors import AbliterateError
from abliterate.inference.devices import DTYPES, describe_map, device_map, resolve_device

# ---------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], left padded
    attention_mask: torch.Tensor  # [B, T]
    indices: list[int]  # prompt indices in the original order

    @property
    def position_ids(self) -> torch.Tensor:
        # Left padding shifts tokens; positions count real tokens only, as in an unpadded pass.
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)


def length_sorted_batches(encoded: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Batches of similar length (less padding), left padded so that the last token is at index -1."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in indices)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - n :] = 1
        yield Batch(ids, mask, indices)


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    """The main decoder layers (without extra layers such as GLM's MTP layer)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise AbliterateError(
            f"cannot find the decoder layers of {type(model).__name__} (expected `model.layers`): "
            "this architecture is not supported for measurement"
        )
    count = getattr(model.config, "num_hidden_layers", len(layers))
    return list(layers)[:count]


# ---------------------------------------------------------------- loading


def pad_token_id(tokenizer: Any) -> int:
    """Padding is masked out, so any id works; prefer the tokenizer's own pad token."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]  # transformers' reasons run over several lines
        raise AbliterateError(
            f"cannot load a tokenizer from {model_dir}: {reason}; copy the tokenizer files (tokenizer.json, "
            "tokenizer_config.json) from the model's source"
        ) from exc
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    model_dir: str | Path, dtype: str = "float32", device: str = "cpu", budget: int | None = None
) -> tuple[Any, Any]:
    """Model (eval mode, in `dtype`) and tokenizer from a local directory.

    On `cpu` or `cuda:N` the whole model is moved there. With `device` `auto` (GPUs present) or a
    host-memory `budget` (offloading: a model over the budget), accelerate places one decoder layer
    at a time on every GPU, then `budget` bytes of host memory, then disk
    (`abliterate.inference.devices.device_map`); disk-offloaded weights go to a temporary folder that is
    deleted with the model.
    """
    from transformers import AutoModelForCausalLM  # heavy: only when a model is loaded

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise AbliterateError(f"{model_dir} is not a model directory (no config.json)")
    if dtype not in DTYPES:
        raise AbliterateError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    device = resolve_device(device)
    # seconds, before the weights' minutes: a folder without tokenizer files fails first
    tokenizer = load_tokenizer(model_dir)
    mapping = device_map(model_dir, dtype, device, budget) if device == "auto" or budget is not None else None
    offload = (
        tempfile.mkdtemp(prefix="abliterate-offload-") if mapping and "disk" in mapping.values() else None
    )
    try:
        if mapping is None:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype])
            model.to(device)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=DTYPES[dtype], device_map=mapping, offload_folder=offload
            )
            model.abliterate_placement = describe_map(mapping)
    except (OSError, ValueError) as exc:
        if offload:
            shutil.rmtree(offload, ignore_errors=True)
        raise AbliterateError(f"cannot load the model in {model_dir}: {exc}") from exc
    if offload:
        model.abliterate_offload_dir = offload
        weakref.finalize(model, shutil.rmtree, offload, True)
    model.eval()
    return model, tokenizer
