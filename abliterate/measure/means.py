"""Activation measurement: mean residual of harmful and harmless prompts at every residual position.

Residual position i is the input of decoder layer i; position L is the raw output of the last
decoder layer, before the final norm. For each prompt we keep only one token (by default the
last prompt token, i.e. where the reply starts), never whole sequences.

The pieces are separate on purpose, so a layer-streamed measurement can reuse them:
`encode_prompts` + `length_sorted_batches` (rendering and batching), `ResidualAccumulator`
(float64 statistics per position), and `capture_residuals` (one forward pass of a whole model).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate.errors import AbliterateError
from abliterate.inference.devices import DTYPES, input_device
from abliterate.measure.prompts import prompts_sha256

# tokenizer.model_max_length is a huge sentinel (1e30) when the tokenizer does not know its limit.
_SANE_CONTEXT = 10_000_000


@dataclass(frozen=True)
class MeasureSettings:
    """Everything that decides what is measured; hashable, so caches can key on it.

    `position` is the token index counted from the end of the rendered prompt (-1 = the last
    prompt token, which is the last token of the generation prompt). `chat_template_kwargs` is a
    sorted tuple of (key, value) pairs; build it from a dict with `MeasureSettings.create`.
    `batch_size` changes results only at float rounding level.
    """

    position: int = -1
    system_prompt: str | None = None
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()
    batch_size: int = 16
    dtype: str = "float32"
    max_length: int | None = None  # None: the model's context length

    @classmethod
    def create(cls, chat_template_kwargs: Mapping[str, Any] | None = None, **fields: Any) -> MeasureSettings:
        pairs = tuple(sorted((chat_template_kwargs or {}).items()))
        return cls(chat_template_kwargs=pairs, **fields)

    def __post_init__(self) -> None:
        if self.position >= 0:
            raise AbliterateError(
                f"token position {self.position} must be negative (counted from the end of the prompt; -1 = last token)"
            )
        if self.batch_size < 1:
            raise AbliterateError(f"batch size must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise AbliterateError(f"dtype {self.dtype!r} is not supported; choose one of {sorted(DTYPES)}")

    @property
    def template_kwargs(self) -> dict[str, Any]:
        return dict(self.chat_template_kwargs)

    def template(self) -> dict[str, Any]:
        """The template settings as recorded in the directions metadata."""
        return {"system_prompt": self.system_prompt, "chat_template_kwargs": self.template_kwargs}

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["chat_template_kwargs"] = self.template_kwargs
        return out


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
    harmful: SetStats
    harmless: SetStats
    settings: MeasureSettings
    num_layers: int
    hidden_size: int

    @property
    def num_positions(self) -> int:
        return self.num_layers + 1


# ---------------------------------------------------------------- rendering and batching


def context_length(model: Any, tokenizer: Any, settings: MeasureSettings) -> int | None:
    """The longest prompt we accept: the smaller of the model's and the tokenizer's sane limits."""
    limits = [settings.max_length]
    limits.append(getattr(getattr(model, "config", None), "max_position_embeddings", None))
    limits.append(getattr(tokenizer, "model_max_length", None))
    sane = [int(x) for x in limits if isinstance(x, int) and 0 < x < _SANE_CONTEXT]
    return min(sane) if sane else None


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    settings: MeasureSettings,
    max_context: int | None,
    label: str = "prompt",
) -> list[list[int]]:
    """Render each prompt with the chat template and generation prompt, then tokenise it.

    The rendered text already holds the template's special tokens, so none are added again.
    """
    from abliterate.measure.chat import render_chat
    from abliterate.measure.prompts import describe_prompt

    if len(prompts) == 0:
        raise AbliterateError(f"the {label} prompt set is empty: give at least one prompt")
    texts = render_chat(
        tokenizer, list(prompts), system_prompt=settings.system_prompt, **settings.template_kwargs
    )
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    need = -settings.position
    for index, ids in enumerate(encoded):
        where = describe_prompt(prompts[index], f"#{index}")  # its file and line when read from a file
        if max_context is not None and len(ids) > max_context:
            raise AbliterateError(
                f"{label} prompt {where} is {len(ids)} tokens long after chat rendering, more than the "
                f"model's context of {max_context} tokens: shorten or remove it"
            )
        if len(ids) < need:
            raise AbliterateError(
                f"{label} prompt {where} has only {len(ids)} tokens; token position {settings.position} "
                "does not exist in it"
            )
    return encoded


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


# ---------------------------------------------------------------- the whole-model forward pass


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


def describe_position(position: int, num_layers: int) -> str:
    if position == 0:
        return "residual position 0 (output of the embedding layer)"
    if position == num_layers:
        return f"residual position {position} (output of the last decoder layer {position - 1}, before the final norm)"
    return f"residual position {position} (output of decoder layer {position - 1}, input of layer {position})"


def _copy_token(hidden: torch.Tensor, token_index: int) -> torch.Tensor:
    # A copy, not a view: a view would keep the layer's whole [B, T, H] hidden states alive.
    return hidden[:, token_index, :].to(torch.float32, copy=True)


def capture_residuals(model: Any, batch: Batch, token_index: int = -1) -> torch.Tensor:
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


def check_finite(residuals: torch.Tensor, batch: Batch, label: str) -> None:
    """Name the first position (and so the layer) where NaN or Inf appears."""
    finite = torch.isfinite(residuals).all(dim=-1)  # [P, B]
    if bool(finite.all()):
        return
    position, row = (int(x) for x in (~finite).nonzero()[0])
    num_layers = residuals.shape[0] - 1
    raise AbliterateError(
        f"NaN or Inf activations at {describe_position(position, num_layers)} for {label} prompt "
        f"#{batch.indices[row]}: the weights of that layer (or the dtype) are broken; try dtype float32"
    )


def measure_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: MeasureSettings,
    label: str = "prompt",
    progress: bool = True,
) -> SetStats:
    encoded = encode_prompts(tokenizer, prompts, settings, context_length(model, tokenizer, settings), label)
    num_layers = len(decoder_layers(model))
    acc = ResidualAccumulator(num_layers + 1, model.config.hidden_size)
    tokens = 0
    bar = tqdm(total=len(encoded), desc=f"measure {label}", unit="prompt", disable=not progress)
    for batch in length_sorted_batches(encoded, settings.batch_size, pad_token_id(tokenizer)):
        residuals = capture_residuals(model, batch, settings.position)
        check_finite(residuals, batch, label)
        acc.add(residuals)
        tokens += int(batch.attention_mask.sum())
        bar.update(len(batch.indices))
    bar.close()
    return SetStats(acc.mean, acc.variance(), acc.count, tokens, prompts_sha256(list(prompts)))


def measure(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    settings: MeasureSettings,
    progress: bool = True,
) -> Measurement:
    """Mean residuals at every position for both prompt sets (model already loaded)."""
    return Measurement(
        harmful=measure_prompts(model, tokenizer, harmful, settings, "harmful", progress),
        harmless=measure_prompts(model, tokenizer, harmless, settings, "harmless", progress),
        settings=settings,
        num_layers=len(decoder_layers(model)),
        hidden_size=int(model.config.hidden_size),
    )


def measure_checkpoint(
    model_dir: str | Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    settings: MeasureSettings,
    device: str = "cpu",
    progress: bool = True,
) -> Measurement:
    """Load the model (in `settings.dtype`) and measure both prompt sets."""
    model, tokenizer = load_model(model_dir, settings.dtype, device)
    return measure(model, tokenizer, harmful, harmless, settings, progress)


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
        raise AbliterateError(f"cannot load a tokenizer from {model_dir}: {exc}") from exc
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
    import shutil
    import tempfile
    import weakref

    from transformers import AutoModelForCausalLM

    from abliterate.inference.devices import describe_map, device_map, resolve_device

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise AbliterateError(f"{model_dir} is not a model directory (no config.json)")
    if dtype not in DTYPES:
        raise AbliterateError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    device = resolve_device(device)
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
    return model, load_tokenizer(model_dir)
