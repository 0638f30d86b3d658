"""The names everyone shares (docs/DESIGN.md, "Vocabulary"): weight roles, methods, modes, choices
and file names. The configuration, the stages and the orchestration import them from here, so one
name means one thing from the command line to the plan, the manifest and MLflow.

This module imports nothing: it is the bottom of the project, beside the error type.
"""

from __future__ import annotations

# ------------------------------------------------------------------ weight roles
# Roles that write into the residual stream (edited on the output side) and read from it.
WRITER_ROLES = ("embed", "attn_out", "mlp_down", "expert_down", "shared_expert_down")
READER_ROLES = ("router", "attn_in", "mlp_in", "expert_in", "shared_expert_in", "lm_head")
BIAS_ROLES = ("attn_out_bias", "mlp_down_bias", "expert_down_bias", "shared_expert_down_bias", "attn_in_bias")
OTHER_ROLES = ("norm", "router_bias", "mtp")
ALL_ROLES = WRITER_ROLES + READER_ROLES + BIAS_ROLES + OTHER_ROLES

# What an ablation edits by default, and what it may edit.
DEFAULT_TARGETS = ("attn_out", "mlp_down", "expert_down", "shared_expert_down", "router")
OPTIONAL_TARGETS = ("embed",)
TARGET_ROLES = DEFAULT_TARGETS + OPTIONAL_TARGETS
# Output-side biases follow their weight: edited when `biases` is on and the weight's role is a target.
BIAS_OF = {
    "attn_out": "attn_out_bias",
    "mlp_down": "mlp_down_bias",
    "expert_down": "expert_down_bias",
    "shared_expert_down": "shared_expert_down_bias",
}
WEIGHT_OF = {bias: weight for weight, bias in BIAS_OF.items()}

# ------------------------------------------------------------------ methods and modes
# The direction method makes the directions at measurement; the ablation method edits weights.
DIRECTION_METHODS = ("projected", "mean_diff")
ABLATION_METHODS = ("plain", "norm_preserving", "projected")
# How the several directions of a subspace were found (the directions file's `subspace.<method>` tensors).
SUBSPACE_METHODS = ("pca", "clusters", "categories")
MTP_MODES = ("ablate", "skip")
STREAMING_MODES = ("auto", "always", "never")
FULL_REPLY_MODES = ("auto", "always", "never")
PROMPT_SETS = ("auto", "general", "demo")
# Residual position of the direction to ablate, beside a position number.
DIRECTION_POSITION_WORDS = ("auto", "own", "none")

# ------------------------------------------------------------------ devices
DEVICE_CHOICES = "cpu | cuda | cuda:N | auto"
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")

# ------------------------------------------------------------------ the search
# Component groups, each with its own layer kernel; router_bias lowers routers' correction biases.
SEARCH_GROUPS = ("attn_out", "mlp_down", "expert_down", "shared_expert_down", "router")
SEARCH_COMPONENTS = SEARCH_GROUPS + ("router_bias",)
SEARCH_OBJECTIVES = ("refusal_rate", "kl")

# ------------------------------------------------------------------ refusal markers
# Lower case, straight apostrophes: refusal detection normalises the reply the same way.
DEFAULT_REFUSAL_MARKERS: tuple[str, ...] = (
    "i cannot",
    "i can't",
    "i can not",
    "i won't",
    "i will not",
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "i'm unable",
    "i am unable",
    "i'm not able",
    "i am not able",
    "i must decline",
    "i refuse",
    "as an ai",
    "as a language model",
    "i'm not comfortable",
    "i am not comfortable",
    "not able to help with",
    "can't assist with",
    "cannot assist with",
    "can't help with",
    "cannot help with",
    "cannot provide",
    "can't provide",
    "against my guidelines",
    "is illegal and",
    "i'd rather not",
)

# ------------------------------------------------------------------ file names
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DIRECTIONS_FILE = "directions.safetensors"
DIRECTIONS_JSON = "directions.json"
MANIFEST_FILE = "abliteration.json"
STUDY_FILE = "search.db"
MODEL_CARD_FILE = "README.md"  # the output's model card (Hugging Face's name for it)
