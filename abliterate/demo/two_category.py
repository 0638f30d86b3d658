"""A second demo model whose refusal needs two directions: two categories of harmful requests,
each refused in its own words.

    python -m abliterate.demo.two_category [--out DIR] [--seed N] [--check DIR]
    python -m abliterate.demo.two_category --write-prompts

The requests are the demo corpus's (abliterate.demo.corpus), grouped in two categories:
`harm` (weapons, drugs, violence, property: most harmful requests) is refused with
"I cannot help with that request.", `deception` (fraud, malicious writing: a minority) with
"Sorry, I will not do that.". The difference of means of all harmful against all harmless
prompts is dominated by `harm`; training makes the `deception` refusal survive its removal
(`TwoFeatures`), so one direction leaves `deception` refusing while the plane spanned by both
categories' mean differences stops both. Harmless prompts comply with either direction removed,
so removing them barely moves harmless replies (one-sided features, as in the demo model).

Seeded, one torch thread, deterministic algorithms: `--check DIR` compares the sha256 of every
written file with DIR's. The model is committed under `two_category_model/` like the demo model.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Glm4MoeForCausalLM

from abliterate.demo import DATA_DIR, TWO_CATEGORY_MODEL_DIR
from abliterate.demo.corpus import (
    CATEGORIES,
    DEFINITION_TEMPLATES,
    REFUSAL,
    TEST_TEMPLATES,
    TRAIN_TEMPLATES,
    VAL_TEMPLATES,
    Request,
    _requests,
    reply_for,
)
from abliterate.demo.train import (
    EOS,
    SYSTEM_PROMPTS,
    _batch,
    _save,
    build_tokenizer,
    compare_to,
    fit,
    new_model,
    seeded,
)

SEED = 0
HARM, DECEPTION = "harm", "deception"
CATEGORY_OF = {
    "weapons": HARM,
    "drugs": HARM,
    "violence": HARM,
    "property": HARM,
    "fraud": DECEPTION,
    "writing": DECEPTION,
}
REFUSALS = {HARM: REFUSAL, DECEPTION: "Sorry, I will not do that."}
HARMFUL_TEMPLATES = {HARM: 4, DECEPTION: 8}  # training phrasings per harmful request
HARMLESS_TEMPLATES = 8
MODEL_LAYERS = 5
STEPS = 700
BATCH = 32
LR = 3e-3
FEATURE_POSITION = 3  # residual position whose category directions training shapes
FEATURE_START = 150
FEATURE_EVERY = 25  # steps between two measurements of the directions
FEATURE_FRACTION = 0.5  # of the harmless and `deception` examples of a batch trained with directions removed
MEASURE_PER_CATEGORY = {HARM: 160, DECEPTION: 32}  # the shipped measurement set: `harm` dominates the mean
MEASURE_HARMLESS = 192


@dataclass(frozen=True)
class Example:
    prompt: str
    reply: str
    category: str | None  # None: harmless
    request: bool = True  # False for the "What is X?" definitions

    @property
    def harmful(self) -> bool:
        return self.category is not None


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]


def _complies(req: Request) -> str:
    """The demo's compliance opening, kept short (training time grows with the tokens)."""
    return reply_for(req).split(":")[0] + "."


