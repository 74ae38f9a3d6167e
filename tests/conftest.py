"""Shared pytest set-up: every test session gets its own PREFECT_HOME and no analytics."""

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

import nst.engine

_home = tempfile.mkdtemp(prefix="nst-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _home)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "manifests" / "images"
# Tests name the sample images by absolute path from manifests in temporary directories: allow them as inputs.
os.environ.setdefault("NST_INPUT_ROOTS", str(SAMPLES))
# Deployment runs read manifests only under their roots: the tests' manifests live in temporary directories and buckets.
os.environ.setdefault("NST_MANIFEST_ROOTS", f"{tempfile.gettempdir()},s3://")

# Fixture modules, one per concern (each file owns its fixtures).
pytest_plugins: list[str] = ["tests.fixtures.s3", "tests.fixtures.prefect"]


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Pair ids of every batch that reached the engine (a spy around the real Stylizer)."""
    calls: list[list[str]] = []
    real = nst.engine.Stylizer.run

    def spy(self: Any, jobs: Any, **kwargs: Any) -> Any:
        calls.append([j.id for j in jobs])
        return real(self, jobs, **kwargs)

    monkeypatch.setattr(nst.engine.Stylizer, "run", spy)
    return calls


class FaultyStylizer:
    """A real Stylizer whose `run` first calls `fault(jobs)`: faults the real parts cannot produce on demand (OOM)."""

    def __init__(self, inner: Any, fault: Any) -> None:
        self.inner, self.fault = inner, fault

    def run(self, jobs: Any, **kwargs: Any) -> Any:
        self.fault(jobs)
        return self.inner.run(jobs, **kwargs)
