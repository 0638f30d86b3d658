"""Cache keys built from content, never from paths alone.

A key is a task name, a hash of the domain code the task runs (so a code change
invalidates its cache) and content fingerprints of its inputs (checkpoint stamps, prompt
hashes, settings). Equal keys mean equal results, so a rerun with other ablation settings
reuses the inventory, the measurement and the directions.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from functools import cache
from types import ModuleType
from typing import Any


@cache
def code_hash(*modules: ModuleType) -> str:
    digest = hashlib.sha256()
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def make_key(task: str, code: str, *parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return f"{task}-{code}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}"
