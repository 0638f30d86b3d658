"""The search space: what a trial of the study may choose, and the ablation plan of its choice.

- the direction position: a float between the first and the last candidate position (selection's
  candidates: non-zero directions up to `floor(L (1 - skip_last_fraction))`); a fraction mixes the
  two neighbouring directions (`Directions.vector`);
- the ablation method: plain, norm_preserving, projected;
- one layer kernel per component group (attention outputs `attn_out`, dense MLPs `mlp_down`, routed
  experts `expert_down`, shared experts `shared_expert_down`, routers `router`): the Gaussian of the
  plan's scale specs, `floor + (peak - floor) exp(-((i - center) / width)^2 / 2)`, with the center in
  the group's layers, width in [0.5, L], peak in [0.5, 1.5] and floor a fraction of the peak; scales
  under MIN_SCALE become 0 (the tensor is left alone: so small an edit may round away entirely);
- optionally (`router_bias`) how many of the most refusal-specific experts (`abliterate.search.experts`)
  get their router correction bias lowered, and by how much (which changes only the choice of
  experts);
- when the directions file holds subspaces (`subspace.<method>` tensors): the rank, 1 to the largest
  K held, and the subspace method among those held; a rank above the method's K is that K, and at
  rank > 1 the direction position is rounded to the nearest whole position (a subspace is measured
  at whole positions). Rank 1 is the difference of means whatever the method.

`default_params` is `run`'s automatic choice in the space (every group at scale 1 on every layer,
the selected position, plain method, rank 1): trial 0 of a new study.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from abliterate.config import Ablation, Search, Selection
from abliterate.edit.matching import AblationInputs
from abliterate.edit.plan import AblationPlan, build_plan, parse_scale
from abliterate.errors import AbliterateError
from abliterate.vocabulary import ABLATION_METHODS, SEARCH_GROUPS, SUBSPACE_METHODS

MIN_SCALE = 0.05  # kernel scales below this are 0: the tensor is not edited
PEAK = (0.5, 1.5)
MIN_WIDTH = 0.5
SHIFT = (0.05, 1.0)  # how far the correction bias of a suppressed expert is lowered


@dataclass(frozen=True)
class SearchSpace:
    num_layers: int
    mtp_layers: tuple[int, ...]
    positions: tuple[float, float]  # direction position range
    groups: tuple[tuple[str, tuple[int, ...]], ...]  # searched roles, each with the layers that hold it
    methods: tuple[str, ...]
    experts: tuple[tuple[int, int], ...] = ()  # router_bias candidates, most refusal-specific first
    selected_position: int | None = None  # run's automatic choice
    subspaces: tuple[tuple[str, int], ...] = ()  # the file's subspaces: (method, directions K per position)

    @property
    def max_rank(self) -> int:
        return max((k for _, k in self.subspaces), default=1)

    def to_json(self) -> dict[str, Any]:
        """The space as JSON (part of the study's name): without subspaces, the keys of earlier versions,
        so their studies keep their names."""
        out = asdict(self)
        if not self.subspaces:
            del out["subspaces"]
        return out


def search_space(
    inputs: AblationInputs,
    search: Search,
    selection: Selection,
    experts: Sequence[tuple[int, int]] = (),
) -> SearchSpace:
    """The space for a model: the groups of `search.components` the checkpoint has, the candidate
    direction positions (`selection.skip_last_fraction`), and the experts the router_bias component
    may suppress (most specific first: `ExpertProfile.most_specific`; the first `search.router_experts`)."""
    components = search.components
    structure, directions = inputs.structure, inputs.directions
    L = structure.num_layers
    present: dict[str, set[int]] = {}
    for t in inputs.inventory.tensors.values():
        if t.role in SEARCH_GROUPS and t.layer is not None and t.layer < L:
            present.setdefault(t.role, set()).add(t.layer)
    groups = tuple((g, tuple(sorted(present[g]))) for g in SEARCH_GROUPS if g in components and g in present)
    if not groups:
        raise AbliterateError(f"the model holds none of the searched components {list(components)}")
    if directions.single:
        positions = (0.0, 0.0)
    else:
        last = int(L * (1.0 - selection.skip_last_fraction))
        defined = [
            p
            for p in range(directions.num_positions)
            if p <= last and float(directions.direction[p].norm()) > 0
        ]
        if not defined:
            raise AbliterateError(
                "no candidate position has a non-zero direction: the two prompt sets look identical"
            )
        positions = (float(defined[0]), float(defined[-1]))
    methods = tuple(
        m
        for m in ABLATION_METHODS
        if m in search.methods and (m != "projected" or directions.harmless_mean is not None)
    )
    if not methods:
        raise AbliterateError(
            "the projected method needs the harmless means, which the directions file lacks"
        )
    selected = 0 if directions.single else directions.selected_position
    held = tuple(
        (m, int(directions.subspaces[m].shape[1]))
        for m in SUBSPACE_METHODS
        if m in directions.subspaces and directions.subspaces[m].shape[1] > 1
    )
    return SearchSpace(
        L,
        tuple(structure.mtp_layers),
        positions,
        groups,
        methods,
        tuple(experts)[: search.router_experts] if "router_bias" in components else (),
        selected,
        held,
    )


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """The trial's parameters, drawn by its sampler (names as stored in the study)."""
    params: dict[str, Any] = {
        "direction_position": trial.suggest_float("direction_position", *space.positions)
    }
    params["method"] = trial.suggest_categorical("method", list(space.methods))
    for group, layers in space.groups:
        params[f"{group}.center"] = trial.suggest_float(
            f"{group}.center", float(layers[0]), float(layers[-1])
        )
        params[f"{group}.width"] = trial.suggest_float(
            f"{group}.width", MIN_WIDTH, float(max(space.num_layers, 1))
        )
        params[f"{group}.peak"] = trial.suggest_float(f"{group}.peak", *PEAK)
        params[f"{group}.floor"] = trial.suggest_float(f"{group}.floor", 0.0, 1.0)
    if space.experts:
        params["router_bias.experts"] = trial.suggest_int("router_bias.experts", 0, len(space.experts))
        params["router_bias.shift"] = trial.suggest_float("router_bias.shift", *SHIFT)
    if space.subspaces:
        params["rank"] = trial.suggest_int("rank", 1, space.max_rank)
        params["subspace"] = trial.suggest_categorical("subspace", [m for m, _ in space.subspaces])
    return params


def default_params(space: SearchSpace) -> dict[str, Any] | None:
    """`run`'s automatic choice in this space: every group at scale 1 on every layer, the selected
    direction, the plain method, no expert suppressed. None without a selected position."""
    if space.selected_position is None or "plain" not in space.methods:
        return None
    low, high = space.positions
    params: dict[str, Any] = {
        "direction_position": float(min(max(space.selected_position, low), high)),
        "method": "plain",
    }
    if params["direction_position"] != space.selected_position:
        return None
    for group, layers in space.groups:
        params.update(
            {
                f"{group}.center": float(layers[0] + layers[-1]) / 2,
                f"{group}.width": float(max(space.num_layers, 1)),
                f"{group}.peak": 1.0,
                f"{group}.floor": 1.0,
            }
        )
    if space.experts:
        params.update({"router_bias.experts": 0, "router_bias.shift": SHIFT[0]})
    if space.subspaces:
        params.update({"rank": 1, "subspace": space.subspaces[0][0]})
    return params


def kernel_spec(params: dict[str, Any], group: str) -> str:
    peak = params[f"{group}.peak"]
    return (
        f"gauss:center={params[f'{group}.center']:.6g},width={params[f'{group}.width']:.6g},"
        f"peak={peak:.6g},floor={peak * params[f'{group}.floor']:.6g}"
    )


def trial_rank(params: dict[str, Any], space: SearchSpace) -> tuple[int, str | None]:
    """The rank and subspace a trial's parameters give: rank 1 (no subspace) where the space has none;
    a rank above its method's K is that K."""
    if not space.subspaces or int(params.get("rank", 1)) <= 1:
        return 1, None
    method = str(params["subspace"])
    return min(int(params["rank"]), dict(space.subspaces)[method]), method


def plan_for(
    params: dict[str, Any], space: SearchSpace, origin: dict[str, Any] | None = None
) -> AblationPlan:
    """The ablation plan of a trial's parameters: per-role scales from each group's kernel (0 where the
    group has no tensor or the kernel is under MIN_SCALE), the layers where anything is edited."""
    layers_all = tuple(range(space.num_layers))
    scales: dict[str, list[float]] = {}
    for group, present in space.groups:
        values, _ = parse_scale(kernel_spec(params, group), layers_all)
        held = set(present)
        scales[group] = [round(v, 4) if i in held and v >= MIN_SCALE else 0.0 for i, v in enumerate(values)]
    layers = [i for i in layers_all if any(v[i] > 0 for v in scales.values())]
    shifts: dict[int, dict[int, float]] = {}
    count = int(params.get("router_bias.experts", 0))
    for layer, expert in space.experts[:count]:
        shifts.setdefault(layer, {})[expert] = -round(float(params["router_bias.shift"]), 4)
    targets = [g for g in scales if any(scales[g][i] > 0 for i in layers)]
    if not targets:
        raise AbliterateError("the trial's kernels edit no tensor (every scale is under the minimum)")

    def listed(values: list[float]) -> str:
        return ",".join(repr(values[i]) for i in layers)

    rank, subspace = trial_rank(params, space)
    ablation = Ablation(
        layers=",".join(map(str, layers)),
        scale=listed([max(scales[g][i] for g in targets) for i in layers_all]),
        targets=targets,
        ablation_method=params["method"],
        rank=rank,
        **({"subspace": subspace} if subspace else {}),
    )
    position = float(params["direction_position"])
    return build_plan(
        space.num_layers,
        space.mtp_layers,
        ablation,
        repr(float(round(position)) if rank > 1 else position),
        role_scales={g: listed(scales[g]) for g in targets},
        router_bias=shifts,
        origin=origin,
    )
