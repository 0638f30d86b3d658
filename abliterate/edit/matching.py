"""The plan against one model: resolved, matched to tensors, and given its direction vectors.

`plan.py` holds the plan as the user states it, independent of any checkpoint; this module
checks it against a model's structure and directions file (`resolve_plan`), lists the tensors it
edits (`plan_matches`, layer indices matched exactly, never by prefix) and gives each edited
layer its unit vector, or its basis of `plan.rank` orthonormal rows (`direction_for`). The engine, validation, the CLI and the flows all match
through here, so a dry run, an ablation and its validation agree on every tensor.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from abliterate.config import Ablation
from abliterate.edit.orthogonalize import projected_basis
from abliterate.edit.plan import AblationPlan, build_plan
from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import Directions
from abliterate.vocabulary import SUBSPACE_METHODS
from abliterate.vocabulary import WEIGHT_OF as BIAS_WEIGHT
from abliterate.weights.checkpoint import Inventory, TensorInfo
from abliterate.weights.dtypes import EDITABLE_DTYPES
from abliterate.weights.structure import Structure


@dataclass
class AblationInputs:
    """What a plan is resolved against: the checkpoint's inventory and structure, the directions."""

    inventory: Inventory
    structure: Structure
    directions: Directions
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Match:
    """One tensor the plan edits, with everything needed to edit it and to record it."""

    tensor: TensorInfo
    scale: float
    direction_position: int | float | None  # None: a router bias shift (no direction)
    side: str  # "writer" | "reader" | "embed" | "shift" (a value added: the router correction bias)
    method: str  # the method applied: routers are always edited plainly; "shift" for a bias shift
    shift: tuple[tuple[int, float], ...] = ()  # side "shift": (expert, value added) pairs
    scales: tuple[TensorInfo, tuple[int, int]] | None = None  # an FP8 weight: its scale tensor and block

    @property
    def experts(self) -> int:
        return self.tensor.shape[0] if self.tensor.fused_experts else 1

    def to_dict(self) -> dict[str, Any]:
        t = self.tensor
        extra = {"shift": {str(e): v for e, v in self.shift}} if self.side == "shift" else {}
        if self.scales is not None:  # FP8: requantized with fresh scales in this tensor
            extra.update(
                scale_tensor=self.scales[0].name, scale_shard=self.scales[0].shard, block=list(self.scales[1])
            )
        return {
            "name": t.name,
            "shard": t.shard,
            "role": t.role,
            "layer": t.layer,
            "expert": t.expert,
            "fused_experts": t.fused_experts,
            "scale": self.scale,
            "direction_position": self.direction_position,
            "side": self.side,
            "residual_axis": t.residual_axis,
            "method": self.method,
            **extra,
        }


def configured_plan(
    inputs: AblationInputs, ablation: Ablation, direction_position: str | int | float
) -> AblationPlan:
    """The plan the `ablation` settings and `direction_position` (`auto`, `own` or a position)
    describe, built for this model and resolved against its directions file. With rank `auto` at
    direction position `auto`, the rank and subspace selection chose (the file's `selection` record)
    are the plan's, recorded in its origin; an explicit rank is kept as given, 1 included."""
    s = inputs.structure
    chosen = inputs.directions.metadata.get("selection")
    rank = chosen.get("rank", 1) if isinstance(chosen, dict) else 1
    origin = None
    if direction_position == "auto" and ablation.rank == "auto" and rank != 1:
        subspace = chosen.get("subspace")  # type: ignore[union-attr]
        if (
            isinstance(rank, bool)
            or not isinstance(rank, int)
            or rank < 1
            or subspace not in SUBSPACE_METHODS
        ):
            raise AbliterateError(
                f"{inputs.directions.path} records the selected rank {rank!r} of subspace {subspace!r}: not a rank "
                f"of one of {', '.join(SUBSPACE_METHODS)}; re-measure, or pass --rank and --subspace"
            )
        ablation = ablation.model_copy(update={"rank": rank, "subspace": subspace})
        origin = {"selection": {"rank": rank, "subspace": subspace}}
    return resolve_plan(
        build_plan(s.num_layers, s.mtp_layers, ablation, direction_position, origin=origin), inputs
    )


