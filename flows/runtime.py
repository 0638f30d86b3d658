"""Embedded defaults: with nothing configured, runs use Prefect's temporary local server and an
MLflow SQLite store under ./mlruns (absolute paths). PREFECT_API_URL / MLFLOW_TRACKING_URI,
when set, point the same commands at real servers.

Prefect reads its settings at import time, so `configure()` must run before `import prefect`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from abliterate.config import environment
from abliterate.errors import AbliterateError
from abliterate.paths import describe_os_error

# Prefect waits PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (default 20, prefect/settings/models/
# server/ephemeral.py) for its temporary server. A first start runs the database migrations: on a busy
# 2-core machine that takes minutes, so the default here is generous; a user's own setting wins.
SERVER_STARTUP_TIMEOUT_S = 300
# Retries of each request by Prefect's client when the server is the temporary one (Prefect's default: 5).
TEMPORARY_SERVER_CLIENT_RETRIES = 2
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
        # The console is ours (one line per stage): Prefect's console handler (the root logger's, which
        # uvicorn's and fastapi's use too) shows nothing, and would otherwise print every task's state and
        # every failed flow's traceback above our one-line error. Prefect's own level stays as the user set
        # it (INFO by default): its API log handler sends the flow and task runs' logs, tracebacks
        # included, to the Prefect UI; a level of WARNING here would leave the UI's log tab empty.
        defaults["PREFECT_SERVER_LOGGING_LEVEL"] = "WARNING"
        defaults["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
        # Prefect's internal machinery logs to stderr through a handler of its own (`debug`, at ERROR): once
        # the temporary server is gone, its events worker printed "Service 'EventsWorker' failed to process
        # event" after the run's one-line error, at exit.
        defaults["PREFECT_INTERNAL_LOGGING_LEVEL"] = "CRITICAL"
        defaults["DASK_LOGGING__DISTRIBUTED"] = "error"
        defaults["MLFLOW_LOGGING_LEVEL"] = "WARNING"
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # Prefect's API log handler writes "--- Error logging to API ---" and the reason to stderr for every
        # batch of logs it cannot send once the server is gone (`logging.raiseExceptions`, the stdlib's
        # switch for errors of logging itself): they buried the run's one-line error (R12).
        logging.raiseExceptions = False
    if not environment().prefect_api_url:
        # The temporary server is this process's child on this machine: a request it does not answer means
        # it was stopped or killed, and Prefect's client retried each request 5 times with backoff (2+4+...+32
        # s: 20 s to 2 minutes, several requests in turn) before the run's one line (R12). Two tries, 2 s and
        # 4 s apart, still cover a server busy with a database lock (it answers 503 after its own wait).
        defaults["PREFECT_CLIENT_MAX_RETRIES"] = str(TEMPORARY_SERVER_CLIENT_RETRIES)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    (project_dir() / "mlruns").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    global _temporary_server
    _temporary_server = uses_temporary_server()
    if _temporary_server:
        tie_temporary_server_to_this_process()


# ------------------------------------------------------------------ the temporary server's lifetime

PR_SET_PDEATHSIG = 1  # linux/prctl.h

# Whether `configure` found that this process's flows run on Prefect's temporary server (Prefect then
# points PREFECT_API_URL at it: an unreachable URL is that server gone, not the user's server).
_temporary_server = False


_libc: ctypes.CDLL | None = None  # loaded in this process: the forked child must not import anything


def _server_child_setup(parent: int) -> None:  # pragma: no cover - runs in the forked child before exec
    """In the temporary server's process, before uvicorn starts: SIGKILL when the process that started
    it dies, however it dies (SIGKILL included: the kernel sends it, so no orphaned server is left). Not
    SIGTERM: uvicorn's graceful shutdown, with no client left to serve, took 17-25 s on a busy machine,
    an orphan all that time (its SQLite database is safe: SQLite survives a killed writer)."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