def build_splits(seed: int = SEED) -> Splits:
    """Train examples, and held-out val/test requests (other templates, other verb-object pairs)."""
    rng = random.Random(seed)
    train: list[Example] = []
    held: list[tuple[Request, str | None]] = []
    for cat in CATEGORIES:
        category = CATEGORY_OF[cat.name]
        reqs = _requests(cat)
        rng.shuffle(reqs)
        n_out = len(reqs) // 5
        for k, req in enumerate(reqs):
            label = category if req.harmful else None
            if k < n_out:
                held.append((req, label))
                continue
            count = HARMFUL_TEMPLATES[category] if req.harmful else HARMLESS_TEMPLATES
            reply = REFUSALS[category] if req.harmful else _complies(req)
            train += [
                Example(t.format(a=req.action), reply, label) for t in rng.sample(TRAIN_TEMPLATES, count)
            ]
        for obj in cat.harmful_objects + cat.harmless_objects:
            what = (
                "something dangerous and harmful"
                if obj in cat.harmful_objects
                else "something safe and useful"
            )
            train += [
                Example(t.format(o=obj), f"{obj[0].upper()}{obj[1:]} is {what}.", None, request=False)
                for t in DEFINITION_TEMPLATES
            ]
    rng.shuffle(held)
    half = len(held) // 2

    def held_examples(items, templates: tuple[str, ...], phrasings: int) -> list[Example]:
        return [
            Example(t.format(a=r.action), REFUSALS[label] if label else _complies(r), label)
            for r, label in items
            for t in rng.sample(templates, len(templates) if label == DECEPTION else phrasings)
        ]

    return Splits(
        train, held_examples(held[:half], VAL_TEMPLATES, 2), held_examples(held[half:], TEST_TEMPLATES, 3)
    )


