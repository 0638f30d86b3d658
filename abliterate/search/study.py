"""Automatic search: the refusal-vs-KL front over layer kernels, weight roles and routers.

An Optuna study (multi-objective TPE, both objectives minimised) over
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
  experts).

Each trial's parameters become an `AblationPlan` (`plan_for`), and the plan is scored without
rewriting the checkpoint, applied at inference time (`abliterate.inference.plan_edit.PlanEdit`, which
equals the engine's edit): the refusal rate of greedy replies of `reply_tokens` tokens to held-out
harmful prompts (the marker check of `abliterate.inference.refusal`), and the mean first-token
KL(unmodified || trial) on held-out harmless prompts (the figure `abliterate.check.evaluate` reports).
In memory each trial costs one `generate` and one forward pass; layer-streamed, the trials asked
together (`parallel_trials`) share every pass over the weights: one for the KL and one per reply
token (a reply stops as soon as the marker check calls it a refusal).

Trial 0 of a new study is `run`'s automatic choice (every group at scale 1 on every layer, the
selected position, plain method): the front starts from the default and the search looks for
better trade-offs. The study lives in SQLite (`<project>/mlruns/search.db`); its name hashes the
model, the directions, the held-out prompts and the search space, so a rerun of the same search
resumes it: trials a killed run left running are marked failed and their parameters tried again,
and `trials` is the number of complete trials the study should hold (a rerun with more continues).
One process runs a study at a time (a lock file beside the database).

The chosen trial (`choose`): the front's trial with the fewest refusals among those whose KL is at
most `kl_max` (ties: the lower KL), or the trial the user names.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from abliterate.edit.plan import METHODS, AblationPlan, build_plan, parse_scale
from abliterate.errors import AbliterateError
from abliterate.vocabulary import SEARCH_COMPONENTS, SEARCH_GROUPS, SEARCH_OBJECTIVES, STUDY_FILE

GROUPS = SEARCH_GROUPS
COMPONENTS = SEARCH_COMPONENTS
MIN_SCALE = 0.05  # kernel scales below this are 0: the tensor is not edited
PEAK = (0.5, 1.5)
MIN_WIDTH = 0.5
SHIFT = (0.05, 1.0)  # how far the correction bias of a suppressed expert is lowered
OBJECTIVES = SEARCH_OBJECTIVES


# ------------------------------------------------------------------ the space and the plan of a trial


@dataclass(frozen=True)
class SearchSpace:
    num_layers: int
    mtp_layers: tuple[int, ...]
    positions: tuple[float, float]  # direction position range
    groups: tuple[tuple[str, tuple[int, ...]], ...]  # searched roles, each with the layers that hold it
    methods: tuple[str, ...]
    experts: tuple[tuple[int, int], ...] = ()  # router_bias candidates, most refusal-specific first
    selected_position: int | None = None  # run's automatic choice

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def search_space(
    inputs: Any,
    components: Sequence[str],
    methods: Sequence[str],
    skip_last_fraction: float,
    experts: Sequence[tuple[int, int]] = (),
) -> SearchSpace:
    """The space for a model (`matching.AblationInputs`): the groups of `components` the checkpoint
    has, the candidate direction positions, and the experts the router_bias component may suppress
    (most specific first: `ExpertProfile.most_specific`)."""
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise AbliterateError(f"unknown search components {unknown}: choose from {', '.join(COMPONENTS)}")
    bad = sorted(set(methods) - set(METHODS))
    if bad or not methods:
        raise AbliterateError(f"search methods {list(methods)}: choose one or more of {', '.join(METHODS)}")
    structure, directions = inputs.structure, inputs.directions
    L = structure.num_layers
    present: dict[str, set[int]] = {}
    for t in inputs.inventory.tensors.values():
        if t.role in GROUPS and t.layer is not None and t.layer < L:
            present.setdefault(t.role, set()).add(t.layer)
    groups = tuple((g, tuple(sorted(present[g]))) for g in GROUPS if g in components and g in present)
    if not groups:
        raise AbliterateError(f"the model holds none of the searched components {list(components)}")
    if directions.single:
        positions = (0.0, 0.0)
    else:
        last = int(L * (1.0 - skip_last_fraction))
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
        m for m in METHODS if m in methods and (m != "projected" or directions.harmless_mean is not None)
    )
    if not methods:
        raise AbliterateError(
            "the projected method needs the harmless means, which the directions file lacks"
        )
    selected = 0 if directions.single else directions.selected_position
    return SearchSpace(
        L,
        tuple(structure.mtp_layers),
        positions,
        groups,
        methods,
        tuple(experts) if "router_bias" in components else (),
        selected,
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
    return params


def kernel_spec(params: dict[str, Any], group: str) -> str:
    peak = params[f"{group}.peak"]
    return (
        f"gauss:center={params[f'{group}.center']:.6g},width={params[f'{group}.width']:.6g},"
        f"peak={peak:.6g},floor={peak * params[f'{group}.floor']:.6g}"
    )


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

    return build_plan(
        space.num_layers,
        space.mtp_layers,
        layers=",".join(map(str, layers)),
        scale=listed([max(scales[g][i] for g in targets) for i in layers_all]),
        targets=targets,
        direction_position=repr(float(params["direction_position"])),
        method=params["method"],
        role_scales={g: listed(scales[g]) for g in targets},
        router_bias=shifts,
        origin=origin,
    )


# ------------------------------------------------------------------ scoring a trial at inference time


@dataclass(frozen=True)
class ScoreSettings:
    reply_tokens: int = 24
    batch_size: int = 16
    markers: tuple[str, ...] = ()
    system_prompt: str | None = None
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass
class TrialScore:
    refusal_rate: float  # share of held-out harmful prompts whose bounded greedy reply is a refusal
    kl: float  # mean first-token KL(unmodified || trial) over the held-out harmless prompts, nats
    refusals: int
    prompts: int
    seconds: float = 0.0


class TrialScorer:
    """Scores plans (`PlanEdit`s; None: the model as it is) on held-out prompts, on a model in memory or
    layer-streamed (`abliterate.inference.runner`)."""

    def __init__(
        self,
        forward: Any,
        tokenizer: Any,
        harmful: Sequence[str],
        harmless: Sequence[str],
        settings: ScoreSettings,
        progress: bool = False,
    ):
        from abliterate.check.evaluate import EvalSettings, encode
        from abliterate.inference.runner import stop_ids
        from abliterate.measure.means import pad_token_id
        from abliterate.vocabulary import DEFAULT_REFUSAL_MARKERS

        self.forward, self.tokenizer, self.settings, self.progress = forward, tokenizer, settings, progress
        self.markers = settings.markers or DEFAULT_REFUSAL_MARKERS
        rendering = EvalSettings(
            max_new_tokens=settings.reply_tokens,
            batch_size=settings.batch_size,
            markers=self.markers,
            system_prompt=settings.system_prompt,
            chat_template_kwargs=settings.chat_template_kwargs,
        )
        context = getattr(forward.config, "max_position_embeddings", None)
        context = context if isinstance(context, int) and 0 < context < 10_000_000 else None
        self.harmful = encode(tokenizer, harmful, rendering, "held-out harmful", context)
        self.harmless = encode(tokenizer, harmless, rendering, "held-out harmless", context)
        self.pad_id = pad_token_id(tokenizer)
        self.stops = stop_ids(forward.generation_eos, tokenizer)
        self.baseline_logprobs: torch.Tensor | None = None
        self.baseline = self.score([None])[0]

    def refused(self, reply: Sequence[int]) -> bool:
        from abliterate.inference.refusal import is_refusal

        return is_refusal(self.tokenizer.decode(list(reply), skip_special_tokens=True), self.markers)

    def score(self, edits: Sequence[Any]) -> list[TrialScore]:
        """One score per edit: in memory one after the other, layer-streamed all in the same passes."""
        from abliterate.select.selection import first_token_kl, first_token_logprobs

        began = time.perf_counter()
        if self.forward.streamed:
            replies = streamed_greedy(
                self.forward,
                self.harmful,
                edits,
                self.settings.reply_tokens,
                self.settings.batch_size,
                self.pad_id,
                self.stops,
                self.refused,
            )
            logprobs = streamed_last_logprobs(
                self.forward, [self.harmless] * len(edits), edits, self.settings.batch_size, self.pad_id
            )
        else:
            replies, logprobs = [], []
            for edit in edits:
                with edit.applied(self.forward.model) if edit is not None else nullcontext():
                    replies.append(
                        self.forward.greedy(
                            self.harmful,
                            self.settings.reply_tokens,
                            self.settings.batch_size,
                            self.pad_id,
                            self.stops,
                        )
                    )
                    logprobs.append(
                        first_token_logprobs(
                            self.forward.model, self.harmless, self.settings.batch_size, self.pad_id
                        )
                    )
        if self.baseline_logprobs is None:
            self.baseline_logprobs = logprobs[0]
        seconds = (time.perf_counter() - began) / max(len(edits), 1)
        out = []
        for reply_set, lp in zip(replies, logprobs, strict=True):
            refusals = sum(self.refused(r) for r in reply_set)
            out.append(
                TrialScore(
                    refusals / len(reply_set),
                    first_token_kl(self.baseline_logprobs, lp),
                    refusals,
                    len(reply_set),
                    round(seconds, 4),
                )
            )
        return out


def streamed_last_logprobs(
    forward: Any,
    variant_sets: Sequence[Sequence[Sequence[int]]],
    edits: Sequence[Any],
    batch_size: int,
    pad_id: int,
) -> list[torch.Tensor]:
    """One pass over a layer-streamed model's weights: edit v (a PlanEdit, or None) runs on its own
    encoded prompts `variant_sets[v]` (embedded once where variants share a list); float64
    log-probabilities [N_v, V] of the token after each prompt."""
    from abliterate.inference.streaming import layer_output

    stream = forward.stream()
    embedded: dict[int, list] = {}
    batches = []
    for encoded in variant_sets:
        if id(encoded) not in embedded:
            embedded[id(encoded)] = stream.embed({"x": [list(x) for x in encoded]}, batch_size, -1, pad_id)
        batches.append(embedded[id(encoded)])
    hidden = [
        [item.hidden if e is None else e.embedded(item.hidden) for item in batches[v]]
        for v, e in enumerate(edits)
    ]
    for index, layer in stream.each_layer(f"score {len(edits)} trials (layer-streamed)", False):
        for v, edit in enumerate(edits):
            with edit.on_layer(index, layer) if edit is not None else nullcontext(), torch.inference_mode():
                for b, item in enumerate(batches[v]):
                    args, kwargs = item.layer_args[index]
                    hidden[v][b] = layer_output(layer(hidden[v][b], *args, **kwargs))
    forward.weight_reads += 1
    out = []
    with stream.head() as logits_of:
        for v in range(len(edits)):
            rows: list[torch.Tensor | None] = [None] * len(variant_sets[v])
            for b, item in enumerate(batches[v]):
                logprobs = torch.log_softmax(logits_of(hidden[v][b][:, -1, :]).double(), dim=-1).cpu()
                for row, prompt in enumerate(item.batch.indices):
                    rows[prompt] = logprobs[row]
            out.append(torch.stack(rows))  # type: ignore[arg-type]
            hidden[v] = []
    return out


def streamed_greedy(
    forward: Any,
    encoded: Sequence[Sequence[int]],
    edits: Sequence[Any],
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
    stops: set[int],
    finished: Callable[[list[int]], bool] | None = None,
) -> list[list[list[int]]]:
    """Greedy replies of every edit on a layer-streamed model: one pass over the weights per new token
    for all edits together; a reply stops at an end token or when `finished(reply so far)`."""
    out: list[list[list[int]]] = [[[] for _ in encoded] for _ in edits]
    active = [list(range(len(encoded))) for _ in edits]
    for _step in range(max_new_tokens):
        live = [v for v in range(len(edits)) if active[v]]
        if not live:
            break
        sets = [[list(encoded[i]) + out[v][i] for i in active[v]] for v in live]
        for k, logprobs in enumerate(
            streamed_last_logprobs(forward, sets, [edits[v] for v in live], batch_size, pad_id)
        ):
            v, still = live[k], []
            for i, token in zip(active[v], logprobs.argmax(dim=-1).tolist(), strict=True):
                if token in stops:
                    continue
                out[v][i].append(int(token))
                if finished is None or not finished(out[v][i]):
                    still.append(i)
            active[v] = still
    return out


# ------------------------------------------------------------------ the study


def study_name(*parts: Any) -> str:
    """`search-<hash>` of what the trials' scores depend on (model, directions, prompts, space, scoring)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return "search-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def study_storage(root: str | Path) -> str:
    """The SQLite URL of the study database under `root` (the project's mlruns/ folder)."""
    return f"sqlite:///{(Path(root) / STUDY_FILE).resolve()}"


