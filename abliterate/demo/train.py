"""Train the tiny GLM-4.5-MoE-shaped demo chat model that refuses harmful requests.

    python -m abliterate.demo.train [--out DIR] [--check DIR]

Seeded, one torch thread, deterministic algorithms: the same command on the same
torch/transformers versions writes bit-identical files (`--check DIR` compares the sha256
of every written file with DIR's). The model is written to a temporary folder beside
the output and renamed into place, so a failed run never leaves half a model.

Training data: abliterate.demo.corpus (loss on the reply tokens only). Besides plain
supervised training, `RefusalFeature` makes the refusal a one-sided feature: a harmless
prompt complies whether or not the residual stream carries a component along the refusal
direction, as observed in real chat models. Without it this toy model encodes harmful vs
harmless as a two-sided code (harmless prompts sit far on the negative side), and removing
the direction then pushes harmless prompts towards refusing (first-token KL 0.06 to 6
depending on the data mix), which is not what the demo is meant to show.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, PreTrainedTokenizerFast

from abliterate.demo import DEMO_MODEL_DIR
from abliterate.demo.corpus import Example, build_splits

SEED = 0
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[UNK]",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<think>",
    "</think>",
)
EOS = "<|endoftext|>"
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly chatbot. Answer briefly.",
    "Be concise and polite.",
    "You are an assistant. Answer the question.",
    "Please keep answers short.",
    "You are a kind and careful helper.",
    "Reply in simple words.",
    "You are a chat assistant for a small company.",
)
SYSTEM_PROMPT_FRACTION = 0.4

# GLM-4.5's chat format, simplified: no tools, no reasoning history. The demo model does
# not think, so thinking is off unless `enable_thinking=True` is passed; then the prompt
# ends in an open <think> and the model closes it at once before replying.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ '<|system|>\\n' + m['content'] }}"
    "{%- elif m['role'] == 'user' -%}{{ '<|user|>\\n' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}{{ '<|assistant|>\\n<think></think>\\n' + m['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{ '<|assistant|>\\n<think>' }}"
    "{%- else -%}{{ '<|assistant|>\\n<think></think>\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

# Widths: GLM-4.5-Air's structure (dense layer 0, then MoE with a shared expert and a
# sigmoid router; GQA; q/k/v biases; untied head) at toy size.
MODEL_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
    attention_bias=True,
    use_qk_norm=False,
    tie_word_embeddings=False,
    max_position_embeddings=256,
    num_nextn_predict_layers=0,
    rms_norm_eps=1e-5,
)
STEPS = 2000
BATCH = 32
LR = 3e-3
BIAS_UPDATE = 1e-3  # aux-loss-free load balancing step for e_score_correction_bias
MAX_SHARD_BYTES = 300_000
FEATURE_POSITION = 3  # residual position whose refusal direction training makes one-sided
FEATURE_START = 200  # steps before the running means are meaningful
FEATURE_MOMENTUM = 0.95
FEATURE_FRACTION = 0.5  # of the harmless examples of a batch trained with the direction removed


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level vocabulary of the corpus; any other word encodes as [UNK]."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    words = set()
    for text in texts:
        words.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text))
    # Punctuation and digits of arbitrary prompts should not all be [UNK].
    words.update(["▁", *"!\"#$%&'()*+,-./:;<=>?@[]^_`{|}~", *"0123456789", *(f"▁{d}" for d in range(10))])
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok.model = models.WordLevel(vocab, unk_token="[UNK]")
    # Newline is an added token so that it is matched before the pre-tokenizer prefixes it.
    tok.add_tokens([AddedToken("\n", normalized=False)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        unk_token="[UNK]",
        padding_side="left",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _sequences(examples: list[Example], tokenizer, rng: random.Random) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example, with varied system prompts and thinking."""
    out = []
    for ex in examples:
        messages = [{"role": "user", "content": ex.prompt}]
        if rng.random() < SYSTEM_PROMPT_FRACTION:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        thinking = rng.random() < 0.25
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=thinking, tokenize=False
        )
        answer = ("</think>\n" if thinking else "") + ex.reply + EOS
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        out.append((p_ids + a_ids, len(p_ids)))
    return out


