"""The ablation plan: which tensors to edit, with which direction, how strongly, by which method.

One frozen, validated object, serialisable to a dict/YAML that round-trips exactly. Specs as a
user types them (CLI, YAML, Prefect parameters) are parsed by `build_plan` against the model's
structure; the plan itself always holds explicit layer indices and one scale per layer.

Layer spec: `all`, a range `10-30` (inclusive), a list `5,7,9-12`, or any mix. Indices are exact
decoder layer numbers 0..L-1 (layer 1 is layer 1, never 10-19); out of range is an error.

Scale spec: a constant (`1.0`); a comma list with one value per target layer (`1,1,0.5`); or a
Gaussian kernel over layer indices `gauss:center=20,width=5,peak=1.0[,floor=0.0]`, giving
`floor + (peak - floor) * exp(-((i - center) / width)^2 / 2)`. Every scale lies in [0, 2]:
0 leaves a tensor unchanged, 1 removes the direction completely, values above 1 push the
weights past zero along the direction (2 reflects it); larger values only damage the model.

Direction: `auto` (default: the one position selection chose, as the directions file records it,
used for every layer; plans written before this name read `selected` the same way), `own` (layer i uses the direction at residual position i, the input of
layer i; the embedding uses position 0), or an explicit position number.

Method: `plain` (W' = W - s r r^T W), `norm_preserving` (writers keep each residual-space
column's norm), `projected` (the direction is first made orthogonal to the harmless mean at
the tensor's own layer; needs a directions file with means).

Rank: `rank` directions removed at each edited layer (default 1: the direction). Rank k > 1 removes
the first k orthonormal rows Q [k, H] of the directions file's `subspace` (`pca`, `clusters` or
`categories`) at the plan's direction position, W' = W - s Q^T (Q W), with every method. Written
only when k > 1, so a rank-1 plan keeps its identity (sha256) and its output's keys.

MTP layers (GLM-4.5 stores one after the decoder layers; transformers drops it on load, but
inference servers use it for speculative decoding): default `ablate`. The MTP layer reads the
last decoder layer's output, so it sees the residual stream the last decoder layer writes;
left unedited it would keep writing the refusal direction into its draft tokens and the
drafts would disagree with the ablated model (fewer accepted tokens, refusals proposed again).
`ablate` treats each MTP layer like the last decoder layer: it is edited when the last decoder
layer is a target, with that layer's scale; under `own` it uses the direction at its own index
(position L, the last decoder layer's output, which is what it reads). `skip` leaves it as is.

Embedding rows (`embed` target) use a scale of their own (constant: the constant; list: the
first value, i.e. the first target layer's; kernel: the kernel at layer 0).

Per-role scales (`role_scales`, what `abliterate search` writes): a role may carry its own scale
per layer (e.g. a kernel for attention outputs and another for routed experts); `scale` then
holds the scale of every role without its own (a search sets every target's, and `scale` holds
each layer's largest, for people). A role's own scale of 0 leaves that role's tensors of that
layer out of the plan: they are not edited. A direction position may be a fraction: position
2.25 is the direction between positions 2 and 3, `normalize(0.75 r_2 + 0.25 r_3)`.

Router correction bias (`router_bias`): per layer and expert, a value added to the router's
`e_score_correction_bias` (GLM-4.5: the bias that decides which experts are chosen, not their
gate weights). Lowering it keeps an expert from being chosen; nothing is projected. `origin`
records where the plan came from (a search trial's study, number, parameters and objectives);
like the specs as typed, it is not part of the plan's identity.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from abliterate.config import Ablation
from abliterate.errors import AbliterateError
from abliterate.vocabulary import (
    ABLATION_METHODS,
    BIAS_OF,
    DEFAULT_TARGETS,
    MTP_MODES,
    SUBSPACE_METHODS,
    TARGET_ROLES,
    WEIGHT_OF,
)

METHODS = ABLATION_METHODS
MAX_SCALE = 2.0
PLAN_FORMAT = 1
DEFAULT_SUBSPACE = Ablation.model_fields["subspace"].default


@dataclass(frozen=True)
class AblationPlan:
    layers: tuple[int, ...]  # every edited layer, MTP layers included, sorted
    scales: tuple[float, ...]  # one per entry of `layers`
    num_layers: int  # decoder layers of the model (MTP layers have indices >= this)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    direction_position: str | int | float = "auto"  # "auto" | "own" | position number (or a fraction)
    selected_position: int | None = None  # resolved from the directions file
    method: str = "plain"
    mtp: str = "ablate"
    biases: bool = False
    embed_scale: float = 1.0
    layer_spec: str = "all"  # as the user wrote them, for the record
    scale_spec: str = "1.0"
    format: int = field(default=PLAN_FORMAT)
    # per role, one scale per entry of `layers` (overrides `scales` for that role; 0: not edited)
    role_scales: tuple[tuple[str, tuple[float, ...]], ...] = ()
    # per layer, (expert, value added to the router's e_score_correction_bias) pairs
    router_bias: tuple[tuple[int, tuple[tuple[int, float], ...]], ...] = ()
    rank: int = 1  # directions removed at each edited layer (> 1: the file's subspace)
    subspace: str = DEFAULT_SUBSPACE  # which of the file's subspaces (used when rank > 1)
    origin: dict[str, Any] | None = field(default=None, compare=False, hash=False)  # for the record only

    def __post_init__(self) -> None:
        if list(self.layers) != sorted(set(self.layers)) or any(i < 0 for i in self.layers):
            raise AbliterateError(f"plan layers must be distinct, sorted, non-negative: {list(self.layers)}")
        if not self.layers and "embed" not in self.targets and not self.router_bias:
            raise AbliterateError("the plan targets no layer: give at least one layer (e.g. --layers all)")
        if len(self.scales) != len(self.layers):
            raise AbliterateError(f"plan has {len(self.layers)} layers but {len(self.scales)} scales")
        for layer, value in zip(self.layers, self.scales, strict=True):
            _check_scale(value, f"layer {layer}")
        _check_scale(self.embed_scale, "the embedding")
        if not self.targets:
            raise AbliterateError(f"the plan has no target roles: choose from {', '.join(TARGET_ROLES)}")
        for role in self.targets:
            _check_role(role)
        if len(set(self.targets)) != len(self.targets):
            raise AbliterateError(f"target roles repeat: {list(self.targets)}")
        if self.method not in METHODS:
            raise AbliterateError(f"unknown method {self.method!r}: choose {', '.join(METHODS)}")
        if self.mtp not in MTP_MODES:
            raise AbliterateError(f"unknown MTP mode {self.mtp!r}: choose {', '.join(MTP_MODES)}")
        if not _count(self.rank) or self.rank < 1:
            raise AbliterateError(
                f"rank {self.rank!r} is invalid: give the number of directions removed at each layer, 1 or more"
            )
        if self.subspace not in SUBSPACE_METHODS:
            raise AbliterateError(f"unknown subspace {self.subspace!r}: choose {', '.join(SUBSPACE_METHODS)}")
        if self.rank == 1:  # one direction is the difference of means whichever subspace: one plan
            object.__setattr__(self, "subspace", DEFAULT_SUBSPACE)
        pos = self.direction_position
        if pos == "selected":  # the word of plans written before `auto` named it everywhere
            object.__setattr__(self, "direction_position", "auto")
            pos = "auto"
        if isinstance(pos, float) and math.isfinite(pos) and pos.is_integer():
            object.__setattr__(self, "direction_position", int(pos))  # 3.0 is position 3
            pos = self.direction_position
        number = (
            isinstance(pos, int | float) and not isinstance(pos, bool) and math.isfinite(pos) and pos >= 0
        )
        if not (pos in ("auto", "own") or number):
            raise AbliterateError(
                f"direction position {pos!r} is invalid: use `auto`, `own` or a position number >= 0"
            )
        self._check_role_scales()
        self._check_router_bias()
        if self.format != PLAN_FORMAT:
            raise AbliterateError(
                f"plan format {self.format} is not supported (this version reads {PLAN_FORMAT})"
            )

    def _check_role_scales(self) -> None:
        seen = set()
        for role, values in self.role_scales:
            if role not in self.targets or role == "embed":
                raise AbliterateError(
                    f"the plan gives role {role!r} its own scales but does not target it: its targets are "
                    f"{list(self.targets)} (the embedding has embed_scale)"
                )
            if role in seen:
                raise AbliterateError(f"the plan gives role {role!r} its own scales twice")
            seen.add(role)
            if len(values) != len(self.layers):
                raise AbliterateError(
                    f"role {role!r} has {len(values)} scales for the plan's {len(self.layers)} layers"
                )
            for layer, value in zip(self.layers, values, strict=True):
                _check_scale(value, f"role {role} of layer {layer}")

    def _check_router_bias(self) -> None:
        layers = [layer for layer, _ in self.router_bias]
        if layers != sorted(set(layers)) or any(not _count(i) for i in layers):
            raise AbliterateError(f"router_bias layers must be distinct, sorted layer numbers: {layers}")
        for layer, shifts in self.router_bias:
            experts = [e for e, _ in shifts]
            if not shifts or experts != sorted(set(experts)) or any(not _count(e) for e in experts):
                raise AbliterateError(
                    f"router_bias of layer {layer}: experts must be distinct, sorted numbers: {experts}"
                )
            for expert, value in shifts:
                if not _number_value(value) or not math.isfinite(value):
                    raise AbliterateError(
                        f"router_bias of layer {layer}, expert {expert}: {value!r} is not a finite number"
                    )

    def scale_for(self, layer: int | None, role: str | None = None) -> float:
        """Scale of a tensor of `layer` (None: the embedding, which is not in a layer) and `role` (its
        own scales when the plan gives it some; an output-side bias follows its weight)."""
        if layer is None:
            return self.embed_scale
        own = dict(self.role_scales).get(WEIGHT_OF.get(role, role)) if role else None
        return (own if own is not None else self.scales)[self.layers.index(layer)]

    def router_shifts(self, layer: int | None) -> dict[int, float]:
        """expert -> value added to `layer`'s router correction bias (empty: not edited)."""
        return dict(dict(self.router_bias).get(layer, ()))

    def edited_layers(self) -> tuple[int, ...]:
        """Every layer with an edited tensor: the plan's layers and those whose router bias it shifts."""
        return tuple(sorted(set(self.layers) | {layer for layer, _ in self.router_bias}))

    def position_for(self, layer: int | None) -> int | float:
        """Residual position whose direction edits tensors of `layer` (None: the embedding)."""
        if self.direction_position == "own":
            return 0 if layer is None else layer
        if self.direction_position == "auto":
            if self.selected_position is None:
                raise AbliterateError(
                    "the plan uses the selected direction but records no selected position: "
                    "build it with the directions file, or pass an explicit direction position"
                )
            return self.selected_position
        return self.direction_position  # a number: a position, or a fraction between two

    def roles(self) -> tuple[str, ...]:
        """Every role the plan edits: the targets, plus their output-side biases when `biases` is on,
        plus `router_bias` when it shifts a router's correction bias."""
        extra = tuple(BIAS_OF[r] for r in self.targets if self.biases and r in BIAS_OF)
        return self.targets + extra + (("router_bias",) if self.router_bias else ())

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": self.format,
            "layers": list(self.layers),
            "scale": {str(layer): value for layer, value in zip(self.layers, self.scales, strict=True)},
            "embed_scale": self.embed_scale,
            "num_layers": self.num_layers,
            "targets": list(self.targets),
            "direction_position": self.direction_position,
            "selected_position": self.selected_position,
            "method": self.method,
            "mtp": self.mtp,
            "biases": self.biases,
            "layer_spec": self.layer_spec,
            "scale_spec": self.scale_spec,
        }
        # Written only when used, so that a plan without them keeps its identity (sha256).
        if self.rank > 1:
            data["rank"] = self.rank
            data["subspace"] = self.subspace
        if self.role_scales:
            data["role_scales"] = {
                role: {str(layer): v for layer, v in zip(self.layers, values, strict=True)}
                for role, values in self.role_scales
            }
        if self.router_bias:
            data["router_bias"] = {
                str(layer): {str(e): v for e, v in shifts} for layer, shifts in self.router_bias
            }
        if self.origin is not None:
            data["origin"] = self.origin
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the ablation plan") -> AblationPlan:
        """The plan a mapping describes (a plan file, a manifest), every value checked for its type:
        a string where a list or a boolean belongs is an error, never read as something else
        (`biases: "false"` is not true). Errors name `source`, the key and the fix."""
        if not isinstance(data, dict):
            raise AbliterateError(f"{source} must be a mapping of plan keys, got {_kind(data)}")
        known = ({f.name for f in fields(cls)} - {"scales"}) | {"scale"}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise AbliterateError(f"{source}: unknown ablation plan keys {unknown}; known: {sorted(known)}")
        missing = [k for k in ("layers", "scale", "num_layers") if k not in data]
        if missing:
            raise AbliterateError(
                f"{source} lacks `{missing[0]}`: an ablation plan needs layers, scale and num_layers"
            )

        def bad(key: str, value: Any, want: str, example: str) -> AbliterateError:
            return AbliterateError(
                f"{source}: `{key}` is {value!r} ({_kind(value)}); it must be {want}: write e.g. {example}"
            )

        layers = data["layers"]
        if not isinstance(layers, list) or not all(_count(i) for i in layers):
            raise bad("layers", layers, "a list of layer numbers", "layers: [1, 2, 3]")
        scale = data["scale"]
        if not isinstance(scale, dict) or not all(
            _layer_key(k) is not None and _number_value(v) for k, v in scale.items()
        ):
            raise bad("scale", scale, "a mapping of layer number to scale", "scale: {'1': 1.0, '2': 0.5}")
        scales = {_layer_key(k): float(v) for k, v in scale.items()}
        if len(scales) != len(scale):
            raise AbliterateError(f"{source}: `scale` names a layer twice: {scale!r}")
        if sorted(scales) != sorted(layers):
            raise AbliterateError(
                f"{source}: `scale` keys {sorted(scales)} differ from `layers` {list(layers)}"
            )
        num_layers = data["num_layers"]
        if not _count(num_layers) or num_layers < 1:
            raise bad(
                "num_layers",
                num_layers,
                "the model's number of decoder layers (a whole number >= 1)",
                "num_layers: 46",
            )
        rest: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("layers", "scale", "num_layers"):
                continue
            if key == "targets":
                if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                    raise bad(key, value, "a list of weight roles", "targets: [attn_out, expert_down]")
                value = tuple(value)
            elif key in ("biases",):
                if not isinstance(value, bool):
                    raise bad(key, value, "true or false", f"{key}: false")
            elif key in ("method", "mtp", "subspace"):
                if not isinstance(value, str):
                    example = {"method": "plain", "mtp": "ablate", "subspace": "pca"}[key]
                    raise bad(key, value, "a string", f"{key}: {example}")
            elif key == "rank":
                if not _count(value) or value < 1:
                    raise bad(key, value, "a whole number >= 1 (directions removed at each layer)", "rank: 2")
            elif key == "embed_scale":
                if not _number_value(value):
                    raise bad(key, value, "a number in [0, 2]", "embed_scale: 1.0")
                value = float(value)
            elif key == "selected_position":
                if value is not None and not _count(value):
                    raise bad(key, value, "a residual position number or null", "selected_position: 12")
            elif key == "direction_position":
                if not (
                    value in ("auto", "selected", "own")
                    or _count(value)
                    or (_number_value(value) and value >= 0)
                ):
                    raise bad(
                        key,
                        value,
                        "a direction position: auto, own or a residual position number",
                        "direction_position: auto",
                    )
            elif key == "role_scales":
                value = _read_role_scales(value, list(layers), bad)
            elif key == "router_bias":
                value = _read_router_bias(value, bad)
            elif key == "origin":
                if value is not None and not isinstance(value, dict):
                    raise bad(key, value, "a mapping (where the plan came from)", "origin: {search: ...}")
            elif key in ("layer_spec", "scale_spec"):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    value = str(value)
                if not isinstance(value, str):
                    raise bad(key, value, "text (the spec as typed)", f"{key}: '1.0'")
            elif key == "format":
                if not _count(value):
                    raise bad(key, value, f"the plan format number ({PLAN_FORMAT})", f"format: {PLAN_FORMAT}")
            rest[key] = value
        try:
            return cls(
                layers=tuple(layers), scales=tuple(scales[i] for i in layers), num_layers=num_layers, **rest
            )
        except AbliterateError as exc:
            raise AbliterateError(f"{source}: {exc}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    @classmethod
    def from_yaml(cls, text: str, source: str = "the ablation plan") -> AblationPlan:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise AbliterateError(f"{source} is not valid YAML: {detail}") from exc
        except RecursionError:
            raise AbliterateError(f"{source} nests too deeply to be a plan") from None
        return cls.from_dict(data, source)

    def sha256(self) -> str:
        """Identity of what the plan does (the specs as typed are left out: only their result counts)."""
        data = self.to_dict()
        del data["layer_spec"], data["scale_spec"]
        data.pop("origin", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _read_role_scales(value: Any, layers: list, bad) -> tuple[tuple[str, tuple[float, ...]], ...]:
    example = "role_scales: {attn_out: {'1': 1.0, '2': 0.5}}"
    if not isinstance(value, dict) or not all(
        isinstance(role, str) and isinstance(v, dict) for role, v in value.items()
    ):
        raise bad("role_scales", value, "a mapping of role to a mapping of layer number to scale", example)
    out = []
    for role, per_layer in value.items():
        scales = {_layer_key(k): v for k, v in per_layer.items()}
        if (
            None in scales
            or not all(_number_value(v) for v in scales.values())
            or sorted(scales) != sorted(layers)
        ):
            raise bad(
                f"role_scales.{role}", per_layer, f"a scale for each of the plan's layers {layers}", example
            )
        out.append((role, tuple(float(scales[i]) for i in layers)))
    return tuple(out)


def _read_router_bias(value: Any, bad) -> tuple[tuple[int, tuple[tuple[int, float], ...]], ...]:
    example = "router_bias: {'3': {'5': -1.0}}"
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise bad(
            "router_bias",
            value,
            "a mapping of layer number to a mapping of expert number to a value",
            example,
        )
    out = []
    for layer_key, shifts in value.items():
        layer = _layer_key(layer_key)
        experts = {_layer_key(e): v for e, v in shifts.items()}
        if layer is None or None in experts or not all(_number_value(v) for v in experts.values()):
            raise bad(f"router_bias.{layer_key}", shifts, "a mapping of expert number to a value", example)
        out.append((layer, tuple((e, float(experts[e])) for e in sorted(experts))))
    return tuple(sorted(out))


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        str: "a string",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _count(value: Any) -> bool:
    """A whole number >= 0 (YAML's `true` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number_value(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _layer_key(key: Any) -> int | None:
    """A `scale` key: a layer number, written as a number or as digits."""
    if _count(key):
        return key
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return None


def _check_role(role: str) -> None:
    if role not in TARGET_ROLES:
        raise AbliterateError(
            f"unknown or unsupported target role {role!r}: choose from {', '.join(TARGET_ROLES)} "
            "(output-side biases follow their weight with --biases)"
        )


def _check_scale(value: float, where: str) -> None:
    if not isinstance(value, int | float) or math.isnan(value) or not 0.0 <= value <= MAX_SCALE:
        raise AbliterateError(
            f"scale {value!r} for {where} is outside [0, {MAX_SCALE}]: 0 leaves weights unchanged, 1 removes "
            f"the direction, up to {MAX_SCALE} overshoots it; other values would damage the model"
        )


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """`all`, `10-30`, `5,7,9-12` -> sorted distinct decoder layer indices, each checked against 0..L-1."""
    text = str(spec).strip().lower()
    if text == "all":
        return tuple(range(num_layers))
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise AbliterateError(
                f"layer spec {spec!r}: cannot read {part!r}; write `all`, `N`, `A-B` or a comma list like `5,7,9-12`"
            )
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise AbliterateError(
                f"layer spec {spec!r}: range {part!r} runs backwards; write it as {high}-{low}"
            )
        if high >= num_layers:
            raise AbliterateError(
                f"layer spec {spec!r}: layer {high} is out of range, the model has decoder layers 0..{num_layers - 1} "
                "(MTP layers are chosen with --mtp)"
            )
        chosen.update(range(low, high + 1))
    return tuple(sorted(chosen))


def parse_scale(spec: str | float, layers: tuple[int, ...]) -> tuple[tuple[float, ...], float]:
    """Scale spec -> (one scale per layer in `layers`, the embedding's scale). See the module docstring."""
    text = str(spec).strip()
    if text.startswith("gauss:"):
        params = _kernel_params(text, {"center", "width", "peak", "floor"}, {"center", "width"})
        peak, floor = params.get("peak", 1.0), params.get("floor", 0.0)
        if params["width"] <= 0:
            raise AbliterateError(f"scale spec {text!r}: width must be positive")

        def kernel(i: float) -> float:
            z = (i - params["center"]) / params["width"]  # may be inf for a tiny width: exp(-inf) is 0
            return floor + (peak - floor) * math.exp(-0.5 * z * z)

        values, embed = tuple(kernel(i) for i in layers), kernel(0)
    elif "," in text:
        values = tuple(_number(p, text) for p in text.split(","))
        if len(values) != len(layers):
            raise AbliterateError(
                f"scale spec {text!r} lists {len(values)} values but the plan targets {len(layers)} layers "
                f"({_short(layers)}): give one value per target layer, a constant or a kernel"
            )
        embed = values[0]
    else:
        value = _number(text, text)
        values, embed = tuple(value for _ in layers), value
    for layer, value in zip(layers, values, strict=True):
        _check_scale(value, f"layer {layer} (scale spec {text!r})")
    return values, embed


def _kernel_params(text: str, allowed: set[str], required: set[str]) -> dict[str, float]:
    params: dict[str, float] = {}
    for part in text.split(":", 1)[1].split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise AbliterateError(
                f"scale spec {text!r}: cannot read {part!r}; write e.g. gauss:center=20,width=5,peak=1.0,floor=0"
            )
        params[key] = _number(value, text)
    missing = required - set(params)
    if missing:
        raise AbliterateError(f"scale spec {text!r} lacks {', '.join(sorted(missing))}")
    return params


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AbliterateError(
            f"scale spec {spec!r}: {text.strip()!r} is not a number; write a constant (1.0), one value per "
            "target layer (1,1,0.5) or a kernel (gauss:center=20,width=5)"
        ) from None
    if not math.isfinite(value):
        raise AbliterateError(f"scale spec {spec!r}: {text.strip()!r} is not finite")
    return value


def format_layers(layers) -> str:
    """The inverse of a layer spec, for people: {1, 2, 3, 7} -> '1-3, 7'."""
    out: list[str] = []
    for i in sorted(layers):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out) or "none"


def _short(layers: tuple[int, ...]) -> str:
    return ",".join(map(str, layers[:8])) + (",..." if len(layers) > 8 else "")


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Comma list of roles; `default` stands for the default set (e.g. `default,embed`)."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    roles: list[str] = []
    for part in (p.strip() for p in parts):
        for role in DEFAULT_TARGETS if part == "default" else (part,):
            _check_role(role)
            if role not in roles:
                roles.append(role)
    if not roles:
        raise AbliterateError(f"the target set {spec!r} is empty: choose from {', '.join(TARGET_ROLES)}")
    return tuple(roles)


def parse_position(spec: str | int | float) -> str | int | float:
    """`auto` (the position selection chose), `own`, a position number, or a fraction between two
    positions (2.25); `selected`, the word of older plans, is read as `auto`."""
    text = str(spec).strip().lower()
    if text in ("selected", "auto"):
        return "auto"
    if text == "own":
        return text
    if text.isdigit():
        return int(text)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise AbliterateError(f"direction position {spec!r}: use `auto`, `own` or a position number")
    return int(value) if value.is_integer() else value


def build_plan(
    num_layers: int,
    mtp_layers: Sequence[int],
    ablation: Ablation,
    direction_position: str | int | float,
    selected_position: int | None = None,
    role_scales: dict[str, str] | None = None,
    router_bias: dict[int, dict[int, float]] | None = None,
    origin: dict[str, Any] | None = None,
) -> AblationPlan:
    """The plan the `ablation` settings describe for a model with `num_layers` decoder layers and the
    given MTP layer indices, its specs parsed (see the module docstring).

    `direction_position`: `auto` (the selected position), `own`, or a position;
    `role_scales`: role -> scale spec, each role's own scales; `router_bias`: layer -> expert -> value
    added to that router's correction bias; `origin`: the plan's record."""
    layers, scale, mtp = ablation.layers, ablation.scale, ablation.mtp
    decoder = parse_layers(layers, num_layers)
    values, embed_scale = parse_scale(scale, decoder)
    own = {role: parse_scale(spec, decoder)[0] for role, spec in (role_scales or {}).items()}
    if mtp not in MTP_MODES:
        raise AbliterateError(f"unknown MTP mode {mtp!r}: choose {', '.join(MTP_MODES)}")
    all_layers, all_scales = list(decoder), list(values)
    own_scales = {role: list(v) for role, v in own.items()}
    if mtp == "ablate" and decoder and decoder[-1] == num_layers - 1:
        for m in sorted(mtp_layers):
            all_layers.append(m)
            all_scales.append(values[-1])
            for role, v in own.items():
                own_scales[role].append(v[-1])
    shifts = tuple(
        (int(layer), tuple((int(e), float(v)) for e, v in sorted(experts.items())))
        for layer, experts in sorted((router_bias or {}).items())
        if experts
    )
    return AblationPlan(
        layers=tuple(all_layers),
        scales=tuple(all_scales),
        num_layers=num_layers,
        targets=parse_targets(ablation.targets),
        direction_position=parse_position(direction_position),
        selected_position=selected_position,
        method=ablation.ablation_method,
        mtp=mtp,
        rank=ablation.fixed_rank or 1,
        subspace=ablation.subspace,
        biases=ablation.biases,
        embed_scale=embed_scale,
        layer_spec=str(layers),
        scale_spec=str(scale),
        role_scales=tuple((role, tuple(v)) for role, v in own_scales.items()),
        router_bias=shifts,
        origin=origin,
    )
