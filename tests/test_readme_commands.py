"""Every command the README and the deployment files show, run as written.

The commands are read from the files, never retyped here: the README's fenced ```bash blocks, its
inline code spans that run a program (`.venv/bin/...`, `export ...`, `curl ...`), the example commands
in deployments/prefect.yaml's comments and deployments/serve.py's docstring. Each is given to bash as
it stands, in a project folder of its own (ABLITERATE_HOME and HOME in a temporary directory, the
checkout's files linked in, so `$PWD/mlruns` and `results/` land there), and the outcome the text
claims is checked through the programs' own APIs. Servers (`prefect server start`, `mlflow ui`,
`mlflow server`, a worker, `serve.py`) are started, checked for answering on loopback, and stopped.
What cannot run here is listed with the reason in SKIPPED_SEGMENTS; a command no rule covers fails
`test_every_command_has_a_rule`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fixtures import ROOT
from mlflow.tracking import MlflowClient

README = ROOT / "README.md"
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
SERVE = ROOT / "deployments" / "serve.py"
# What a checkout holds that the commands use; linked into each test's project folder.
CHECKOUT = (".venv", "abliterate", "flows", "tasks", "deployments", "pyproject.toml", "README.md", "tests")
SERVER_START_S = 300  # a cold `prefect server start` migrates its database: minutes on a busy machine
FLOW_RUN_S = 1200
COMMAND_S = 1500

# Parts of commands (split at ` && `) that do not run in the test suite, and why.
SKIPPED_SEGMENTS = {
    r"^python3 -m venv \.venv$": "makes the virtual environment the test suite runs in",
    r"pip install": "installs from the package index (network); CI's set-up runs the same install",
    r"pytest": "the test command itself: this suite",
    r'runtime=\{"device": "cuda"': "needs a CUDA GPU",
}
# Commands that start a server and keep running: started, checked, stopped.
LONG_RUNNING = (
    r"prefect server start",
    r"mlflow (ui|server)",
    r"prefect worker start",
    r"deployments/serve\.py",
)


# ------------------------------------------------------------------ reading the commands


def readme_blocks(text: str) -> list[str]:
    """Lines of the ```bash blocks (a line is one command; comments stay, bash ignores them)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [line.strip() for line in block.splitlines() if line.strip()]
    return commands


def readme_inline(text: str) -> list[str]:
    """Inline code spans that run a program: `.venv/bin/...` anywhere in them, `export ...`, `curl ...`."""
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", outside)
    return [s for s in spans if ".venv/bin/" in s or s.startswith(("export ", "curl "))]


def yaml_commands(text: str) -> list[str]:
    """prefect.yaml's example commands: comment lines `#   prefect ...`."""
    return [m.strip() for m in re.findall(r"^#\s+(prefect .*)$", text, flags=re.M)]


def serve_commands(text: str) -> list[str]:
    """serve.py's docstring: its indented command lines."""
    doc = text.split('"""')[1]
    return [line.strip() for line in doc.splitlines() if line.startswith("    ") and "serve.py" in line]


def all_commands() -> list[str]:
    readme = README.read_text()
    return (
        readme_blocks(readme)
        + readme_inline(readme)
        + yaml_commands(PREFECT_YAML.read_text())
        + serve_commands(SERVE.read_text())
    )


def segments(command: str) -> list[str]:
    return [part.strip() for part in command.split(" && ")]


def skip_reason(segment: str) -> str | None:
    return next((why for pattern, why in SKIPPED_SEGMENTS.items() if re.search(pattern, segment)), None)


def find(pattern: str, commands: list[str] | None = None) -> str:
    """The one command matching `pattern` (a test names what it needs; the text comes from the files)."""
    found = [c for c in (commands or all_commands()) if re.search(pattern, c)]
    assert found, f"no command matches {pattern!r}: did the README change? update this test with it"
    return found[0]


