"""Every setting of the pipeline, typed, named and checked in one place.

The sections below are pydantic models. The same objects are
- the CLI's options (`add_options` builds argparse options from the fields: flag = field name
  with dashes, help = the field's description, checks = the field's constraints),
- the Prefect flows' parameters (Prefect validates them and renders each as a form in its UI),
- MLflow params (`flat_params`: `section.field` keys),
- what the domain's functions take: they read their settings from the sections themselves.
`Environment` is what the environment says (homes, tracking URI, Prefect server), read here only.

This module is the bottom of the project: it imports nothing of it but the vocabulary and the
error type (an import-linter contract in pyproject.toml keeps it so). Each default is written
once, here.

Names follow docs/DESIGN.md: a *token position* counts tokens from the end of the prompt; a
*residual position* is the input of a decoder layer (L: the last layer's raw output); the
*direction method* makes the directions at measurement, the *ablation method* edits weights.
"""

from __future__ import annotations

import argparse
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from abliterate.errors import AbliterateError
from abliterate.vocabulary import (
    ABLATION_METHODS,
    DEFAULT_TARGETS,
    DEVICE_CHOICES,
    DIRECTION_METHODS,
    DIRECTION_POSITION_WORDS,
    DTYPE_CHOICES,
    FULL_REPLY_MODES,
    MTP_MODES,
    PROMPT_SETS,
    SEARCH_COMPONENTS,
    SEARCH_GROUPS,
    STREAMING_MODES,
    SUBSPACE_METHODS,
    TARGET_ROLES,
)

# ------------------------------------------------------------------ values typed by users, parsed once

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40})
MAX_SIZE = float(1 << 60)  # 1 EiB: any larger "memory budget" is a typo
# More threads than any machine has cores: OpenMP fails to create them and the process crashes
# (100000 threads: a segmentation fault, issue 22's hostile pass).
MAX_THREADS = 1024


def parse_size(text: str | None) -> int | None:
    """A byte count from `64GiB`, `500MB`, `1.5TB` or plain bytes; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([A-Za-z]*)", text.strip())
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise AbliterateError(f"memory budget {text!r}: use a size such as 64GiB, 500MB or a number of bytes")
    size = float(match.group(1)) * _UNITS[unit]
    if not size < MAX_SIZE:  # 400 nines is inf as a float
        shown = text if len(text) <= 24 else text[:21] + "..."
        raise AbliterateError(
            f"memory budget {shown!r} is beyond any machine (at most 1 EiB): use a size such as 64GiB"
        )
    return int(size)


def check_device(value: str) -> str:
    """The device as typed, checked against this machine's torch: raises ValueError with what to
    type instead."""
    import torch  # heavy: only when a device other than `auto` is named

    text = value.strip().lower()
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"use {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"use {DEVICE_CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "this torch build sees no CUDA device; use cpu or auto, or install torch with CUDA"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"there are {torch.cuda.device_count()} CUDA devices (cuda:0..)")
    return text


# ------------------------------------------------------------------ the sections


def text_or_number(schema: dict[str, Any]) -> None:
    """JSON schema of a setting held as text that users may also type as a number (`0.8`, `3`): the
    Prefect form and `prefect deployment run -p` check this schema before the validator normalises the
    value to text."""
    schema.pop("type", None)
    schema["anyOf"] = [{"type": "string"}, {"type": "number"}]


class Section(BaseModel):
    """A group of settings. Bad values raise AbliterateError naming the setting and the fix."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    section: typing.ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise AbliterateError(describe(exc, self.section)) from None

    def flat(self) -> dict[str, Any]:
        """`section.field` -> value, for MLflow params and manifests."""
        return {f"{self.section}.{k}": v for k, v in self.model_dump(mode="json").items()}


