"""Cache keys: one hash of the whole source the tasks run, so editing any module invalidates.

The packages are copied (their .py files) to a temporary folder and hashed there; each test
edits one byte of one module in the copy, never the working tree.
"""

import importlib
import pkgutil
import shutil
from pathlib import Path

import pytest
import torch
from prefect import Task

import abliterate
import abliterate_tasks
import abliterate_tasks.caching
import abliterate_tasks.measure
from abliterate.config import Ablation, Measurement, Runtime, Template
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.edit.ablate import load_inputs
from abliterate.edit.matching import configured_plan
from abliterate.measure.direction_file import save_directions
from abliterate.weights.checkpoint import build_inventory
from abliterate.weights.synthetic import GlmLayout, write_glm_layout
from abliterate_tasks.caching import code_hash, make_key, package_roots, source_hash

ABLITERATE_DIR = Path(abliterate.__file__).resolve().parent
TASKS_DIR = Path(abliterate_tasks.__file__).resolve().parent


def _modules(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root.parent).as_posix() for p in root.rglob("*.py") if "__pycache__" not in p.parts
    )


MODULES = _modules(ABLITERATE_DIR) + _modules(TASKS_DIR)


def _only_sources(directory: str, names: list[str]) -> list[str]:
    return [
        n for n in names if n == "__pycache__" or (Path(directory, n).is_file() and not n.endswith(".py"))
    ]


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> tuple[Path, ...]:
    """The .py files of abliterate/ and tasks/, under the same package names."""
    base = tmp_path_factory.mktemp("src")
    for src in (ABLITERATE_DIR, TASKS_DIR):
        shutil.copytree(src, base / src.name, ignore=_only_sources)
    return (base / "abliterate", base / "tasks")


def test_default_roots_are_the_installed_packages():
    assert package_roots() == (ABLITERATE_DIR, TASKS_DIR)


def test_a_copy_hashes_like_the_installed_packages(copy):
    # Relative paths under the package names, not absolute paths: a checkout elsewhere (a Dask
    # worker, another clone) computes the same keys. Package data (demo model, prompts) is not hashed.
    assert source_hash(copy) == source_hash(package_roots())
    assert code_hash(copy) == code_hash()


def test_code_hash_is_computed_once_per_process():
    assert code_hash.cache_info().maxsize is None  # functools.cache
    code_hash()
    hits = code_hash.cache_info().hits
    code_hash()
    assert code_hash.cache_info().hits == hits + 1


@pytest.mark.parametrize("module", MODULES)
def test_editing_any_module_changes_the_hash(copy, module):
    before = source_hash(copy)
    path = copy[0].parent / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"#")  # one byte more: a comment
        assert source_hash(copy) != before
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]) if original else b"x")  # one byte changed
        assert source_hash(copy) != before
    finally:
        path.write_bytes(original)
    assert source_hash(copy) == before


def test_adding_or_renaming_a_module_changes_the_hash(copy):
    before = source_hash(copy)
    added = copy[0] / "new_module.py"
    added.write_text("")
    try:
        assert source_hash(copy) != before
    finally:
        added.unlink()
    module = copy[0] / "inference" / "refusal.py"
    renamed = copy[0] / "inference" / "refusal_markers.py"
    module.rename(renamed)
    try:
        assert source_hash(copy) != before
    finally:
        renamed.rename(module)
    assert source_hash(copy) == before


def test_bytecode_and_data_files_do_not_count(copy):
    before = source_hash(copy)
    cache = copy[0] / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "measure.cpython-312.pyc").write_bytes(b"\0")
    (copy[0] / "notes.txt").write_text("not code")
    try:
        assert source_hash(copy) == before
    finally:
        shutil.rmtree(cache)
        (copy[0] / "notes.txt").unlink()


def test_the_measurement_key_changes_with_the_code(copy, monkeypatch):
    """A real task key (activation measurement) follows the hash of the code: an edit of a module
    the task does not name (streaming, chat rendering) makes a new key."""
    parameters = {
        "model_dir": str(DEMO_MODEL_DIR),
        "harmful": ["how do I pick a lock"],
        "harmless": ["how do I bake bread"],
        "measurement": Measurement(),
        "template": Template(),
        "runtime": Runtime(device="cpu", dtype="float32"),
    }
    monkeypatch.setattr(abliterate_tasks.measure, "code_hash", lambda: code_hash(copy))
    before = abliterate_tasks.measure._measure_key(None, parameters)
    assert before == abliterate_tasks.measure._measure_key(None, parameters)
    for module in ("inference/streaming.py", "measure/chat.py"):
        path = copy[0] / module
        original = path.read_bytes()
        try:
            path.write_bytes(original + b"\n")
            code_hash.cache_clear()
            assert abliterate_tasks.measure._measure_key(None, parameters) != before, module
        finally:
            path.write_bytes(original)
            code_hash.cache_clear()
    assert abliterate_tasks.measure._measure_key(None, parameters) == before


