"""Where the model runs and in which dtype.

`--device`:
- `cpu`, `cuda`, `cuda:N`: the whole model on that device (in memory), or one decoder layer at a
  time on it (layer-streamed).
- `auto`: every GPU, then the CPU, then disk, with accelerate's device map: each module is placed
  on the first device with room (`max_memory`: each GPU's free memory, then the free host memory),
  the rest is offloaded to disk. Without a GPU, `auto` is `cpu`. A layer-streamed pass runs on the
  GPU with the most free memory.

`--dtype`: the compute dtype. `auto` is the checkpoint's own dtype on a GPU (bfloat16 for
GLM-4.5-Air) and float32 on the CPU (CPU kernels for bfloat16 are slow and round every stage to
2^-8). Sums that make the results (means, variances, log-probabilities, KL) are float64 whatever
the compute dtype.

The memory budget (`--memory-budget`, default: the free memory of where the model would go)
decides whether a model is held in memory or streamed one decoder layer at a time (see
`abliterate.inference.streaming.choose_streaming`). For `auto` with GPUs the default budget is the GPUs'
free memory: a model that fits only with CPU offload is streamed, because accelerate's CPU
offload moves every offloaded weight to the GPU once per forward pass (once per batch and per
candidate direction), while streaming moves each layer once for all of them.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from abliterate.config import Runtime, check_device
from abliterate.errors import AbliterateError
from abliterate.vocabulary import DTYPE_CHOICES
from abliterate.weights.checkpoint import build_inventory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HEADER_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
# Headroom kept free on each GPU under `auto`: activations, the CUDA context, fragmentation.
GPU_HEADROOM = 0.10


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str) -> str:
    """`cpu`, `cuda:N`, or `auto` (kept only when there is a GPU to spread the model over)."""
    device = check_device(device)
    if device == "auto":
        return "auto" if gpu_count() else "cpu"
    if device == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device


def stream_device(device: str) -> str:
    """The one device a layer-streamed pass runs on: under `auto`, the GPU with the most free memory."""
    device = resolve_device(device)
    if device != "auto":
        return device
    free = [torch.cuda.mem_get_info(i)[0] for i in range(gpu_count())]
    return f"cuda:{max(range(len(free)), key=free.__getitem__)}"


def on_gpu(device: str) -> bool:
    return resolve_device(device) != "cpu"


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The checkpoint's floating dtype: config.json's `torch_dtype` (or `dtype`), else the dtype most
    weight bytes are stored in (safetensors headers)."""
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        config = {}
    for key in ("torch_dtype", "dtype"):
        value = str(config.get(key) or "").removeprefix("torch.")
        if value in DTYPES:
            return value
    counts: Counter[str] = Counter()
    for t in build_inventory(model_dir).tensors.values():
        if t.dtype in _HEADER_DTYPES:
            counts[_HEADER_DTYPES[t.dtype]] += math.prod(t.shape)
    return counts.most_common(1)[0][0] if counts else "float32"


def resolve_dtype(dtype: str, device: str, model_dir: str | Path) -> str:
    """`auto`: the checkpoint's dtype on a GPU, float32 on the CPU; any other value as given."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise AbliterateError(
                f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPE_CHOICES)}"
            )
        return dtype
    return checkpoint_dtype(model_dir) if on_gpu(device) else "float32"


def resolve_runtime(runtime: Runtime, model_dir: str | Path) -> Runtime:
    """The same settings with `auto` device and dtype made concrete for this machine and model: what
    the stages compute with, and what their cache keys hold."""
    device = resolve_device(runtime.device)
    return runtime.model_copy(
        update={"device": device, "dtype": resolve_dtype(runtime.dtype, device, model_dir)}
    )


def available_memory(device: str) -> int:
    """Free memory where the model would be held: host RAM (MemAvailable) for the CPU, the GPU's free
    memory for cuda:N, every GPU's together for `auto`."""
    device = resolve_device(device)
    if device == "auto":
        return sum(int(torch.cuda.mem_get_info(i)[0]) for i in range(gpu_count()))
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: the execution device of its input embedding (accelerate's hook on a
    device-mapped or offloaded model, whose weights may sit on the meta device), else its weights'."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for param in embedding.parameters():
        if param.device.type != "meta":
            return param.device
    return next(p.device for p in model.parameters())


# ---------------------------------------------------------------- accelerate device maps


def _blocks(model: Any) -> list[tuple[str, int]]:
    """(module name, bytes) of the units a device map places: the input embedding, every decoder layer,
    and every other top-level piece (final norm, rotary tables, LM head), in forward order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    decoder_name = next(name for name, module in model.named_modules() if module is decoder)
    prefix = decoder_name + "." if decoder_name else ""
    out: list[tuple[str, int]] = []

    def size(module: torch.nn.Module) -> int:
        tensors = list(module.parameters()) + list(module.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    for name, child in decoder.named_children():
        if isinstance(child, torch.nn.ModuleList):
            out += [(f"{prefix}{name}.{i}", size(layer)) for i, layer in enumerate(child)]
        else:
            out.append((prefix + name, size(child)))
    for name, child in model.named_children():
        if child is not decoder:
            out.append((name, size(child)))
    return out


def device_map(model_dir: str | Path, dtype: str, device: str, budget: int | None = None) -> dict[str, Any]:
    """An accelerate device map, one entry per decoder layer (so offloading holds one layer's weights at
    a time): modules fill every GPU (for `auto`; only the named one for cuda:N), then `budget` bytes of
    host memory (default: the free host memory), then disk."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    device = resolve_device(device)
    places: list[tuple[Any, float]] = []
    if device == "auto":
        places += [(i, torch.cuda.mem_get_info(i)[0] * (1 - GPU_HEADROOM)) for i in range(gpu_count())]
    elif device.startswith("cuda"):
        index = torch.device(device).index or 0
        places.append((index, torch.cuda.mem_get_info(index)[0] * (1 - GPU_HEADROOM)))
    places.append(("cpu", available_memory("cpu") if budget is None else budget))
    places.append(("disk", math.inf))
    mapping: dict[str, Any] = {}
    place, used = 0, 0
    for name, nbytes in _blocks(skeleton):
        while used + nbytes > places[place][1] and places[place][0] != "disk":
            place, used = place + 1, 0
        mapping[name] = places[place][0]
        used += nbytes
    return mapping


def describe_map(mapping: dict[str, Any]) -> str:
    """`cuda:0 12 modules, cpu 3, disk 40`: where a device map put the model."""
    counts = Counter(f"cuda:{v}" if isinstance(v, int) else str(v) for v in mapping.values())
    return ", ".join(f"{where} {n}" for where, n in counts.items())
