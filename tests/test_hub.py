"""Hub ids `org/name[@revision]`: resolved through huggingface_hub's cache, built here on disk in its
layout (models--org--name/{blobs,refs,snapshots}), offline (tests/conftest.py sets HF_HUB_OFFLINE)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import CLI, ROOT
from tiny_chat_model import HARMFUL, HARMLESS, build_tiny_chat_model

from abliterate.errors import AbliterateError
from abliterate.measure.direction_file import load_directions
from abliterate.weights.hub import download, hub_origin, model_name, parse_hub_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def cache_repo(cache: Path, repo_id: str, model_dir: Path, commit: str, refs: dict[str, str]) -> Path:
    """Put the files of `model_dir` into a huggingface_hub cache as `repo_id` at `commit`: content-named
    blobs, the snapshot's files as relative links to them, and refs (branch or tag -> commit)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for path in sorted(model_dir.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref, target in refs.items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(target)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """$HF_HOME/hub holding acme/tiny-chat at two commits: main and the tag v1 at COMMIT, the branch
    old at OLD_COMMIT (another model), plus a stray weight file the tool must not need."""
    root = tmp_path_factory.mktemp("hf-home")
    model = build_tiny_chat_model(root / "source")
    (model / "pytorch_model.bin").write_bytes(b"not read")  # downloaded by nobody: not in the patterns
    other = build_tiny_chat_model(root / "other", seed=1)
    cache = root / "hub"
    cache_repo(cache, "acme/tiny-chat", model, COMMIT, {"main": COMMIT, "v1": COMMIT})
    cache_repo(cache, "acme/tiny-chat", other, OLD_COMMIT, {"old": OLD_COMMIT})
    return root


def test_hub_ids_and_local_folders_are_told_apart(tmp_path, monkeypatch):
    assert parse_hub_id("zai-org/GLM-4.5-Air") == ("zai-org/GLM-4.5-Air", None)
    assert parse_hub_id("zai-org/GLM-4.5-Air@main") == ("zai-org/GLM-4.5-Air", "main")
    assert parse_hub_id(f"acme/tiny@{COMMIT}") == ("acme/tiny", COMMIT)
    for text in ("./models/x", "/models/x", "~/x", "x", "a/b/c"):
        assert parse_hub_id(text) is None, text
    folder = tmp_path / "acme" / "local"  # a folder that exists is a folder, even when it looks like an id
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("acme/local") is None and resolve_model("acme/local") == "acme/local"


@pytest.mark.parametrize(
    ("revision", "commit"),
    [(None, COMMIT), ("main", COMMIT), ("v1", COMMIT), ("old", OLD_COMMIT), (COMMIT, COMMIT)],
)
def test_revisions_resolve_to_their_snapshot_offline(hub_cache, revision, commit):
    model = download("acme/tiny-chat", revision, cache_dir=hub_cache / "hub")
    assert model.commit == commit and model.path.name == commit
    assert (model.path / "config.json").is_file() and (model.path / "model.safetensors").is_file()
    origin = hub_origin(model.path)
    assert origin["repo_id"] == "acme/tiny-chat" and origin["commit"] == commit
    assert set(origin["refs"]) == ({"main", "v1"} if commit == COMMIT else {"old"})
    assert model_name(model.path) == "tiny-chat" and hub_origin(ROOT) is None


def test_what_is_missing_is_one_line_that_says_what_to_do(hub_cache, tmp_path):
    with pytest.raises(
        AbliterateError, match=r"acme/nothing@main is not in the Hugging Face cache.*HF_HUB_OFFLINE"
    ):
        download("acme/nothing", cache_dir=hub_cache / "hub")
    with pytest.raises(AbliterateError, match="acme/tiny-chat@nope is not in the Hugging Face cache"):
        download("acme/tiny-chat", "nope", cache_dir=hub_cache / "hub")
    # a snapshot whose index names a shard the cache does not hold
    broken = tmp_path / "hub"
    source = tmp_path / "source"
    source.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(hub_cache / "source" / name, source / name)
    (source / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})
    )
    cache_repo(broken, "acme/partial", source, COMMIT, {"main": COMMIT})
    with pytest.raises(AbliterateError, match=r"lacks model-00001-of-00002\.safetensors") as info:
        download("acme/partial", cache_dir=broken)
    assert "\n" not in str(info.value)


def test_configure_leaves_the_users_hugging_face_settings_alone(restored_environment, monkeypatch, tmp_path):
    from abliterate_flows.runtime import configure

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("ABLITERATE_HOME", str(tmp_path))
    configure()
    assert "HF_HUB_OFFLINE" not in os.environ  # downloads stay possible unless the user says offline


@pytest.mark.slow
def test_measure_a_hub_id_from_the_cache_that_hf_home_names(hub_cache, tmp_path):
    """The CLI in a fresh process, as a user runs it: HF_HOME points at the cache, offline."""
    files = {}
    for name, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(prompts) + "\n")
    env = {**os.environ, "HF_HOME": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    argv = [
        sys.executable,
        "-c",
        CLI,
        "measure",
        "acme/tiny-chat@v1",
        "--harmful",
        str(files["harmful"]),
        "--harmless",
        str(files["harmless"]),
        "--out",
        str(tmp_path / "out"),
        "--kl-threshold",
        "1e9",
        "--batch-size",
        "3",
        "--quiet",
    ]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    directions = load_directions(tmp_path / "out" / "directions.safetensors")
    assert directions.metadata["hub"]["repo_id"] == "acme/tiny-chat"
    assert directions.metadata["hub"]["commit"] == COMMIT and "v1" in directions.metadata["hub"]["refs"]
    assert directions.selected_position is not None
    # not in that cache: one line, exit code 2
    argv[4] = "acme/absent"  # the MODEL argument
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "acme/absent@main is not in the Hugging Face cache" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_flow_takes_a_hub_id_and_records_its_commit(prefect_env, hub_cache, tmp_path, monkeypatch):
    """`model` as typed into the Prefect UI: resolved in the flow; the commit in MLflow and the manifest."""
    import huggingface_hub.constants
    from mlflow.tracking import MlflowClient

    from abliterate.config import Evaluation, Prompts, Runtime, Selection
    from abliterate_flows.main import abliterate_flow
    from abliterate_flows.runtime import tracking_uri

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache / "hub")
    )  # what HF_HOME sets
    prompts = {}
    for name, values in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        prompts[name] = tmp_path / f"{name}.txt"
        prompts[name].write_text("\n".join(values) + "\n")
    summary = abliterate_flow(
        model="acme/tiny-chat@main",
        out=str(tmp_path / "out"),
        prompts=Prompts(harmful=str(prompts["harmful"]), harmless=str(prompts["harmless"])),
        selection=Selection(direction_position="1"),
        evaluation=Evaluation(evaluate=False),
        runtime=Runtime(batch_size=4),
    )
    run = MlflowClient(tracking_uri()).get_run(summary["mlflow_run_id"])
    assert run.data.tags["model_source"] == "acme/tiny-chat@main" and run.data.tags["hub.commit"] == COMMIT
    assert run.data.params["hub.repo_id"] == "acme/tiny-chat" and run.data.params["hub.commit"] == COMMIT
    experiment = MlflowClient(tracking_uri()).get_experiment(run.info.experiment_id)
    assert experiment.name == "abliterate/acme/tiny-chat"  # named after the Hub id
    manifest = json.loads((tmp_path / "out" / "abliteration.json").read_text())
    assert manifest["input"]["path"].endswith(f"/snapshots/{COMMIT}")
    assert manifest["input"]["hub"]["commit"] == COMMIT
