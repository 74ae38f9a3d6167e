"""Shared pytest set-up: every test session gets its own PREFECT_HOME and no analytics; the S3 and Prefect fixtures;
the test tiers.

Tiers (issue 31). Every test that needs none of the heavy parts is marked `unit` here, at collection, and runs in
`make test-unit` (`pytest -m unit`): the heavy parts are a server (HEAVY_FIXTURES below: SeaweedFS, Prefect, the `s3`
case of `storage_root`), the real engine (a weights file, the VGG network, seconds of optimisation) and a browser.
A test is not unit when it is marked `slow`, `browser` or `vgg`, or requests a heavy fixture. Tests written before
the tiers that run the engine are listed in ENGINE_TESTS (marked `vgg` here); a new test that loads weights
carries `@pytest.mark.vgg` itself, or uses tests/tiny_extractor.py or a fake engine (tests/test_done.py). A
`unit` test that loads a weights file, builds the VGG network or starts SeaweedFS, a Prefect server or worker or
Chromium fails with UnitTierViolation, in every run (the guard below): nothing heavy hides in the unit tier.
"""

import os
import signal
import subprocess
import tempfile
from collections import OrderedDict
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import nst.engine.stylizer
import nst.engine.vgg
import nst.engine.weight_formats
import nst.engine.weights
from nst_testing.paths import SAMPLES
from nst_testing.prefect import (
    DB_TEMPLATE_ENV,
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

# Every test process gets its own PREFECT_HOME (the pytest-xdist workers too: they inherit the parent's environment).
if "PREFECT_HOME" not in os.environ or os.environ.get("NST_TEST_OWN_PREFECT_HOME") == "1":
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="nst-test-prefect-")
    os.environ["NST_TEST_OWN_PREFECT_HOME"] = "1"
