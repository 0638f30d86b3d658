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
    TARGET_ROLES,
)

# ------------------------------------------------------------------ values typed by users, parsed once

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40})


def parse_size(text: str | None) -> int | None:
    """A byte count from `64GiB`, `500MB`, `1.5TB` or plain bytes; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([A-Za-z]*)", text.strip())
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise AbliterateError(f"memory budget {text!r}: use a size such as 64GiB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


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


class Selection(Section):
    section: typing.ClassVar[str] = "selection"

    direction_position: str = Field(
        "auto",
        description="residual position of the direction to ablate: auto (chosen by inference-time "
        "ablation on validation prompts), a number (scored for the record), own (each layer its own position's "
        "direction), none (measure only)",
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

    @field_validator("direction_position", mode="before")
    @classmethod
    def _position(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if text == "selected":  # the plan's and older versions' word for auto
            text = "auto"
        if text in DIRECTION_POSITION_WORDS or text.isdigit():
            return text
        raise ValueError("use auto, own, none or a residual position number >= 0")


class Ablation(Section):
    section: typing.ClassVar[str] = "ablation"

    layers: str = Field("all", description="target layers: all | 10-30 | 5,7,9-12 (exact indices)")
    scale: str = Field(
        "1.0",
        description="1.0 | one value per target layer (comma list) | "
        "gauss:center=20,width=5,peak=1 (each in [0, 2])",
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

    @field_validator("layers", "scale", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:  # `prefect deployment run -p scale=0.8` sends numbers
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("give text such as `all`, `10-30` or `1.0`")
        return str(value)

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
        "(when the model fits the memory budget), always (a larger model runs offloaded by accelerate: every new "
        "token reads the offloaded weights from disk once per batch), never (first-token figures only)",
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
    search_seed: int = Field(0, description="seed of the study's sampler (another seed: another study)")
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
        description="study name (default: derived from the model, directions, prompts, "
        "scoring and search space, so the same search resumes)",
    )

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
    for cls in (Prompts, Template, Measurement, Selection, Ablation, Evaluation, Runtime, Search)
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
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = (info.description or "") + (
            "" if default in (None, {}, [], False) else f" (default {shown})"
        )
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