def test_the_measurement_key_follows_what_decides_the_numbers():
    """Every setting that changes the measured means makes a new key; the direction method (applied to
    the means afterwards), the device and the ablation's runtime settings do not."""
    base = {
        "model_dir": str(DEMO_MODEL_DIR),
        "harmful": ["how do I pick a lock"],
        "harmless": ["how do I bake bread"],
        "measurement": Measurement(),
        "template": Template(),
        "runtime": Runtime(device="cpu", dtype="float32"),
    }
    key = abliterate_tasks.measure._measure_key(None, base)

    def changed(section: str, **update) -> str:
        return abliterate_tasks.measure._measure_key(
            None, {**base, section: base[section].model_copy(update=update)}
        )

    for section, update in (
        ("measurement", {"token_position": -2}),
        ("measurement", {"max_length": 100}),
        ("template", {"system_prompt": "Be brief."}),
        ("template", {"chat_template_kwargs": {"enable_thinking": False}}),
        ("runtime", {"batch_size": 3}),
        ("runtime", {"dtype": "bfloat16"}),
    ):
        assert changed(section, **update) != key, update
    for section, update in (
        ("measurement", {"direction_method": "mean_diff"}),
        ("runtime", {"device": "cuda"}),
        ("runtime", {"workers": 8}),
    ):
        assert changed(section, **update) == key, update
    reordered = {**base, "template": Template(chat_template_kwargs={"a": 1, "b": 2})}
    assert abliterate_tasks.measure._measure_key(None, reordered) == abliterate_tasks.measure._measure_key(
        None, {**base, "template": Template(chat_template_kwargs={"b": 2, "a": 1})}
    )


class _CodeHashCalled(Exception):
    """Raised by the stand-in for code_hash: a key function got that far, with these arguments."""


class _Parameters(dict):
    """A task's parameters for its key function: the small checkpoint's, the model folder for any other."""

    def __missing__(self, name):
        return self["model_dir"]


def _cached_tasks() -> dict[str, tuple]:
    """Every task of the orchestration that has a cache key function: name -> (module, task)."""
    found = {}
    for info in pkgutil.iter_modules(abliterate_tasks.__path__):
        module = importlib.import_module(f"abliterate_tasks.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, Task)
                and value.cache_key_fn is not None
                and value.fn.__module__ == module.__name__
            ):
                found[value.name] = (module, value)
    return found


def test_every_task_key_uses_the_one_code_hash(monkeypatch, tmp_path):
    """No task goes back to a hand-picked module list: each cached task's key function, run, calls
    `code_hash()` without arguments (the hash of the whole source)."""
    layout = GlmLayout(num_layers=2, n_routed_experts=4)
    model = write_glm_layout(tmp_path / "model", layout, num_shards=1)
    directions = save_directions(
        tmp_path / "directions.safetensors",
        torch.randn(layout.num_layers + 1, layout.hidden_size),
        {"fingerprint": build_inventory(model).fingerprint, "selected_position": 1},
    )
    inputs = load_inputs(model, directions)
    parameters = _Parameters(
        model_dir=str(model),
        directions_path=str(directions),
        force=False,
        plan=configured_plan(inputs, Ablation(), "auto"),
        shard=inputs.inventory.shards[0],
        out_dir=str(tmp_path / "out"),
    )

    def stand_in(*args, **kwargs):
        raise _CodeHashCalled(args, kwargs)

    tasks = _cached_tasks()
    assert {"weight-inventory", "activation-measurement", "ablate-shard", "output-validation"} <= set(tasks)
    monkeypatch.setattr(abliterate_tasks.caching, "code_hash", stand_in)
    for name, (module, task) in tasks.items():
        monkeypatch.setattr(module, "code_hash", stand_in, raising=False)
        with pytest.raises(_CodeHashCalled) as called:
            task.cache_key_fn(None, parameters)
        args, kwargs = called.value.args
        assert args == () and kwargs == {}, f"{name}: code_hash{args} hashes a hand-picked module list"


def test_make_key_keeps_task_code_and_parts_apart():
    assert make_key("measure", "c1", 1, "a") != make_key("measure", "c2", 1, "a")
    assert make_key("measure", "c1", 1, "a") != make_key("measure", "c1", 1, "b")
    assert make_key("measure", "c1", 1, "a").startswith("measure-c1-")
