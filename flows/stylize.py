"""Prefect flow `stylize-manifest`: validate a manifest, skip finished pairs, run one task per GPU batch, report.

The work happens in `nst.batch` (plan, make_batches, run_batch, write_run_summary); this module orchestrates it.

Retry of a failed flow run (UI button, `prefect flow-run retry`) runs only the failed pairs, by two mechanisms:
- `plan()` skips every pair whose JSON in storage says succeeded with the same inputs and parameters (this holds
  across machines and pods), so a retried run plans only the pairs that failed or never ran;
- each batch task persists its result under a cache key made of its pairs (ids, input hashes, parameters), the task's
  source and the flow run id. A batch that completed in an earlier attempt of the same flow run returns that result
  instead of running again (this covers `force=True`, where `plan()` skips nothing). A batch with failed pairs
  raises `PairsFailed` after its records are written, so its task run is Failed, caches nothing, and runs again.

GPU use: a `DeviceSlots` pool holds one slot per visible GPU (or `cpu_slots` on a machine without one). The thread
pool has two workers per slot; a batch task reads and decodes its own images, then waits for a free slot only for the
optimisation (see `SlottedStylizer`), and writes its outputs after giving the slot back. So while one batch
optimises on a GPU, the next batch's images are being read and the previous batch's outputs written. With
`batch_timeout_s` (a task timeout, counted from the task's start) the pool has one worker per slot instead, so that
no batch spends its time budget waiting for a slot.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import RUN_ID, TASK_SOURCE, CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows import report
from nst import batch as nst_batch
from nst import storage
from nst.batch import PairRecord, PairTask
from nst.errors import ManifestError, NSTError, StorageError
from nst.manifest import load_manifest
from nst.optimize import ProgressCallback, ProgressEvent
from nst.stylize import PairJob, PairResult, Stylizer

# Task retries are for transient trouble only (storage, network): waits before the 2nd and 3rd attempt, seconds.
RETRY_DELAYS_S: list[float] = [10, 60]
PROGRESS_UPDATE_S = 5.0
LOG_EVERY_S = 30.0
WORKERS_PER_SLOT = 2  # one batch optimising, one reading its inputs / writing its outputs


class PairsFailed(Exception):
    """A batch finished with failed pairs (their JSON already written); carries every pair's record."""

    def __init__(self, message: str, records: list[PairRecord]) -> None:
        super().__init__(message, records)
        self.records = records

    def __str__(self) -> str:
        return str(self.args[0])


class DeviceSlots:
    """One slot per device; a batch holds a slot while it optimises, so each GPU runs one batch at a time."""

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = list(devices)
        self._free: queue.Queue[str] = queue.Queue()
        for device in self.devices:
            self._free.put(device)

    @contextlib.contextmanager
    def take(self) -> Iterator[str]:
        """Wait for a free device and hold it for the duration of the block."""
        device = self._free.get()
        try:
            yield device
        finally:
            self._free.put(device)

    def __repr__(self) -> str:
        return f"DeviceSlots({self.devices})"


class SlottedStylizer(Stylizer):
    """A Stylizer that optimises only while holding a device slot, pinning pairs set to `device: auto` to it.

    `nst.batch.run_batch` reads the images before calling `run_batch` here and writes outputs after it returns,
    so that I/O happens outside the slot. Loss networks stay loaded per device across batches.
    """

    def __init__(self, slots: DeviceSlots) -> None:
        super().__init__(read_bytes=storage.read_bytes)
        self.slots = slots
        self._load_lock = threading.Lock()

    def network(self, params: Any, device: Any) -> Any:
        """The loss network for these parameters on this device, loaded once (thread-safe)."""
        with self._load_lock:
            return super().network(params, device)

    def run_batch(self, jobs: Sequence[PairJob], *, callback: ProgressCallback | None = None) -> list[PairResult]:
        """Wait for a free device, then stylize the jobs on it."""
        with self.slots.take() as device:
            pinned = [
                dataclasses.replace(j, params=j.params.model_copy(update={"device": device}))
                if j.params.device == "auto"
                else j
                for j in jobs
            ]
            return super().run_batch(pinned, callback=callback)


def visible_devices(cpu_slots: int) -> list[str]:
    """`cuda:0..N-1` for the visible GPUs (CUDA_VISIBLE_DEVICES applies), else `cpu_slots` CPU slots."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"] * cpu_slots


def pair_fingerprint(pair: PairTask) -> str:
    """Everything that decides a pair's output: spec (inputs, parameters), input hashes (stable across processes)."""
    return json.dumps(
        {
            "spec": pair.spec.model_dump(mode="json"),
            "hashes": pair.input_hashes,
            "size": pair.content_size,
            "input_error": pair.input_error,
        },
        sort_keys=True,
        default=str,
    )


