"""The `stylize-manifest` flow on a real (in-process) Prefect API with the real engine: tiny images, 2 iterations.

Engine calls are counted by wrapping `nst.run.batches.run_batch` (it still runs); faults the real parts cannot produce
on demand (out of memory on CPU, a hung batch, a storage blip) come through a `FaultyStylizer` or the wrapper.
"""

import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.deployments.runner import RunnerDeployment
from prefect.flow_engine import run_flow
from prefect.states import AwaitingRetry, State

import flows.stylize as flow_module
import nst.engine.images
import nst.run
import nst.run.batches
from flows.stylize import stylize_manifest
from nst.errors import OutOfMemory, StorageError
from nst.run import Batch
from nst.run_options import RunOptions
from nst_testing.faults import FaultyStylizer
from nst_testing.manifests import write_manifest
from nst_testing.paths import SAMPLES
from nst_testing.prefect import PrefectServer

pytestmark = pytest.mark.usefixtures("prefect_harness")

CHELSEA = SAMPLES / "content" / "chelsea.jpg"  # 256x170 -> 32x21, same shape as coffee
COFFEE = SAMPLES / "content" / "coffee.jpg"
ASTRONAUT = SAMPLES / "content" / "astronaut.jpg"  # square: a batch of its own
BRICK = SAMPLES / "styles" / "brick.jpg"
HUBBLE = SAMPLES / "styles" / "hubble.jpg"
IHC = SAMPLES / "styles" / "ihc.jpg"


class EngineCalls:
    """Wraps nst.run.batches.run_batch: records the pair ids of every call, optionally injects a fault hook or error."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fault_hook: Callable[[Sequence[Any]], None] | None = None
        self.raise_first: list[BaseException] = []

    @property
    def pairs(self) -> list[str]:
        return sorted(i for call in self.calls for i in call)


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineCalls]:
    """Count engine calls; tests may set `fault_hook` (run before the real engine) or `raise_first`."""
    rec = EngineCalls()
    real = nst.run.batches.run_batch

    def run_batch(batch: Batch, **kwargs: Any) -> Any:
        rec.calls.append([p.id for p in batch.pairs])
        if rec.raise_first:
            raise rec.raise_first.pop(0)
        if rec.fault_hook is not None:
            kwargs["stylizer"] = FaultyStylizer(kwargs["stylizer"], rec.fault_hook)
        return real(batch, **kwargs)

    monkeypatch.setattr(nst.run.batches, "run_batch", run_batch)
    yield rec


def bad_image(root: Path, name: str = "broken.jpg") -> Path:
    path = root / name
    path.write_bytes(b"this is not a JPEG")
    return path


def record(root: Path, pair_id: str) -> dict[str, Any]:
    return json.loads((root / "out" / f"{pair_id}.json").read_text())


def flow_run_id(state: State[Any]) -> Any:
    return state.state_details.flow_run_id


def artifacts(run_id: Any) -> dict[str, Any]:
    """The latest artifact of each key created by this flow run."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    latest: dict[str, Any] = {}
    for art in sorted(found, key=lambda a: str(a.created)):
        latest[art.key or str(art.id)] = art
    return latest


def run_as_deployment(parameters: dict[str, Any]) -> Any:
    """Create a flow run of a deployment of the flow (Retry needs one) and execute it here, as a worker would."""
    deploy_in_process()
    flow_run = cast(FlowRun, run_deployment("stylize-manifest/in-process", parameters=parameters, timeout=0))
    return execute(flow_run.id)


def deploy_in_process() -> None:
    """A deployment of the flow with no work pool: its runs are executed by `execute()` in this process."""
    cast(RunnerDeployment, stylize_manifest.to_deployment(name="in-process")).apply()


