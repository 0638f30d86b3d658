"""An ablation plan applied at inference time: what the edited checkpoint computes, without
rewriting it. `abliterate search` scores every trial this way (`PlanEdit`), and selection scores
every candidate direction this way (`DirectionEdit`: the special case of one direction removed
from every write into the residual stream at scale 1).

Both give the runner (`abliterate.inference.runner`) the same three things: `applied(model)` for a
model in memory, `embedded(hidden)` and `on_layer(index, layer)` for a layer-streamed one.

A plan may do more than one direction at scale 1: each role of each layer has its own scale
(per-role layer kernels), each layer its own vector (`matching.direction_for`: the selected,
interpolated or per-layer projected direction), routers are edited on their input side, and a
router's correction bias may be shifted. A rank-k plan removes a basis Q [k, H] of orthonormal rows
instead of r: every `r (r . x)` below becomes `Q^T (Q x)`, the same hooks otherwise. For every tensor the plan edits, the loaded module is
changed so that it computes what the edited tensor computes (docs/DESIGN.md 2.4):

| edit (plan) | at inference time | why it is the same |
|---|---|---|
| writer W [H, in], plain or projected, scale s | forward hook on the module that owns W: `y - s r (r . (y - b))` (b: an unedited bias of that module, else 0) | `W' x = W x - s r (r^T W x)`; a fused expert tensor's module returns the routed sum of its experts' writes, linear in each |
| writer, norm-preserving | the module's weight replaced by its edited copy while the plan is applied | column rescaling is not a projection of the output |
| router W [E, H], scale s | forward pre-hook on the router: `x - s (x . r) r` | `W' x = W (x - s r r^T x)` |
| embedding rows, scale s | forward hook on the embedding: `e - s (e . r) r` (norm-preserving: rescaled to `|e|`, in float32) | every row is edited alike; each output is a row |
| router correction bias | the buffer replaced by `bias + values` while the plan is applied | the same values the engine adds |
| writer stored in FP8 (any method) | the module's weight replaced by its edit requantized and dequantized (`fp8.quantize`, fresh block scales) | the engine writes the requantized edit (`fp8_edit.requantized_edit`); the loaded weight is the dequantized FP8 one |

Replaced tensors are computed as the engine computes them (float32 from the loaded values, one
rounding to the checkpoint's storage dtype, then the compute dtype), so they equal the edited
checkpoint's loaded tensors; the hooks are exact in exact arithmetic and differ from the edited
checkpoint by rounding only (float32 arithmetic, and the storage rounding of the edited weights:
2^-8 relative per element in bfloat16). An FP8 weight is never hooked: its edit requantized (2^-4
relative per element) is no rounding to neglect, so it is computed as the engine writes it; loaded
in float32 (transformers dequantizes FP8 in float32 on a CPU, and so does the layer stream), the
replaced weight is bit for bit the edited checkpoint's. tests/test_search_plan.py checks hooked
inference against a checkpoint edited by the engine, bf16 and FP8. MTP layers, which transformers does not load, are left out.
Memory: while a plan is applied, the edited copy of every replaced tensor (norm-preserving: every
edited writer of a model in memory, one layer's when layer-streamed; router biases: [E] each).

The modules are found by the family profile's role rules over the loaded parameter and buffer
names (`model.layers.<i>.<path>`), the same rules that classify the checkpoint's tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from abliterate.edit.matching import direction_for
from abliterate.edit.orthogonalize import norm_preserving_, project_out_
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.inference.loading import decoder_layers
from abliterate.measure.direction_file import Directions
from abliterate.vocabulary import BIAS_OF
from abliterate.weights.dtypes import TORCH_DTYPES
from abliterate.weights.fp8 import dequantize, quantize
from abliterate.weights.profiles import Profile

WRITERS = ("attn_out", "mlp_down", "expert_down", "shared_expert_down")


@dataclass(frozen=True)
class Slot:
    """One loaded parameter or buffer of a decoder layer that a plan may edit."""

    path: str  # inside the layer: `mlp.experts.down_proj`, `self_attn.o_proj.weight`
    role: str
    residual_axis: int | None


def layer_slots(layer: torch.nn.Module, index: int, profile: Profile) -> list[Slot]:
    """The parameters and buffers of decoder layer `index` with an editable role, classified by the
    profile's rules over their full names `model.layers.<index>.<path>`."""
    slots = []
    named = list(layer.named_parameters(recurse=True)) + list(layer.named_buffers(recurse=True))
    for path, _ in named:
        found = profile.classify(f"model.layers.{index}.{path}")
        if found is None:
            continue
        rule, layer_index, _expert = found
        if layer_index == index and (
            rule.role in WRITERS or rule.role in ("router", "router_bias") or rule.role in BIAS_OF.values()
        ):
            slots.append(Slot(path, rule.role, rule.residual_axis))
    return slots


