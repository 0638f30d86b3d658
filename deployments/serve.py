"""Serve the flows as Prefect deployments from this process (no work pool needed).

    PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/serve.py

registers `abliterate/demo`, `abliterate-sweep/demo-sweep` and `abliterate-search/demo-search` with
default parameters (the demo model; point `model` at your checkpoint when you trigger a run) and an example weekly schedule,
created paused so nothing runs until you switch it on in the UI. Runs execute in subprocesses
of this one, in the repository root, and log to the MLflow store that MLFLOW_TRACKING_URI names
(default: ./mlruns/mlflow.db of the repository).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).absolute().parents[1]  # the checkout it is started from (links not followed)
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
os.environ.setdefault("ABLITERATE_HOME", str(ROOT))

from abliterate_flows.runtime import configure  # noqa: E402

configure(quiet=False)

from prefect import serve  # noqa: E402
from prefect.deployments.runner import EntrypointType  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from abliterate.demo import DEMO_MODEL_DIR  # noqa: E402
from abliterate_flows.main import abliterate_flow  # noqa: E402
from abliterate_flows.search import search_flow  # noqa: E402
from abliterate_flows.sweep import EXAMPLE_VARIANTS, sweep_flow  # noqa: E402

WEEKLY = "0 3 * * 1"  # Mondays 03:00 UTC: e.g. re-run after a new prompt set lands


def deployments() -> list:
    # runtime: where the model runs (device cpu | cuda | cuda:N | auto) and in which dtype (auto | bfloat16 |
    # float16 | float32); every section of abliterate/config.py is a parameter of both flows.
    runtime = {"device": "auto", "dtype": "auto"}
    demo_params = {
        "model": str(DEMO_MODEL_DIR),
        "out": str(ROOT / "results" / "deployed" / "demo"),
        "overwrite": True,
        "runtime": runtime,
    }
    sweep_params = {
        "model": str(DEMO_MODEL_DIR),
        "out": str(ROOT / "results" / "deployed" / "sweep"),
        "variants": EXAMPLE_VARIANTS,
        "overwrite": True,
        "runtime": runtime,
    }
    # the search: `search` holds the study's settings (trials, kl_max, trial, components, methods, ...); a rerun
    # with the same settings resumes the study, one with more trials continues it
    search_params = {
        "model": str(DEMO_MODEL_DIR),
        "out": str(ROOT / "results" / "deployed" / "search"),
        "overwrite": True,
        "search": {"trials": 50, "kl_max": 0.01},
        "runtime": runtime,
    }
    return [
        abliterate_flow.to_deployment(
            name="demo",
            parameters=demo_params,
            tags=["abliterate"],
            entrypoint_type=EntrypointType.MODULE_PATH,
            schedules=[Cron(WEEKLY, timezone="UTC", active=False)],
        ),
        sweep_flow.to_deployment(
            name="demo-sweep",
            parameters=sweep_params,
            tags=["abliterate", "sweep"],
            entrypoint_type=EntrypointType.MODULE_PATH,
            schedules=[Cron(WEEKLY, timezone="UTC", active=False)],
        ),
        search_flow.to_deployment(
            name="demo-search",
            parameters=search_params,
            tags=["abliterate", "search"],
            entrypoint_type=EntrypointType.MODULE_PATH,
            schedules=[Cron(WEEKLY, timezone="UTC", active=False)],
        ),
    ]


if __name__ == "__main__":
    serve(*deployments(), pause_on_shutdown=False)