def describe(exc: ValidationError, section: str) -> str:
    """One line: which setting, what was wrong."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or section
        flag = "--" + name.replace("_", "-")
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{flag} ({section}.{name}): {message} (got {err.get('input')!r})")
    return "; ".join(parts)


class Prompts(Section):
    section: typing.ClassVar[str] = "prompts"

    harmful: str | None = Field(
        None,
        description="harmful prompts (.txt/.jsonl/.json/.csv/.parquet); "
        "default: the prompt set's training split",
    )
    harmless: str | None = Field(
        None, description="harmless prompts; default: the prompt set's training split"
    )
    harmful_test: str | None = Field(
        None, description="harmful prompts of the evaluation; default: the set's test split"
    )
    harmless_test: str | None = Field(
        None, description="harmless prompts of the evaluation; default: the set's test split"
    )
    prompt_set: Literal[PROMPT_SETS] = Field(  # type: ignore[valid-type]
        "auto",
        description="the project's prompt sets used where no file is given: demo (for the demo model), "
        "general, or auto (demo for the demo model, general otherwise)",
    )
    validation_fraction: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="seeded part of each set held out to select the direction (not measured)",
    )
    seed: int = Field(0, description="seed of the measurement/validation split")


class Template(Section):
    """How each prompt is rendered: the same for measurement, selection and evaluation."""

    section: typing.ClassVar[str] = "template"

    system_prompt: str | None = Field(None, description="system message rendered before every prompt")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra chat-template variables, a JSON object or KEY=VALUE (repeatable; "
        "VALUE is read as JSON when it parses, e.g. enable_thinking=false)",
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(
            set(value) & {"conversation", "messages", "tokenize", "add_generation_prompt", "return_dict"}
        )
        if reserved:
            raise ValueError(f"{reserved} are set by the tool itself; remove them")
        return value


class Measurement(Section):
    section: typing.ClassVar[str] = "measurement"

    token_position: int = Field(
        -1,
        lt=0,
        description="token whose residual is measured, counted from the end of "
        "the rendered prompt (-1: the last, where the reply starts)",
    )
    direction_method: Literal[DIRECTION_METHODS] = Field(  # type: ignore[valid-type]
        "projected",
        description="projected: the mean difference made orthogonal to the harmless mean at its "
        "residual position (disturbs harmless prompts less); mean_diff: as is",
    )
    max_length: int | None = Field(
        None, ge=1, description="longest rendered prompt in tokens (default: the model's context)"
    )
    subspace_rank: int = Field(
        4,
        ge=1,
        description="directions kept per residual position for each subspace method (pca, clusters, and "
        "categories when the harmful prompts carry a category), row 0 the difference of means; 1: keep none",
    )


class Selection(Section):
    section: typing.ClassVar[str] = "selection"

    direction_position: str = Field(
        "auto",
        description="residual position of the direction to ablate: auto (chosen by inference-time "
        "ablation on validation prompts), a number (scored for the record), own (each layer its own position's "
        "direction), none (measure only)",
        json_schema_extra=text_or_number,
    )
    kl_threshold: float = Field(
        0.1,
        ge=0,
        description="largest mean first-token KL (nats) on harmless prompts "
        "an automatically selected direction may cause",
    )
    skip_last_fraction: float = Field(
        0.2, ge=0, lt=1, description="fraction of the last residual positions that are not candidates"
    )
    max_candidates: int | None = Field(None, ge=1, description="score at most N evenly spaced positions")
    shortlist: str = Field(
        "1",
        description="candidates scored on every validation prompt: N (the others are ranked out first by "
        "successive halving: every candidate on the first shortlist-prompts prompts of each set, the better half "
        "on twice as many, ... until N remain; one pass over the weights per round) or all (every candidate on "
        "every prompt, one pass)",
        json_schema_extra=text_or_number,
    )
    shortlist_prompts: int = Field(
        8,
        ge=1,
        description="prompts of each validation set in the first ranking round (doubled each round); the rank "
        "pass's first round takes this many harmful ones, rounded up to whole batches",
    )
    prefilter: str = Field(
        "4",
        description="candidates that reach scoring: N (the N with the largest measured separation of the two "
        "sets, |mean harmful - mean harmless| / |mean harmless| at the position, known after measurement: the "
        "others are never scored) or all",
        json_schema_extra=text_or_number,
    )
    max_rank: int = Field(
        4,
        ge=1,
        description="most directions selection tries removing together at the chosen position (the first k "
        "rows of each subspace the directions hold); a rank above 1 is kept only where one direction's "
        "first-token refusal rate on the harmful validation prompts is above the subspace's Wilson upper bound "
        "(rank-confidence) and the subspace's KL is within the threshold; 1: one direction, nothing more scored",
    )
    rank_confidence: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="level of the Wilson bound a subspace's first-token refusal rate must stay under (below one "
        "direction's rate) for selection to keep it",
    )
    rank_elimination: bool = Field(
        True,
        description="score the ranks only as far as they can still earn their KL: none where one direction's "
        "first-token refusal rate is at or below the Wilson upper bound of a subspace refusing none; else the "
        "harmful validation prompts first, in whole batches from shortlist-prompts on (doubled each pass), a rank "
        "dropped once its refusals so far put that bound at or above one direction's rate, and the harmless "
        "prompts for the ranks left: the same choice as scoring every rank on every prompt "
        "(--no-rank-elimination: that, in one pass)",
    )

    @field_validator("direction_position", mode="before")
    @classmethod
    def _position(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if text == "selected":  # the plan's and older versions' word for auto
            text = "auto"
        if text in DIRECTION_POSITION_WORDS or text.isdigit():
            return text
        raise ValueError("use auto, own, none or a residual position number >= 0")

    @field_validator("shortlist", "prefilter", mode="before")
    @classmethod
    def _shortlist(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if text == "all" or (text.isdigit() and int(text) >= 1):
            return text
        raise ValueError("use all or a number of candidates >= 1")


class Ablation(Section):
    section: typing.ClassVar[str] = "ablation"

    layers: str = Field(
        "all",
        description="target layers: all | 10-30 | 5,7,9-12 (exact indices)",
        json_schema_extra=text_or_number,
    )
    scale: str = Field(
        "1.0",
        description="1.0 | one value per target layer (comma list) | "
        "gauss:center=20,width=5,peak=1 (each in [0, 2])",
        json_schema_extra=text_or_number,
    )
    targets: list[str] = Field(
        list(DEFAULT_TARGETS),
        description="weight roles to edit (comma list; "
        f"choose from {', '.join(TARGET_ROLES)}; `default` = the default set)",
    )
    ablation_method: Literal[ABLATION_METHODS] = Field(  # type: ignore[valid-type]
        "plain",
        description="plain: W - s r r^T W; norm_preserving: keep each column's norm; projected "
        "(biprojected): remove the harmless mean's component at each edited layer from r first",
    )
    mtp: Literal[MTP_MODES] = Field(
        "ablate", description="MTP layers: edit like the last layer, or skip them"
    )  # type: ignore[valid-type]
    biases: bool = Field(False, description="also edit the output-side biases of targeted writers")
    rank: str = Field(
        "auto",
        description="directions removed at each edited layer: auto (the rank and subspace selection chose "
        "at the auto direction position, else 1); 1 the difference of means alone; k > 1 the first k "
        "orthonormal rows of the directions file's subspace (--subspace), W - s Q^T (Q W)",
        json_schema_extra=text_or_number,
    )
    subspace: Literal[SUBSPACE_METHODS] = Field(  # type: ignore[valid-type]
        "pca",
        description="how the subspace's directions were found (rank > 1): pca (principal components of the "
        "harmful-minus-harmless differences), clusters (of the harmful prompts), categories (per prompt category)",
    )

    @field_validator("layers", "scale", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:  # `prefect deployment run -p scale=0.8` sends numbers
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("give text such as `all`, `10-30` or `1.0`")
        return str(value)

    @field_validator("rank", mode="before")
    @classmethod
    def _rank(cls, value: Any) -> str:
        text = "" if isinstance(value, bool) else str(value).strip().lower()
        if text == "auto" or (text.isdigit() and int(text) >= 1):
            return text if text == "auto" else str(int(text))
        raise ValueError("use auto or a number of directions >= 1")

    @property
    def fixed_rank(self) -> int | None:
        """The rank the user fixed; None at `auto` (the plan takes selection's)."""
        return None if self.rank == "auto" else int(self.rank)

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
            raise ValueError("give a comma list of weight roles")
        roles = [t.strip() for item in value for t in item.split(",") if t.strip()]
        if not roles:
            raise ValueError(f"the target set is empty: choose from {', '.join(TARGET_ROLES)}")
        return roles


class Evaluation(Section):
    section: typing.ClassVar[str] = "evaluation"

    evaluate: bool = Field(
        True,
        description="evaluate the model before and after on the test prompts: first-token "
        "refusal score, refusal rate and KL, and refusal rates of full greedy replies",
    )
    full_replies: Literal[FULL_REPLY_MODES] = Field(  # type: ignore[valid-type]
        "auto",
        description="full greedy replies (--max-new-tokens tokens, marker-checked) in the evaluation: auto "
        "(when the model fits the memory budget), always (a larger model runs layer-streamed with its keys and "
        "values cached: one read of the weights per new token for every prompt), never (first-token figures only)",
    )
    max_new_tokens: int = Field(48, ge=1, description="reply length in the evaluation (tokens)")
    examples: int = Field(5, ge=0, description="example replies kept per prompt kind")
    markers: str | None = Field(
        None,
        description="file of refusal marker phrases, one per line, # starts a "
        "comment (default: the built-in English list); matched ignoring case",
    )
    marker: list[str] = Field(
        default_factory=list, description="a refusal marker phrase (repeatable; adds to --markers)"
    )
    refusal_probe_tokens: int = Field(
        6,
        ge=0,
        description="reply tokens generated greedily per harmful prompt to find the tokens the model's "
        "own refusals start with (a layer-streamed model reads its weights once per token); 0: the first tokens "
        "of the marker phrases",
    )

    @field_validator("marker")
    @classmethod
    def _phrases(cls, value: list[str]) -> list[str]:
        if not all(m.strip() for m in value):  # a blank phrase would match every reply
            raise ValueError("a refusal marker phrase is blank: give the words to look for")
        return value

    def replies(self, stream: bool) -> bool:
        """Whether full greedy replies are generated: `auto` does so for a model held in memory."""
        return self.full_replies == "always" or (self.full_replies == "auto" and not stream)


class Runtime(Section):
    section: typing.ClassVar[str] = "runtime"

    device: str = Field(
        "auto",
        description="where the model runs: cpu | cuda | cuda:N | auto (every GPU, then the CPU, then disk, "
        "with accelerate's device map; cpu without a GPU)",
    )
    dtype: Literal[DTYPE_CHOICES] = Field(  # type: ignore[valid-type]
        "auto",
        description="compute dtype: auto (the checkpoint's dtype on a GPU, float32 on the CPU), bfloat16, "
        "float16 or float32; sums stay float64",
    )
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")
    memory_budget: str | None = Field(
        None,
        description="memory the model may take, e.g. 64GiB (default: the "
        "free memory of the device: host RAM, the GPU's, or every GPU's for auto); "
        "a larger model is measured, scored and evaluated one decoder layer at a "
        "time",
    )
    streaming: Literal[STREAMING_MODES] = Field(  # type: ignore[valid-type]
        "auto",
        description="layer-streamed measurement, selection and evaluation: auto (when the model exceeds "
        "the budget), always, never",
    )
    threads: str = Field(
        "auto",
        description="torch's CPU threads: auto (the cores this process may use, from its CPU affinity and cgroup "
        "quota, less those other processes keep busy now; at least 1; OMP_NUM_THREADS where it is set) or a number",
    )
    interop_threads: str = Field(
        "auto",
        description="torch's inter-op threads, set once per process before any parallel work: auto (as many as "
        "--threads chooses) or a number",
    )
    workers: int = Field(2, ge=1, description="shards ablated at the same time (threads)")
    dask_address: str | None = Field(
        None, description="ablate shards on this Dask scheduler (tcp://host:8786); needs shared storage"
    )
    dask_workers: int | None = Field(
        None, ge=1, description="ablate shards on a local Dask cluster of this many processes"
    )

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _size(cls, value: Any) -> str | None:
        if value is None:
            return None
        try:
            parse_size(str(value))
        except AbliterateError as exc:
            raise ValueError(str(exc)) from None
        return str(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("threads", "interop_threads", mode="before")
    @classmethod
    def _threads(cls, value: Any) -> str:  # `prefect deployment run -p threads=1` sends a number
        text = str(value).strip().lower()
        if isinstance(value, bool) or not (
            text == "auto" or (text.isdigit() and 1 <= int(text) <= MAX_THREADS)
        ):
            raise ValueError(f"use auto or a number of threads from 1 to {MAX_THREADS}")
        return str(int(text)) if text.isdigit() else text


class Search(Section):
    """`abliterate search`: the Optuna study over layer kernels, weight roles, routers (abliterate/search/study.py)."""

    section: typing.ClassVar[str] = "search"

    trials: int = Field(
        50,
        ge=1,
        description="complete trials the study holds when the search ends (a rerun of the "
        "same search resumes the study; with more trials it continues)",
    )
    kl_max: float = Field(
        0.01,
        ge=0,
        description="the written trial is the front's one with the fewest refusals "
        "among those with a first-token KL (nats) at most this",
    )
    trial: int | None = Field(
        None, ge=0, description="write this trial of the study instead of the automatic choice"
    )
    search_seed: int = Field(
        0,
        ge=0,
        le=2**31 - 1,
        description="seed of the study's sampler, 0 to 2^31-1 (another seed: another study)",
    )
    components: list[str] = Field(
        list(SEARCH_GROUPS),
        description="component groups searched, each with its own layer kernel (peak position, width, peak and "
        "floor weight): attn_out, mlp_down, expert_down, shared_expert_down, router; router_bias (MoE: lower the "
        "router correction bias of the most refusal-specific experts) is optional; `default` = the five groups",
    )
    methods: list[str] = Field(
        list(ABLATION_METHODS),
        description=f"ablation methods searched (comma list of {', '.join(ABLATION_METHODS)})",
    )
    reply_tokens: int = Field(
        24,
        ge=1,
        description="greedy reply tokens per held-out harmful prompt in each "
        "trial (the refusal check reads them)",
    )
    max_prompts: int | None = Field(
        None,
        ge=1,
        description="score each trial on at most this many prompts of each held-out (validation) set",
    )
    router_experts: int = Field(
        16,
        ge=1,
        description="router_bias: lower the bias of at most this many of the most refusal-specific experts",
    )
    startup_trials: int = Field(10, ge=1, description="random trials before the sampler models the front")
    parallel_trials: int = Field(
        1,
        ge=1,
        description="trials asked and scored together (a layer-streamed model "
        "scores them in the same passes over its weights)",
    )
    study: str | None = Field(
        None,
        description="study name: letters, digits, '.', '_' or '-', at most 100 (default: derived from the model, "
        "directions, prompts, scoring and search space, so the same search resumes)",
    )
    refusal_floor: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="a held-out harmful prompt whose first-token refusal probability is under this is far "
        "enough from refusing: between trials that refuse alike, the study prefers the one closer to this "
        "floor on every prompt, then the lower KL",
    )
    confirm_fraction: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="seeded part of each held-out (validation) set the study never scores: the chosen trial "
        "and run's choice are confirmed on it (0: no confirmation)",
    )
    confidence: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="level of the Wilson bound on a trial's refusal rate: a confirmation that refuses more "
        "than the study's upper bound fails",
    )
    on_confirm_failure: Literal["stronger", "keep", "refuse"] = Field(
        "stronger",
        description="when the chosen trial refuses more on the confirmation prompts than the study's bound: "
        "stronger (write the next stronger trial of the front that holds, warning when its KL exceeds "
        "kl_max), keep (write the choice, warning), refuse (write nothing)",
    )

    @field_validator("study")
    @classmethod
    def _study(cls, value: str | None) -> str | None:  # it names a lock file beside the study database
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}", value):
            raise ValueError(
                f"{value[:40]!r} is no study name: use 1 to 100 letters, digits, '.', '_' or '-', not starting with '.'"
            )
        return value

    @field_validator("components", "methods", mode="before")
    @classmethod
    def _names(cls, value: Any, info: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
            raise ValueError("give a comma list of names")
        names = [t.strip() for item in value for t in item.split(",") if t.strip()]
        known = SEARCH_COMPONENTS if info.field_name == "components" else ABLATION_METHODS
        if info.field_name == "components":
            names = [n for name in names for n in (SEARCH_GROUPS if name == "default" else (name,))]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(
                f"choose one or more of {', '.join(known)}" + (f" (not {unknown})" if unknown else "")
            )
        return list(dict.fromkeys(names))


class Chat(Section):
    """`abliterate chat`: how the replies of an interactive chat are made (abliterate/cli/chat.py)."""

    section: typing.ClassVar[str] = "chat"

    sample: bool = Field(
        False, description="sample the replies (--temperature, --top-p) instead of taking the greedy ones"
    )
    temperature: float = Field(0.7, gt=0, description="sampling temperature (with --sample)")
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="nucleus sampling: the top tokens holding this much probability (with --sample)",
    )
    sample_seed: int = Field(0, description="seed of the sampled replies (with --sample)")
    max_reply_tokens: int = Field(200, ge=1, description="longest reply in the chat (tokens)")