def batch_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a batch task: output location and its pairs' fingerprints (not the device or helpers)."""
    digest = hashlib.sha256(str(parameters["output"]).encode())
    for pair in parameters["batch"]:
        digest.update(b"\0" + pair_fingerprint(pair).encode())
    return digest.hexdigest()


def retry_transient(task: Any, task_run: Any, state: State[Any]) -> bool:
    """Retry a batch task only for transient errors (storage, network); never for failed pairs or a timeout."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return isinstance(exc, StorageError | ConnectionError)


class Progress:
    """Finished pairs plus the fraction done of running batches, mirrored into a progress artifact (throttled)."""

    def __init__(self, total: int, artifact_id: Any) -> None:
        self.total = total
        self.done = 0
        self.running: dict[str, float] = {}  # batch label -> pairs-equivalent done
        self.artifact_id = artifact_id
        self._lock = threading.Lock()
        self._last = 0.0

    @property
    def percent(self) -> float:
        """Progress in percent (100 when there is nothing to do)."""
        if self.total == 0:
            return 100.0
        return min(100.0, 100.0 * (self.done + sum(self.running.values())) / self.total)

    def step(self, label: str, pairs: int, fraction: float) -> None:
        """A running batch of `pairs` pairs is `fraction` done."""
        with self._lock:
            self.running[label] = pairs * min(max(fraction, 0.0), 1.0)
            self._publish(force=False)

    def finish(self, label: str, pairs: int) -> None:
        """A batch of `pairs` pairs ended (in any state)."""
        with self._lock:
            self.running.pop(label, None)
            self.done += pairs
            self._publish(force=True)

    def _publish(self, force: bool) -> None:
        now = time.monotonic()
        if self.artifact_id is None or (not force and now - self._last < PROGRESS_UPDATE_S):
            return
        self._last = now
        with contextlib.suppress(Exception):  # progress is cosmetic: never fail a run over it
            update_progress_artifact(
                self.artifact_id, self.percent, description=f"{self.done}/{self.total} pairs finished"
            )


def _progress_callback(progress: Progress | None, label: str, batch: list[PairTask]) -> ProgressCallback:
    """on_progress for run_batch: feeds the progress artifact and logs losses now and then."""
    logger = get_run_logger()
    last_log = [time.monotonic()]

    def on_progress(event: ProgressEvent) -> None:
        if progress is not None:
            progress.step(label, len(batch), event.iteration / max(1, event.total_iterations))
        now = time.monotonic()
        if event.losses and now - last_log[0] >= LOG_EVERY_S:
            last_log[0] = now
            best = min(loss["total"] for loss in event.losses)
            logger.info(
                "batch %s: iteration %d/%d, best total loss %.4g", label, event.iteration, event.total_iterations, best
            )

    return on_progress


@task(
    name="stylize-batch",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=retry_transient,
    persist_result=True,
    cache_policy=CacheKeyFnPolicy(cache_key_fn=batch_cache_key) + TASK_SOURCE + RUN_ID,
    task_run_name="batch-{label}",
)
def stylize_batch(
    batch: list[PairTask],
    output: str,
    label: str,
    stylizer: Stylizer | None = None,
    progress: Progress | None = None,
    run_id: str | None = None,
) -> list[PairRecord]:
    """Stylize one batch and write its outputs; raise PairsFailed (task Failed, runs on Retry) if a pair failed."""
    logger = get_run_logger()
    logger.info("batch %s: %d pairs: %s", label, len(batch), ", ".join(p.id for p in batch))
    records = nst_batch.run_batch(
        batch,
        output=output,
        stylizer=stylizer,
        on_progress=_progress_callback(progress, label, batch),
        run_id=run_id,
    )
    for r in records:
        if r.status == "failed":
            logger.error("pair %s failed: %s", r.id, (r.error or {}).get("message"))
        else:
            logger.info("pair %s %s in %.1f s, final losses %s", r.id, r.status, r.seconds, r.final_losses)
    failed = [r for r in records if r.status == "failed"]
    if failed:
        raise PairsFailed(f"{len(failed)} of {len(records)} pairs failed: {', '.join(r.id for r in failed)}", records)
    return records


def batch_outcome(future: PrefectFuture[Any], batch: list[PairTask], output: str, run_id: str) -> list[PairRecord]:
    """The records of a finished batch task, whatever its final state."""
    future.wait()  # sets the final state locally; `.state` alone may still read RUNNING from the API
    state = future.state
    if state.is_completed():
        return list(future.result())
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, PairsFailed):
        return list(exc.records)
    timed_out = state.name == "TimedOut" or isinstance(exc, TimeoutError)
    error = {
        "type": "Timeout" if timed_out else type(exc).__name__,
        "message": state.message or str(exc),
        "iteration": None,
    }
    return [nst_batch.record_failure(p, output, error, run_id, best_effort=True) for p in batch]


def publish_report(
    name: str,
    run_id: str,
    records: list[PairRecord],
    *,
    summary_uri: str | None,
    output: str | None,
    dry_run: bool = False,
) -> None:
    """Table and markdown artifacts keyed by the manifest's name; the loss plot is written next to the outputs."""
    logger = get_run_logger()
    slug = report.slugify(name)
    try:
        create_table_artifact(
            key=f"{slug}-pairs",
            table=report.table_rows(records),
            description=f"{name}: pairs of flow run {run_id}" + (" (dry run: nothing ran)" if dry_run else ""),
        )
        curves_url = None
        png = None if dry_run else report.loss_curves_png(records, title=f"{name} · {run_id}")
        if png is not None and output:
            curves_uri = storage.join(output.rstrip("/") + "/", f"_runs/{run_id}-losses.png")
            storage.write_bytes(curves_uri, png, content_type="image/png")
            curves_url = report.display_url(curves_uri)
        create_markdown_artifact(
            key=f"{slug}-report",
            markdown=report.markdown_report(
                name=name,
                run_id=run_id,
                records=records,
                summary_uri=summary_uri,
                curves_url=curves_url,
                dry_run=dry_run,
            ),
            description=f"{name}: report of flow run {run_id}",
        )
    except Exception as exc:  # the report is for people; the pairs' JSON and the run summary are the record
        logger.warning("could not publish the report: %s: %s", type(exc).__name__, exc)


