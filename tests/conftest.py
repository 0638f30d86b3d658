"""Shared test set-up: one torch thread, offline, telemetry off, GLM-4.5-Air-layout fixtures."""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # `--threads auto` takes it: one thread, as below

import pytest  # noqa: E402
import torch  # noqa: E402
from checkpoint_guard import unchanged  # noqa: E402

from abliterate.demo import DEMO_MODEL_DIR  # noqa: E402
from abliterate.weights.synthetic import GlmLayout, write_glm_layout  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """A test that needs the Prefect test harness (a server started for the session) is slow."""
    for item in items:
        if "prefect_env" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def demo_model_unchanged():
    """No test may write into the committed demo model: its files are hashed before and after."""
    with unchanged(DEMO_MODEL_DIR):
        yield


@pytest.fixture(scope="session")
def glm_air_layout(tmp_path_factory) -> "os.PathLike":
    """GLM-4.5-Air's full tensor layout (18,329 tensors, 8 shards) at tiny widths. Read-only:
    hashed when made and again at the end of the session."""
    path = write_glm_layout(tmp_path_factory.mktemp("glm") / "glm-air-layout", GlmLayout(), num_shards=8)
    with unchanged(path):
        yield path


@pytest.fixture(scope="session")
def glm_air_layout_fused(tmp_path_factory):
    """The same layout saved with fused 3-D expert tensors (transformers' save_original_format=False)."""
    path = write_glm_layout(
        tmp_path_factory.mktemp("glm") / "glm-air-fused", GlmLayout(fused_experts=True), num_shards=8
    )
    with unchanged(path):
        yield path


@pytest.fixture
def restored_environment():
    """configure() sets process-wide defaults: put the environment back for the tests after this one."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory):
    """One Prefect test harness (temporary server + database) and one MLflow store per session.

    Prefect reads settings at import, so this configures the environment before the flows import.
    """
    home = tmp_path_factory.mktemp("project")
    os.environ["ABLITERATE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from abliterate_flows.runtime import configure

    configure()
    from prefect.testing.utilities import prefect_test_harness

    # The bound configure() sets for a cold, busy machine (a fresh database migrates on every session;
    # 300 s unless the caller set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS), read from the
    # environment: Prefect's own settings object may have been built before configure() ran.
    startup = int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    with prefect_test_harness(server_startup_timeout=startup):
        yield home
