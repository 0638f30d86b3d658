"""The model card of an output: `README.md` with Hugging Face's front matter, saying how it was made.

The ablation writes it with the manifest (`abliterate.edit.output.finalize_output`): the base model,
the plan, the direction (its residual position, the direction method, the prompts it was measured
on), the edited tensors, the tool's version and a command that rewrites exactly these weights from
the directions file. A flow that validated and evaluated the output writes it again with the
verdict, the figures (refusal rates before and after, the first-token KL) and the command that
reproduces the whole run (`update_model_card`). It is derived from the manifest alone (plus the
input's license), holds no time, and is written atomically like every output file.

Front matter: `base_model` when the input's Hub repository is known (a cached snapshot's, else a
Hub id in the input's config.json `_name_or_path`); a local folder is no Hub id, so the card then
omits the key (the Hub would reject a path there) and names the folder in its text;
`tags` (abliterated, abliterate, ...), `library_name: transformers`, `pipeline_tag`, and the
license fields of the input's own README.md front matter (or a `license` in its config.json) when it
has them. The input's README.md itself is never copied: this card replaces it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from abliterate.config import Section
from abliterate.edit.plan import AblationPlan
from abliterate.errors import AbliterateError
from abliterate.figures import evaluation_lines, figure
from abliterate.paths import write_text_atomic
from abliterate.vocabulary import DIRECTIONS_FILE, MANIFEST_FILE, MODEL_CARD_FILE
from abliterate.weights.hub import parse_hub_id

TAGS = ("abliterated", "abliterate", "refusal-direction", "text-generation")
LICENSE_KEYS = ("license", "license_name", "license_link")


def base_model(manifest: dict[str, Any]) -> str | None:
    """The input's Hub repository: a cached snapshot's, else the Hub id its config.json was saved
    from (`_name_or_path`); None for a folder with neither."""
    source = manifest.get("input") or {}
    hub = source.get("hub") or {}
    if hub.get("repo_id"):
        return hub["repo_id"]
    saved_from = _input_config(source.get("path") or "").get("_name_or_path")
    parsed = parse_hub_id(saved_from) if isinstance(saved_from, str) and saved_from else None
    return parsed[0] if parsed else None


def title(base: str) -> str:
    """The base model's name: a Hub repository's, else the folder's (with its parent's for a folder
    named generically, as the demo's `demo/model`)."""
    parts = [p for p in base.split("/") if p]
    if len(parts) > 1 and parts[-1].lower() in ("model", "models", "checkpoint", "weights", "snapshot"):
        return "/".join(parts[-2:])
    return parts[-1] if parts else base


