"""Structure detection: config.json cross-checked against the inventory.

The result says which layers are dense or MoE, how many routed and shared experts each MoE
layer has, where the router and MTP layers are, and the role counts the ablation plan will
match. Any disagreement between config and tensors is an error naming the layer and tensor.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from abliterate.errors import AbliterateError
from abliterate.weights.checkpoint import Inventory, TensorInfo, known_families, read_config
from abliterate.weights.fp8 import uncovered
from abliterate.weights.profiles import PROFILES, Profile


@dataclass
class Structure:
    architecture: str
    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    dense_layers: list[int]
    moe_layers: list[int]
    mtp_layers: list[int]
    experts_per_layer: int
    shared_experts: int
    router_dtype: str | None
    router_bias: bool
    tied_embeddings: bool
    fused_experts: bool
    tensors: int
    bytes: int
    shards: int
    fingerprint: str
    roles: dict[str, int]  # main decoder, embeddings and head
    mtp_roles: dict[str, int]
    dtypes: dict[str, int]
    quantization: str | None = None  # kind of the first quantized tensor that cannot be edited
    fp8_weights: int = 0  # FP8 weights with their scales (fp8.py): ablated FP8 in, FP8 out
    unrecognised: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _moe_layers(config: dict, profile: Profile, num_layers: int) -> list[int]:
    """Which main decoder layers are MoE, by the family's config convention (`Profile.moe_layout`)."""
    if profile.moe_layout == "first_k_dense":
        first_dense = int(config.get("first_k_dense_replace") or 0)
        return list(range(first_dense, num_layers))
    if profile.moe_layout == "sparse_step":
        step = int(config.get("decoder_sparse_step") or 1)
        only_mlp = set(config.get("mlp_only_layers") or [])
        return [i for i in range(num_layers) if i not in only_mlp and (i + 1) % step == 0]
    return []


def detect_structure(inventory: Inventory) -> Structure:
    config = read_config(inventory.model_dir)
    if inventory.family is None:
        raise AbliterateError(
            f"unknown architecture {config.get('architectures')} (model_type {config.get('model_type')!r}) in "
            f"{inventory.model_dir}: supported families are {known_families()}; {_closest_family(inventory)}. "
            "If the model follows a family's layout, pass --family NAME, and --map 'REGEX=ROLE' (repeatable) "
            "for the tensors it names otherwise"
        )
    profile = PROFILES[inventory.family]
    for key in ("num_hidden_layers", "hidden_size"):
        if config.get(key) is None:
            raise AbliterateError(f"{inventory.model_dir / 'config.json'} lacks `{key}`")
    num_layers = int(config["num_hidden_layers"])
    hidden = int(config["hidden_size"])
    experts = int(next((config[k] for k in profile.experts_keys if config.get(k) is not None), 0))
    n_mtp = int(config.get(profile.mtp_key) or 0) if profile.mtp_key else 0
    n_shared = int(config.get(profile.shared_experts_key) or 0) if profile.shared_experts_key else 0
    moe_layers = _moe_layers(config, profile, num_layers) if experts else []
    dense_layers = [i for i in range(num_layers) if i not in set(moe_layers)]

    per_layer: dict[int, list[TensorInfo]] = defaultdict(list)
    for t in inventory.tensors.values():
        if t.layer is not None:
            per_layer[t.layer].append(t)
        _check_hidden(t, hidden)
    stored_mtp = sorted(i for i in per_layer if i >= num_layers)
    expected_mtp = list(range(num_layers, num_layers + n_mtp))
    extra = [i for i in stored_mtp if i not in expected_mtp]
    if extra:
        raise AbliterateError(
            f"tensors of layer {extra[0]} exist (e.g. {per_layer[extra[0]][0].name}) but config.json has "
            f"num_hidden_layers={num_layers} and {n_mtp} MTP layer(s): the config does not describe this checkpoint"
        )
    mtp_layers = stored_mtp  # a checkpoint may drop its MTP layer (transformers does on save)

    router_dtypes = set()
    for layer in range(num_layers):
        _check_layer(
            per_layer.get(layer, []), layer, layer in moe_layers, experts, n_shared, hidden, router_dtypes
        )
    for layer in mtp_layers:
        _check_layer(per_layer[layer], layer, experts > 0, experts, n_shared, hidden, router_dtypes)

    names = inventory.tensors
    if "model.embed_tokens.weight" not in names:
        raise AbliterateError("model.embed_tokens.weight is missing from the checkpoint")
    has_head = "lm_head.weight" in names
    tied_config = config.get("tie_word_embeddings")
    if tied_config is not None and bool(tied_config) == has_head:
        raise AbliterateError(
            f"config.json says tie_word_embeddings={tied_config} but lm_head.weight is "
            f"{'present' if has_head else 'absent'}: the config does not describe this checkpoint"
        )
    warnings = []
    scales = {scale for scale, _ in inventory.fp8.values()}  # FP8 scales: rewritten with their weight
    unrecognised = [name for name in inventory.unclassified() if name not in scales]
    if unrecognised:
        warnings.append(
            f"{len(unrecognised)} tensors match no {inventory.family} rule (e.g. {unrecognised[0]}); "
            "they are copied verbatim, never edited"
        )
    main_layers = set(range(num_layers))
    dtypes: dict[str, int] = defaultdict(int)
    for t in names.values():
        dtypes[t.dtype] += 1
    return Structure(
        architecture=(config.get("architectures") or ["?"])[0],
        family=inventory.family,
        model_type=str(config.get("model_type")),
        num_layers=num_layers,
        hidden_size=hidden,
        dense_layers=dense_layers,
        moe_layers=moe_layers,
        mtp_layers=mtp_layers,
        experts_per_layer=experts,
        shared_experts=n_shared,
        router_dtype=sorted(router_dtypes)[0] if router_dtypes else None,
        router_bias=any(t.role == "router_bias" for t in names.values()),
        tied_embeddings=not has_head,
        fused_experts=any(t.fused_experts for t in names.values()),
        tensors=len(names),
        bytes=inventory.total_bytes,
        shards=len(inventory.shards),
        fingerprint=inventory.fingerprint,
        roles=inventory.role_counts(main_layers),
        mtp_roles=inventory.role_counts(set(mtp_layers), include_unlayered=False),
        dtypes=dict(sorted(dtypes.items())),
        quantization=next(iter(uncovered(inventory.quantization, inventory.fp8).values()), None),
        fp8_weights=len(inventory.fp8),
        unrecognised=unrecognised,
        warnings=warnings,
    )


