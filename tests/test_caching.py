"""Cache keys: one hash of the whole source the tasks run, so editing any module invalidates.

The packages are copied (their .py files) to a temporary folder and hashed there; each test
edits one byte of one module in the copy, never the working tree.
"""

import re
import shutil
from pathlib import Path

import pytest

import abliterate
import abliterate_tasks
import abliterate_tasks.measure
from abliterate.demo import DEMO_MODEL_DIR
from abliterate.measure.means import MeasureSettings
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
        "settings": MeasureSettings(),
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


def test_every_task_key_uses_the_one_code_hash():
    """No task goes back to a hand-picked module list: every call is `code_hash()`."""
    for path in sorted(TASKS_DIR.glob("*.py")):
        if path.name == "caching.py":
            continue
        for call in re.findall(r"code_hash\(([^)]*)\)", path.read_text()):
            assert call.strip() == "", f"{path.name}: code_hash({call}) hashes a hand-picked module list"


def test_make_key_keeps_task_code_and_parts_apart():
    assert make_key("measure", "c1", 1, "a") != make_key("measure", "c2", 1, "a")
    assert make_key("measure", "c1", 1, "a") != make_key("measure", "c1", 1, "b")
    assert make_key("measure", "c1", 1, "a").startswith("measure-c1-")
