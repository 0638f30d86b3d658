"""Models named by their Hugging Face Hub id: `org/name` or `org/name@revision` (a branch, tag or commit).

`resolve_model` turns such an id into the snapshot folder of huggingface_hub's cache
(`$HF_HOME/hub/models--org--name/snapshots/<commit>`), downloading only what this tool reads:
config.json, generation_config.json, the tokenizer files and chat template, the safetensors index
and the shards it names (never stray weight files, PyTorch .bin copies or original/ folders).
Files already in the cache are not downloaded again. huggingface_hub reads HF_HOME / HF_HUB_CACHE
(where), HF_TOKEN (gated and private models) and HF_HUB_OFFLINE (no network: the cache only) as the
user set them; this tool sets none of them. A folder that exists on disk is always taken as a
folder, never as an id.

`hub_origin` reads the repository and commit back from a snapshot path, for MLflow and the
manifest: the commit pins exactly which weights were measured and edited.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abliterate.errors import AbliterateError
from abliterate.paths import describe_special
from abliterate.vocabulary import INDEX_FILE, SINGLE_FILE
from abliterate.weights.checkpoint import read_index

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
# Everything but the weights that loading a chat model reads (transformers' tokenizer and template files).
METADATA_FILES = [
    "config.json",
    "generation_config.json",
    INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
_SNAPSHOT = re.compile(r"(?P<kind>models|datasets|spaces)--(?P<repo>.+)")


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    revision: str  # as asked (default: main)
    commit: str
    path: Path  # the snapshot folder

    def as_dict(self) -> dict[str, str]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "path": str(self.path),
        }


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `text` is a Hub id and no such local path exists; else None."""
    if Path(text).expanduser().exists():
        return None
    match = HUB_ID.fullmatch(text.strip())
    if match is None or text.startswith((".", "/", "~")):
        return None
    return match.group("repo"), match.group("revision")


def resolve_model(model: str | Path, cache_dir: str | Path | None = None) -> str:
    """A local model folder as it is; a Hub id as the cached snapshot folder (downloading what is missing)."""
    parsed = parse_hub_id(str(model))
    if parsed is None:
        return str(model)
    return str(download(parsed[0], parsed[1], cache_dir).path)


def download(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> HubModel:
    """The files this tool reads from `repo_id` at `revision`, in huggingface_hub's cache: first the
    metadata (config, tokenizer, chat template, index), then exactly the shards the index names, from
    the same commit."""
    from huggingface_hub import snapshot_download

    revision = revision or "main"
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=METADATA_FILES, cache_dir=cache_dir)
        )
        shards = _shards(folder, repo_id)
        commit = folder.name
        folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=shards, cache_dir=cache_dir))
    except AbliterateError:
        raise
    except Exception as exc:  # huggingface_hub's errors: not found, gated, offline without the files, network
        raise AbliterateError(_explain(exc, repo_id, revision)) from None
    _refuse_damaged(folder, ["config.json", *shards], f"{repo_id}@{revision}")
    missing = [name for name in ["config.json", *shards] if not (folder / name).is_file()]
    if missing:
        raise AbliterateError(
            f"the cached snapshot of {repo_id}@{revision} ({folder}) lacks {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}: download them with network access (HF_HUB_OFFLINE unset)"
        )
    return HubModel(repo_id, revision, commit, folder)


def _refuse_damaged(folder: Path, names: list[str], where: str) -> None:
    """One line for a file of the snapshot that is there but is no file: a loop of symbolic links, a
    directory, a FIFO (a damaged cache, never reported as missing: downloading would not repair it).
    A dangling link is a download that did not finish: reported as missing by the caller."""
    for name in names:
        kind = describe_special(folder / name)
        if kind is not None and kind != "missing" and not kind.startswith("a dangling"):
            raise AbliterateError(
                f"the cached snapshot of {where} ({folder}) holds {name} as {kind}, not a file: the Hugging Face "
                f"cache is damaged; remove {folder / name} (it is downloaded again with network access) and rerun"
            )


def _shards(folder: Path, repo_id: str) -> list[str]:
    index = folder / INDEX_FILE
    _refuse_damaged(folder, [INDEX_FILE], repo_id)
    if describe_special(index) not in (None, "missing"):  # a dangling link: the download did not finish
        raise AbliterateError(
            f"the cached snapshot of {repo_id} ({folder}) lacks {INDEX_FILE} (a dangling link: the download "
            "did not finish): download it with network access (HF_HUB_OFFLINE unset)"
        )
    read = read_index(folder)  # checked: plain .safetensors names of this folder, one line otherwise
    return [SINGLE_FILE] if read is None else sorted(set(read[0].values()))


def _explain(exc: Exception, repo_id: str, revision: str) -> str:
    """One line for huggingface_hub's exceptions, saying what to do."""
    from huggingface_hub import constants

    name = type(exc).__name__
    where = f"{repo_id}@{revision}"
    first = (str(exc).strip().splitlines() or [name])[0][:200]
    if name == "RevisionNotFoundError":
        return f"{where}: the Hub repository has no revision {revision!r} (a branch, tag or commit)"
    if name in ("RepositoryNotFoundError", "GatedRepoError") or "401" in first or "403" in first:
        return (
            f"{where}: no such model on the Hub, or it is gated or private ({name}): check the id, accept its "
            f"licence on huggingface.co and set HF_TOKEN; a local folder of that name does not exist either"
        )
    if name in ("LocalEntryNotFoundError", "IncompleteSnapshotError") or isinstance(exc, OSError):
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        return (
            f"{where} is not in the Hugging Face cache at {constants.HF_HUB_CACHE} and cannot be downloaded"
            f"{offline}: {first}. Connect to the network (unset HF_HUB_OFFLINE), or point HF_HOME at a cache "
            "that holds it, or give a local folder"
        )
    return f"{where}: cannot get it from the Hugging Face Hub ({name}: {first})"


def hub_origin(model_dir: str | Path) -> dict[str, Any] | None:
    """{"repo_id", "commit", "refs"} when `model_dir` is a snapshot folder of huggingface_hub's cache
    (`.../models--org--name/snapshots/<commit>`); refs: the branches and tags that point at it there."""
    path = Path(model_dir).absolute()
    if path.parent.name != "snapshots":
        return None
    match = _SNAPSHOT.fullmatch(path.parent.parent.name)
    if match is None or match.group("kind") != "models":
        return None
    repo_id = match.group("repo").replace("--", "/")
    refs_dir = path.parent.parent / "refs"
    refs = []
    if refs_dir.is_dir():
        for ref in sorted(p for p in refs_dir.rglob("*") if p.is_file()):
            try:
                if ref.read_text().strip() == path.name:
                    refs.append(ref.relative_to(refs_dir).as_posix())
            except OSError:
                continue
    return {"repo_id": repo_id, "commit": path.name, "refs": refs}


def model_name(model_dir: str | Path) -> str:
    """The model's name for people: the Hub repository's name for a cached snapshot, else the folder's."""
    origin = hub_origin(model_dir)
    return origin["repo_id"].split("/")[-1] if origin else Path(model_dir).resolve().name
