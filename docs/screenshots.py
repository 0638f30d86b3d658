"""The README's MLflow pictures, made from real runs: two `abliterate demo` runs (all layers, and layers
0-3 at scale 0.8) in a fresh project folder, `mlflow ui` on loopback against their store, and headless
Chromium photographing the runs table, the comparison of the two runs, their charts and one run's
metrics.

    .venv/bin/python docs/screenshots.py                      # writes docs/screenshots/*.png
    .venv/bin/python docs/screenshots.py --home DIR --keep    # reuse (or keep) the project folder DIR

Needs a Chromium (`apt-get install chromium`, or one on PATH as chromium, chromium-browser,
google-chrome); without one it says so and exits 0 having made nothing (exit code 3 with --require).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).absolute().parents[1]  # the checkout it is run from (links not followed)
BIN = Path(sys.executable).parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEMO_RUNS = ([], ["--layers", "0-3", "--scale", "0.8"])  # the two runs to compare
WINDOW = (1500, 950)
RENDER_MS = 25000  # virtual time Chromium gives the page to fetch and draw before the picture
UI_START_S = 120
SHOT_S = 600  # one picture: seconds on a quiet machine, minutes on a loaded one


def browser() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "ABLITERATE_HOME": str(home), "HOME": str(home)}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(key, None)
    return env


def make_runs(home: Path) -> None:
    for options in DEMO_RUNS:
        command = [str(BIN / "abliterate"), "demo", "--quiet", *options]
        print("running", " ".join(command[1:]), flush=True)
        subprocess.run(command, env=project_env(home), cwd=home, check=True, stdout=subprocess.DEVNULL)


def wait_until_up(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + UI_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow ui exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow ui did not answer at {url} within {UI_START_S} s")


def shoot(chrome: str, url: str, path: Path, size: tuple[int, int] = WINDOW) -> None:
    subprocess.run(
        [
            chrome,
            "--headless=new",
            "--no-sandbox",  # root in containers
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={path.parent / '.chromium'}",
            f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={RENDER_MS}",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=SHOT_S,
    )
    print("wrote", path, flush=True)


def pictures(base: str, experiment: str, runs: list[str]) -> dict[str, str]:
    """File name -> UI route: what a reader does to compare two runs, step by step."""
    ml = "workflowType=machine_learning"
    return {
        "mlflow_runs.png": f"{base}/#/experiments/{experiment}/runs?{ml}",
        "mlflow_compare.png": f"{base}/#/compare-runs?runs={json.dumps(runs)}&experiments={json.dumps([experiment])}&{ml}",
        "mlflow_charts.png": f"{base}/#/experiments/{experiment}/runs?{ml}&compareRunsMode=CHART",
        "mlflow_run_metrics.png": f"{base}/#/experiments/{experiment}/runs/{runs[0]}/model-metrics?{ml}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="folder for the PNGs")
    parser.add_argument(
        "--home", type=Path, help="project folder with the runs (made there when it has none)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary project folder")
    parser.add_argument("--require", action="store_true", help="exit 3 when no Chromium is installed")
    args = parser.parse_args(argv)
    chrome = browser()
    if chrome is None:
        print(
            "no Chromium found (looked for " + ", ".join(BROWSERS) + "): install one, e.g. `apt-get install "
            "chromium`, and rerun; no screenshots made",
            file=sys.stderr,
        )
        return 3 if args.require else 0
    home = args.home or Path(tempfile.mkdtemp(prefix="abliterate-screens-"))
    home.mkdir(parents=True, exist_ok=True)
    store = home / "mlruns" / "mlflow.db"
    sys.path.insert(0, str(ROOT))
    from mlflow.tracking import MlflowClient

    if not store.is_file():
        make_runs(home)
    client = MlflowClient(f"sqlite:///{store}")
    experiment = next(e for e in client.search_experiments() if e.name.startswith("abliterate/demo"))
    runs = [
        r.info.run_id for r in client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    ]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{store}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=project_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"{base}/health", ui)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, url in pictures(base, experiment.experiment_id, runs[-2:]).items():
            shoot(chrome, url, args.out / name)
    finally:
        ui.terminate()
        ui.wait(timeout=30)
        shutil.rmtree(args.out / ".chromium", ignore_errors=True)
        if args.home is None and not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        elif args.home is None:
            print("kept", home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