class _OwnSessionSubprocess:
    """`subprocess` as prefect/server/api/server.py sees it: its Popen starts the temporary server in a
    session of its own (Ctrl-C in a terminal, SIGINT to the whole foreground process group, reaches
    this process only, which stops the server itself at exit: the server used to die first and the
    run waited 75 s for it, then printed a traceback), tied to this process (`_server_child_setup`)."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802 - the name prefect calls
        kwargs.setdefault("start_new_session", True)
        if sys.platform.startswith("linux"):
            kwargs.setdefault("preexec_fn", functools.partial(_server_child_setup, os.getpid()))
        return subprocess.Popen(*args, **kwargs)


def tie_temporary_server_to_this_process() -> None:
    """Make Prefect's temporary server a child that dies with this process and that Ctrl-C does not
    reach before this process (prefect 3.x's `SubprocessASGIServer` starts it with a plain Popen and
    stops it from atexit, which neither SIGKILL nor a terminal's Ctrl-C of the whole group lets run
    first). Idempotent."""
    global _libc
    from prefect.server.api import server

    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = None
    if not isinstance(server.subprocess, _OwnSessionSubprocess):
        server.subprocess = _OwnSessionSubprocess()


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
        if isinstance(e, RuntimeError) and first.startswith("Failed to reach API at") and _temporary_server:
            return AbliterateError(
                f"Prefect's temporary server stopped answering in the middle of the run ({first[:200]}): it was "
                "stopped or killed; rerun the same command (finished stages are cached and kept)"
            )
        if isinstance(e, RuntimeError) and first.startswith("Failed to reach API at"):
            url = environment().prefect_api_url or first.removeprefix("Failed to reach API at").strip(" .")
            return AbliterateError(
                f"the Prefect server at PREFECT_API_URL={url} does not answer: start it with "
                "`prefect server start` (or `unset PREFECT_API_URL` to let each command start a temporary one)"
            )
    return None


# ------------------------------------------------------------------ errors in the middle of a run

# SQLite's words for a store it cannot write: (fragment, what to do).
_STORE_FIXES = (
    ("disk is full", "free space, then rerun the same command (finished work is kept)"),
    ("readonly", "its folder is read-only: fix the permissions, or set ABLITERATE_HOME to a writable folder"),
    (
        "read-only",
        "its folder is read-only: fix the permissions, or set ABLITERATE_HOME to a writable folder",
    ),
    (
        "unable to open",
        "its folder is missing or not writable: fix it, or set ABLITERATE_HOME to a writable folder",
    ),
    ("locked", "another process keeps it locked: let it finish, then rerun the same command"),
    (
        "disk i/o error",
        "the disk failed or filled up: free space or check the disk, then rerun the same command",
    ),
    ("not a database", "it is damaged: move it away (a new one is created) or restore it from a backup"),
    ("malformed", "it is damaged: move it away (a new one is created) or restore it from a backup"),
)


def _store_of(e: BaseException) -> str:
    """Which store an SQLite error came from: MLflow's, Prefect's, or a named database."""
    names = [f.f_code.co_filename.replace("\\", "/") for f, _ in traceback.walk_tb(e.__traceback__)]
    if any("/mlflow/" in n for n in names):
        return f"the MLflow store {os.environ.get('MLFLOW_TRACKING_URI') or tracking_uri()}"
    if any("/prefect/" in n for n in names):
        return f"Prefect's database (under PREFECT_HOME={os.environ.get('PREFECT_HOME', '~/.prefect')})"
    return "a database"


def runtime_error(exc: BaseException) -> AbliterateError | None:
    """Any error of the machinery around the stages as one line that says what and what to do; None for
    other exceptions (re-raise them). Recognised: Prefect's temporary server that does not start or an
    unreachable PREFECT_API_URL (`server_start_error`); the Prefect server going away in the middle of a
    run (httpx's transport errors, a 5xx answer: Prefect then fails to record the failure too, so this
    comes first); an SQLite store (MLflow's, Prefect's) that cannot be written (a full or read-only
    home, a lock), however deep MLflow or SQLAlchemy wrapped it; a stage's own one-line error that a
    library's error followed; a filesystem error wrapped by a library (`paths.describe_os_error`)."""
    first = server_start_error(exc)
    if first is not None:
        return first
    import sqlite3

    chain = list(_chain(exc))
    for e in chain:
        if _is_transport_error(e) or _is_server_error(e):
            url = None if _temporary_server else environment().prefect_api_url
            server = f"the Prefect server at PREFECT_API_URL={url}" if url else "Prefect's temporary server"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            return AbliterateError(
                f"{server} stopped answering in the middle of the run ({type(e).__name__}: {reason}): "
                + ("check that it runs" if url else "it was stopped or killed")
                + ", then rerun the same command (finished stages are cached and kept)"
            )
    for e in chain:  # MLflow's HTTP client gave up on the tracking server (after its own retries)
        text = str(e).strip()
        if (
            type(e).__name__ == "MlflowException"
            and text.startswith("API request to")
            and "failed with" in text
        ):
            uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri()
            return AbliterateError(
                f"the MLflow tracking server at MLFLOW_TRACKING_URI={uri} does not answer "
                f"({text.splitlines()[0][:200]}): check that it runs, then rerun the same command (finished stages "
                "are cached and kept), or unset MLFLOW_TRACKING_URI to record runs in the local store"
            )
    for e in chain:
        if isinstance(e, sqlite3.Error):
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            fix = next((f for k, f in _STORE_FIXES if k in reason.lower()), None)
            if fix is None:
                continue
            store = _store_of(e)
            if store == "a database":
                store = next((_store_of(x) for x in chain if _store_of(x) != "a database"), store)
            return AbliterateError(f"{store} cannot be written ({reason}): {fix}")
    for e in chain:
        if isinstance(e, AbliterateError):
            return e
    for e in chain:  # a file (not a socket: those are the server's, above)
        if isinstance(e, OSError) and not isinstance(e, ConnectionError) and e.filename is not None:
            return AbliterateError(describe_os_error(e))
    return None


def _is_transport_error(e: BaseException) -> bool:
    try:
        import httpx
    except ImportError:  # pragma: no cover - prefect depends on httpx
        return False
    return isinstance(e, httpx.TransportError)


def _is_server_error(e: BaseException) -> bool:
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    return type(e).__name__ == "PrefectHTTPStatusError" and isinstance(status, int) and status >= 500


@contextmanager
def store_errors() -> Iterator[None]:
    """The tracking store's errors (a full or read-only home under MLflow's SQLite file) as one line:
    what the flows raise, so their Failed state carries the same message the CLI prints."""
    try:
        yield
    except AbliterateError:
        raise
    except Exception as exc:
        translated = runtime_error(exc)
        if translated is None:
            raise
        raise translated from exc
