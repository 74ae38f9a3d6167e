"""Prefect flow `stylize-manifest`: the run path of `nst.run`, with Prefect's parts added.

`nst.run.run` loads the manifest, plans (reading each input once, skipping pairs already done), makes batches,
runs them and writes the run summary. This module adds only what Prefect brings: one task per batch (retries for
transient storage errors, a persisted result, an optional timeout), device slots, artifacts and the final state.

Retry of a failed flow run (UI button, `prefect flow-run retry`) runs only the failed pairs, by two mechanisms:
- `plan()` skips every pair whose JSON in storage says succeeded with the same inputs and parameters (this holds
  across machines and pods), so a retried run plans only the pairs that failed or never ran;
- each batch task persists its result under a cache key made of its pairs (ids, input hashes, parameters), the task's
  source and the flow run id. A batch that completed in an earlier attempt of the same flow run returns that result
  instead of running again (this covers `force=True`, where `plan()` skips nothing). A batch with failed pairs
  raises `PairsFailed` after its records are written, so its task run is Failed, caches nothing, and runs again.
  Cached is not done: the outputs of a Cached batch are checked (stat of each PNG and JSON), and pairs whose outputs
  are gone or were replaced run again, refreshing the cache.

GPU use: `DeviceSlots` holds one slot per visible GPU (or `cpu_slots` on a machine without one). Two batches per slot
are in flight; a batch task reads and decodes its own images, holds a slot only while it optimises, and writes its
outputs after giving the slot back, so I/O overlaps the optimisation. With `batch_timeout_s` (a task timeout, counted
from the task's start) one batch per slot is in flight instead, so that no batch spends its time budget waiting.
Live objects (the Stylizer with its loaded networks, the slots, the progress artifact) stay in this process, found by
the flow run id; task parameters are plain data (`nst.run.Batch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact
from prefect.cache_policies import RUN_ID, TASK_SOURCE, CacheKeyFnPolicy
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.runtime import deployment as runtime_deployment
from prefect.runtime import flow_run as runtime_flow_run

import nst.run.batches
from flows import outcome, report
from flows.progress import Progress, progress_callback
from nst import storage
from nst.errors import NSTError, StorageError
from nst.manifest import PairSpec, ParamOverrides, load_manifest, override_values
from nst.results import error_info
from nst.run import Batch, PairRecord, Plan, RunHooks, RunSummary, new_run_id, some_ids, verify_written
from nst.run.inputs import InputFacts
from nst.run_options import RunOptions

if TYPE_CHECKING:  # the engine (torch) loads in the flow run's first batch: `prefect deploy` loads this file too
    from nst.engine.stylizer import Stylizer

# Task retries are for transient trouble only (storage, network): waits before the 2nd and 3rd attempt, seconds.
RETRY_DELAYS_S: list[float] = [10, 60]
PROGRESS_UPDATE_S = 5.0
LOG_EVERY_S = 30.0
BATCHES_PER_SLOT = 2  # one batch optimising, one reading its inputs / writing its outputs
GPU_SHARDS_LIMIT = "gpu-shards"  # global concurrency limit, slots = GPUs of the pool (deploy/setup.py)
# A gpu-shards slot is a lease, renewed every 0.75 x this while held: a SIGKILLed worker's slot comes back this long
# (plus the server's 15 s repossessor loop) after its last renewal, about when the zombie automation crashes its run.
# Prefect's default is 300 s; a renewal that fails only logs a warning (not strict).
SLOT_LEASE_S = 90.0


class PairsFailed(Exception):
    """A batch finished with failed pairs (their JSON already written); carries every pair's record."""

    def __init__(self, message: str, records: list[PairRecord]) -> None:
        super().__init__(message, records)
        self.records = records

    def __str__(self) -> str:
        return str(self.args[0])


class DeviceSlots:
    """One slot per device; a batch holds a slot while it optimises, so each GPU runs one batch at a time."""

    def __init__(self, devices: Sequence[str], limit: str | None = None) -> None:
        self.devices = list(devices)
        self.limit = limit  # also hold a slot of this global concurrency limit while optimising
        self._holders: list[object | None] = [None] * len(self.devices)  # who holds each device
        self._changed = threading.Condition()

    def _acquire(self, holder: object) -> str:
        """Wait for a free device; mark it held by `holder` in one assignment (an exception lands before or after)."""
        with self._changed:
            while True:
                for i, current in enumerate(self._holders):
                    if current is None:
                        self._holders[i] = holder
                        return self.devices[i]
                self._changed.wait()

    def _release(self, holder: object) -> None:
        with self._changed:
            self._holders = [None if h is holder else h for h in self._holders]
            self._changed.notify_all()

    @contextlib.contextmanager
    def take(self) -> Iterator[str]:
        """Wait for a free device and hold it for the duration of the block.

        The device is taken inside `try`, by holder: a task timeout (an exception injected into this thread) that
        lands anywhere, even just after the device was taken, still gives it back.
        """
        holder = object()
        try:
            device = self._acquire(holder)
            if self.limit is None:
                yield device
            else:  # not strict: without the limit Prefect logs a warning and the batch runs
                with concurrency(self.limit, occupy=1, lease_duration=SLOT_LEASE_S):
                    yield device
        finally:
            self._release(holder)

    def __repr__(self) -> str:
        return f"DeviceSlots({self.devices})"