class Environment(BaseSettings):
    """What the environment says: where the tool keeps its records and which servers it talks to.
    Read here and nowhere else (`environment()`); every field names its variable."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    home: Path | None = Field(
        None,
        validation_alias="ABLITERATE_HOME",
        description="folder of mlruns/ (MLflow store, search studies) and results/ (default: the current folder)",
    )
    results: Path | None = Field(
        None, validation_alias="ABLITERATE_RESULTS", description="folder of results (default: HOME/results)"
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias="MLFLOW_TRACKING_URI",
        description="MLflow server or store (default: sqlite:///HOME/mlruns/mlflow.db)",
    )
    prefect_api_url: str | None = Field(
        None,
        validation_alias="PREFECT_API_URL",
        description="a running Prefect server (default: a temporary one per command)",
    )
    omp_num_threads: str | None = Field(
        None,
        validation_alias="OMP_NUM_THREADS",
        description="OpenMP's thread count: where it names a number, `--threads auto` takes it as is",
    )
    omp_wait_policy: str | None = Field(
        None,
        validation_alias="OMP_WAIT_POLICY",
        description="OpenMP's wait policy (default here: PASSIVE, set before torch loads; ACTIVE spins)",
    )

    def project_dir(self) -> Path:
        return Path(self.home or Path.cwd()).resolve()

    def results_dir(self) -> Path:
        return Path(self.results or self.project_dir() / "results").resolve()

    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.project_dir() / 'mlruns' / 'mlflow.db'}"

    def artifact_root(self) -> str:
        return (self.project_dir() / "mlruns" / "artifacts").as_uri()


def environment() -> Environment:
    """The environment as it is now (read at each call: a test or a wrapper may change it)."""
    try:
        return Environment()
    except ValidationError as exc:
        raise AbliterateError(describe(exc, "environment")) from None


SECTIONS: dict[str, type[Section]] = {
    cls.section: cls
    for cls in (Prompts, Template, Measurement, Selection, Ablation, Evaluation, Runtime, Search, Chat)
}


def flat_params(*sections: Section) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sections:
        out.update(s.flat())
    return out


# ------------------------------------------------------------------ argparse options from the sections


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parse_kwargs(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                value = json.loads(item)
            except json.JSONDecodeError as exc:
                raise AbliterateError(f"--chat-template-kwargs {item!r} is not valid JSON ({exc})") from exc
            if not isinstance(value, dict):
                raise AbliterateError(f"--chat-template-kwargs {item!r} must be a JSON object")
            out.update(value)
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise AbliterateError(f"--chat-template-kwargs {item!r}: expected a JSON object or KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


# Older flag names, still accepted, not shown in --help.
ALIASES: dict[str, tuple[str, ...]] = {
    "token_position": ("--position",),
    "direction_position": ("--direction-layer", "--select"),
    "ablation_method": ("--method",),
    "streaming": ("--stream",),
    "validation_fraction": ("--val-fraction",),
}


def _default_note(description: str, default: Any) -> str:
    """What --help adds to a setting's description: its default, unless the description says it."""
    if isinstance(default, bool):
        return f" (default: {'on' if default else 'off'})"
    if default is None or (isinstance(default, list | dict) and not default):
        return "" if "default" in description else " (default: none)"
    return f" (default {','.join(default) if isinstance(default, list) else default})"