# Which test runs each command: pattern -> test name (the tests below).
RULES = {
    r"abliterate demo$": "test_quick_start_and_look_at_the_runs",
    r"ruff check": "test_quick_start_checks",
    r"pip install torch": "skipped: " + SKIPPED_SEGMENTS[r"pip install"],
    r"pytest -q -m": "skipped: " + SKIPPED_SEGMENTS[r"pytest"],
    r"^\.venv/bin/mlflow ui": "test_quick_start_and_look_at_the_runs",
    r"^PREFECT_SERVER_ANALYTICS_ENABLED=false \.venv/bin/prefect server start\s*(#.*)?$": "test_quick_start_and_look_at_the_runs",
    r"--port 4300": "test_ui_on_another_port",
    r"curl http://127\.0\.0\.1:4300": "test_ui_on_another_port",
    r"mlflow server": "test_deployments_as_documented",
    r"^export PREFECT_API_URL": "test_deployments_as_documented",
    r"deployments/serve\.py$": "test_deployments_as_documented",
    r"work-pool create": "test_deployments_as_documented",
    r"prefect deploy --all": "test_deployments_as_documented",
    r"worker start": "test_deployments_as_documented",
    r"deployment run abliterate/demo -p 'ablation": "test_deployments_as_documented",
    r"deployment run abliterate-search/demo-search": "test_deployments_as_documented",
    r'runtime=\{"device": "cuda"': "skipped: " + SKIPPED_SEGMENTS[r'runtime=\{"device": "cuda"'],
    r"abliterate search abliterate/demo/model": "test_search_command",
    r"pytest -q tests/test_demo_model\.py": "skipped: " + SKIPPED_SEGMENTS[r"pytest"],
    r"^\.venv/bin/abliterate demo$": "test_quick_start_and_look_at_the_runs",
    r"inventory DIR": "skipped: needs the 18,329-tensor layout folder DIR (test_inventory.py runs it)",
    r"benchmarks/": "skipped: a benchmark (prints figures; minutes), not a check",
    r"abliterate\.demo\.train": "skipped: regenerates the demo model (3.5 min; test_demo_model.py checks it)",
    r"abliterate\.demo\.two_category": "skipped: regenerates the two-category model (minutes; "
    "test_two_category_model.py checks it with ABLITERATE_RETRAIN=1)",
    r"pytest -q -s tests/test_two_category_model\.py": "skipped: " + SKIPPED_SEGMENTS[r"pytest"],
    r"PREFECT_API_URL=http://127\.0\.0\.1:4200/api python deployments/serve\.py": "test_deployments_as_documented",
    r"abliterate demo --layers 0-3 --scale 0\.8$": "test_screenshots_script (it runs this demo)",
    r"docs/screenshots\.py$": "test_screenshots_script",
    r"abliterate chat ": "skipped: interactive (tests/test_chat.py drives the chat in a pseudo-terminal)",
    r"^\.venv/bin/python$": "not a command: names the interpreter",
    r"abliterate (measure|ablate) abliterate/demo/two_category_model": "test_subspace_choice.py::test_two_categories_need_the_subspace",
}


def test_commands_are_found():
    commands = all_commands()
    assert len(readme_blocks(README.read_text())) >= 5
    assert len(yaml_commands(PREFECT_YAML.read_text())) >= 5
    assert serve_commands(SERVE.read_text())
    assert any("deployment run abliterate/demo" in c for c in commands)


def test_every_command_has_a_rule():
    """A new command in the README is run by a test (or skipped here with its reason)."""
    missing = [c for c in all_commands() if not any(re.search(p, c) for p in RULES)]
    assert not missing, f"commands no test runs: {missing}"


# ------------------------------------------------------------------ running them


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder like a checkout: the checkout's files linked in; mlruns/ and results/ its own."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    for name in CHECKOUT:
        (folder / name).symlink_to(ROOT / name)
    return folder