def _front_matter(text: str) -> dict[str, Any]:
    """The YAML block at the top of a README.md (empty when there is none or it does not parse)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def input_license(input_dir: str | Path) -> dict[str, Any]:
    """The license fields of the input: its README.md front matter, else config.json's `license`."""
    folder = Path(input_dir)
    try:
        found = _front_matter((folder / MODEL_CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        found = {}
    fields = {k: found[k] for k in LICENSE_KEYS if isinstance(found.get(k), str | list)}
    if not fields:
        config = _input_config(folder)
        if isinstance(config.get("license"), str):
            fields = {"license": config["license"]}
    return fields


def _input_config(folder: str | Path) -> dict[str, Any]:
    """The input's config.json as far as the card needs it (empty when unreadable: the ablation
    already checked the keys it uses)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def reproduce_command(command: str, model: str, out: str, sections: list[Section]) -> str:
    """`abliterate COMMAND MODEL --out OUT` with every setting that differs from its default, as typed
    on the command line (flag = setting with dashes)."""
    words = ["abliterate", command, model, "--out", out]
    for section in sections:
        defaults = type(section)().model_dump(mode="json")
        for name, value in section.model_dump(mode="json").items():
            if value == defaults[name]:
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                words.append(flag if value else "--no-" + name.replace("_", "-"))
            elif isinstance(value, dict):
                words += [flag, json.dumps(value, sort_keys=True)]
            elif isinstance(value, list) and name == "marker":  # repeatable, one phrase each
                for phrase in value:
                    words += [flag, str(phrase)]
            elif isinstance(value, list):
                words += [flag, ",".join(str(v) for v in value)]
            else:
                words += [flag, str(value)]
    return shlex.join(words)


def card_text(
    manifest: dict[str, Any],
    evaluation: dict[str, float] | None = None,
    validation_ok: bool | None = None,
    command: str | None = None,
) -> str:
    """The card's text: front matter, then how the output was made (see the module docstring)."""
    source = manifest.get("input") or {}
    hub_id = base_model(manifest)
    base = hub_id or str(source.get("path"))
    front: dict[str, Any] = {"base_model": hub_id} if hub_id else {}
    front.update({"tags": list(TAGS), "library_name": "transformers"})
    front.update(input_license(source.get("path") or ""))
    front["pipeline_tag"] = "text-generation"
    plan = AblationPlan.from_dict(manifest["plan"], f"{MANIFEST_FILE} plan")
    meta = (manifest.get("directions") or {}).get("metadata") or {}
    tool = manifest.get("tool") or {}
    versions = manifest.get("versions") or {}
    position = plan.direction_position
    if position == "auto":
        where = f"residual position {plan.selected_position} (the input of decoder layer {plan.selected_position}), chosen automatically"
    elif position == "own":
        where = "each edited layer's own residual position"
    else:
        where = f"residual position {position}"
    hub = source.get("hub") or {}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip("\n"),
        "---",
        "",
        f"# {title(base)}, abliterated",  # not the output's path: the same inputs give the same card
        "",
        f"`{base}`"
        + (f" (commit {hub['commit']})" if hub.get("commit") else "")
        + " with its refusal direction projected out of the weights by "
        + f"abliterate {tool.get('version', '')}: the model should stop refusing "
        "and otherwise behave as before. Every other file is the base model's, copied verbatim.",
        "",
        "## How it was made",
        "",
        f"- **Direction**: {where}; direction method `{meta.get('method', 'n/a')}`, measured at token position "
        f"{meta.get('position', 'n/a')} on {meta.get('n_harmful', 'n/a')} harmful and {meta.get('n_harmless', 'n/a')} "
        "harmless prompts (the difference of their mean residuals).",
        f"- **Edit**: ablation method `{plan.method}` on {', '.join(plan.targets)} of layers {plan.layer_spec or plan.layers} "
        f"at scale {plan.scale_spec or 'per layer'}; MTP layers: {plan.mtp}.",
        *(
            [
                f"- **Subspace**: {plan.rank} directions removed at each edited layer, the first {plan.rank} "
                f"orthonormal rows of the directions file's `{plan.subspace}` subspace (row 0 the direction)."
            ]
            if plan.rank > 1
            else []
        ),
        *([f"- **Origin**: {json.dumps(plan.origin, sort_keys=True)}"] if plan.origin else []),
        "- **Edited tensors**: "
        + ", ".join(f"{role} {n:,}" for role, n in (manifest.get("counts") or {}).items()),
        "",
        "The plan, as `abliterate ablate --plan` reads it:",
        "",
        "```yaml",
        plan.to_yaml().rstrip("\n"),
        "```",
        "",
    ]
    if validation_ok is not None or evaluation:
        lines += ["## Checks", ""]
    if validation_ok is not None:
        lines += [
            f"- **Validation**: {'passed' if validation_ok else 'FAILED'} (structure, every byte, the edited set, "
            "projection residuals: `abliterate validate`)",
        ]
    if evaluation:
        n = f"{figure(evaluation.get('n_harmful'))} harmful and {figure(evaluation.get('n_harmless'))} harmless"
        lines += [f"- **Evaluation** on {n} held-out test prompts (before: the base model; after: this one):"]
        lines += [f"  - {line}" for line in evaluation_lines(evaluation)]
    if validation_ok is not None or evaluation:
        lines.append("")
    lines += ["## Reproduce", ""]
    if command:
        lines += [
            "The whole run (measurement, selection, ablation, checks):",
            "",
            "```bash",
            command,
            "```",
            "",
        ]
    directions = (manifest.get("directions") or {}).get("path") or DIRECTIONS_FILE
    rewrite = shlex.join(
        [
            "abliterate",
            "ablate",
            str(source.get("path")),
            "--directions",
            str(directions),
            "--plan",
            "plan.yaml",
            "--out",
            "OUT",
        ]
    )
    lines += [
        "These exact weights, from the directions file and the plan above saved as `plan.yaml`:",
        "",
        "```bash",
        rewrite,
        "```",
        "",
        f"Tool and libraries: {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))}. "
        f"Every edited tensor, the plan and the fingerprints are in `{MANIFEST_FILE}`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """The card of a finished ablation (before its manifest, which is written last)."""
    return write_text_atomic(Path(out_dir) / MODEL_CARD_FILE, card_text(manifest))


def update_model_card(
    out_dir: str | Path,
    evaluation: dict[str, float] | None = None,
    validation_ok: bool | None = None,
    command: str | None = None,
) -> Path:
    """The card again, from the output's manifest, with the checks a flow ran and its command."""
    path = Path(out_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AbliterateError(
            f"cannot read {path} to write the model card: {exc}; rerun the ablation"
        ) from exc
    return write_text_atomic(
        Path(out_dir) / MODEL_CARD_FILE, card_text(manifest, evaluation, validation_ok, command)
    )