def visible_devices(cpu_slots: int) -> list[str]:
    """`cuda:0..N-1` for the visible GPUs (CUDA_VISIBLE_DEVICES applies), else `cpu_slots` CPU slots."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"] * cpu_slots


def new_stylizer() -> Stylizer:
    """The engine with its network cache, reading weights through `nst.storage`; torch loads here, not at import."""
    from nst.engine.stylizer import Stylizer

    return Stylizer(read_bytes=storage.read_bytes)


@dataclass
class _RunParts:
    """What the batch tasks of one flow run share in this process."""

    slots: DeviceSlots
    stylizer: Stylizer = field(default_factory=new_stylizer)
    progress: Progress = field(default_factory=lambda: Progress(0, None))


_RUNS: dict[str, _RunParts] = {}  # by flow run id


def pair_fingerprint(spec: PairSpec, inputs: dict[str, InputFacts]) -> str:
    """Everything that decides a pair's output: spec (inputs, parameters), input hashes (stable across processes)."""
    facts = [inputs[u] for u in (spec.content, *spec.styles)]
    return json.dumps(
        {
            "spec": spec.model_dump(mode="json"),
            "inputs": [(f.uri, f.sha256, f.dims, f.error) for f in facts],
        },
        sort_keys=True,
        default=str,
    )


def batch_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a batch task: output location and its pairs' fingerprints (not the spool, label or device)."""
    batch: Batch = parameters["batch"]
    digest = hashlib.sha256(batch.output.encode())
    for spec in batch.pairs:
        digest.update(b"\0" + pair_fingerprint(spec, batch.inputs).encode())
    return digest.hexdigest()


def retry_transient(task: Any, task_run: Any, state: State[Any]) -> bool:
    """Retry a batch task only for transient errors (storage, network); never for failed pairs or a timeout."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return (isinstance(exc, StorageError) and exc.transient) or isinstance(exc, ConnectionError)


@task(
    name="stylize-batch",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=retry_transient,
    persist_result=True,
    cache_policy=CacheKeyFnPolicy(cache_key_fn=batch_cache_key) + TASK_SOURCE + RUN_ID,
    task_run_name="batch-{batch.label}",
)
def batch_task(batch: Batch) -> list[PairRecord]:
    """Stylize one batch on a device slot and write its outputs; raise PairsFailed (task Failed) if a pair failed."""
    logger = get_run_logger()
    logger.info("batch %s: %d pairs: %s", batch.label, len(batch.pairs), ", ".join(p.id for p in batch.pairs))
    parts = _RUNS[batch.run_id]
    records = nst.run.batches.run_batch(
        batch,
        stylizer=parts.stylizer,
        hold_device=parts.slots.take,
        on_progress=progress_callback(parts.progress, batch),
        run_is_live=flow_run_is_live,
    )
    for r in records:
        if r.status == "failed":
            logger.error("pair %s failed: %s", r.id, (r.error or {}).get("message"))
        else:
            logger.info("pair %s %s in %.1f s, final losses %s", r.id, r.status, r.seconds, r.final_losses)
    failed = [r.id for r in records if r.status == "failed"]
    if failed:
        raise PairsFailed(f"{len(failed)} of {len(records)} pairs failed: {some_ids(failed)}", records)
    claimed = [r.id for r in records if r.status == "not_run"]  # another run holds them: nothing to cache
    if claimed:
        message = f"{len(claimed)} of {len(records)} pairs claimed by another run: {some_ids(claimed)}"
        raise PairsFailed(message, records)
    return records


def flow_run_is_live(run_id: str) -> bool:
    """Whether the flow run that holds a pair's claim may still write it (not in a final state; unknown: yes)."""
    import uuid

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(run_id)).state
    except Exception:  # not a flow run id (a local run), or the API is unreachable: the claim's expiry decides
        return True
    return state is None or not state.is_final()


def batch_records(state: State[Any], batch: Batch) -> list[PairRecord]:
    """The records of a finished batch task, whatever its final state (a timeout or crash fails its pairs)."""
    if state.is_completed():
        return list(state.result())
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, PairsFailed):
        return list(exc.records)
    timed_out = state.name == "TimedOut" or isinstance(exc, TimeoutError)
    error = error_info("Timeout" if timed_out else type(exc).__name__, state.message or str(exc))
    return [batch.fail(spec, error) for spec in batch.pairs]