# Prefect servers of this session start from a copy of the first one's migrated database (nst_testing/prefect.py).
os.environ.setdefault(DB_TEMPLATE_ENV, os.path.join(tempfile.mkdtemp(prefix="nst-test-prefect-db-"), "template.db"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Servers and workers are stopped with SIGINT, as a user's Ctrl-C. A suite started in the background (`make test &`,
# nohup, some CI runners) inherits SIGINT ignored, every process it starts too, and Python then installs no Ctrl-C
# handler: each stop waited out its grace (20-30 s) before SIGTERM, ~35 s a worker, and the restart test's server
# stop took minutes. The default handler here makes every child start with SIGINT's default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# One torch thread in each test process and in every process it starts (servers, workers, flow runs): `make test`
# runs several test processes on 2 cores, and each one's second OpenMP thread only spun on a core another process
# needed. Whole suite: 1,863 -> 1,531 s of CPU, 17 min 28 s -> 15 min 41 s (docs/bench/test-durations.txt).
# Only a test setting: results differ from 2 threads by float summation order, which no test may depend on.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Tests name the sample images by absolute path from manifests in temporary directories: allow them as inputs.
os.environ.setdefault("NST_INPUT_ROOTS", str(SAMPLES))
# Deployment runs read manifests only under their roots: the tests' manifests live in temporary directories and buckets.
os.environ.setdefault("NST_MANIFEST_ROOTS", f"{tempfile.gettempdir()},s3://")


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Pair ids of every batch that reached the engine (a spy around the real Stylizer)."""
    calls: list[list[str]] = []
    real = nst.engine.stylizer.Stylizer.stylize

    def spy(self: Any, jobs: Any, **kwargs: Any) -> Any:
        calls.append([j.id for j in jobs])
        return real(self, jobs, **kwargs)

    monkeypatch.setattr(nst.engine.stylizer.Stylizer, "stylize", spy)
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
def prefect_harness(prefect_server: PrefectServer) -> Iterator[None]:
    """Flows run in this process talk to the session's real server (as `prefect_test_harness` does with a server of
    its own: one server a test process instead of two, ~15 s of CPU each to start). Tests find their runs by id."""
    from prefect.context import _temporary_global_settings_context, get_settings_context

    with prefect_server.settings(), _temporary_global_settings_context(get_settings_context()):
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


# --- Tiers (see the module docstring): `vgg` and `unit` are added at collection; the guard keeps unit tests light.

HEAVY_FIXTURES = frozenset(
    {
        "s3_server",
        "s3_env",
        "s3_bucket",
        "prefect_harness",
        "prefect_server",
        "process_worker",
        "isolated_prefect_server",
        "isolated_process_worker",
    }
)
HEAVY_MARKERS = ("slow", "browser", "vgg")
ALL: frozenset[str] = frozenset()  # every test of the module
# Tests written before the tiers that run the engine for real (a weights file, the VGG network, or seconds of
# optimisation), by module and function name (every parameter case): marked `vgg` here. New tests carry
# `@pytest.mark.vgg` themselves.
ENGINE_TESTS: dict[str, frozenset[str]] = {
    "test_vgg.py": ALL,
    "test_engine_e2e.py": ALL,
    "test_engine_revision.py": ALL,
    "test_quality_bench.py": ALL,
    "test_bounded_lbfgs.py": frozenset(
        {
            "test_saved_image_losses_equal_the_last_logged_losses_tiny",
            "test_saved_image_losses_equal_the_last_logged_losses_vgg19",
        }
    ),
    "test_fast_path.py": frozenset(
        {
            "test_bf16_step_computes_the_fp32_loss_and_gradient",
            "test_bf16_grams_stay_fp32_and_finite",
            "test_bf16_batched_run_tracks_the_fp32_single_pair_reference",
            "test_memory_model_counts_what_autograd_saves",
        }
    ),
    "test_optimize.py": frozenset({"test_batched_equals_single"}),
    "test_batch.py": frozenset(
        {
            "test_a_bad_pair_fails_alone_and_is_recorded",
            "test_a_dead_runs_claim_lapses",
            "test_a_done_pairs_leftover_claim_is_cleared_unless_its_run_is_live",
            "test_a_failure_after_the_write_never_downgrades_a_written_pair",
            "test_a_pairs_claim_is_released_as_soon_as_it_is_written",
            "test_a_replaced_image_is_not_done",
            "test_a_write_error_fails_only_its_pair_and_never_reruns_the_optimisation",
            "test_cli_run_and_validate_without_prefect",
            "test_cli_run_takes_overrides_and_run_options",
            "test_each_input_is_read_once_per_run",
            "test_oom_splits_the_batch_and_retries_the_halves",
            "test_pair_ids_pick_pairs_and_unknown_ids_are_an_error",
            "test_run_writes_outputs_and_reruns_only_what_changed",
            "test_two_runs_at_once_every_json_describes_the_png_beside_it",
        }
    ),
    "test_cli.py": frozenset(
        {
            "test_output_directory_not_writable",
            "test_preset_is_recorded_complete",
            "test_presets_and_weights_commands",
            "test_stylize_writes_png_and_json",
            "test_unusual_image_modes_are_handled",
            "test_weights_of_the_wrong_shape",
        }
    ),
    "test_ids.py": frozenset(
        {"test_a_migrated_pair_is_still_done", "test_night_two_neither_changes_nor_takes_night_ones_id"}
    ),
    "test_long_nights.py": frozenset(
        {
            "test_a_run_removes_the_temp_files_a_killed_writer_left",
            "test_intermediates_never_fail_a_written_pair_and_old_ones_are_removed",
            "test_without_prefect_an_unexpected_error_fails_its_batch_and_the_run_goes_on",
        }
    ),
}


class UnitTierViolation(AssertionError):
    """A test in the unit tier reached a heavy part (weights file, VGG network, server, browser)."""


def is_engine_test(item: pytest.Item) -> bool:
    """Whether ENGINE_TESTS lists this test (its module, or its function in its module)."""
    names = ENGINE_TESTS.get(item.path.name)
    return names is not None and (names is ALL or getattr(item, "originalname", item.name) in names)


def is_unit(item: pytest.Item) -> bool:
    """Whether a collected test belongs to the unit tier (the rule in this module's docstring)."""
    if any(item.get_closest_marker(name) for name in HEAVY_MARKERS):
        return False
    if HEAVY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return False
    callspec = getattr(item, "callspec", None)
    return callspec is None or callspec.params.get("storage_root") != "s3"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the listed engine tests `vgg`, then the unit tier `unit` (`pytest -m unit`); order for parallel workers."""
    for item in items:
        if is_engine_test(item):
            item.add_marker(pytest.mark.vgg)
        if is_unit(item):
            item.add_marker(pytest.mark.unit)
        if MODULE_SERVER in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    if "PYTEST_XDIST_WORKER" in os.environ:  # a pytest-xdist worker (each collects, in the same order)
        items[:] = longest_first(items)


MODULE_SERVER = "isolated_prefect_server"  # module-scoped: its module's tests share one worker (--dist loadgroup)


# The longest tests of docs/bench/test-durations.txt (several minutes each beside other test processes): handed out
# before the other end-to-end tests, so that none of them starts last. Only an order: a stale name costs nothing.
LONGEST = (
    "test_server_restart.py",
    "test_many_pairs.py",
    "test_shard_e2e.py",
    "test_faults.py",
    "test_fast_path.py::test_bf16_batched_run_tracks",
    "test_stack.py",
    "test_deployment_e2e.py",
    "test_notifications.py",
    "test_ui_retry.py",
)


def cost_rank(item: pytest.Item) -> int:
    """Below 0 for LONGEST (in its order), 0 for the other end-to-end tests (minutes each), 1 for the other heavy
    ones, 2 for the unit tier."""
    for i, name in enumerate(LONGEST):
        if item.nodeid.split("/")[-1].startswith(name):
            return i - len(LONGEST)
    if item.get_closest_marker("slow") or item.get_closest_marker("browser"):
        return 0
    return 2 if item.get_closest_marker("unit") else 1


def longest_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """The collection, end-to-end tests first (pytest-xdist hands tests out in this order, so the long ones start
    at once and the short ones fill the gaps); a module that shares one server keeps its tests together."""
    group_rank: dict[str, int] = {}
    for item in items:
        if (group := item.get_closest_marker("xdist_group")) is not None:
            group_rank[group.args[0]] = min(group_rank.get(group.args[0], 2), cost_rank(item))

    def rank(item: pytest.Item) -> int:
        group = item.get_closest_marker("xdist_group")
        return group_rank[group.args[0]] if group is not None else cost_rank(item)

    return sorted(items, key=rank)


def heavy_command(args: Any) -> str | None:
    """What heavy part a command line would start (SeaweedFS, a Prefect server or worker, a browser), or None."""
    argv = [str(a) for a in args] if isinstance(args, Sequence) and not isinstance(args, str | bytes) else [str(args)]
    names = [os.path.basename(a) for a in argv]
    if "weed" in names:
        return "SeaweedFS"
    if "prefect" in names and ("server" in argv or "worker" in argv):
        return "a Prefect server or worker"
    if any("prefect.server" in a for a in argv):
        return "a Prefect API server"
    if any(n.startswith("chromium") for n in names) or "run-driver" in argv:
        return "a browser (Playwright/Chromium)"
    return None


GUARD = pytest.StashKey[tuple[pytest.MonkeyPatch, list[str]]]()
ADVICE = "use the tiny extractor or a fake engine, request the part's fixture, or mark the test vgg/slow/browser"


def _guard(item: pytest.Item) -> tuple[pytest.MonkeyPatch, list[str]]:
    """Patches that make weights files, the VGG network, servers and browsers raise; what was reached is recorded."""
    patch, reached = pytest.MonkeyPatch(), []
    where = f"{item.nodeid} is in the unit tier (tests/conftest.py) but"

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        reached.append("loads a weights file or builds the VGG network")
        raise UnitTierViolation(f"{where} {reached[-1]}: {ADVICE}")

    class GuardedPopen(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, args: Any = None, *rest: Any, **kwargs: Any) -> None:
            if args is None:
                args = kwargs.pop("args", ())
            what = heavy_command(args)
            if what is not None:
                reached.append(f"starts {what}")
                raise UnitTierViolation(f"{where} {reached[-1]}: {ADVICE}")
            super().__init__(args, *rest, **kwargs)

    # Every weights file is parsed by parse_weights (imported when called) unless cached: the cache is empty here.
    patch.setattr(nst.engine.weight_formats, "parse_weights", no_weights)
    patch.setattr(nst.engine.weights, "_cache", OrderedDict())
    patch.setattr(nst.engine.vgg.VGGFeatures, "__init__", no_weights)
    patch.setattr(subprocess, "Popen", GuardedPopen)
    return patch, reached


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """A `unit` test runs guarded from its first fixture (module-scoped ones included) to its last teardown."""
    if item.get_closest_marker("unit") is not None:
        item.stash[GUARD] = _guard(item)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        if GUARD in item.stash:
            item.stash[GUARD][0].undo()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A unit test that reached a heavy part fails, even if it caught the error, and its report says why first."""
    report = yield
    reached = item.stash[GUARD][1] if GUARD in item.stash else []
    if reached and report.when != "teardown" and (report.failed or report.when == "call"):
        why = f"{item.nodeid} is in the unit tier (tests/conftest.py) but {reached[0]}: {ADVICE}"
        report.longrepr = why if report.passed else f"{why}\n\n{report.longreprtext}"
        report.outcome = "failed"
    return report


@pytest.fixture
def unit_tier_reached(request: pytest.FixtureRequest) -> list[str]:
    """What the running unit test reached of the heavy parts (tests/test_markers.py checks the guard with it)."""
    return request.node.stash[GUARD][1]