def _closest_family(inventory: Inventory) -> str:
    """Which family's rules recognise the most tensors, with the roles found and a tensor left over."""
    names = list(inventory.tensors)
    best: tuple[int, str, dict[str, int], list[str]] | None = None
    for profile in PROFILES.values():
        roles: dict[str, int] = defaultdict(int)
        missed = []
        for name in names:
            matched = profile.classify(name)
            if matched:
                roles[matched[0].role] += 1
            else:
                missed.append(name)
        if best is None or len(names) - len(missed) > best[0]:
            best = (len(names) - len(missed), profile.family, roles, missed)
    if best is None or best[0] == 0:
        return f"no family's rules recognise any of its {len(names)} tensors (e.g. {names[0] if names else 'none'})"
    found, family, roles, missed = best
    text = f"closest: {family}, whose rules recognise {found} of {len(names)} tensors (roles: "
    text += ", ".join(f"{role} {n}" for role, n in sorted(roles.items())) + ")"
    return text + (f"; unrecognised e.g. {missed[0]}" if missed else "")


def _check_hidden(t: TensorInfo, hidden: int) -> None:
    if t.residual_axis is None:
        return
    if len(t.shape) <= t.residual_axis or t.shape[t.residual_axis] != hidden:
        raise AbliterateError(
            f"tensor {t.name} has shape {list(t.shape)} but its role {t.role} needs hidden size {hidden} "
            f"on axis {t.residual_axis}: config.json's hidden_size does not match the weights"
        )


def _check_layer(
    tensors: list[TensorInfo],
    layer: int,
    moe: bool,
    experts: int,
    n_shared: int,
    hidden: int,
    router_dtypes: set[str],
) -> None:
    by_role: dict[str, list[TensorInfo]] = defaultdict(list)
    for t in tensors:
        if t.role:
            by_role[t.role].append(t)

    def require(role: str, count: int, what: str) -> None:
        found = sum(t.shape[0] if t.fused_experts else 1 for t in by_role.get(role, []))
        if found != count:
            raise AbliterateError(f"layer {layer}: expected {count} {what} ({role}), found {found}")

    require("attn_out", 1, "attention output projection")
    if not moe:
        for role in ("expert_down", "router"):
            if by_role.get(role):
                raise AbliterateError(
                    f"layer {layer} is dense by config.json but holds {by_role[role][0].name}: "
                    "check first_k_dense_replace / mlp_only_layers"
                )
        require("mlp_down", 1, "dense MLP down projection")
        return
    if by_role.get("mlp_down"):
        raise AbliterateError(
            f"layer {layer} is MoE by config.json but holds a dense MLP ({by_role['mlp_down'][0].name}): "
            "check first_k_dense_replace / mlp_only_layers"
        )
    downs = by_role.get("expert_down", [])
    fused = [t for t in downs if t.fused_experts]
    if fused:
        for t in fused + [t for t in by_role.get("expert_in", []) if t.fused_experts]:
            if t.shape[0] != experts:
                raise AbliterateError(
                    f"layer {layer}: config.json says {experts} routed experts but {t.name} has shape {list(t.shape)}"
                )
    else:
        present = sorted(t.expert for t in downs)
        if present != list(range(experts)):
            missing = sorted(set(range(experts)) - set(present))
            detail = (
                f"expert {missing[0]} has no down_proj" if missing else f"unexpected expert indices {present}"
            )
            raise AbliterateError(
                f"layer {layer}: config.json says {experts} routed experts but the checkpoint has "
                f"{len(present)} expert down projections ({detail}, e.g. "
                f"model.layers.{layer}.mlp.experts.{missing[0] if missing else present[-1]}.down_proj.weight)"
            )
    require("router", 1, "router")
    router = by_role["router"][0]
    if router.shape != (experts, hidden):
        raise AbliterateError(
            f"{router.name} has shape {list(router.shape)}, expected [{experts}, {hidden}] (experts, hidden)"
        )
    router_dtypes.add(router.dtype)
    if n_shared:
        require("shared_expert_down", 1, "shared expert down projection")