def _owner(layer: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return (layer.get_submodule(parent) if parent else layer), attr


class PlanEdit:
    """A resolved plan and its directions file, ready to be applied to loaded modules.

    `storage`: (role, layer) -> the checkpoint's dtype of those tensors (safetensors names: BF16,
    F32, ...), to round replaced tensors as the engine does; `fp8`: (role, layer) -> (block, scale
    dtype) of the writers stored in FP8 (`fp8_blocks`); `profile`: the family's role rules."""

    def __init__(
        self,
        plan: AblationPlan,
        directions: Directions,
        profile: Profile,
        storage: dict[tuple[str, int], str] | None = None,
        fp8: dict[tuple[str, int], tuple[tuple[int, int], torch.dtype]] | None = None,
    ):
        self.plan = plan
        self.directions = directions
        self.profile = profile
        self.storage = storage or {}
        self.fp8 = fp8 or {}
        self._vectors: dict[int | None, torch.Tensor] = {}
        self._roles = set(plan.roles())
        self._slots: dict[int, list[Slot]] = {}

    def vector(self, layer: int | None) -> torch.Tensor:
        if layer not in self._vectors:
            self._vectors[layer] = direction_for(self.plan, self.directions, layer)
        return self._vectors[layer]

    def scale(self, layer: int, role: str) -> float:
        if role not in self._roles or layer not in self.plan.layers:
            return 0.0
        return self.plan.scale_for(layer, role)

    # ---------------------------------------------------------------- the embedding

    def embed_scale(self) -> float:
        return self.plan.embed_scale if "embed" in self.plan.targets else 0.0

    def embedded(self, hidden: torch.Tensor) -> torch.Tensor:
        """The embedding output as the edited embedding gives it (rows edited alike: each output vector
        is a row of the table; the norm-preserving edit rescales rows too, as the engine does)."""
        s = self.embed_scale()
        if s == 0.0:
            return hidden
        if self.plan.method == "norm_preserving":
            work = hidden.detach().to(torch.float32, copy=True).contiguous()  # never the caller's tensor
            norm_preserving_(work, self.vector(None).to(work.device), s, work.dim() - 1)
            return work.to(hidden.dtype)
        return _project(hidden, self.vector(None), s)

    # ---------------------------------------------------------------- one decoder layer

    @contextmanager
    def on_layer(self, index: int, layer: torch.nn.Module) -> Iterator[None]:
        """Within the block, decoder layer `index` (loaded) computes what its edited tensors compute."""
        if index not in self._slots:
            self._slots[index] = layer_slots(layer, index, self.profile)
        slots = self._slots[index]
        handles: list[Any] = []
        replaced: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
        try:
            bias_edited = {
                s.path.rpartition(".")[0]: s
                for s in slots
                if s.role in BIAS_OF.values() and self.scale(index, s.role) > 0 and self.plan.biases
            }
            for slot in slots:
                if slot.role in WRITERS:
                    self._writer(layer, index, slot, bias_edited, handles, replaced)
                elif slot.role == "router":
                    s = self.scale(index, "router")
                    if s > 0:
                        owner, _ = _owner(layer, slot.path)
                        handles.append(owner.register_forward_pre_hook(_input_hook(self.vector(index), s)))
                elif slot.role == "router_bias":
                    shifts = self.plan.router_shifts(index)
                    if shifts:
                        self._replace(
                            layer, index, slot, replaced, lambda w, shifts=shifts: _shifted(w, shifts)
                        )
            yield
        finally:
            for handle in handles:
                handle.remove()
            for owner, attr, original in reversed(replaced):
                getattr(owner, attr).data = original

    def _writer(
        self, layer, index: int, slot: Slot, bias_edited: dict, handles: list, replaced: list
    ) -> None:
        s = self.scale(index, slot.role)
        if s == 0.0:
            return
        r = self.vector(index)
        owner, _ = _owner(layer, slot.path)
        module_path = slot.path.rpartition(".")[0]
        fp8 = self.fp8.get((slot.role, index))
        if self.plan.method == "norm_preserving" or fp8 is not None:
            axis = slot.residual_axis
            edit = norm_preserving_ if self.plan.method == "norm_preserving" else project_out_

            def edited(w: torch.Tensor) -> torch.Tensor:
                edit(w, r.to(w.device), s, axis)
                if fp8 is not None:  # what the engine writes: the edit requantized with fresh scales
                    q, scale = quantize(w, *fp8)
                    w.copy_(dequantize(q, scale, fp8[0]).reshape(w.shape))
                return w

            self._replace(layer, index, slot, replaced, edited)
            if module_path in bias_edited:  # biases get the plain edit
                self._replace(
                    layer,
                    index,
                    bias_edited[module_path],
                    replaced,
                    lambda w: project_out_(w, r.to(w.device), s, 0),
                )
            return
        bias = (
            getattr(owner, "bias", None) if isinstance(getattr(owner, "bias", None), torch.Tensor) else None
        )
        if module_path in bias_edited:
            bias = None  # edited with the same scale: the whole output is projected
        handles.append(owner.register_forward_hook(_output_hook(r, s, bias)))

    def _replace(self, layer, index: int, slot: Slot, replaced: list, edit) -> None:
        """Replace a parameter or buffer by its edited copy: float32, edited, rounded once to the
        checkpoint's storage dtype, then back to the loaded dtype."""
        owner, attr = _owner(layer, slot.path)
        tensor = getattr(owner, attr)
        original = tensor.data
        work = original.detach().to(torch.float32).clone().contiguous()
        edit(work)
        stored = TORCH_DTYPES.get(self.storage.get((slot.role, index), ""), original.dtype)
        if (slot.role, index) in self.fp8:
            stored = torch.float32  # already the dequantized FP8 values
        tensor.data = work.to(stored).to(original.dtype)
        replaced.append((owner, attr, original))

    # ---------------------------------------------------------------- a whole loaded model

    @contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        """Within the block, a loaded transformers causal LM (model.model.embed_tokens and
        model.model.layers) computes what the edited checkpoint computes."""
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        with ExitStack() as stack:
            if self.embed_scale() > 0:
                handle = base.embed_tokens.register_forward_hook(lambda _m, _i, out: self.embedded(out))
                stack.callback(handle.remove)
            for index, layer in enumerate(decoder_layers(model)):
                stack.enter_context(self.on_layer(index, layer))
            yield


class DirectionEdit:
    """One direction removed from every write into the residual stream, at scale 1: the plan of every
    writer (embedding, attention, MLP, experts, with their biases) at scale 1 on every layer, which is
    what selection scores each candidate direction with.

    The residual stream is the sum of the embedding output and of every attention and MLP output (for
    MoE layers: routed experts plus shared expert), so projecting those module outputs is exactly what
    orthogonalising the embedding, o_proj, down_proj and every expert's down_proj does to the weights,
    without a family profile. (Projecting whole decoder-layer outputs would not be: inside a layer the
    MLP would still read the direction its attention just wrote.) Routers, which read the normed stream,
    are left alone.

    `direction`: one direction [H], or the orthonormal rows [k, H] of a subspace (`Directions.basis`),
    all removed together: `y - (y Q^T) Q`. One row is the single direction, computed as before."""

    def __init__(self, direction: torch.Tensor):
        rows = direction.detach().float()
        if rows.dim() == 2 and rows.shape[0] > 1:
            self.unit = rows  # orthonormal rows, as the directions file holds them
        else:
            unit = rows.flatten()
            self.unit = unit / unit.norm()
        self._hook = _output_hook(self.unit, 1.0, None)  # a basis: y - (y Q^T) Q (`_removed`)

    def embedded(self, hidden: torch.Tensor) -> torch.Tensor:
        return _project(hidden, self.unit, 1.0)

    @contextmanager
    def on_layer(self, index: int, layer: torch.nn.Module) -> Iterator[None]:
        hook = self._hook
        handles = [layer.self_attn.register_forward_hook(hook), layer.mlp.register_forward_hook(hook)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        with ExitStack() as stack:
            handle = base.embed_tokens.register_forward_hook(self._hook)
            stack.callback(handle.remove)
            for index, layer in enumerate(decoder_layers(model)):
                stack.enter_context(self.on_layer(index, layer))
            yield


def fp8_blocks(inventory: Any) -> dict[tuple[str, int], tuple[tuple[int, int], torch.dtype]]:
    """(role, layer) -> (block, scale dtype) of the weights the checkpoint stores in FP8 (the first one
    found: a layer's experts share their format)."""
    out: dict[tuple[str, int], tuple[tuple[int, int], torch.dtype]] = {}
    for name, (scale_name, block) in inventory.fp8.items():
        t = inventory.tensors[name]
        if t.role is not None and t.layer is not None:
            scale_dtype = TORCH_DTYPES.get(inventory.tensors[scale_name].dtype, torch.float32)
            out.setdefault((t.role, t.layer), (tuple(block), scale_dtype))
    return out


def storage_dtypes(inventory: Any) -> dict[tuple[str, int], str]:
    """(role, layer) -> the dtype the checkpoint stores those tensors in (the first one found)."""
    out: dict[tuple[str, int], str] = {}
    for t in inventory.tensors.values():
        if t.role is not None and t.layer is not None:
            out.setdefault((t.role, t.layer), t.dtype)
    return out


def _project(hidden: torch.Tensor, r: torch.Tensor, s: float) -> torch.Tensor:
    """`hidden - s (hidden . r) r` for a unit vector r (a basis Q [k, H]: `hidden - s Q^T (Q hidden)`),
    in the hidden states' dtype and device (at s = 1 the product by s is exact: the same numbers as
    without it)."""
    return _removed(hidden, hidden, r, s)


def _removed(y: torch.Tensor, written: torch.Tensor, r: torch.Tensor, s: float) -> torch.Tensor:
    """`y - s r (r . written)`, or with a basis Q [k, H] `y - s Q^T (Q written)`, in y's dtype and device."""
    unit = r.to(device=y.device, dtype=y.dtype)
    if unit.dim() == 1:
        return y - s * (written @ unit).unsqueeze(-1) * unit
    return y - s * ((written @ unit.T) @ unit)


def _output_hook(r: torch.Tensor, s: float, bias: torch.Tensor | None):
    """y -> y - s r (r . (y - b)): the output of W' x + b with W' = W - s r r^T W (a basis Q: W' = W - s
    Q^T Q W)."""

    def hook(_module, _inputs, output):
        y = output[0] if isinstance(output, tuple) else output
        written = y if bias is None else y - bias.to(y.dtype)
        edited = _removed(y, written, r, s)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    return hook


def _input_hook(r: torch.Tensor, s: float):
    """x -> x - s (x . r) r: what a reader with W' = W - s (W r) r^T reads (a basis Q: x - s Q^T (Q x))."""

    def hook(_module, args, kwargs=None):
        if not args:
            raise AbliterateError("a router was called without positional input: cannot apply its edit")
        return (_project(args[0], r, s), *args[1:])

    return hook


def _shifted(w: torch.Tensor, shifts: dict[int, float]) -> torch.Tensor:
    values = torch.zeros_like(w)
    for expert, value in shifts.items():
        values[expert] = value
    return w.add_(values)