def resolve_plan(plan: AblationPlan, inputs: AblationInputs) -> AblationPlan:
    """Check `plan` against the model and directions; fill in the selected position."""
    s, directions = inputs.structure, inputs.directions
    if plan.num_layers != s.num_layers:
        raise AbliterateError(
            f"the plan was made for {plan.num_layers} decoder layers, the model has {s.num_layers}"
        )
    bad = [i for i in plan.layers if i >= s.num_layers and i not in s.mtp_layers]
    if bad:
        raise AbliterateError(
            f"the plan targets layer {bad[0]}, which the model lacks (decoder layers 0..{s.num_layers - 1}, "
            f"MTP layers {s.mtp_layers or 'none'})"
        )
    if directions.single:
        if plan.direction_position not in ("auto", 0):
            raise AbliterateError(
                f"{directions.path} holds one direction for every layer: direction position "
                f"{plan.direction_position!r} cannot apply; use `auto`"
            )
        plan = _replace(plan, selected_position=0)
    elif plan.direction_position == "auto":
        if directions.selected_position is None:
            raise AbliterateError(
                f"{directions.path} records no selected position: pass --direction-layer N (a residual position) "
                "or `own`"
            )
        plan = _replace(plan, selected_position=directions.selected_position)
    if plan.direction_position == "own" and not directions.single:
        plan = _drop_zero_directions(plan, inputs)
    if plan.method == "projected" and directions.harmless_mean is None:
        raise AbliterateError(
            f"the projected method needs the harmless means, but {directions.path} holds only `direction`: "
            "use a directions file written by `abliterate measure`, or the plain method"
        )
    layers: list[int | None] = list(plan.layers) + ([None] if "embed" in plan.targets else [])
    for layer in layers:
        direction_for(plan, directions, layer)  # every vector the run will use must exist and be non-zero
    return plan


def _drop_zero_directions(plan: AblationPlan, inputs: AblationInputs) -> AblationPlan:
    """Under `own`, a layer whose position has no direction (e.g. position 0 when every prompt ends
    in the same token) has nothing to remove: it leaves the plan, with a warning."""
    direction = inputs.directions.direction
    zero = [i for i in plan.layers if i < len(direction) and float(direction[i].norm()) == 0.0]
    if not zero:
        return plan
    inputs.warnings.append(f"layers {zero} have a zero direction at their own position: they stay unedited")
    keep = [(i, s) for i, s in zip(plan.layers, plan.scales, strict=True) if i not in zero]
    changes: dict[str, Any] = {"layers": [i for i, _ in keep], "scale": {str(i): s for i, s in keep}}
    if plan.role_scales:
        changes["role_scales"] = {
            role: {k: v for k, v in values.items() if int(k) not in zero}
            for role, values in plan.to_dict()["role_scales"].items()
        }
    return _replace(plan, **changes)


def _replace(plan: AblationPlan, **changes: Any) -> AblationPlan:
    return AblationPlan.from_dict({**plan.to_dict(), **changes})


def vector_for(plan: AblationPlan, directions: Directions, match: Match) -> torch.Tensor:
    """What the engine edits a matched tensor with: the unit direction of its layer, or, for a router
    bias shift, the float32 values added to the bias (zero for every expert the plan leaves alone)."""
    if match.side != "shift":
        return direction_for(plan, directions, match.tensor.layer)
    values = torch.zeros(match.tensor.shape, dtype=torch.float32)
    for expert, value in match.shift:
        values[expert] = value
    return values


def direction_for(plan: AblationPlan, directions: Directions, layer: int | None) -> torch.Tensor:
    """What edits tensors of `layer` (None: the embedding): at rank 1 the unit float32 vector [H] (at a
    fractional direction position, the direction between its two neighbours: `Directions.vector`);
    at rank k > 1 the basis [k, H] of orthonormal rows of the plan's subspace (`Directions.basis`).
    The projected method makes it orthogonal to the harmless mean at the layer (`projected_basis`)."""
    position = 0 if directions.single else plan.position_for(layer)
    if plan.rank == 1:
        r = directions.vector(position)
    else:
        r = directions.basis(position, plan.rank, plan.subspace)
    if plan.method == "projected":
        mean_position = 0 if layer is None else layer
        if directions.harmless_mean is None or mean_position >= directions.num_positions:
            raise AbliterateError(f"no harmless mean at position {mean_position} for the projected method")
        r = projected_basis(r, directions.harmless_mean[mean_position], f" for layer {layer}")
    return r