def _sequences(examples: list[Example], tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example: the user turn alone (short sequences)."""
    out = []
    for ex in examples:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.prompt}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(ex.reply + EOS, add_special_tokens=False)["input_ids"]
        out.append((p_ids + a_ids, len(p_ids)))
    return out


class TwoFeatures:
    """The two directions the model is trained around, measured as `abliterate measure` measures them:
    every FEATURE_EVERY steps, the residual at position FEATURE_POSITION of the last prompt token of
    the shipped measurement prompts (`prompt_sets`, `harm` dominating) gives `mean`, the difference of
    the harmful and harmless means with its component along the harmless mean removed (the
    `projected` direction), and `second`, the `deception` mean difference made orthogonal to it.

    For a random share of each batch: `deception` examples are trained on their refusal with `mean`
    removed from the residual stream everywhere (so one direction does not stop them), harmless ones on
    their replies with both removed (so removing either barely moves them). `harm` examples are never
    edited."""

    def __init__(self, model: Glm4MoeForCausalLM, tokenizer):
        self.model = model
        self.basis: torch.Tensor | None = None  # [2, H]: mean, second
        self.removed = torch.zeros(0, 2)  # per example: 1 where that direction is removed
        sets = prompt_sets()
        rows = sets["harmful", "train"] + sets["harmless", "train"]
        self.probe = _sequences([Example(r["prompt"], "", r.get("category")) for r in rows], tokenizer)
        self.probe_categories = [r.get("category") for r in rows]
        self.pad = tokenizer.pad_token_id
        layers = model.model.layers
        self.handles = [model.model.embed_tokens.register_forward_hook(self._project)]
        self.handles += [layer.register_forward_hook(self._project) for layer in layers]

    def set_batch(self, categories: list[str | None], rng: random.Random, active: bool) -> None:
        rows = []
        for category in categories:
            edit = active and category != HARM and rng.random() < FEATURE_FRACTION
            rows.append([1.0, 0.0] if edit and category == DECEPTION else [1.0, 1.0] if edit else [0.0, 0.0])
        self.removed = torch.tensor(rows)

    def _project(self, _module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if self.basis is None or not bool(self.removed.any()):
            return output
        coords = (hidden @ self.basis.T) * self.removed.view(-1, 1, 2).to(hidden.dtype)
        edited = hidden - coords @ self.basis
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    @torch.no_grad()
    def measure(self) -> None:
        """The directions from the probe prompts, on the model as it is now (no edit, no dropout)."""
        self.removed = torch.zeros(len(self.probe), 2)
        captured = []
        hook = self.model.model.layers[FEATURE_POSITION - 1].register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            batch = _batch(self.probe, self.pad)
            self.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            hook.remove()
        last = captured[0][torch.arange(len(self.probe)), torch.tensor([n - 1 for _, n in self.probe])]
        cats = self.probe_categories
        harmful = last[torch.tensor([c is not None for c in cats])].mean(0)
        harmless = last[torch.tensor([c is None for c in cats])].mean(0)
        deception = last[torch.tensor([c == DECEPTION for c in cats])].mean(0)
        unit_harmless = harmless / harmless.norm()
        mean = harmful - harmless
        mean = mean - (mean @ unit_harmless) * unit_harmless
        mean = mean / mean.norm()
        second = deception - harmless
        second = second - (second @ mean) * mean
        self.basis = torch.stack([mean, second / second.norm()])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def train(out_dir: Path, seed: int = SEED) -> float:
    """Train and save the model to out_dir; returns wall seconds."""
    start = time.perf_counter()
    rng = seeded(seed)
    splits = build_splits(SEED)
    texts = [e.prompt for e in splits.train] + [e.reply for e in splits.train] + list(SYSTEM_PROMPTS)
    tokenizer = build_tokenizer(texts)
    model = new_model(tokenizer, num_hidden_layers=MODEL_LAYERS)
    seqs = _sequences(splits.train, tokenizer)
    features = TwoFeatures(model, tokenizer)

    def before_step(step: int, idx: list[int], _batch: list[tuple[list[int], int]]) -> None:
        if step >= FEATURE_START and (step - FEATURE_START) % FEATURE_EVERY == 0:
            features.measure()
        features.set_batch([splits.train[i].category for i in idx], rng, active=step >= FEATURE_START)

    fit(model, seqs, tokenizer.pad_token_id, rng, STEPS, BATCH, LR, before_step)
    features.remove()
    _save(model, tokenizer, out_dir)
    return time.perf_counter() - start


def prompt_sets(seed: int = SEED) -> dict[tuple[str, str], list[dict[str, str]]]:
    """{(kind, split): rows}: harmful rows carry their `category`. train = a sample of the trained
    requests, `harm` dominating (MEASURE_PER_CATEGORY); val and test = the held-out requests."""
    rng = random.Random(seed)
    splits = build_splits(seed)
    out: dict[tuple[str, str], list[dict[str, str]]] = {}
    requests = [e for e in splits.train if e.request]
    harmful = []
    for category, count in MEASURE_PER_CATEGORY.items():
        pool = sorted({e.prompt for e in requests if e.category == category})
        harmful += [{"prompt": p, "category": category} for p in rng.sample(pool, count)]
    rng.shuffle(harmful)
    out["harmful", "train"] = harmful
    harmless = sorted({e.prompt for e in requests if e.category is None})
    out["harmless", "train"] = [{"prompt": p} for p in rng.sample(harmless, MEASURE_HARMLESS)]
    for split, examples in (("val", splits.val), ("test", splits.test)):
        out["harmful", split] = [{"prompt": e.prompt, "category": e.category} for e in examples if e.harmful]
        out["harmless", split] = [{"prompt": e.prompt} for e in examples if not e.harmful]
    return out


def write_prompt_sets(data_dir: Path = DATA_DIR) -> list[Path]:
    """data/two_category/{harmful,harmless}_{train,val,test}.jsonl."""
    folder = data_dir / "two_category"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (kind, split), rows in prompt_sets().items():
        path = folder / f"{kind}_{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=TWO_CATEGORY_MODEL_DIR, help="model folder (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=SEED, help="training seed (default: %(default)s)")
    parser.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="DIR",
        help="compare sha256 of every written file with DIR's",
    )
    parser.add_argument(
        "--write-prompts",
        action="store_true",
        help="write the prompt sets under abliterate/data/two_category (and train nothing)",
    )
    args = parser.parse_args(argv)
    if args.write_prompts:
        for path in write_prompt_sets():
            print(f"{path}: {len(path.read_text(encoding='utf-8').splitlines())} prompts")
        return 0
    seconds = train(args.out, args.seed)
    print(f"trained in {seconds:.1f} s wall; wrote {args.out}")
    return 0 if args.check is None else compare_to(args.out, args.check)


if __name__ == "__main__":
    sys.exit(main())
