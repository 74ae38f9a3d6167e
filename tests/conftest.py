"""Shared pytest set-up: every test session gets its own PREFECT_HOME and no analytics; the S3 and Prefect fixtures."""

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nst.engine
from nst_testing.paths import SAMPLES
from nst_testing.prefect import (
    PrefectServer,
    Worker,
    WorkerFactory,
    kill_process_groups,
    process_tree,
    start_process_worker,
    start_server,
    stop_process,
)
from nst_testing.s3 import S3Server, point_boto3_at, reset_storage_clients, running_seaweedfs

_home = tempfile.mkdtemp(prefix="nst-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _home)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Tests name the sample images by absolute path from manifests in temporary directories: allow them as inputs.
os.environ.setdefault("NST_INPUT_ROOTS", str(SAMPLES))
# Deployment runs read manifests only under their roots: the tests' manifests live in temporary directories and buckets.
os.environ.setdefault("NST_MANIFEST_ROOTS", f"{tempfile.gettempdir()},s3://")


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Pair ids of every batch that reached the engine (a spy around the real Stylizer)."""
    calls: list[list[str]] = []
    real = nst.engine.Stylizer.stylize

    def spy(self: Any, jobs: Any, **kwargs: Any) -> Any:
        calls.append([j.id for j in jobs])
        return real(self, jobs, **kwargs)

    monkeypatch.setattr(nst.engine.Stylizer, "stylize", spy)
    return calls


# --- S3: SeaweedFS (nst_testing/s3.py). Fails loudly if `weed` is not installed (the dev extras install it).


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS for the whole session (credentials enforced)."""
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[S3Server]:
    """Point boto3's default credential/endpoint chain at the test server for one test (fresh `nst.storage` clients)."""
    point_boto3_at(s3_server, monkeypatch, tmp_path)
    yield s3_server
    reset_storage_clients()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the test server (use with `s3_env`)."""
    return s3_server.create_bucket()


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A base URI on each backend: a fresh local directory, or `s3://<fresh bucket>/root/` (with `s3_env` set)."""
    if request.param == "local":
        root = tmp_path / "root"
        root.mkdir()
        return str(root)
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root/"


# --- Prefect (nst_testing/prefect.py): every process a fixture starts is stopped at teardown.


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One in-process Prefect API (temporary SQLite) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _served(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[PrefectServer]:
    """A `prefect server start` in a fresh folder `name`, stopped when the fixture ends."""
    server = start_server(tmp_path_factory.mktemp(name))
    try:
        yield server
    finally:
        assert server.proc is not None
        stop_process(server.proc)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real `prefect server start` (API + UI) on a free port, shared by the session's end-to-end tests."""
    yield from _served(tmp_path_factory, "prefect-server")


@pytest.fixture
def process_worker(prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerFactory]:
    """Factory: `process_worker(pool, env=..., cwd=...)` starts `prefect worker start --type process` on the server.

    Its flow runs are subprocesses of the same venv's Python; every worker started is stopped with SIGINT at teardown.
    """
    started: list[Worker] = []

    def start(pool: str, *, env: dict[str, str] | None = None, cwd: Path | str | None = None) -> Worker:
        worker = start_process_worker(prefect_server, pool, tmp_path_factory.mktemp("prefect-worker"), env=env, cwd=cwd)
        started.append(worker)
        return worker

    yield start
    for worker in reversed(started):
        stop_process(worker.proc, first=signal.SIGINT, grace_s=30)


# A module's own server, workers on it, and killing a whole process tree (tests/test_zombie.py, test_work_pools.py).


@pytest.fixture(scope="module")
def isolated_prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A `prefect server start` for one test module: automations, pools and limits created there touch no other test."""
    yield from _served(tmp_path_factory, "prefect-server-isolated")


@pytest.fixture
def isolated_process_worker(
    isolated_prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerFactory]:
    """Factory like `process_worker`, on `isolated_prefect_server`; workers and their flow runs end at teardown."""
    started: list[Worker] = []

    def start(pool: str, **kwargs: Any) -> Worker:
        home = tmp_path_factory.mktemp("prefect-worker")
        worker = start_process_worker(isolated_prefect_server, pool, home, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in reversed(started):
        descendants = process_tree(worker.proc.pid)[1:]
        stop_process(worker.proc, first=signal.SIGINT, grace_s=30)
        # Flow runs of a process worker run in process groups of their own: end any the worker left behind.
        kill_process_groups(descendants)
