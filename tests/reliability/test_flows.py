"""Reliability through the Prefect flows (catalogue F): each failure is a Failed flow run with the
one-line message, nothing written, the input unchanged.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoint_guard import unchanged

from abliterate.demo import DEMO_MODEL_DIR
from abliterate.errors import AbliterateError
from abliterate.vocabulary import MANIFEST_FILE

from .common import (
    POSITIONS,
    SHARDS,
    H,
    ablate_args,
    edit_tensor_bytes,
    entry,
    first_tensor,
    rewrite_header,
    shard_bytes,
    start_paused,
    tree,
    truncate,
    with_means,
)


@pytest.mark.slow
def test_flow_fails_on_a_damaged_checkpoint_in_the_inventory_task(prefect_env, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from abliterate_flows.main import abliterate_flow

    model = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_DIR, model)
    truncate(model / SHARDS[1], (model / SHARDS[1]).stat().st_size - 64)
    out = tmp_path / "out"
    with unchanged(model):
        # streaming="never": nothing reads the checkpoint before the inventory task
        state = abliterate_flow(
            model=str(model),
            out=str(out),
            prompts={"prompt_set": "demo"},
            evaluation={"evaluate": False},
            runtime={"streaming": "never"},
            return_state=True,
        )
    assert state.is_failed()
    assert SHARDS[1] in state.message and "truncated" in state.message and "re-download" in state.message
    with pytest.raises(AbliterateError, match="truncated"):
        state.result()
    with get_client(sync_client=True) as client:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        runs = client.read_task_runs(flow_run_filter=flow_run)
    inventory = [r for r in runs if r.name.startswith("weight-inventory")]
    assert [r.state.type.value for r in inventory] == ["FAILED"] and "truncated" in inventory[0].state.message
    assert not out.exists()


@pytest.mark.slow
def test_flow_fails_on_a_layer_out_of_range(prefect_env, tmp_path):
    from abliterate_flows.main import abliterate_flow

    out = tmp_path / "out"
    with unchanged(DEMO_MODEL_DIR):
        state = abliterate_flow(
            model=str(DEMO_MODEL_DIR),
            out=str(out),
            ablation={"layers": "99"},
            evaluation={"evaluate": False},
            return_state=True,
        )
    assert state.is_failed()
    assert "layer 99 is out of range" in state.message and "decoder layers 0..4" in state.message
    assert not out.exists()


def _task_names(state) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        return [r.name for r in client.read_task_runs(flow_run_filter=flow_run)]


@pytest.mark.slow
def test_flows_refuse_bad_paths_and_settings_before_any_work(prefect_env, base, prompts, tmp_path):
    """F3-F6 through the flows: a work dir inside the model (`run` and `sweep` alike), a sweep variant
    named out of --out, an output that is a file, a layer out of range, a device this torch lacks, a
    header of the wrong type, an over-long prompt (named by file and line): each a Failed flow run with
    the one-line message, before the measurement where it can be known then, with nothing written and
    the input unchanged."""
    from abliterate_flows.main import abliterate_flow
    from abliterate_flows.sweep import sweep_flow

    model = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_DIR, model)
    out, quick = (
        tmp_path / "out",
        {
            "evaluation": {"evaluate": False},
            "selection": {"direction_position": "own"},
            "prompts": {"prompt_set": "demo"},
        },
    )
    (tmp_path / "file").write_text("mine")
    with unchanged(model):
        for call, fragments in [
            (
                lambda: abliterate_flow(
                    model=str(model), out=str(out), work_dir=str(model / "work"), **quick, return_state=True
                ),
                ["inside the input checkpoint"],
            ),
            (
                lambda: sweep_flow(
                    model=str(model),
                    out=str(out),
                    work_dir=str(model / "work"),
                    return_state=True,
                    evaluation={"evaluate": False},
                ),
                ["inside the input checkpoint"],
            ),
            (
                lambda: sweep_flow(
                    model=str(model), out=str(out), variants=[{"name": "../escape"}], return_state=True
                ),
                ["variant #0: name '../escape'", "folder under --out"],
            ),
            (
                lambda: abliterate_flow(
                    model=str(model), out=str(tmp_path / "file"), **quick, return_state=True
                ),
                ["exists and is not a directory"],
            ),
            (
                lambda: abliterate_flow(
                    model=str(model), out=str(out), ablation={"layers": "7"}, **quick, return_state=True
                ),
                ["layer 7 is out of range"],
            ),
        ] + (
            []
            if torch.cuda.is_available()
            else [  # a device this torch lacks: a CPU-only build asked for CUDA
                (
                    lambda: abliterate_flow(
                        model=str(model),
                        out=str(out),
                        runtime={"device": "cuda:3"},
                        **quick,
                        return_state=True,
                    ),
                    ["no CUDA device"],
                ),
            ]
        ):
            state = call()
            assert state.is_failed() and all(f in state.message for f in fragments), state.message
            assert "Traceback" not in state.message
            assert not any(n.startswith("activation-measurement") for n in _task_names(state))
        _, _, _, huge = prompts
        state = abliterate_flow(
            model=str(model),
            out=str(out),
            **{**quick, "prompts": {"prompt_set": "demo", "harmful": str(huge)}},
            return_state=True,
        )
        assert state.is_failed() and f"harmful prompt {huge} line 2 is" in state.message, state.message
    assert not out.exists() and (tmp_path / "file").read_text() == "mine"
    damaged = tmp_path / "damaged"
    shutil.copytree(DEMO_MODEL_DIR, damaged)
    shard = next(p for p in sorted(damaged.glob("*.safetensors")))
    rewrite_header(shard, entry(first_tensor(shard), "data_offsets", ["0", "8"]))
    with unchanged(damaged):
        state = abliterate_flow(model=str(damaged), out=str(out), **quick, return_state=True)
    assert state.is_failed() and "`data_offsets`" in state.message and "re-download" in state.message
    assert any(n.startswith("weight-inventory") for n in _task_names(state)) and not out.exists()


@pytest.mark.slow
def test_ablate_flow_keeps_what_is_not_its_own_locks_and_reproduces(prefect_env, base, tmp_path):
    """F7 (O11, R5, X1, D15 through the `ablate` flow, the per-shard subflow every run uses): --overwrite
    keeps the user's files and the directions file inside the output; a second run into an output being
    written fails at once; identical runs write identical files; a NaN harmless mean fails the run."""
    from abliterate.config import Ablation
    from abliterate.edit.ablate import load_inputs
    from abliterate.edit.matching import configured_plan
    from abliterate_flows.ablate import ablate_flow

    model, directions, reference = base
    plan = configured_plan(load_inputs(model, directions), Ablation(), "auto")
    out = tmp_path / "out"
    with unchanged(model):
        assert ablate_flow(str(model), str(directions), str(out), plan)["counts"]
        first = tree(out)
        shutil.rmtree(out)
        ablate_flow(str(model), str(directions), str(out), plan)
        assert tree(out) == first  # every file, abliteration.json included
        (out / "notes.txt").write_text("mine")
        inside = out / "directions.safetensors"
        shutil.copyfile(directions, inside)
        other = configured_plan(load_inputs(model, inside), Ablation(layers="1"), "auto")
        ablate_flow(str(model), str(inside), str(out), other, overwrite=True)
        assert (out / "notes.txt").read_text() == "mine" and inside.read_bytes() == directions.read_bytes()

        busy = tmp_path / "busy"
        run = start_paused(tmp_path / "gate", ablate_args(model, directions, busy, "--workers", "1"))
        try:
            state = ablate_flow(str(model), str(directions), str(busy), plan, return_state=True)
            assert state.is_failed() and "is being written by another abliterate run" in state.message
        finally:
            (tmp_path / "gate").touch()
            assert run.wait(timeout=300) == 0
        assert shard_bytes(busy) == shard_bytes(reference)

        harmless = torch.randn(POSITIONS, H)
        harmless[2, 0] = float("nan")
        bad = with_means(tmp_path, torch.randn(POSITIONS, H), harmless)
        state = ablate_flow(str(model), str(bad), str(tmp_path / "nan"), plan, force=True, return_state=True)
        assert state.is_failed() and "`harmless_mean`" in state.message and "NaN or Inf" in state.message
    assert not (tmp_path / "nan").exists()


@pytest.mark.slow
def test_flow_validation_catches_a_damaged_output(prefect_env, tmp_path):
    """F8: the `abliterate` flow rerun over its own output after an edited tensor was damaged in a way
    that keeps it orthogonal to the direction: the validation task reruns (the output changed) and
    recomputes every edited tensor, and the flow fails; the input is unchanged throughout."""
    from abliterate_flows.main import abliterate_flow

    model, out = tmp_path / "demo", tmp_path / "out"
    shutil.copytree(DEMO_MODEL_DIR, model)
    settings = {
        "evaluation": {"evaluate": False},
        "selection": {"direction_position": "2"},
        "prompts": {"prompt_set": "demo"},
    }
    with unchanged(model):
        first = abliterate_flow(model=str(model), out=str(out), **settings, return_state=True)
        assert first.is_completed(), first.message
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        victim = next(e["name"] for e in manifest["edited"] if e["role"] == "attn_out")
        edit_tensor_bytes(out, victim, lambda w: w * 0.5)  # still orthogonal to the direction
        second = abliterate_flow(model=str(model), out=str(out), **settings, return_state=True)
    assert second.is_failed(), second.message
    assert (
        "validation of" in second.message
        and "differs from the edit recomputed from the input" in second.message
    )
