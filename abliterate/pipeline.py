"""The pipeline: its stages in order, as plain functions with typed results. The one wiring of the
stages: the CLI's commands, the Prefect tasks and flows (abliterate_tasks, abliterate_flows) and the
benchmarks call these, so every way of running gives the same results and records.

- checks before any work: `run_paths` (nothing written inside the model), `check_plans` (each
  ablation against the model's headers), `check_settings` (the refusal markers);
- `PromptSets.load`: the prompt sets a run uses (files, or the project's sets), split for validation;
- `decide_streaming`: the one decision between in-memory and layer-streamed work;
- `measure_stage`: mean residuals of both prompt sets at every residual position;
- `direction_stage`: the directions and the direction to ablate, scored in memory or layer-streamed;
- `plan_position`: the configured direction position as the plan names it.

Ablation, validation and evaluation are each one domain call (`abliterate.edit.ablate`,
`abliterate.check.validate`, `abliterate.check.evaluate`), run by their tasks.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from abliterate import config
from abliterate.config import Ablation, Evaluation, Prompts, Runtime, Template, environment, parse_size
from abliterate.demo import DEMO_MODEL_DIR, prompt_file
from abliterate.edit.matching import plan_matches
from abliterate.edit.plan import build_plan
from abliterate.errors import AbliterateError
from abliterate.inference.refusal import marker_phrases
from abliterate.inference.runner import model_forward
from abliterate.inference.streaming import choose_streaming
from abliterate.measure.directions import DirectionSet, compute_directions
from abliterate.measure.means import Measurement, measure_checkpoint
from abliterate.measure.prompts import load_prompts, prompts_sha256, split_prompts
from abliterate.measure.streamed import measure_streamed
from abliterate.measure.subspace import prompt_categories
from abliterate.paths import check_sqlite_file, folder_to_write
from abliterate.select.selection import Selection, select_direction
from abliterate.vocabulary import MANIFEST_FILE
from abliterate.weights.checkpoint import build_inventory, check_output_location
from abliterate.weights.hub import resolve_model
from abliterate.weights.structure import detect_structure


def decide_streaming(model_dir: str | Path, runtime: Runtime) -> bool:
    """Layer-streamed when the runtime says so, or (auto) when the weights exceed the memory budget."""
    return choose_streaming(
        model_dir, parse_size(runtime.memory_budget), runtime.dtype, runtime.device, runtime.streaming
    )


def scores_directions(model_dir: str | Path, direction_position: str, stream: bool = False) -> bool:
    """Whether the direction stage scores candidates (and so needs validation prompts): in memory or
    layer-streamed alike, every position but `own` and `none`."""
    return direction_position not in ("own", "none")


def measure_stage(
    model_dir: str,
    harmful: Sequence[str],
    harmless: Sequence[str],
    measurement: config.Measurement,
    template: Template,
    runtime: Runtime,
    stream: bool = False,
    progress: bool = True,
) -> Measurement:
    """In memory, or one decoder layer at a time (`stream`, on `abliterate.inference.devices.stream_device`):
    equal results either way. `runtime`: resolved for the model (`resolve_runtime`)."""
    if stream:
        return measure_streamed(model_dir, harmful, harmless, measurement, template, runtime, progress)
    return measure_checkpoint(model_dir, harmful, harmless, measurement, template, runtime, progress)


def direction_stage(
    model_dir: str,
    measurement: Measurement,
    direction_method: str,
    direction_position: str,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    selection: config.Selection,
    evaluation: config.Evaluation,
    device: str = "cpu",
    stream: bool = False,
    progress: bool = True,
) -> tuple[DirectionSet, Selection | None]:
    """Directions at every residual position, and the one to ablate.

    `direction_position`: `auto` scores every candidate by inference-time ablation and picks the
    best; a number N is scored alone (for the record) and kept whatever its scores; `own` and
    `none` choose nothing (each layer uses its own position's direction, or measurement only).
    A streamed model (`stream`) is scored layer-streamed: the unmodified model and every candidate
    in one pass over the weights, after one pass per probe token to find its refusal tokens.
    `evaluation` gives the refusal markers and probe length; the batch size is the measurement's.
    Where the measurement kept subspaces, the rank removed at the chosen position is chosen too
    (`selection.max_rank`; `abliterate.select.selection.score_ranks`).
    """
    directions = compute_directions(measurement, direction_method)
    if direction_position in ("own", "none"):
        return directions, None
    fixed = int(direction_position) if direction_position.isdigit() else None
    if fixed is not None and (fixed >= directions.num_positions or fixed not in directions.defined):
        raise AbliterateError(
            f"direction position {fixed}: residual positions with a non-zero direction are {directions.defined}"
        )
    forward, tokenizer = model_forward(model_dir, measurement.runtime.dtype, device, stream, progress)
    chosen = select_direction(
        forward,
        tokenizer,
        directions,
        harmful_val,
        harmless_val,
        measurement.settings,
        measurement.template,
        selection,
        evaluation,
        measurement.runtime,
        fixed,
        progress,
        directions.subspaces,
    )
    return directions, chosen


# ------------------------------------------------------------------ paths and prompt sets, checked before any work


@dataclass
class PromptSets:
    """Measurement and validation parts of each set (split here, seeded), and the test sets."""

    harmful: list[str]
    harmless: list[str]
    harmful_val: list[str]
    harmless_val: list[str]
    harmful_test: list[str]
    harmless_test: list[str]
    files: dict[str, str]

    @classmethod
    def load(
        cls,
        model: str,
        prompts: Prompts,
        harmful_val: str | None = None,
        harmless_val: str | None = None,
        split: bool = True,
    ) -> PromptSets:
        """The sets the settings name, the project's prompt set where they name none. Validation
        prompts: the given files, else a seeded split of the training sets (`split`), else none
        (nothing is scored: every prompt is measured)."""
        if (harmful_val is None) != (harmless_val is None):
            raise AbliterateError("give both harmful and harmless validation prompts, or neither")
        default_set = prompts.prompt_set
        if default_set == "auto":  # the demo model knows only its own vocabulary
            default_set = "demo" if is_demo_model(model) else "general"
        files = {
            "harmful": prompts.harmful or str(prompt_file(default_set, "harmful", "train")),
            "harmless": prompts.harmless or str(prompt_file(default_set, "harmless", "train")),
            "harmful_test": prompts.harmful_test or str(prompt_file(default_set, "harmful", "test")),
            "harmless_test": prompts.harmless_test or str(prompt_file(default_set, "harmless", "test")),
        }
        fraction, seed = prompts.validation_fraction, prompts.seed
        harmful, harmless = load_prompts(files["harmful"]), load_prompts(files["harmless"])
        if harmful_val is not None and harmless_val is not None:
            files.update(harmful_val=harmful_val, harmless_val=harmless_val)
            harmful_val, harmless_val = load_prompts(harmful_val), load_prompts(harmless_val)
        elif split:
            harmful_val, harmful = split_prompts(harmful, fraction, seed)
            harmless_val, harmless = split_prompts(harmless, fraction, seed)
        else:
            harmful_val, harmless_val = [], []
        return cls(
            harmful,
            harmless,
            harmful_val,
            harmless_val,
            load_prompts(files["harmful_test"]),
            load_prompts(files["harmless_test"]),
            files,
        )

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"prompts.{k}.file": v for k, v in self.files.items()}
        for name in ("harmful", "harmless", "harmful_val", "harmless_val", "harmful_test", "harmless_test"):
            prompts = getattr(self, name)
            out[f"prompts.{name}.n"] = len(prompts)
            out[f"prompts.{name}.sha256"] = prompts_sha256(prompts)
        return out


def is_demo_model(model: str | Path) -> bool:
    """The demo model, or an ablation of it (its manifest names the demo model as the input)."""
    path = Path(model).resolve()
    if path == DEMO_MODEL_DIR.resolve():
        return True
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    source = manifest.get("input") if isinstance(manifest, dict) else None
    return isinstance(source, dict) and source.get("path") == str(DEMO_MODEL_DIR.resolve())


def run_paths(model: str, out: str | None, work_dir: str | None) -> tuple[str, str | None, str]:
    """Absolute paths, checked before any work: nothing the run writes may lie inside the model. A Hub
    id `org/name[@revision]` becomes its snapshot folder in huggingface_hub's cache (abliterate.weights.hub)."""
    model = str(Path(resolve_model(model)).resolve())
    work = str(check_output_location(model, work_dir or environment().results_dir()))
    check_output_location(model, environment().project_dir() / "mlruns")
    check_tracking_store(environment().tracking_uri())
    check_output_location(
        model, environment().results_dir() / "prefect-storage"
    )  # where Prefect persists task results
    return model, str(check_output_location(model, out)) if out else None, work


# How long a tracking server may take to accept a connection before a run refuses to start.
TRACKING_CONNECT_TIMEOUT_S = 10


def check_tracking_store(uri: str) -> None:
    """The stores of a run, checked with its paths, before any server starts or any work: a local SQLite
    MLflow store that is garbage or a directory (MLflow failed on it only when the flow opened it, minutes
    in), a tracking server that accepts no connection (MLflow retried for minutes, then a traceback)."""
    if uri.startswith("sqlite:///"):
        check_sqlite_file(Path(uri.removeprefix("sqlite:///")), "the MLflow store")
        return
    reason = connection_refused(uri)
    if reason is not None:
        raise AbliterateError(
            f"the MLflow tracking server at MLFLOW_TRACKING_URI={uri} does not answer ({reason}): start it, or "
            "unset MLFLOW_TRACKING_URI to record runs in the local store under ABLITERATE_HOME"
        )


def check_prefect_server() -> None:
    """A PREFECT_API_URL that accepts no connection (the line came after the imports and the flow's start:
    90 s on a busy machine), or without one a PREFECT_HOME that is no folder (the temporary server could
    not start and the run waited out the 300 s start-up bound): one line before the flows are imported."""
    api = environment().prefect_api_url
    if not api:  # the temporary server keeps its database under PREFECT_HOME: a file there hung 300 s
        home = os.environ.get("PREFECT_HOME") or str(Path.home() / ".prefect")
        folder_to_write(
            Path(home).expanduser(), "PREFECT_HOME (where Prefect's temporary server keeps its database)"
        )
    reason = connection_refused(api) if api else None
    if reason is not None:
        raise AbliterateError(
            f"the Prefect server at PREFECT_API_URL={api} does not answer ({reason}): start it with `prefect "
            "server start` (or `unset PREFECT_API_URL` to let each command start a temporary one)"
        )


def connection_refused(url: str) -> str | None:
    """Why a server at an http(s) URL accepts no TCP connection (within TRACKING_CONNECT_TIMEOUT_S), or None
    when it does (or the URL names no such server: the client reports that itself)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=TRACKING_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return None


def check_settings(evaluation: Evaluation) -> None:
    """The settings read from files that need no model, read once before any work: the refusal
    markers (the `--markers` file readable and not empty, no blank `--marker`), which the selection
    and the evaluation otherwise read only after the measurement."""
    marker_phrases(evaluation)


def check_subspace(ablation: Ablation, prompts: PromptSets) -> None:
    """A fixed rank k > 1 of the `categories` subspace needs k categories among the harmful prompts:
    said before the measurement, not when the ablation asks the directions file for them."""
    rank = ablation.fixed_rank or 1
    if rank <= 1 or ablation.subspace != "categories":
        return
    found = len(set(prompt_categories(prompts.harmful) or ()))
    if found < rank:
        raise AbliterateError(
            f"--rank {rank} --subspace categories removes one direction per category, but the harmful prompts "
            f"({prompts.files['harmful']}) carry {found} categories: give each prompt a `category` field "
            "(jsonl, json, csv or parquet), lower --rank, or choose --subspace pca or clusters"
        )


def check_plans(
    model: str, specs: list[tuple[Ablation, str]], measurement: config.Measurement | None = None
) -> None:
    """Each ablation's layers, scales, targets and direction position against the model's headers,
    and its rank against the directions `measurement` keeps, before the measurement: a plan that
    cannot run fails in seconds, not after an hour. A checkpoint whose headers cannot be read is left
    to the inventory task, which reports it."""
    for ablation, _ in specs:
        rank = ablation.fixed_rank or 1
        if measurement is not None and rank > measurement.subspace_rank:
            raise AbliterateError(
                f"--rank {rank} removes {rank} directions at each layer, but the measurement keeps "
                f"{measurement.subspace_rank} per subspace method (--subspace-rank): raise --subspace-rank to "
                f"{rank} or lower --rank"
            )
    try:
        inventory = build_inventory(model)
        structure = detect_structure(inventory)
    except AbliterateError:
        return
    for ablation, position in specs:
        if position.isdigit() and int(position) > structure.num_layers:
            raise AbliterateError(
                f"direction position {position} is out of range: the model has residual positions "
                f"0..{structure.num_layers}"
            )
        plan = build_plan(
            structure.num_layers, structure.mtp_layers, ablation, position if position.isdigit() else "own"
        )
        plan_matches(plan, inventory, structure)


def plan_position(direction_position: str, selected: bool) -> str | int:
    """The plan's direction position for the configured one: `auto` (the selected position, recorded
    in the directions file) when one was selected, else each layer's own; or N."""
    if direction_position.isdigit():
        return int(direction_position)
    if direction_position == "own" or not selected:
        return "own"
    return "auto"
