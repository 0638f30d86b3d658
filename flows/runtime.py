"""Embedded defaults: with nothing configured, runs use Prefect's temporary local server and an
MLflow SQLite store under ./mlruns (absolute paths). PREFECT_API_URL / MLFLOW_TRACKING_URI,
when set, point the same commands at real servers.

Prefect reads its settings at import time, so `configure()` must run before `import prefect`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


def project_dir() -> Path:
    """Where mlruns/ and results/ live: ABLITERATE_HOME, or the current directory."""
    return Path(os.environ.get("ABLITERATE_HOME") or Path.cwd()).resolve()


def results_dir() -> Path:
    return Path(os.environ.get("ABLITERATE_RESULTS") or project_dir() / "results").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_dir() / 'mlruns' / 'mlflow.db'}"


def artifact_root() -> str:
    return (project_dir() / "mlruns" / "artifacts").as_uri()


def configure(quiet: bool = True) -> None:
    """Set process-wide defaults (never overriding what the user set)."""
    defaults = {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Task results (the cache) persist under the project, next to the outputs they describe.
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(results_dir() / "prefect-storage"),
    }
    if quiet:
        defaults["PREFECT_LOGGING_LEVEL"] = "WARNING"
        defaults["PREFECT_SERVER_LOGGING_LEVEL"] = "WARNING"
        defaults["DASK_LOGGING__DISTRIBUTED"] = "error"
        defaults["MLFLOW_LOGGING_LEVEL"] = "WARNING"
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    (project_dir() / "mlruns").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