def plan_matches(plan: AblationPlan, inventory: Inventory, structure: Structure | None = None) -> list[Match]:
    """Every tensor the plan edits, in inventory order (shard, then offset). Layers match exactly.
    A role's own scale of 0 leaves its tensor out; a router bias the plan shifts is a `shift` match."""
    roles = set(plan.roles())
    layers = set(plan.layers)
    own_scales = {role for role, _ in plan.role_scales}
    shifted = {layer for layer, _ in plan.router_bias}
    matches = []
    for t in inventory.tensors.values():
        if t.role not in roles:
            continue
        if t.role == "router_bias":
            if t.layer in shifted:
                matches.append(_shift_match(plan, t))
            continue
        # The embedding is the one edited tensor outside a layer. The MTP layer's own embedding is
        # not: it reaches the MTP residual stream only through enorm and eh_proj.
        if (t.layer is None) != (t.role == "embed") or (t.layer is not None and t.layer not in layers):
            continue
        if t.residual_axis is None:
            raise AbliterateError(f"{t.name} has role {t.role} but its profile gives no residual axis")
        if structure is not None and t.shape[t.residual_axis] != structure.hidden_size:
            raise AbliterateError(
                f"{t.name} has shape {list(t.shape)}: axis {t.residual_axis} should be the hidden size "
                f"{structure.hidden_size}"
            )
        fp8 = inventory.fp8.get(t.name)
        if t.dtype not in EDITABLE_DTYPES and fp8 is None:
            raise AbliterateError(
                f"{t.name} is stored as {t.dtype}; only {', '.join(EDITABLE_DTYPES)} can be edited"
            )
        side = "reader" if t.role == "router" else "embed" if t.role == "embed" else "writer"
        # norm preservation is defined for matrix columns: routers and biases get the plain edit
        plain_only = side == "reader" or t.role.endswith("_bias")
        method = "plain" if plain_only and plan.method == "norm_preserving" else plan.method
        scale = plan.scale_for(t.layer, t.role)
        if scale == 0.0 and t.layer is not None and BIAS_WEIGHT.get(t.role, t.role) in own_scales:
            continue
        scales = None if fp8 is None else (inventory.tensors[fp8[0]], fp8[1])
        matches.append(Match(t, scale, plan.position_for(t.layer), side, method, scales=scales))
    missing = shifted - {m.tensor.layer for m in matches if m.side == "shift"}
    if missing:
        raise AbliterateError(
            f"the plan shifts the router correction bias of layers {sorted(missing)}, which have no "
            f"e_score_correction_bias tensor in {inventory.model_dir}"
        )
    if not matches:
        raise AbliterateError(
            f"the plan matches no tensor: roles {', '.join(plan.roles())} do not exist in layers {plan.layer_spec} of "
            f"{inventory.model_dir}; choose other --targets or --layers (see `abliterate inventory`)"
        )
    return matches


def _shift_match(plan: AblationPlan, t: TensorInfo) -> Match:
    shifts = plan.router_shifts(t.layer)
    if len(t.shape) != 1 or any(e >= t.shape[0] for e in shifts):
        raise AbliterateError(
            f"the plan shifts experts {sorted(shifts)} of {t.name}, which has shape {list(t.shape)}: "
            "no such expert"
        )
    if t.dtype not in EDITABLE_DTYPES:
        raise AbliterateError(
            f"{t.name} is stored as {t.dtype}; only {', '.join(EDITABLE_DTYPES)} can be edited"
        )
    return Match(t, 1.0, None, "shift", "shift", tuple(sorted(shifts.items())))


def role_counts(matches: list[Match]) -> dict[str, int]:
    """Edited tensors per role; a fused expert tensor counts once per expert."""
    counts: Counter[str] = Counter()
    for m in matches:
        counts[m.tensor.role] += m.experts
    return dict(sorted(counts.items()))


def describe_matches(plan: AblationPlan, matches: list[Match]) -> str:
    """The dry-run listing: the plan, every matched tensor, counts per role and per layer."""
    lines = [
        "# ablation plan",
        plan.to_yaml().rstrip(),
        "",
        "# matched tensors: shard, name, role, layer, scale, position",
    ]
    for m in matches:
        t = m.tensor
        lines.append(f"{t.shard}\t{t.name}\t{t.role}\t{t.layer}\t{m.scale:g}\t{m.direction_position}")
    lines += ["", "# per role (fused expert tensors count once per expert)"]
    lines += [f"{role}\t{n}" for role, n in role_counts(matches).items()]
    per_layer: dict[Any, Counter[str]] = defaultdict(Counter)
    for m in matches:
        per_layer[m.tensor.layer][m.tensor.role] += m.experts
    lines += ["", "# per layer"]
    for layer in sorted(per_layer, key=lambda i: -1 if i is None else i):
        label = "embed" if layer is None else str(layer)
        lines.append(f"{label}\t" + " ".join(f"{r}={n}" for r, n in sorted(per_layer[layer].items())))
    lines.append(f"# total: {len(matches)} tensors, {sum(m.tensor.nbytes for m in matches)} bytes rewritten")
    return "\n".join(lines)
