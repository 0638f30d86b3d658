"""MoE expert profiling: how often each routed expert is chosen on harmful versus harmless prompts.

For every MoE decoder layer and routed expert, the share of real prompt tokens (padding left out)
whose chosen experts include it, on each prompt set: `harmful[l][e]`, `harmless[l][e]` (each row sums
to the number of experts chosen per token). The choice is read from the model's own router module
while the prompts run (its third output, the chosen expert indices), so it is exactly what the
model computes: for GLM-4.5 the sigmoid scores plus `e_score_correction_bias`, the group-limited
top-k (the `topk_group` best of `n_group` groups, each group scored by its two best experts) and
the top `num_experts_per_tok` of what is left (transformers' `Glm4MoeTopkRouter`). The correction
bias decides which experts are chosen, never their gate weights.

`specificity = harmful - harmless`: experts chosen more often on harmful prompts come first in
`most_specific` (the refusal-specific experts of SteerMoE and SAFEx). The search's optional
`router_bias` component lowers the correction bias of the first N of them.

Runs on a model in memory or layer-streamed (one read of the weights), like the measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from abliterate.config import Measurement, Runtime, Template
from abliterate.edit.inference_edit import layer_slots
from abliterate.errors import AbliterateError
from abliterate.inference.loading import Batch, pad_token_id
from abliterate.inference.runner import model_forward
from abliterate.measure.chat import encode_prompts
from abliterate.weights.checkpoint import choose_profile
from abliterate.weights.profiles import Profile


@dataclass
class ExpertProfile:
    layers: list[int]  # the MoE decoder layers, in order
    experts: int  # routed experts per layer
    chosen: int  # experts chosen per token
    harmful: list[list[float]]  # [layer][expert]: share of harmful prompt tokens routed to the expert
    harmless: list[list[float]]
    tokens: dict[str, int]  # real prompt tokens counted per set

    def specificity(self) -> torch.Tensor:
        """[layers, experts]: harmful share minus harmless share."""
        return torch.tensor(self.harmful, dtype=torch.float64) - torch.tensor(
            self.harmless, dtype=torch.float64
        )

    def most_specific(self, n: int | None = None) -> list[tuple[int, int, float]]:
        """(layer, expert, specificity) with the largest specificity first (ties: lower layer, then expert);
        only experts chosen more often on harmful prompts."""
        spec = self.specificity()
        ranked = sorted(
            (
                (self.layers[i], e, float(spec[i, e]))
                for i in range(len(self.layers))
                for e in range(self.experts)
            ),
            key=lambda item: (-item[2], item[0], item[1]),
        )
        ranked = [item for item in ranked if item[2] > 0]
        return ranked if n is None else ranked[:n]

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer and expert, for a table."""
        spec = self.specificity()
        return [
            {
                "layer": layer,
                "expert": e,
                "harmful": self.harmful[i][e],
                "harmless": self.harmless[i][e],
                "specificity": float(spec[i, e]),
            }
            for i, layer in enumerate(self.layers)
            for e in range(self.experts)
        ]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def router_paths(layer: torch.nn.Module, index: int, profile: Profile) -> list[str]:
    """The router modules of a decoder layer (`mlp.gate`), found by the profile's role rules."""
    return [
        slot.path.rpartition(".")[0] for slot in layer_slots(layer, index, profile) if slot.role == "router"
    ]


class _Counter:
    """Forward hooks on the routers: count each real token's chosen experts."""

    def __init__(self, experts: int):
        self.experts = experts
        self.mask: torch.Tensor | None = None  # [B*T] bool: real tokens of the batch running now
        self.counts: dict[tuple[str, int], torch.Tensor] = {}
        self.label = ""

    def hook(self, index: int):
        def record(_module, _inputs, output):
            if (
                not isinstance(output, tuple)
                or len(output) < 3
                or output[-1].dtype not in (torch.int64, torch.int32)
            ):
                raise AbliterateError(
                    f"the router of layer {index} ({type(_module).__name__}) does not return the chosen experts "
                    "as its last output: expert profiling supports routers that do (GLM-4.5, Qwen3-MoE)"
                )
            chosen = output[-1].reshape(-1, output[-1].shape[-1]).cpu()
            if self.mask is not None:
                chosen = chosen[self.mask]
            key = (self.label, index)
            counts = self.counts.setdefault(key, torch.zeros(self.experts, dtype=torch.float64))
            counts += torch.bincount(chosen.flatten(), minlength=self.experts)[: self.experts].double()

        return record


def profile_experts(
    forward: Any,
    tokenizer: Any,
    harmful: Sequence[Sequence[int]],
    harmless: Sequence[Sequence[int]],
    profile: Profile,
    batch_size: int,
    progress: bool = True,
) -> ExpertProfile:
    """Routing shares per MoE layer and expert on the encoded prompt sets (`abliterate.inference.runner`: a model
    in memory or layer-streamed)."""
    config = forward.config
    experts = int(
        getattr(config, "n_routed_experts", None)
        or getattr(config, "num_experts", None)
        or getattr(config, "num_local_experts", 0)
        or 0
    )
    if experts <= 0:
        raise AbliterateError("the model has no routed experts: there is nothing to profile")
    chosen = int(config.num_experts_per_tok)
    counter = _Counter(experts)
    pad_id = pad_token_id(tokenizer)
    sets = {"harmful": [list(x) for x in harmful], "harmless": [list(x) for x in harmless]}
    tokens = {label: sum(len(x) for x in ids) for label, ids in sets.items()}
    moe: list[int] = []

    def hooks(index: int, layer: torch.nn.Module) -> list[Any]:
        handles = [
            layer.get_submodule(p).register_forward_hook(counter.hook(index))
            for p in router_paths(layer, index, profile)
        ]
        if handles:
            moe.append(index)
        return handles

    def on_batch(label: str, batch: Batch) -> None:
        counter.label, counter.mask = label, batch.attention_mask.reshape(-1).bool()

    forward.run_with_hooks(sets, batch_size, pad_id, hooks, on_batch, "route experts", progress)
    if not moe:
        raise AbliterateError("no decoder layer has a router the family profile knows: nothing to profile")

    def shares(label: str) -> list[list[float]]:
        return [(counter.counts[(label, i)] / max(tokens[label], 1)).tolist() for i in moe]

    return ExpertProfile(moe, experts, chosen, shares("harmful"), shares("harmless"), tokens)


def profile_checkpoint(
    model_dir: str,
    harmful: Sequence[str],
    harmless: Sequence[str],
    measurement: Measurement,
    template: Template,
    runtime: Runtime,
    stream: bool,
) -> ExpertProfile:
    """The expert profile of a checkpoint on the measurement's prompts, rendered as the measurement
    renders them, on `runtime`'s device and dtype (resolved), in memory or layer-streamed (`stream`:
    one read of the weights)."""
    profile = choose_profile(model_dir)
    if profile is None:
        raise AbliterateError(f"{model_dir} is of no known family: cannot find its routers")
    forward, tokenizer = model_forward(model_dir, runtime.dtype, runtime.device, stream, progress=False)
    encoded = [
        encode_prompts(tokenizer, prompts, template, label, measurement=measurement)
        for prompts, label in ((harmful, "harmful"), (harmless, "harmless"))
    ]
    return profile_experts(forward, tokenizer, *encoded, profile, runtime.batch_size, progress=False)