def add_options(
    parser: argparse.ArgumentParser,
    cls: type[Section],
    only: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    title: str | None = None,
) -> None:
    """Add one option per field of `cls`. Unset options stay out of the namespace, so the model's
    defaults apply and `from_args` sees only what the user typed."""
    group = parser.add_argument_group(title or cls.section)
    for name, info in cls.model_fields.items():
        if (only is not None and name not in only) or name in exclude:
            continue
        kind, _ = _base_type(info.annotation)
        default = info.get_default(call_default_factory=True)
        help_text = (info.description or "") + _default_note(info.description or "", default)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if name in required:
            kwargs["required"] = True
            kwargs["help"] = info.description
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        elif typing.get_origin(kind) is dict:
            kwargs.update(action="append", metavar="JSON|KEY=VALUE")
        elif typing.get_origin(kind) is list:
            kwargs.update(action="append", metavar=name.split("_")[-1].upper())
        else:
            kwargs.update(type=kind if kind in (int, float) else str, metavar=name.split("_")[-1].upper())
        group.add_argument(_flag(name), **kwargs)
        for alias in ALIASES.get(name, ()):
            group.add_argument(alias, **{**kwargs, "help": argparse.SUPPRESS, "required": False})


def from_args(cls: type[Section], args: argparse.Namespace, **overrides: Any):
    """The section from the options the user gave (model defaults for the rest)."""
    values = {name: getattr(args, name) for name in cls.model_fields if hasattr(args, name)}
    if "chat_template_kwargs" in values:
        values["chat_template_kwargs"] = _parse_kwargs(values["chat_template_kwargs"])
    values.update(overrides)
    return cls(**values)
