"""Every setting of the pipeline, typed, named and checked in one place.

The sections below are pydantic models. The same objects are
- the CLI's options (`add_options` builds argparse options from the fields: flag = field name
  with dashes, help = the field's description, checks = the field's constraints),
- the Prefect flows' parameters (Prefect validates them and renders each as a form in its UI),
- MLflow params (`flat_params`: `section.field` keys),
- the source of the domain's settings records (`measure_settings`, `selection_settings`,
  `eval_settings`), which are built here and nowhere else.

Names follow docs/DESIGN.md: a *token position* counts tokens from the end of the prompt; a
*residual position* is the input of a decoder layer (L: the last layer's raw output); the
*direction method* makes the directions at measurement, the *ablation method* edits weights.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from abliterate.edit.plan import METHODS
from abliterate.errors import AbliterateError
from abliterate.vocabulary import DEFAULT_TARGETS, DTYPE_CHOICES, MTP_MODES, STREAMING_MODES, TARGET_ROLES


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
    prompt_set: Literal["auto", "general", "demo"] = Field(
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
    direction_method: Literal["projected", "mean_diff"] = Field(
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
        if text in ("auto", "own", "none") or text.isdigit():
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
    ablation_method: Literal[METHODS] = Field(  # type: ignore[valid-type]
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
    full_replies: Literal["auto", "always", "never"] = Field(
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

    def marker_list(self) -> tuple[str, ...]:
        """The marker phrases: the file's, then each --marker; the built-in list when neither is given."""
        from abliterate.inference.refusal import read_markers
        from abliterate.vocabulary import DEFAULT_REFUSAL_MARKERS

        markers = tuple(read_markers(self.markers)) if self.markers else ()
        return markers + tuple(self.marker) or DEFAULT_REFUSAL_MARKERS

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
        from abliterate.inference.streaming import parse_size

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
        from abliterate.inference.devices import check_device

        return check_device(value)

    def resolved(self, model_dir: str | Path) -> Runtime:
        """The same settings with `auto` device and dtype made concrete for this machine and model
        (`abliterate.inference.devices`): what the stages compute with, and what their cache keys hold."""
        from abliterate.inference.devices import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        return self.model_copy(
            update={"device": device, "dtype": resolve_dtype(self.dtype, device, model_dir)}
        )


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
        ["attn_out", "mlp_down", "expert_down", "shared_expert_down", "router"],
        description="component groups searched, each with its own layer kernel (peak position, width, peak and "
        "floor weight): attn_out, mlp_down, expert_down, shared_expert_down, router; router_bias (MoE: lower the "
        "router correction bias of the most refusal-specific experts) is optional; `default` = the five groups",
    )
    methods: list[str] = Field(
        list(METHODS), description=f"ablation methods searched (comma list of {', '.join(METHODS)})"
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
        from abliterate.search.study import COMPONENTS, GROUPS

        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
            raise ValueError("give a comma list of names")
        names = [t.strip() for item in value for t in item.split(",") if t.strip()]
        known = COMPONENTS if info.field_name == "components" else METHODS
        if info.field_name == "components":
            names = [n for name in names for n in (GROUPS if name == "default" else (name,))]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(
                f"choose one or more of {', '.join(known)}" + (f" (not {unknown})" if unknown else "")
            )
        return list(dict.fromkeys(names))


SECTIONS: dict[str, type[Section]] = {
    cls.section: cls
    for cls in (Prompts, Template, Measurement, Selection, Ablation, Evaluation, Runtime, Search)
}


def flat_params(*sections: Section) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sections:
        out.update(s.flat())
    return out


# ------------------------------------------------------------------ domain settings, built here only


def measure_settings(measurement: Measurement, template: Template, runtime: Runtime):
    """From a runtime resolved for the model (`Runtime.resolved`): the settings hold the concrete dtype."""
    from abliterate.measure.means import MeasureSettings

    if runtime.dtype == "auto":
        raise AbliterateError("the compute dtype is still `auto`: resolve the runtime for the model first")

    return MeasureSettings.create(
        template.chat_template_kwargs,
        position=measurement.token_position,
        system_prompt=template.system_prompt,
        batch_size=runtime.batch_size,
        dtype=runtime.dtype,
        max_length=measurement.max_length,
    )


def selection_settings(selection: Selection, runtime: Runtime, evaluation: Evaluation | None = None):
    """`evaluation` gives the marker phrases and the probe length that find the refusal tokens."""
    from abliterate.select.selection import SelectionSettings

    evaluation = evaluation or Evaluation()
    return SelectionSettings(
        kl_threshold=selection.kl_threshold,
        skip_last_fraction=selection.skip_last_fraction,
        max_candidates=selection.max_candidates,
        batch_size=runtime.batch_size,
        markers=evaluation.marker_list(),
        refusal_probe_tokens=evaluation.refusal_probe_tokens,
    )


def eval_settings(evaluation: Evaluation, template: Template, runtime: Runtime, stream: bool = False):
    """From a runtime resolved for the model; `stream`: the model is evaluated layer-streamed."""
    from abliterate.check.evaluate import EvalSettings

    if runtime.dtype == "auto":
        raise AbliterateError("the compute dtype is still `auto`: resolve the runtime for the model first")
    return EvalSettings(
        max_new_tokens=evaluation.max_new_tokens,
        batch_size=runtime.batch_size,
        markers=evaluation.marker_list(),
        system_prompt=template.system_prompt,
        chat_template_kwargs=tuple(sorted(template.chat_template_kwargs.items())),
        n_examples=evaluation.examples,
        full_replies=evaluation.replies(stream),
        refusal_probe_tokens=evaluation.refusal_probe_tokens,
        dtype=runtime.dtype,
    )


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