@contextmanager
def study_lock(root: str | Path, name: str) -> Iterator[None]:
    """Held while a process runs the study: a second search of the same study stops at once."""
    path = Path(root) / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AbliterateError(
                f"another search is running study {name} (lock {path}): wait for it to finish or stop it"
            ) from None
        yield
    finally:
        os.close(fd)


def open_study(root: str | Path, name: str, seed: int, startup_trials: int = 10, parallel: int = 1) -> Any:
    """The study `name` in `root`/search.db, created if missing. Its sampler is seeded with `seed` plus
    the number of trials already stored, so a resumed search draws new points, not its first ones."""
    import optuna

    from abliterate.paths import file_lock

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_url = study_storage(root)
    with file_lock(Path(root) / f"{STUDY_FILE}.lock"):  # one process creates or migrates the schema
        storage = optuna.storages.RDBStorage(storage_url, engine_kwargs={"connect_args": {"timeout": 60}})
        _write_ahead_log(storage.engine)
        study = optuna.create_study(
            study_name=name, storage=storage, directions=["minimize", "minimize"], load_if_exists=True
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(
            seed=seed + len(study.get_trials(deepcopy=False)),
            multivariate=True,
            n_startup_trials=startup_trials,
            constant_liar=parallel > 1,
        )
    return study


def _write_ahead_log(engine: Any) -> None:
    """SQLite in write-ahead-log mode, synced at checkpoints: every suggested parameter is a commit, and
    with the default rollback journal each one waits for a sync of the disk (about 1 s per trial here
    against 0.15 s). A killed process loses nothing committed; a power cut at most the last commits."""
    from sqlalchemy import event

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections made from now on get the pragmas


def recover_stale(study: Any) -> list[int]:
    """Trials a killed run left running (this process holds the study's lock, so no one runs them):
    marked failed, and their parameters queued to be tried again. Returns their numbers."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs=dict(t.user_attrs))
    return [t.number for t in stale]


def complete_trials(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def trial_record(t: Any) -> dict[str, Any]:
    """A complete trial as the search reports it."""
    return {
        "trial": t.number,
        "refusal_rate": t.values[0],
        "kl": t.values[1],
        "refusals": t.user_attrs.get("refusals"),
        "prompts": t.user_attrs.get("prompts"),
        "parameters": dict(t.params),
        "reference": t.user_attrs.get("reference"),
        "plan": t.user_attrs.get("plan"),
    }


def pareto(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records no other record beats on both objectives (lower is better), by refusal rate then KL."""
    front = [
        p
        for p in records
        if not any(
            q["refusal_rate"] <= p["refusal_rate"]
            and q["kl"] <= p["kl"]
            and (q["refusal_rate"] < p["refusal_rate"] or q["kl"] < p["kl"])
            for q in records
        )
    ]
    return sorted(front, key=lambda p: (p["refusal_rate"], p["kl"], p["trial"]))


def choose(records: list[dict[str, Any]], kl_max: float, trial: int | None = None) -> dict[str, Any]:
    """The trial to write: `trial` when given (a complete trial), else the front's trial with the fewest
    refusals among those with KL <= kl_max (ties: the lower KL, then the earlier trial)."""
    if trial is not None:
        found = [r for r in records if r["trial"] == trial]
        if not found:
            raise AbliterateError(
                f"trial {trial} is not a complete trial of this study: "
                f"choose from {sorted(r['trial'] for r in records)}"
            )
        return found[0]
    front = pareto(records)
    allowed = [r for r in front if r["kl"] <= kl_max]
    if not allowed:
        least = min(front, key=lambda r: r["kl"])
        raise AbliterateError(
            f"no trial on the front has a KL of at most {kl_max:g}: the lowest is {least['kl']:.4g} (trial "
            f"{least['trial']}); raise --kl-max, run more trials, or name one with --trial"
        )
    return min(allowed, key=lambda r: (r["refusal_rate"], r["kl"], r["trial"]))


@dataclass
class TrialResult:
    """What the search hands to whoever records it (the flow: one nested MLflow run per trial)."""

    number: int
    parameters: dict[str, Any]
    plan: dict[str, Any] | None
    score: TrialScore | None  # None: the trial failed (its plan could not be built)
    reference: str | None = None
    error: str | None = None


@dataclass
class SearchProgress:
    new: list[TrialResult] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    seconds: float = 0.0


def run_search(
    study: Any,
    space: SearchSpace,
    scorer: TrialScorer,
    make_edit: Callable[[AblationPlan], Any],
    trials: int,
    parallel: int = 1,
    on_trial: Callable[[TrialResult], None] | None = None,
    origin: dict[str, Any] | None = None,
) -> SearchProgress:
    """Ask, score and tell until the study holds `trials` complete trials. `make_edit(plan)` gives the
    plan's PlanEdit (resolved against the model and directions). `on_trial` sees every finished trial."""
    from optuna.trial import TrialState

    progress = SearchProgress(stale=recover_stale(study))
    began = time.perf_counter()
    if not study.get_trials(deepcopy=False):
        reference = default_params(space)
        if reference is not None:
            study.enqueue_trial(reference, user_attrs={"reference": "run"})
    failures = 0
    while len(complete_trials(study)) < trials:
        wanted = min(parallel, trials - len(complete_trials(study)))
        asked, plans, edits = [], [], []
        for _ in range(wanted):
            t = study.ask()
            params = suggest(t, space)
            record = {
                "search": {
                    "study": study.study_name,
                    "trial": t.number,
                    "parameters": params,
                    "kernels": {g: kernel_spec(params, g) for g, _ in space.groups},
                    **(origin or {}),
                }
            }
            try:
                plan = plan_for(params, space, record)
                edit = make_edit(plan)
            except AbliterateError as exc:
                study.tell(t, state=TrialState.FAIL)
                failures += 1
                result = TrialResult(t.number, params, None, None, t.user_attrs.get("reference"), str(exc))
                progress.new.append(result)
                if on_trial:
                    on_trial(result)
                if failures > max(10, trials):
                    raise AbliterateError(
                        f"{failures} trials failed to build a plan, the last: {exc}"
                    ) from None
                continue
            asked.append((t, params))
            plans.append(plan)
            edits.append(edit)
        if not edits:
            continue
        for (t, params), plan, score in zip(asked, plans, scorer.score(edits), strict=True):
            t.set_user_attr("plan", plan.to_dict())
            t.set_user_attr("refusals", score.refusals)
            t.set_user_attr("prompts", score.prompts)
            t.set_user_attr("seconds", score.seconds)
            study.tell(t, [score.refusal_rate, score.kl])
            result = TrialResult(t.number, params, plan.to_dict(), score, t.user_attrs.get("reference"))
            progress.new.append(result)
            if on_trial:
                on_trial(result)
    progress.seconds = time.perf_counter() - began
    return progress


def trials_per_minute(progress: SearchProgress) -> float | None:
    scored = [r for r in progress.new if r.score is not None]
    if not scored or progress.seconds <= 0:
        return None
    return len(scored) / progress.seconds * 60.0


# ------------------------------------------------------------------ one search, end to end (the flow's task)


@dataclass(frozen=True)
class StudySettings:
    """What `run_study` needs besides the model: the Search section's values, resolved."""

    trials: int
    components: tuple[str, ...]
    methods: tuple[str, ...]
    seed: int = 0
    startup_trials: int = 10
    parallel_trials: int = 1
    router_experts: int = 16
    skip_last_fraction: float = 0.2
    study: str | None = None


def run_study(
    model_dir: str | Path,
    directions_path: str | Path,
    harmful: Sequence[str],
    harmless: Sequence[str],
    settings: StudySettings,
    scoring: ScoreSettings,
    root: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    stream: bool = False,
    experts: Sequence[tuple[int, int]] = (),
    on_trial: Callable[[TrialResult], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Open (or resume) the study of this model, directions, held-out prompts, scoring and space in
    `root`/search.db and run it until it holds `settings.trials` complete trials. `experts`: the
    router_bias candidates, most refusal-specific first. `on_start` sees the study's name and space
    once this process holds the study's lock, before the first trial. Returns the study's name, the space, this run's new trials and timing,
    the unmodified model's score and every complete trial (`trial_record`)."""
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import resolve_plan
    from abliterate.edit.output import directions_digest
    from abliterate.inference.plan_edit import PlanEdit, storage_dtypes
    from abliterate.measure.prompts import prompts_sha256
    from abliterate.pipeline import model_forward
    from abliterate.weights.checkpoint import choose_profile

    inputs = load_inputs(model_dir, directions_path)
    profile = choose_profile(model_dir)
    if profile is None:
        raise AbliterateError(f"{model_dir} is of no known family: the search needs its role rules")
    space = search_space(
        inputs,
        settings.components,
        settings.methods,
        settings.skip_last_fraction,
        list(experts)[: settings.router_experts],
    )
    signature = json.loads(
        json.dumps(
            {
                "model": inputs.inventory.fingerprint,
                "directions": directions_digest(inputs.directions),
                "harmful": prompts_sha256(list(harmful)),
                "harmless": prompts_sha256(list(harmless)),
                "scoring": asdict(scoring),
                "space": space.to_json(),
                "seed": settings.seed,
                "dtype": dtype,
            },
            default=str,
        )
    )
    name = settings.study or study_name(signature)
    with study_lock(root, name):
        if on_start:
            on_start({"study": name, "storage": study_storage(root), "space": space.to_json()})
        study = open_study(root, name, settings.seed, settings.startup_trials, settings.parallel_trials)
        stored = study.user_attrs.get("signature")
        if stored is None:
            study.set_user_attr("signature", signature)
        elif stored != signature:
            changed = sorted(k for k in signature if stored.get(k) != signature[k])
            raise AbliterateError(
                f"study {name} in {study_storage(root)} was made by another search ({', '.join(changed)} differ): "
                "its scores would not compare; name another --study, or leave --study out"
            )
        before = len(complete_trials(study))
        forward, tokenizer = model_forward(model_dir, dtype, device, stream, progress)
        scorer = TrialScorer(forward, tokenizer, harmful, harmless, scoring, progress)
        storage = storage_dtypes(inputs.inventory)

        def make_edit(plan: AblationPlan) -> Any:
            return PlanEdit(resolve_plan(plan, inputs), inputs.directions, profile, storage)

        done = run_search(
            study, space, scorer, make_edit, settings.trials, settings.parallel_trials, on_trial
        )
        records = [trial_record(t) for t in complete_trials(study)]
    return {
        "study": name,
        "storage": study_storage(root),
        "space": space.to_json(),
        "resumed_from": before,
        "stale_trials": done.stale,
        "new_trials": [asdict(r) for r in done.new],
        "seconds": round(done.seconds, 3),
        "trials_per_minute": trials_per_minute(done),
        "baseline": asdict(scorer.baseline),
        "weight_reads": forward.weight_reads,
        "trials": records,
    }