@flow(name="stylize-manifest")
def stylize_manifest(
    manifest: str,
    pair_ids: list[str] | None = None,
    force: bool = False,
    dry_run: bool = False,
    max_failures: Annotated[int, Field(ge=1)] | None = None,
    batch_timeout_s: Annotated[float, Field(gt=0)] | None = None,
    max_batch_pairs: Annotated[int, Field(ge=1, le=1024)] = 8,
    cpu_slots: Annotated[int, Field(ge=1, le=64)] = 1,
) -> State[Any]:
    """Stylize the pairs of a manifest: only new or changed pairs run; the run fails if any pair failed.

    Args:
        manifest: manifest URI: a local path (relative to the worker's working directory), file:// or s3://
        pair_ids: run only these pair ids (default: every pair of the manifest)
        force: run pairs even if their outputs already say succeeded with the same inputs and parameters
        dry_run: only report which pairs would run and which would be skipped; write nothing
        max_failures: after this many failed pairs start no new batches; the pairs left are recorded as not_run
        batch_timeout_s: cancel a batch that runs longer than this (seconds); its pairs are recorded as failed
        max_batch_pairs: at most this many pairs (same shape, same graph parameters) share one batch
        cpu_slots: batches optimising at once on a machine without a GPU (with GPUs: one per visible GPU)
    """
    logger = get_run_logger()
    run_id = str(runtime_flow_run.id or f"local-{time.strftime('%Y%m%dT%H%M%S')}")

    # 1. Load and validate: a bad manifest fails the run here, listing every problem, before any GPU work.
    # 2. Plan: hash the inputs, skip pairs already done.
    try:
        loaded = load_manifest(manifest)
        logger.info("manifest %s: %d pairs, output %s", loaded.name, len(loaded.pairs), loaded.output)
        planned = nst_batch.plan(loaded, pair_ids=pair_ids, force=force)
        if planned.unknown_ids:
            raise ManifestError(f"{loaded.source}: pair_ids not in the manifest: {', '.join(planned.unknown_ids)}")
    except NSTError as exc:  # the user's to fix: the message says what and where; a traceback would not help
        logger.error("%s", exc)
        return Failed(message=str(exc), data={"error": type(exc).__name__, "message": str(exc)})
    skipped = list(planned.skipped)
    logger.info("%d pairs to run, %d already done%s", len(planned.to_run), len(skipped), " (force)" if force else "")

    if dry_run:
        would_run = [nst_batch.not_run_record(p, loaded.output, "dry run") for p in planned.to_run]
        for p in planned.to_run:
            logger.info("would run %s", p.id)
        for r in skipped:
            logger.info("would skip %s (up to date)", r.id)
        publish_report(loaded.name, run_id, [*would_run, *skipped], summary_uri=None, output=None, dry_run=True)
        return Completed(
            message=f"dry run: {len(would_run)} pairs would run, {len(skipped)} would be skipped",
            data={"would_run": [p.id for p in planned.to_run], "would_skip": [r.id for r in skipped]},
        )

    # 3. Batches: one task each; tasks optimise on free device slots, reading/writing around them.
    batches = nst_batch.make_batches(planned.to_run, max_pairs=max_batch_pairs)
    slots = DeviceSlots(visible_devices(cpu_slots))
    stylizer = SlottedStylizer(slots)
    progress = Progress(
        len(planned.to_run),
        create_progress_artifact(
            0.0 if planned.to_run else 100.0,
            key=f"{report.slugify(loaded.name)}-progress",
            description=f"0/{len(planned.to_run)} pairs finished",
        ),
    )
    # Task timeouts count from the task's start: with one, no task may wait for a slot, so one thread per slot.
    workers = len(slots.devices) if batch_timeout_s else WORKERS_PER_SLOT * len(slots.devices)
    logger.info("%d batches on %s (%d task threads)", len(batches), slots, workers)
    batch_task = stylize_batch.with_options(timeout_seconds=batch_timeout_s) if batch_timeout_s else stylize_batch

    records: list[PairRecord] = []
    failures = 0
    pending = list(enumerate(batches, start=1))
    running: dict[PrefectFuture[Any], tuple[str, list[PairTask]]] = {}
    stopped = False
    runner: ThreadPoolTaskRunner[Any]
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        while pending or running:
            # Submit only as many batches as there are threads, so that max_failures can stop the rest.
            while pending and not stopped and len(running) < workers:
                index, batch = pending.pop(0)
                label = f"{index}of{len(batches)}"
                parameters = {
                    "batch": batch,
                    "output": loaded.output,
                    "label": label,
                    "stylizer": stylizer,
                    "progress": progress,
                    "run_id": run_id,
                }
                running[runner.submit(batch_task, parameters)] = (label, batch)  # type: ignore[arg-type]
            if not running:
                break
            done = next(as_completed(list(running)))
            label, batch = running.pop(done)
            batch_records = batch_outcome(done, batch, loaded.output, run_id)
            records += batch_records
            failures += sum(r.status == "failed" for r in batch_records)
            progress.finish(label, len(batch))
            if max_failures is not None and failures >= max_failures and not stopped:
                stopped = True
                logger.warning(
                    "%d failed pairs reached max_failures=%d: starting no new batches", failures, max_failures
                )
    reason = f"not started: max_failures={max_failures} reached"
    records += [nst_batch.not_run_record(p, loaded.output, reason) for _, batch in pending for p in batch]

    # 4. Run summary, artifacts, final state.
    order = {p.id: i for i, p in enumerate(loaded.pairs)}
    records = sorted([*records, *skipped], key=lambda r: order.get(r.id, len(order)))
    summary_uri = nst_batch.write_run_summary(loaded.output, run_id, records, manifest=loaded.source)
    publish_report(loaded.name, run_id, records, summary_uri=summary_uri, output=loaded.output)
    c = report.counts(records)
    result = {
        "run_id": run_id,
        "summary": summary_uri,
        "counts": c,
        "failed": [r.id for r in records if r.status == "failed"],
        "not_run": [r.id for r in records if r.status == "not_run"],
    }
    text = ", ".join(f"{n} {s}" for s, n in c.items() if n) or "no pairs"
    if c["failed"] or c["not_run"]:
        message = f"{c['failed']} of {len(records)} pairs failed: {', '.join(result['failed'])}"
        if c["not_run"]:
            message += f"; {c['not_run']} not run (max_failures={max_failures})"
        logger.error("%s. Summary: %s", message, summary_uri)
        return Failed(message=f"{message}. Retry runs only these again. ({text})", data=result)
    logger.info("%s. Summary: %s", text, summary_uri)
    return Completed(message=text, data=result)


def run_from_cli(
    manifest: str,
    *,
    pair_ids: list[str] | None = None,
    force: bool = False,
    dry_run: bool = False,
    max_batch_pairs: int = 8,
) -> int:
    """`nst run`: the flow in this process (ephemeral Prefect API unless PREFECT_API_URL is set); exit code."""
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    loaded = load_manifest(manifest)  # a bad manifest fails here, before any server starts
    updates: dict[Any, Any] = {}
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = 120
    if "PREFECT_SERVER_ANALYTICS_ENABLED" not in os.environ:
        updates[PREFECT_SERVER_ANALYTICS_ENABLED] = False
    with temporary_settings(updates=updates):
        state = stylize_manifest(
            manifest,
            pair_ids=pair_ids,
            force=force,
            dry_run=dry_run,
            max_batch_pairs=max_batch_pairs,
            return_state=True,
        )
    print(f"{state.name}: {state.message}")
    if not dry_run:
        print(f"outputs in {loaded.output}")
    return 0 if state.is_completed() else 1