def environment(project: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HOME": str(project.parent / "home"),
        "ABLITERATE_HOME": str(project),
        "PATH": f"{project / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }
    (project.parent / "home").mkdir(exist_ok=True)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH"):
        if key not in extra:
            env.pop(key, None)
    return env


def bash(
    command: str, project: Path, env: dict[str, str], timeout: float = COMMAND_S
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"`{command}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


def port_of(command: str, default: int) -> int:
    found = re.search(r"--port (\d+)", command)
    return int(found.group(1)) if found else default


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@contextmanager
def started(
    command: str, project: Path, env: dict[str, str], check_url: str | None
) -> Iterator[subprocess.Popen]:
    """Start a long-running command as written; wait until `check_url` answers 200; stop it afterwards."""
    log = open(project.parent / f"server-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["bash", "-c", command],  # its own process group: stopped whole below
        cwd=project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        if check_url:
            deadline = time.monotonic() + SERVER_START_S
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise AssertionError(f"`{command}` exited {proc.returncode}:\n{log.read()[-3000:]}")
                try:
                    if httpx.get(check_url, timeout=10).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"`{command}` did not answer at {check_url}"
                time.sleep(1)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def need_ports(*ports: int) -> None:
    busy = [p for p in ports if not port_free(p)]
    if busy:
        pytest.skip(f"the README's commands use ports {busy}, which another program holds on this machine")


def flow_run_state(api: str, run_id: str, timeout: float = FLOW_RUN_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json().get("state") or {}
            if state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return state
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish within {timeout} s")


def created_run_id(output: str) -> str:
    """`prefect deployment run` prints the new flow run's UUID."""
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert found, output
    return found.group(1)


def mlflow_run(project: Path, flow_run_id: str):
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    assert len(runs) == 1, runs
    return runs[0]


# ------------------------------------------------------------------ the tests


def test_quick_start_checks():
    """The second Quick start command, less its pytest (this suite): lint, format check, import contracts."""
    command = find(r"ruff check")
    for segment in segments(command):
        if skip_reason(segment) is None:
            done = subprocess.run(
                ["bash", "-c", segment], cwd=ROOT, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, f"`{segment}`:\n{done.stdout[-3000:]}{done.stderr[-2000:]}"


@pytest.mark.slow
def test_quick_start_and_look_at_the_runs(project):
    """`abliterate demo` from the Quick start (refusal 1.00 -> 0.00, KL about 6e-7, the UIs' commands),
    then "Look at the runs": `mlflow ui` shows its run, `prefect server start` its flow run and logs."""
    need_ports(5000, 4200)
    env = environment(project)
    demo = [s for s in segments(find(r"abliterate demo$")) if skip_reason(s) is None]
    assert demo == [".venv/bin/abliterate demo"], demo  # the install's segments are listed as skipped
    done = bash(demo[0], project, env)
    assert "mlflow ui --backend-store-uri" in done.stdout and "prefect server start" in done.stdout
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = run.data.metrics
    assert metrics["before/refusal_rate_harmful"] == 1.0 and metrics["after/refusal_rate_harmful"] == 0.0
    assert 3e-7 <= metrics["after/kl_harmless"] <= 1.2e-6  # "about 6e-7": within a factor of 2
    flow_run_id = run.data.tags["prefect.flow_run_id"]

    ui = find(r"^\.venv/bin/mlflow ui")
    with started(ui, project, env, f"http://127.0.0.1:{port_of(ui, 5000)}/health"):
        found = httpx.get(
            f"http://127.0.0.1:{port_of(ui, 5000)}/api/2.0/mlflow/runs/get",
            params={"run_id": run.info.run_id},
        )
        assert found.json()["run"]["info"]["run_name"] == run.info.run_name

    server = find(r"^PREFECT_SERVER_ANALYTICS_ENABLED=false \.venv/bin/prefect server start\s*(#.*)?$")
    api = "http://127.0.0.1:4200/api"
    with started(server, project, env, f"{api}/health"):
        flow_run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).json()
        assert flow_run["state"]["type"] == "COMPLETED"
        tasks = httpx.post(
            f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}, timeout=30
        ).json()
        assert len(tasks) >= 5  # inventory, structure, measurement, directions, ... each a task run
        logs = httpx.post(
            f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}}, timeout=30
        ).json()
        assert any("Finished in state Completed" in entry["message"] for entry in logs)


@pytest.mark.slow
def test_ui_on_another_port(project):
    """`PREFECT_UI_API_URL=... prefect server start --port 4300` and the `curl` that shows the UI's API address."""
    need_ports(4300)
    env = environment(project)
    server = find(r"--port 4300")
    curl = find(r"curl http://127\.0\.0\.1:4300")
    api = re.search(r"PREFECT_UI_API_URL=(\S+)", server).group(1)
    with started(server, project, env, "http://127.0.0.1:4300/api/health"):
        answer = bash(curl, project, env, timeout=60).stdout
        assert json.loads(answer)["api_url"] == api


@pytest.mark.slow
def test_deployments_as_documented(project):
    """Deployments steps 1-4 as written: the servers, `serve.py`, the README's `prefect deployment run`
    (numbers typed as numbers) with what it claims about the demo; then the work pool, `prefect deploy`,
    a worker, and prefect.yaml's example runs."""
    need_ports(4200, 5000)
    readme = README.read_text()
    section = readme.split("### Deployments")[1].split("### ")[0]
    steps = readme_inline(section)
    env = environment(project)
    prefect_server = find(r"prefect server start", steps)
    mlflow_server = find(r"mlflow server", steps)
    export = find(r"^export ", steps)
    exported = dict(item.split("=", 1) for item in shlex.split(export.removeprefix("export ")))
    api = exported["PREFECT_API_URL"]
    with (
        started(prefect_server, project, env, f"{api}/health"),
        started(mlflow_server, project, env, f"{exported['MLFLOW_TRACKING_URI']}/health"),
    ):
        env = {**env, **exported}  # step 2: this shell points at them
        serve = find(r"deployments/serve\.py$", steps)
        with started(serve, project, env, f"{api}/deployments/name/abliterate/demo"):
            run = find(r"deployment run abliterate/demo -p 'ablation", steps)
            flow_run_id = created_run_id(bash(run, project, env, timeout=300).stdout)
            state = flow_run_state(api, flow_run_id)
            assert state["type"] == "COMPLETED", state
        # what the README says this run does on the demo model
        tracked = mlflow_run_via_server(exported["MLFLOW_TRACKING_URI"], flow_run_id)
        assert (
            tracked.data.params["ablation.scale"] == "0.8" and tracked.data.params["ablation.layers"] == "0-3"
        )
        refusals = tracked.data.metrics["after/refusal_rate_harmful"]
        claim = re.search(r"this run leaves (\d+) of (\d+) harmful test prompts refused", section)
        assert claim, "the README says what this run leaves refused"
        assert refusals == pytest.approx(int(claim.group(1)) / int(claim.group(2)), abs=1e-12)
        assert (project / "results" / "early" / "abliteration.json").is_file()

        # the process work pool, as listed in step 3 and prefect.yaml's header
        bash(find(r"work-pool create", steps), project, env, timeout=300)
        bash(find(r"prefect deploy --all", steps), project, env, timeout=600)
        with started(find(r"worker start", steps), project, env, None):
            yaml_runs = yaml_commands(PREFECT_YAML.read_text())
            for command in [c for c in yaml_runs if "deployment run" in c and skip_reason(c) is None]:
                flow_run_id = created_run_id(bash(command, project, env, timeout=300).stdout)
                state = flow_run_state(api, flow_run_id)
                assert state["type"] == "COMPLETED", (command, state)
            search = find(
                r"deployment run abliterate-search/demo-search"
            )  # the README's, under Automatic search
            flow_run_id = created_run_id(bash(search, project, env, timeout=300).stdout)
            assert flow_run_state(api, flow_run_id)["type"] == "COMPLETED"


def mlflow_run_via_server(uri: str, flow_run_id: str):
    client = MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_search_command(project):
    """The README's `abliterate search ... --out`: the chosen trial written, validated and evaluated."""
    env = environment(project)
    command = find(r"abliterate search abliterate/demo/model")
    bash(command, project, env)
    out = project / re.search(r"--out (\S+)", command).group(1)
    manifest = json.loads((out / "abliteration.json").read_text())
    assert manifest["plan"]["origin"]["search"]


@pytest.mark.slow
def test_screenshots_script(project):
    """`docs/screenshots.py` as the README shows it: two demo runs (the README's second one among them),
    `mlflow ui`, Chromium's pictures; where no Chromium is installed it says so and makes nothing."""
    command = find(r"docs/screenshots\.py$")
    assert "--layers 0-3 --scale 0.8" in find(r"abliterate demo --layers 0-3 --scale 0\.8$")
    (project / "docs").mkdir()
    (project / "docs" / "screenshots.py").symlink_to(ROOT / "docs" / "screenshots.py")
    done = bash(command, project, environment(project))
    if "no Chromium found" in done.stderr:
        pytest.skip(done.stderr.strip())
    shots = project / "docs" / "screenshots"
    readme = README.read_text()
    for name in re.findall(r"\(docs/screenshots/([\w.]+\.png)\)", readme):
        assert (shots / name).stat().st_size > 20_000, name  # a page, not a blank window
