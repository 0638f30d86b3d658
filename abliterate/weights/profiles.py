"""Model families as data: which tensor name plays which weight role (docs/DESIGN.md, "Weight roles").

A profile is a list of rules. Each rule is a regular expression over the tensor name with
optional named groups `layer` and `expert`, the role it assigns, and the tensor's
residual axis: the axis whose length is the hidden size (the axis the refusal direction
lives on). The ablation engine edits along that axis, so it is declared here, never guessed
from shapes. Layer numbers are matched as whole numbers (`\\d+` followed by a dot), so
layer 1 never matches layers 10-19.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from abliterate.errors import AbliterateError
from abliterate.vocabulary import ALL_ROLES


@dataclass(frozen=True)
class Rule:
    pattern: str  # full-match regex; groups `layer`, `expert`
    role: str
    residual_axis: int | None  # axis of length hidden_size; None for tensors off the residual stream
    fused_experts: bool = False  # one 3-D tensor [E, ...] holds every expert of the layer

    def __post_init__(self) -> None:
        if self.role not in ALL_ROLES:
            raise ValueError(f"unknown role {self.role!r} in profile rule {self.pattern!r}")


@dataclass(frozen=True)
class Profile:
    family: str
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    # config.json keys for routed experts per MoE layer, first present wins (empty: dense family)
    experts_keys: tuple[str, ...] = ()
    # config.json key for the number of MTP layers stored after the decoder layers
    mtp_key: str | None = None
    # config.json key for shared experts per MoE layer
    shared_experts_key: str | None = None
    # how config.json says which layers are MoE: "first_k_dense" (layers >= first_k_dense_replace),
    # "sparse_step" (every decoder_sparse_step-th layer not in mlp_only_layers), or "dense"
    moe_layout: str = "dense"
    compiled: tuple[tuple[re.Pattern, Rule], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", tuple((re.compile(r.pattern), r) for r in self.rules))

    def classify(self, name: str) -> tuple[Rule, int | None, int | None] | None:
        """The first rule that fully matches `name`, with its layer and expert index."""
        for regex, rule in self.compiled:
            match = regex.fullmatch(name)
            if match:
                groups = match.groupdict()
                layer = int(groups["layer"]) if groups.get("layer") is not None else None
                expert = int(groups["expert"]) if groups.get("expert") is not None else None
                return rule, layer, expert
        return None


L = r"model\.layers\.(?P<layer>\d+)\."
E = r"(?P<expert>\d+)\."

# Shared by every decoder-only transformers family we support.
_COMMON = (
    Rule(r"model\.embed_tokens\.weight", "embed", 1),
    Rule(r"lm_head\.weight", "lm_head", 1),
    Rule(r"model\.norm\.weight", "norm", 0),
    Rule(L + r"(input_layernorm|post_attention_layernorm)\.weight", "norm", 0),
    Rule(L + r"self_attn\.(q_norm|k_norm)\.weight", "norm", None),
    Rule(L + r"self_attn\.(q_proj|k_proj|v_proj)\.weight", "attn_in", 1),
    Rule(L + r"self_attn\.(q_proj|k_proj|v_proj)\.bias", "attn_in_bias", None),
    Rule(L + r"self_attn\.o_proj\.weight", "attn_out", 0),
    Rule(L + r"self_attn\.o_proj\.bias", "attn_out_bias", 0),
    Rule(L + r"mlp\.(gate_proj|up_proj)\.weight", "mlp_in", 1),
    Rule(L + r"mlp\.down_proj\.weight", "mlp_down", 0),
    Rule(L + r"mlp\.down_proj\.bias", "mlp_down_bias", 0),
)

# Routed experts, both on-disk layouts: one 2-D tensor per expert (transformers' default
# save format), or transformers 5's fused 3-D tensors (save_original_format=False):
# gate_up_proj [E, 2I, H], down_proj [E, H, I].
_EXPERTS = (
    Rule(L + r"mlp\.experts\." + E + r"(gate_proj|up_proj)\.weight", "expert_in", 1),
    Rule(L + r"mlp\.experts\." + E + r"down_proj\.weight", "expert_down", 0),
    Rule(L + r"mlp\.experts\.gate_up_proj", "expert_in", 2, fused_experts=True),
    Rule(L + r"mlp\.experts\.down_proj", "expert_down", 1, fused_experts=True),
    Rule(L + r"mlp\.gate\.weight", "router", 1),
)

GLM4_MOE = Profile(
    family="glm4_moe",
    model_types=("glm4_moe",),
    experts_keys=("n_routed_experts",),
    mtp_key="num_nextn_predict_layers",
    shared_experts_key="n_shared_experts",
    moe_layout="first_k_dense",
    rules=_COMMON
    + _EXPERTS
    + (
        Rule(L + r"mlp\.gate\.e_score_correction_bias", "router_bias", None),
        Rule(L + r"mlp\.shared_experts\.(gate_proj|up_proj)\.weight", "shared_expert_in", 1),
        Rule(L + r"mlp\.shared_experts\.down_proj\.weight", "shared_expert_down", 0),
        # The MTP layer (index num_hidden_layers) carries its own embedding and head besides
        # a full MoE decoder layer; transformers drops it on load.
        Rule(L + r"embed_tokens\.weight", "embed", 1),
        Rule(L + r"(eh_proj|enorm|hnorm)\.weight", "mtp", None),
        Rule(L + r"shared_head\.(norm|head)\.weight", "mtp", None),
    ),
)

QWEN3_MOE = Profile(
    family="qwen3_moe",
    model_types=("qwen3_moe",),
    experts_keys=("num_experts", "num_local_experts"),  # Hub checkpoints; transformers 5 saves the latter
    moe_layout="sparse_step",
    rules=_COMMON + _EXPERTS,
)

LLAMA = Profile(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    rules=_COMMON,
)

PROFILES: dict[str, Profile] = {p.family: p for p in (GLM4_MOE, QWEN3_MOE, LLAMA)}


# The residual axis a user-mapped tensor gets: where its role's tensors keep the hidden size in
# the families above (writers [H, in], readers [out, H], embed and head [V, H]). None: off the
# residual stream, or of a shape that varies (q/k norms, MTP extras), so nothing is checked.
ROLE_AXIS: dict[str, int | None] = {
    "embed": 1,
    "lm_head": 1,
    "attn_out": 0,
    "mlp_down": 0,
    "expert_down": 0,
    "shared_expert_down": 0,
    "router": 1,
    "attn_in": 1,
    "mlp_in": 1,
    "expert_in": 1,
    "shared_expert_in": 1,
    "attn_out_bias": 0,
    "mlp_down_bias": 0,
    "expert_down_bias": 0,
    "shared_expert_down_bias": 0,
    "attn_in_bias": None,
    "norm": None,
    "router_bias": None,
    "mtp": None,
}
assert set(ROLE_AXIS) == set(ALL_ROLES)
UNLAYERED_ROLES = ("embed", "lm_head", "norm")  # may lie outside a decoder layer


def parse_mapping(text: str) -> Rule:
    """`REGEX=ROLE` (the user's --map) -> a Rule; the regex full-matches tensor names and names
    the layer index `(?P<layer>\\d+)` (and `(?P<expert>\\d+)` for per-expert tensors)."""
    pattern, sep, role = text.rpartition("=")
    role = role.strip()
    if not sep or not pattern:
        raise AbliterateError(
            f"--map {text!r}: write REGEX=ROLE, e.g. 'model\\.layers\\.(?P<layer>\\d+)\\.attn\\.out\\.weight=attn_out'"
        )
    if role not in ROLE_AXIS:
        raise AbliterateError(f"--map {text!r}: unknown role {role!r}; roles are {', '.join(ROLE_AXIS)}")
    try:
        groups = re.compile(pattern).groupindex
    except re.error as exc:
        raise AbliterateError(
            f"--map {text!r}: {pattern!r} is not a valid regular expression ({exc})"
        ) from exc
    if "layer" not in groups and role not in UNLAYERED_ROLES:
        raise AbliterateError(
            f"--map {text!r}: role {role} belongs to a decoder layer; capture its index with (?P<layer>\\d+)"
        )
    if role.startswith("expert_") and "expert" not in groups:
        raise AbliterateError(
            f"--map {text!r}: role {role} is one routed expert's tensor; capture its index with (?P<expert>\\d+)"
        )
    return Rule(pattern, role, ROLE_AXIS[role])


def extend_profile(base: Profile, mappings: Sequence[str]) -> Profile:
    """`base` with the user's REGEX=ROLE rules tried first (so they also override its own)."""
    extra = tuple(parse_mapping(m) for m in mappings)
    return replace(base, rules=extra + base.rules) if extra else base


def profile_for_model_type(model_type: str | None) -> Profile | None:
    for profile in PROFILES.values():
        if model_type in profile.model_types:
            return profile
    return None


# Markers of quantized checkpoints: their weights are not plain matrices, so a projection
# on them would be wrong. Checked on tensor names (suffixes) and dtypes.
QUANTIZED_SUFFIXES = {
    "weight_scale_inv": "FP8 (block scales)",
    "weight_scale": "FP8/INT8 (scales)",
    "_blocks": "MXFP4",
    "_scales": "MXFP4",
    ".absmax": "bitsandbytes 4-bit",
    ".quant_map": "bitsandbytes 4-bit",
    ".quant_state.bitsandbytes__nf4": "bitsandbytes NF4",
    ".quant_state.bitsandbytes__fp4": "bitsandbytes FP4",
    ".SCB": "bitsandbytes 8-bit",
    ".qweight": "GPTQ/AWQ",
    ".qzeros": "GPTQ/AWQ",
}
QUANTIZED_DTYPES = {"F8_E4M3": "FP8", "F8_E5M2": "FP8", "F8_E8M0": "MXFP4 scales", "F4": "FP4", "I4": "INT4"}


def quantization_marker(name: str, dtype: str) -> str | None:
    for suffix, kind in QUANTIZED_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return QUANTIZED_DTYPES.get(dtype)