def execute(run_id: Any) -> State[Any]:
    """Run an existing (scheduled or awaiting-retry) flow run in this process."""
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
    state = run_flow(stylize_manifest, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
    assert isinstance(state, State)
    return state


def retry(run_id: Any) -> State[Any]:
    """What the UI's Retry button does (AwaitingRetry), then the worker's part: run the same flow run again."""
    with get_client(sync_client=True) as client:
        assert client.set_flow_run_state(run_id, AwaitingRetry()).status.value == "ACCEPT"
    return execute(run_id)


def task_run_states(run_id: Any) -> list[tuple[str, str]]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return sorted((r.name, r.state.name if r.state else "") for r in runs)  # type: ignore[misc]


def test_no_events_worker_outlives_the_server_settings_it_started_under(prefect_server: PrefectServer) -> None:
    """Prefect keys its events worker by client type, not URL: one started while a test pointed this process at a
    module's own server would send every later test's task-run events to that server after it stopped (the task
    runs were then missing here). Leaving `PrefectServer.settings()` sends what it holds and stops it."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    def running() -> list[Any]:
        return [w for w in EventsWorker._instances.values() if not w._stopped]

    with prefect_server.settings():
        assert emit_event("nst.test.ping", resource={"prefect.resource.id": "nst.test"}) is not None
        assert running()
    assert not running()


def test_mixed_manifest_fails_records_failures_and_publishes_artifacts(tmp_path: Path, engine: EngineCalls) -> None:
    pairs = [
        {"id": "cat-brick", "content": CHELSEA, "style": BRICK},
        {"id": "coffee-hubble", "content": COFFEE, "style": HUBBLE},
        {"id": "broken", "content": bad_image(tmp_path), "style": IHC},
    ]
    manifest = write_manifest(tmp_path, pairs, name="Mixed Pairs!")
    state = stylize_manifest(str(manifest), return_state=True)

    assert state.is_failed()
    assert "1 of 3 pairs failed: broken" in (state.message or "")
    failed = record(tmp_path, "broken")
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "ImageError" and "broken.jpg" in failed["error"]["message"]
    assert not (tmp_path / "out" / "broken.png").exists()
    for ok in ("cat-brick", "coffee-hubble"):
        rec = record(tmp_path, ok)
        assert rec["status"] == "succeeded" and rec["iterations"] == 2
        assert rec["run_id"] == str(flow_run_id(state))
        assert (tmp_path / "out" / f"{ok}.png").stat().st_size > 0
    assert engine.pairs == ["broken", "cat-brick", "coffee-hubble"]

    summary = json.loads((tmp_path / "out" / "_runs" / f"{flow_run_id(state)}.json").read_text())
    assert {p["id"]: p["status"] for p in summary["pairs"]} == {
        "cat-brick": "succeeded",
        "coffee-hubble": "succeeded",
        "broken": "failed",
    }
    assert (tmp_path / "out" / "_runs" / f"{flow_run_id(state)}-losses.png").read_bytes()[:4] == b"\x89PNG"

    arts = artifacts(flow_run_id(state))
    assert {"mixed-pairs-pairs", "mixed-pairs-report", "mixed-pairs-progress"} <= set(arts)
    rows = {r["id"]: r for r in json.loads(arts["mixed-pairs-pairs"].data)}
    assert set(rows) == {"cat-brick", "coffee-hubble", "broken"}
    assert rows["broken"]["status"] == "failed" and "ImageError" in rows["broken"]["error"]
    ok_row = rows["cat-brick"]
    assert ok_row["status"] == "succeeded" and ok_row["content loss"] >= 0 and ok_row["style loss"] > 0
    assert ok_row["output"] == str(tmp_path / "out" / "cat-brick.png") and ok_row["seconds"] > 0
    md = arts["mixed-pairs-report"].data
    assert "## Failed pairs" in md and "**broken**: ImageError" in md
    # Embedded thumbnails (flows/report.py): 3 + 3 + the broken pair's style; no worker path is linked.
    assert md.count("](data:image/jpeg;base64,") == 7 and md.count("](data:image/png;base64,") == 1
    assert f"]({tmp_path}" not in md and f"]({CHELSEA}" not in md
    assert arts["mixed-pairs-progress"].data == pytest.approx(100.0)


def test_invalid_manifest_fails_before_any_work_listing_every_problem(tmp_path: Path, engine: EngineCalls) -> None:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(
        "version: 1\noutput: out/\ndefaults: {size: 32, iterations: 0}\npairs:\n"
        f"  - {{content: missing.jpg, style: {BRICK}}}\n  - {{content: {CHELSEA}, style: {BRICK}, colour: red}}\n"
    )
    state = stylize_manifest(str(manifest), return_state=True)
    assert state.is_failed()
    message = state.message or ""
    assert "3 problems" in message and "iterations" in message and "missing.jpg" in message and "colour" in message
    assert engine.calls == [] and not (tmp_path / "out").exists()


def test_retry_runs_only_the_failed_pairs(tmp_path: Path, engine: EngineCalls) -> None:
    broken = bad_image(tmp_path)
    pairs = [
        {"id": "a", "content": CHELSEA, "style": BRICK},
        {"id": "b", "content": COFFEE, "style": HUBBLE},
        {"id": "c", "content": broken, "style": IHC},
    ]
    manifest = write_manifest(tmp_path, pairs)
    first = run_as_deployment({"manifest": str(manifest)})
    assert first.is_failed() and engine.pairs == ["a", "b", "c"]
    run_id = flow_run_id(first)
    a_before = record(tmp_path, "a")["finished_at"]

    shutil.copy(ASTRONAUT, broken)  # the user fixes the input, then presses Retry
    engine.calls.clear()
    second = retry(run_id)
    assert second.is_completed(), second.message
    assert flow_run_id(second) == run_id
    assert engine.calls == [["c"]]
    assert record(tmp_path, "c")["status"] == "succeeded" and record(tmp_path, "c")["run_id"] == str(run_id)
    assert record(tmp_path, "a")["finished_at"] == a_before
    summary = json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text())
    assert {p["id"]: p["status"] for p in summary["pairs"]} == {"a": "skipped", "b": "skipped", "c": "succeeded"}
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).run_count == 2


def forced_run_with_a_broken_input(root: Path) -> tuple[Any, Path]:
    """A forced deployment run of a and b (one batch) and c (a broken input), ended Failed: (its id, the bad file)."""
    broken = bad_image(root)
    pairs = [
        {"id": "a", "content": CHELSEA, "style": BRICK},
        {"id": "b", "content": COFFEE, "style": HUBBLE},  # same shape as a: one batch
        {"id": "c", "content": broken, "style": IHC},
    ]
    first = run_as_deployment({"manifest": str(write_manifest(root, pairs)), "options": {"force": True}})
    assert first.is_failed()
    return flow_run_id(first), broken


def test_retry_with_force_reuses_persisted_results_of_completed_batches(tmp_path: Path, engine: EngineCalls) -> None:
    """With force, plan() skips nothing; the batch that completed returns its persisted result (Cached)."""
    run_id, broken = forced_run_with_a_broken_input(tmp_path)
    assert sorted(engine.calls) == [["a", "b"], ["c"]]

    shutil.copy(ASTRONAUT, broken)  # square: still a batch of its own
    engine.calls.clear()
    second = retry(run_id)
    assert second.is_completed(), second.message
    assert engine.calls == [["c"]]
    states = task_run_states(run_id)
    assert ("batch-1of2", "Cached") in states, states
    summary = json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text())
    assert {p["id"]: p["status"] for p in summary["pairs"]} == {"a": "succeeded", "b": "succeeded", "c": "succeeded"}


def test_retry_after_outputs_were_deleted_runs_them_again(tmp_path: Path, engine: EngineCalls) -> None:
    """Cached is not done: a batch whose cached result names outputs that are gone runs again (issue 16, case 1)."""
    run_id, broken = forced_run_with_a_broken_input(tmp_path)
    for name in ("a.png", "a.json", "b.png", "b.json"):
        (tmp_path / "out" / name).unlink()

    shutil.copy(ASTRONAUT, broken)
    engine.calls.clear()
    second = retry(run_id)
    assert second.is_completed(), second.message
    assert sorted(engine.pairs) == ["a", "b", "c"]
    for pair_id in ("a", "b", "c"):
        written = record(tmp_path, pair_id)
        png = (tmp_path / "out" / f"{pair_id}.png").read_bytes()
        assert written["status"] == "succeeded" and written["output"]["image_sha256"] == nst.engine.images.sha256_bytes(
            png
        )


def test_pair_ids_and_force(tmp_path: Path, engine: EngineCalls) -> None:
    pairs = [{"id": "a", "content": CHELSEA, "style": BRICK}, {"id": "b", "content": ASTRONAUT, "style": IHC}]
    manifest = str(write_manifest(tmp_path, pairs))

    assert stylize_manifest(manifest, options=RunOptions(pair_ids=["a"]), return_state=True).is_completed()
    assert engine.calls == [["a"]] and not (tmp_path / "out" / "b.json").exists()
    first_finish = record(tmp_path, "a")["finished_at"]

    engine.calls.clear()
    state = stylize_manifest(manifest, return_state=True)  # a is done: only b runs
    assert state.is_completed() and state.message == "1 succeeded, 1 skipped"
    assert engine.calls == [["b"]]

    engine.calls.clear()
    time.sleep(1.1)  # finished_at has one-second resolution
    assert stylize_manifest(manifest, options=RunOptions(pair_ids=["a"], force=True), return_state=True).is_completed()
    assert engine.calls == [["a"]] and record(tmp_path, "a")["finished_at"] != first_finish

    engine.calls.clear()
    unknown = stylize_manifest(manifest, options=RunOptions(pair_ids=["a", "nope"]), return_state=True)
    assert unknown.is_failed() and "pair_ids not in the manifest: nope" in (unknown.message or "")
    assert engine.calls == []


def test_out_of_memory_splits_the_batch(tmp_path: Path, engine: EngineCalls) -> None:
    sizes: list[int] = []

    def oom_above_one(jobs: Sequence[Any]) -> None:
        sizes.append(len(jobs))
        if len(jobs) > 1:
            raise OutOfMemory(f"fake: {len(jobs)} pairs do not fit")

    engine.fault_hook = oom_above_one
    pairs = [{"id": f"p{i}", "content": CHELSEA, "style": s} for i, s in enumerate((BRICK, HUBBLE, IHC))]
    state = stylize_manifest(
        str(write_manifest(tmp_path, pairs)), options=RunOptions(max_batch_pairs=4), return_state=True
    )
    assert state.is_completed(), state.message
    assert engine.calls == [["p0", "p1", "p2"]]
    assert sizes == [3, 1, 2, 1, 1]
    assert all(record(tmp_path, f"p{i}")["status"] == "succeeded" for i in range(3))


def test_dry_run_touches_nothing(tmp_path: Path, engine: EngineCalls) -> None:
    pairs = [{"id": "a", "content": CHELSEA, "style": BRICK}, {"id": "b", "content": ASTRONAUT, "style": IHC}]
    manifest = write_manifest(tmp_path, pairs, name="dry")
    before = sorted(p.name for p in tmp_path.iterdir())
    state = stylize_manifest(str(manifest), options=RunOptions(dry_run=True), return_state=True)
    assert state.is_completed() and state.message == "dry run: 2 pairs would run, 0 would be skipped"
    assert state.result() == {"would_run": ["a", "b"], "would_skip": []}
    assert engine.calls == [] and sorted(p.name for p in tmp_path.iterdir()) == before
    rows = json.loads(artifacts(flow_run_id(state))["dry-pairs"].data)
    assert [(r["id"], r["status"]) for r in rows] == [("a", "not_run"), ("b", "not_run")]


def test_max_failures_stops_submitting_batches(tmp_path: Path, engine: EngineCalls) -> None:
    pairs = [{"id": f"bad{i}", "content": bad_image(tmp_path, f"bad{i}.jpg"), "style": IHC} for i in range(3)]
    pairs += [{"id": "good", "content": CHELSEA, "style": BRICK}]
    options = RunOptions(max_failures=1, cpu_slots=1)
    state = stylize_manifest(str(write_manifest(tmp_path, pairs)), options=options, return_state=True)
    assert state.is_failed()
    # cpu_slots=1 -> 2 task threads: two batches were in flight when the first failure arrived; no more started.
    assert sorted(engine.calls) == [["bad0"], ["bad1"]]  # the two threads may start them in either order
    summary = json.loads(next((tmp_path / "out" / "_runs").glob("*.json")).read_text())
    statuses = {p["id"]: p["status"] for p in summary["pairs"]}
    assert statuses == {"bad0": "failed", "bad1": "failed", "bad2": "not_run", "good": "not_run"}
    assert "2 not run (max_failures=1)" in (state.message or "")
    assert not (tmp_path / "out" / "good.json").exists()


def test_hung_batch_times_out_and_its_pairs_are_failed(tmp_path: Path, engine: EngineCalls) -> None:
    def hang_on_slow(jobs: Sequence[Any]) -> None:
        if any(j.id == "slow" for j in jobs):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # short sleeps: the timeout interrupts between them
                time.sleep(0.05)

    engine.fault_hook = hang_on_slow
    pairs = [{"id": "slow", "content": ASTRONAUT, "style": IHC}, {"id": "fine", "content": CHELSEA, "style": BRICK}]
    started = time.monotonic()
    # cpu_slots=2: both batches start at once; with a timeout no batch ever waits for a slot.
    options = RunOptions(batch_timeout_s=10, cpu_slots=2)
    state = stylize_manifest(str(write_manifest(tmp_path, pairs)), options=options, return_state=True)
    assert time.monotonic() - started < 45
    assert state.is_failed() and "slow" in (state.message or "")
    slow = record(tmp_path, "slow")
    assert slow["status"] == "failed" and slow["error"]["type"] == "Timeout"
    assert record(tmp_path, "fine")["status"] == "succeeded"


def test_transient_storage_error_is_retried(
    tmp_path: Path, engine: EngineCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flow_module, "batch_task", flow_module.batch_task.with_options(retry_delay_seconds=0))
    engine.raise_first = [StorageError("s3://bucket/out/a.png: SlowDown (503), try again", transient=True)]
    state = stylize_manifest(
        str(write_manifest(tmp_path, [{"id": "a", "content": CHELSEA, "style": BRICK}])), return_state=True
    )
    assert state.is_completed(), state.message
    assert engine.calls == [["a"], ["a"]]
    assert record(tmp_path, "a")["status"] == "succeeded"


def test_shard_flow_splits_pending_pairs_across_deployment_runs(tmp_path: Path, engine: EngineCalls) -> None:
    from flows.shard import shard_manifest

    pairs = [{"id": f"cat{i}", "content": CHELSEA, "style": s} for i, s in enumerate((BRICK, HUBBLE, IHC))]
    pairs += [{"id": "astro", "content": ASTRONAUT, "style": IHC}]
    manifest = str(write_manifest(tmp_path, pairs))
    done = stylize_manifest(manifest, options=RunOptions(pair_ids=["cat0"]), return_state=True)
    assert done.is_completed()  # cat0 is done: the shards skip it
    engine.calls.clear()

    deploy_in_process()
    options = RunOptions(max_batch_pairs=2)
    deployment = "stylize-manifest/in-process"
    state = shard_manifest(manifest, shards=2, deployment=deployment, options=options, wait=False, return_state=True)
    assert state.is_completed()
    shards: list[dict[str, Any]] = state.result()["shards"]  # type: ignore[index]
    # pending batches: [cat1, cat2] and [astro]; whole batches go to the least-loaded shard
    assert sorted(sorted(s["pair_ids"]) for s in shards) == [["astro"], ["cat1", "cat2"]]
    for shard in shards:
        assert execute(shard["flow_run_id"]).is_completed()
    assert engine.pairs == ["astro", "cat1", "cat2"]
    assert all(record(tmp_path, str(p["id"]))["status"] == "succeeded" for p in pairs)


def test_nst_run_uses_the_flow(tmp_path: Path, engine: EngineCalls, capsys: pytest.CaptureFixture[str]) -> None:
    from nst.cli import main

    manifest = str(write_manifest(tmp_path, [{"id": "a", "content": CHELSEA, "style": BRICK}]))
    assert main(["run", manifest, "--dry-run"]) == 0
    assert "dry run: 1 pairs would run" in capsys.readouterr().out and engine.calls == []
    assert main(["run", manifest]) == 0
    assert f"outputs in {tmp_path / 'out'}" in capsys.readouterr().out
    assert engine.calls == [["a"]] and record(tmp_path, "a")["status"] == "succeeded"


def test_one_batch_per_slot_and_the_next_batch_reads_meanwhile(
    tmp_path: Path, engine: EngineCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cpu_slots=1: optimisations never overlap, but the next batch's images are read during the current one."""
    import threading

    import nst.engine.stylizer

    lock = threading.Lock()
    events: list[tuple[str, str, float]] = []  # (what, pairs, time)
    real = nst.engine.stylizer.Stylizer.stylize

    def stylize(self: Any, jobs: Sequence[Any], **kwargs: Any) -> Any:
        ids = ",".join(j.id for j in jobs)
        with lock:
            events.append(("start", ids, time.monotonic()))
        try:
            return real(self, jobs, **kwargs)
        finally:
            with lock:
                events.append(("end", ids, time.monotonic()))

    real_load = nst.run.batches._load_problem

    def loaded(spec: Any, batch: Any) -> Any:  # a pair's images decoded (before its batch waits for a slot)
        job = real_load(spec, batch)
        with lock:
            events.append(("loaded", spec.id, time.monotonic()))
        return job

    monkeypatch.setattr(nst.engine.stylizer.Stylizer, "stylize", stylize)
    monkeypatch.setattr(nst.run.batches, "_load_problem", loaded)
    pairs = [{"id": "wide", "content": CHELSEA, "style": BRICK}, {"id": "square", "content": ASTRONAUT, "style": IHC}]
    state = stylize_manifest(str(write_manifest(tmp_path, pairs)), options=RunOptions(cpu_slots=1), return_state=True)
    assert state.is_completed(), state.message

    spans = {ids: [t for what, i, t in events if i == ids and what in ("start", "end")] for ids in ("wide", "square")}
    (_, (_, a_end)), (second, (b_start, _)) = sorted(spans.items(), key=lambda kv: kv[1][0])
    assert a_end <= b_start  # one optimisation at a time on the single slot
    second_loaded = next(t for what, i, t in events if what == "loaded" and i == second)
    assert second_loaded < a_end  # ... while the other batch's inputs were already read


def test_overrides_rank_above_defaults_and_below_pair_values(tmp_path: Path, engine: EngineCalls) -> None:
    pairs = [
        {"id": "plain", "content": CHELSEA, "style": BRICK},
        {"id": "own", "content": ASTRONAUT, "style": IHC, "iterations": 3, "style_weight": 9.0},
    ]
    manifest = write_manifest(tmp_path, pairs, style_weight=5.0)  # defaults: size 32, iterations 2, style_weight 5
    state = stylize_manifest(str(manifest), overrides={"iterations": 4, "size": 24}, return_state=True)
    assert state.is_completed(), state.message
    plain, own = record(tmp_path, "plain"), record(tmp_path, "own")
    assert (plain["params"]["iterations"], plain["params"]["size"], plain["params"]["style_weight"]) == (4, 24, 5.0)
    assert (own["params"]["iterations"], own["params"]["size"], own["params"]["style_weight"]) == (3, 24, 9.0)
    assert plain["iterations"] == 4 and own["iterations"] == 3

    engine.calls.clear()
    again = stylize_manifest(str(manifest), overrides={"iterations": 4, "size": 24}, return_state=True)
    assert again.is_completed() and engine.calls == []  # same overrides: the pairs are done


@pytest.mark.timeout(150)  # a leaked slot hangs the run: the batches behind it wait for the device forever
def test_a_timeout_right_after_taking_a_slot_does_not_leak_it(
    tmp_path: Path, engine: EngineCalls, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cpu_slots=1: the first batch's timeout lands just after it took the device; the two others still run."""
    real = flow_module.DeviceSlots._acquire
    stalled: list[str] = []

    def acquire_then_stall(self: Any, *args: Any) -> str:
        device = real(self, *args)
        if not stalled:  # the thread is descheduled right here, past its time budget
            stalled.append(device)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                time.sleep(0.05)
        return device

    monkeypatch.setattr(flow_module.DeviceSlots, "_acquire", acquire_then_stall)
    pairs = [
        {"id": "first", "content": ASTRONAUT, "style": IHC},
        {"id": "wide", "content": CHELSEA, "style": BRICK},
        {"id": "tall", "content": HUBBLE, "style": IHC},
    ]
    # 12 s: room for the next batch to load the network on a loaded machine
    options = RunOptions(batch_timeout_s=12, cpu_slots=1, max_batch_pairs=1)
    state = stylize_manifest(str(write_manifest(tmp_path, pairs)), options=options, return_state=True)
    assert stalled and state.is_failed()
    statuses = {p["id"]: record(tmp_path, str(p["id"]))["status"] for p in pairs}
    assert statuses == {"first": "failed", "wide": "succeeded", "tall": "succeeded"}, statuses


def test_a_pair_claimed_by_another_run_is_not_run_and_retry_runs_it(tmp_path: Path, engine: EngineCalls) -> None:
    """Another live run holds pair b: this run leaves it not_run (Failed); once released, Retry runs it (no cache)."""
    pairs = [{"id": "a", "content": CHELSEA, "style": BRICK}, {"id": "b", "content": ASTRONAUT, "style": HUBBLE}]
    manifest = write_manifest(tmp_path, pairs)  # b (square) is a batch of its own: the same batch in the retry
    claim = tmp_path / "out" / "b.claim"
    claim.parent.mkdir()
    claim.write_text(json.dumps({"run_id": "another-live-run", "expires_at": time.time() + 3600}))
    first = run_as_deployment({"manifest": str(manifest)})
    assert first.is_failed() and "claimed by run another-live-run" in (first.message or "")
    assert record(tmp_path, "a")["status"] == "succeeded" and not (tmp_path / "out" / "b.json").exists()

    claim.unlink()  # the other run finished
    engine.calls.clear()
    second = retry(flow_run_id(first))
    assert second.is_completed(), second.message
    assert engine.calls == [["b"]]  # a is done; b runs although its batch ran in the first attempt
    assert record(tmp_path, "b")["status"] == "succeeded"