def _batch(seqs: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (s, n_prompt) in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
        labels[row, n_prompt : len(s)] = torch.tensor(s[n_prompt:])  # loss on the reply only
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _balance_router_bias(model: Glm4MoeForCausalLM, loads: dict[int, torch.Tensor]) -> None:
    """DeepSeek-V3 style aux-free balancing: nudge under-used experts' bias up."""
    for layer, load in loads.items():
        bias = model.model.layers[layer].mlp.gate.e_score_correction_bias
        bias += BIAS_UPDATE * torch.sign(load.mean() - load)


class RefusalFeature:
    """Makes refusal a one-sided feature, as in real chat models: harmless prompts comply
    whether or not the residual stream carries any component along the refusal direction.

    It tracks the diff-of-means direction at residual position FEATURE_POSITION (at the last
    prompt token; running means over training batches) and, for a random half of the
    harmless examples of a batch, removes that direction from the residual stream everywhere
    while they are trained on their usual replies. Harmful examples are never edited.
    """

    def __init__(self, model: Glm4MoeForCausalLM):
        hidden = model.config.hidden_size
        self.means = {True: torch.zeros(hidden), False: torch.zeros(hidden)}
        self.direction: torch.Tensor | None = None
        self.rows = torch.zeros(0, dtype=torch.bool)  # examples of the batch edited
        self.last = torch.zeros(0, dtype=torch.long)  # their last prompt token
        self.harmful = torch.zeros(0, dtype=torch.bool)
        layers = model.model.layers
        self.handles = [model.model.embed_tokens.register_forward_hook(self._project)]
        self.handles += [layer.register_forward_hook(self._project) for layer in layers]
        self.handles.append(layers[FEATURE_POSITION - 1].register_forward_hook(self._record))

    def set_batch(self, seqs, harmful: list[bool], rng: random.Random, active: bool) -> None:
        self.harmful = torch.tensor(harmful)
        self.last = torch.tensor([n_prompt - 1 for _, n_prompt in seqs])
        edit = [active and not h and rng.random() < FEATURE_FRACTION for h in harmful]
        self.rows = torch.tensor(edit)

    def _project(self, _module, _inputs, output):
        if self.direction is None or not bool(self.rows.any()):
            return output
        r = self.direction
        removed = (output @ r).unsqueeze(-1) * r
        return output - removed * self.rows.view(-1, 1, 1).to(output.dtype)

    @torch.no_grad()
    def _record(self, _module, _inputs, output):
        last = output[torch.arange(len(self.last)), self.last].detach()
        for kind in (True, False):
            rows = (self.harmful == kind) & ~self.rows
            if rows.any():
                self.means[kind].mul_(FEATURE_MOMENTUM).add_(last[rows].mean(0), alpha=1 - FEATURE_MOMENTUM)
        diff = self.means[True] - self.means[False]
        self.direction = diff / diff.norm().clamp_min(1e-6)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def train(out_dir: Path) -> float:
    """Train and save the model to out_dir; returns wall seconds."""
    start = time.perf_counter()
    rng = seeded(SEED)
    splits = build_splits(SEED)
    texts = [e.prompt for e in splits.train] + [e.reply for e in splits.train] + list(SYSTEM_PROMPTS)
    tokenizer = build_tokenizer(texts)
    model = new_model(tokenizer)
    seqs = _sequences(splits.train, tokenizer, rng)
    feature = RefusalFeature(model)

    def before_step(step: int, idx: list[int], batch: list[tuple[list[int], int]]) -> None:
        feature.set_batch(batch, [splits.train[i].harmful for i in idx], rng, active=step >= FEATURE_START)

    fit(model, seqs, tokenizer.pad_token_id, rng, STEPS, BATCH, LR, before_step)
    feature.remove()
    _save(model, tokenizer, out_dir)
    return time.perf_counter() - start


def seeded(seed: int) -> random.Random:
    """One torch thread, deterministic algorithms, torch seeded: the same files on every run."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    return random.Random(seed)


def new_model(tokenizer, **shape: int) -> Glm4MoeForCausalLM:
    """A fresh model of the demo's shape (`shape` overrides entries of MODEL_SHAPE), in training mode."""
    config = Glm4MoeConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in (EOS, "<|user|>", "<|observation|>")],
        **{**MODEL_SHAPE, **shape},
    )
    model = Glm4MoeForCausalLM(config)
    model.train()
    return model


def fit(
    model: Glm4MoeForCausalLM,
    seqs: list[tuple[list[int], int]],
    pad_id: int,
    rng: random.Random,
    steps: int,
    batch_size: int,
    lr: float,
    before_step: Callable[[int, list[int], list[tuple[list[int], int]]], None],
) -> None:
    """AdamW with warm-up and cosine decay over shuffled passes of `seqs`, the routers' correction
    biases balanced after every step; `before_step(step, indices, batch)` runs before each forward
    pass (where a model's refusal features are set up)."""
    config = model.config
    loads: dict[int, torch.Tensor] = {}

    def count_load(layer: int):
        def hook(_module, _inputs, output):
            loads[layer] = torch.bincount(output[2].flatten(), minlength=config.n_routed_experts).float()

        return hook

    hooks = [
        layer.mlp.gate.register_forward_hook(count_load(i))
        for i, layer in enumerate(model.model.layers)
        if i >= config.first_k_dense_replace
    ]
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(seqs)), len(seqs))
        idx, order = order[:batch_size], order[batch_size:]
        batch = [seqs[i] for i in idx]
        before_step(step, idx, batch)
        loss = model(**_batch(batch, pad_id)).loss
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        with torch.no_grad():
            _balance_router_bias(model, loads)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f}", file=sys.stderr)
    for h in hooks:
        h.remove()


def _save(model: Glm4MoeForCausalLM, tokenizer, out_dir: Path) -> None:
    """bf16 like real checkpoints; the router (weight and bias) stays fp32, as in GLM-4.5."""
    model.eval()
    routers = [layer.mlp.gate for layer in model.model.layers[model.config.first_k_dense_replace :]]
    kept = [{k: v.clone() for k, v in gate.state_dict().items()} for gate in routers]
    model.to(torch.bfloat16)
    for gate, state in zip(routers, kept, strict=True):
        gate.float().load_state_dict(state)
    model.config.dtype = "bfloat16"
    model.generation_config.do_sample = False
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=MAX_SHARD_BYTES)
    tokenizer.save_pretrained(tmp)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEMO_MODEL_DIR, help="model folder (default: %(default)s)"
    )
    parser.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="DIR",
        help="after training, compare sha256 of every written file with DIR's; exit 1 on any difference",
    )
    args = parser.parse_args(argv)
    seconds = train(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"trained in {seconds:.1f} s wall; wrote {args.out} ({size / 1e6:.2f} MB)")
    return 0 if args.check is None else compare_to(args.out, args.check)


def compare_to(out: Path, check: Path) -> int:
    """0 when every file of `out` is bit-identical to `check`'s (sha256), else 1; says which."""
    mine, theirs = file_hashes(out), file_hashes(check)
    if mine != theirs:
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        print(f"NOT bit-identical to {check}: {diff}")
        return 1
    print(f"bit-identical to {check} ({len(mine)} files, sha256)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