def flow_hooks(run_id: str, options: RunOptions) -> RunHooks:
    """The run path's hooks as Prefect parts: a task per batch on device slots, a progress artifact, logs."""
    logger = get_run_logger()
    parts = _RUNS[run_id]
    # Task timeouts count from the task's start: with one, no task may wait for a slot, so one batch per slot.
    per_slot = 1 if options.batch_timeout_s else BATCHES_PER_SLOT
    task_ = batch_task.with_options(timeout_seconds=options.batch_timeout_s) if options.batch_timeout_s else batch_task

    def planned(plan: Plan, batches: list[Batch]) -> None:
        manifest = plan.manifest
        logger.info("manifest %s: %d pairs, output %s", manifest.name, len(manifest.pairs), manifest.output)
        for warning in manifest.warnings:  # e.g. a grid glob that matched nothing tonight
            logger.warning("%s", warning)
        force = " (force)" if options.force else ""
        logger.info("%d pairs to run, %d already done%s", len(plan.to_run), len(plan.skipped), force)
        if options.dry_run:
            return
        logger.info("%d batches on %s (%d in flight)", len(batches), parts.slots, per_slot * len(parts.slots.devices))
        artifact = create_progress_artifact(
            0.0 if plan.to_run else 100.0,
            key=f"{report.slugify(manifest.name)}-progress",
            description=f"0/{len(plan.to_run)} pairs finished",
        )
        parts.progress = Progress(len(plan.to_run), artifact)

    def run_batch(batch: Batch) -> list[PairRecord]:
        state = task_(batch, return_state=True)
        records = batch_records(state, batch)
        gone = {r.id for r in verify_written(records)} if state.name == "Cached" else set()
        if not gone:
            return records
        logger.warning(
            "batch %s: cached, but outputs gone or replaced, running again: %s", batch.label, some_ids(sorted(gone))
        )
        redo = dataclasses.replace(batch, pairs=[p for p in batch.pairs if p.id in gone])
        fresh = {r.id: r for r in batch_records(task_.with_options(refresh_cache=True)(redo, return_state=True), redo)}
        return [fresh.get(r.id, r) for r in records]

    def batch_done(batch: Batch, records: list[PairRecord]) -> None:
        parts.progress.finish(batch.label, len(batch.pairs))

    return RunHooks(
        run_batch=run_batch,
        parallel=per_slot * len(parts.slots.devices),
        planned=planned,
        batch_done=batch_done,
        run_is_live=flow_run_is_live,
    )


@flow(name="stylize-manifest")
def stylize_manifest(
    manifest: str,
    overrides: ParamOverrides = {},  # type: ignore[valid-type]  # noqa: B006  # Prefect validates it
    options: RunOptions = RunOptions(),  # noqa: B008
) -> State[Any]:
    """Stylize the pairs of a manifest: only new or changed pairs run; the run fails if any pair failed.

    Args:
        manifest: manifest URI: a local path (relative to the worker's working directory), file:// or s3://
        overrides: engine parameters for every pair: above the manifest's `defaults:`, below its per-pair values
        options: which pairs, force, dry run, failure limit, batch size, timeout and CPU slots
    """
    run_id = str(runtime_flow_run.id or new_run_id())
    # Runs from a deployment (a worker's, e.g. shards) share the pool's GPUs: each batch holds a gpu-shards slot.
    limit = GPU_SHARDS_LIMIT if runtime_deployment.id else None
    _RUNS[run_id] = _RunParts(DeviceSlots(visible_devices(options.cpu_slots), limit=limit))
    try:
        # A deployment's manifest parameter may name any file the worker can read: only those under its roots.
        loaded = load_manifest(
            manifest, overrides=override_values(overrides), confined=runtime_deployment.id is not None
        )
        summary = nst.run.run(loaded, options, run_id=run_id, hooks=flow_hooks(run_id, options))
    except NSTError as exc:  # the user's to fix: the message says what and where; a traceback would not help
        return outcome.failed(str(exc))
    finally:
        _RUNS.pop(run_id, None)
    return finish(summary, options)


def finish(summary: RunSummary, options: RunOptions) -> State[Any]:
    """Publish the report and return the run's final state."""
    outcome.publish_report(
        summary.manifest, summary.run_id, summary.records, summary=summary.summary_uri, dry_run=summary.dry_run
    )
    older = f"; {summary.older_engine} skipped pairs made by an older engine revision" if summary.older_engine else ""
    if summary.dry_run:
        return outcome.dry_run_state(summary.ids("not_run"), summary.ids("skipped"), summary.older_engine)
    return outcome.final_state(summary.records, summary.run_id, summary.summary_uri or "", options, extra=older)


def run_from_cli(manifest: str, options: RunOptions, overrides: dict[str, Any]) -> int:
    """`nst run`: the flow in this process (ephemeral Prefect API unless PREFECT_API_URL is set); exit code."""
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    loaded = load_manifest(manifest, overrides=overrides)  # a bad manifest fails here, before any server
    updates: dict[Any, Any] = {}
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = 120
    if "PREFECT_SERVER_ANALYTICS_ENABLED" not in os.environ:
        updates[PREFECT_SERVER_ANALYTICS_ENABLED] = False
    with temporary_settings(updates=updates):
        state = stylize_manifest(manifest, ParamOverrides(**overrides), options, return_state=True)
    print(f"{state.name}: {state.message}")
    if not options.dry_run:
        print(f"outputs in {loaded.output}")
    return 0 if state.is_completed() else 1
