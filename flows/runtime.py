"""Embedded defaults: with nothing configured, runs use Prefect's temporary local server and an
MLflow SQLite store under ./mlruns (absolute paths). PREFECT_API_URL / MLFLOW_TRACKING_URI,
when set, point the same commands at real servers.

Prefect reads its settings at import time, so `configure()` must run before `import prefect`.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from abliterate.config import environment
from abliterate.errors import AbliterateError

# Prefect waits PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (default 20, prefect/settings/models/
# server/ephemeral.py) for its temporary server. A first start runs the database migrations: on a busy
# 2-core machine that takes minutes, so the default here is generous; a user's own setting wins.
SERVER_STARTUP_TIMEOUT_S = 300
RUNNING_SERVER_HELP = (
    "start one in another terminal with `prefect server start` and "
    "`export PREFECT_API_URL=http://127.0.0.1:4200/api` in this one, then rerun"
)


def project_dir() -> Path:
    """Where mlruns/ and results/ live: ABLITERATE_HOME, or the current directory."""
    return environment().project_dir()


def results_dir() -> Path:
    return environment().results_dir()


def tracking_uri() -> str:
    return environment().tracking_uri()


def artifact_root() -> str:
    return environment().artifact_root()


def configure(quiet: bool = True) -> None:
    """Set process-wide defaults (never overriding what the user set). Hugging Face's own variables
    (HF_HUB_OFFLINE, HF_HOME, HF_TOKEN) are the user's: a Hub id downloads unless they say offline."""
    defaults = {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "TOKENIZERS_PARALLELISM": "false",
        # Task results (the cache) persist under the project, next to the outputs they describe.
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(results_dir() / "prefect-storage"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(SERVER_STARTUP_TIMEOUT_S),
    }
    if quiet:
        defaults["PREFECT_LOGGING_LEVEL"] = "WARNING"
        defaults["PREFECT_SERVER_LOGGING_LEVEL"] = "WARNING"
        # Prefect's console handler would print every failed flow's traceback above our one-line error;
        # the tracebacks still reach the Prefect UI through its API log handler.
        defaults["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
        defaults["DASK_LOGGING__DISTRIBUTED"] = "error"
        defaults["MLFLOW_LOGGING_LEVEL"] = "WARNING"
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    (project_dir() / "mlruns").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())


def uses_temporary_server() -> bool:
    """True when a flow run in this process will start Prefect's temporary (ephemeral) server: no
    PREFECT_API_URL in the environment or the active Prefect profile."""
    try:
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        return not settings.api.url and bool(settings.server.ephemeral.enabled)
    except Exception:  # settings unreadable: decide by the environment alone
        return not environment().prefect_api_url


_announced = False


def announce_prefect_server(stream=None) -> bool:
    """Before the first flow run: one line on stderr when Prefect is about to start its temporary
    server, which is silent (logging at WARNING) and slow on a first start. Once per process;
    returns whether it printed."""
    global _announced
    if _announced or not uses_temporary_server():
        return False
    _announced = True
    print(
        "starting a temporary Prefect server (first start can take a minute; "
        "set PREFECT_API_URL to use a running server)",
        file=stream or sys.stderr,
        flush=True,
    )
    return True


def _chain(exc: BaseException):
    """exc, its causes and contexts, and the members of exception groups, each once."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _raised_in_temporary_server_start(exc: BaseException) -> bool:
    """Raised inside prefect.server.api.server.SubprocessASGIServer (start, its port search, ...)."""
    for frame, _line in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename.replace("\\", "/").endswith("prefect/server/api/server.py"):
            if type(frame.f_locals.get("self")).__name__ == "SubprocessASGIServer":
                return True
    return False


def _startup_timeout() -> str:
    try:
        from prefect.settings import get_current_settings

        return str(get_current_settings().server.ephemeral.startup_timeout_seconds)
    except Exception:
        return os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20")


def server_start_error(exc: BaseException) -> AbliterateError | None:
    """Prefect's failure to start or reach its API server as a one-line AbliterateError that says what
    to do; None for any other exception (re-raise it).

    Recognised: the temporary server's start-up timeout and port search (RuntimeError "Timed out while
    attempting to connect to ephemeral Prefect API server." / "Unable to find an available port", or any
    error raised inside SubprocessASGIServer.start, prefect/server/api/server.py), and an unreachable
    PREFECT_API_URL (RuntimeError "Failed to reach API at ...", prefect/client/orchestration).
    """
    for e in _chain(exc):
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        if isinstance(e, AbliterateError):
            return None
        if "ephemeral Prefect API server" in text or _raised_in_temporary_server_start(e):
            limit = _startup_timeout()
            return AbliterateError(
                f"Prefect's temporary server did not start ({first[:200].rstrip('.')}; start-up bound "
                f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={limit} s): {RUNNING_SERVER_HELP}"
            )
        if isinstance(e, RuntimeError) and first.startswith("Failed to reach API at"):
            url = environment().prefect_api_url or first.removeprefix("Failed to reach API at").strip(" .")
            return AbliterateError(
                f"the Prefect server at PREFECT_API_URL={url} does not answer: start it with "
                "`prefect server start` (or `unset PREFECT_API_URL` to let each command start a temporary one)"
            )
    return None
