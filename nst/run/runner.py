"""The run path: manifest → plan → batches → engine → records → summary, with hooks for the caller's parts.

`run()` is the one path behind `nst run --no-prefect` and the `stylize-manifest` flow (the shard flow plans with the
same `plan`). Callers plug in how a batch runs (`RunHooks.run_batch`: in this thread, or as a Prefect task) and hear
when one finished (`RunHooks.batch_done`).
"""

from __future__ import annotations

import contextlib
import contextvars
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nst import storage
from nst.errors import NSTError
from nst.manifest import Manifest, load_manifest
from nst.manifest.inputs import input_roots
from nst.results import STATUSES, Status, exception_info
from nst.run import batches
from nst.run.batches import Batch, make_batches
from nst.run.claims import RunIsLive, clear_stale_claims
from nst.run.index import write_index
from nst.run.order import in_pair_order
from nst.run.planner import Plan, plan
from nst.run.records import PairRecord, probe_output, write_run_summary
from nst.run_options import RunOptions

if TYPE_CHECKING:
    from nst.engine.optimize import ProgressCallback
    from nst.engine.stylizer import Stylizer

# Ids named in one message (a state, a log line): the first ones, then a count; the full list is in the summary.
IDS_IN_A_MESSAGE = 20
# Our temp files (a write in flight) older than this are what a killed writer left: removed when a run starts.
STALE_TEMP_S = 3600.0


@dataclass
class RunSummary:
    """The outcome of a whole run."""

    run_id: str
    manifest: Manifest
    records: list[PairRecord]
    summary_uri: str | None = None
    dry_run: bool = False
    older_engine: int = 0  # skipped pairs made by an older engine revision

    def counts(self) -> dict[Status, int]:
        """How many pairs ended in each status (every status present, in a fixed order)."""
        return {s: sum(r.status == s for r in self.records) for s in STATUSES}

    def ids(self, *statuses: Status) -> list[str]:
        """Ids of the pairs that ended in one of these statuses, in manifest order."""
        return [r.id for r in self.records if r.status in statuses]


@dataclass
class RunHooks:
    """How a caller takes part in `run()`: what runs a batch, how many at once, what hears about the run."""

    run_batch: Callable[[Batch], list[PairRecord]]
    parallel: int = 1  # batches in flight at once
    planned: Callable[[Plan, list[Batch]], None] | None = None
    batch_done: Callable[[Batch, list[PairRecord]], None] | None = None
    run_is_live: RunIsLive | None = None  # lets the run clear the leftover claims of runs that are over


def some_ids(ids: list[str]) -> str:
    """The first IDS_IN_A_MESSAGE ids, then how many more: a message stays short however large the run."""
    more = len(ids) - IDS_IN_A_MESSAGE
    return ", ".join(ids[:IDS_IN_A_MESSAGE]) + (f" and {more} more" if more > 0 else "")


def local_hooks(stylizer: Stylizer | None = None, on_progress: ProgressCallback | None = None) -> RunHooks:
    """Run batches one after another in this process (`nst run --no-prefect`); any error fails the batch's pairs.

    The engine (torch) is loaded with the first batch: a run with nothing to do never loads it.
    """
    engines = [stylizer] if stylizer is not None else []

    def run_one(batch: Batch) -> list[PairRecord]:
        try:
            if not engines:
                from nst.engine.stylizer import Stylizer

                engines.append(Stylizer(read_bytes=storage.read_bytes))
            return batches.run_batch(batch, stylizer=engines[0], on_progress=on_progress)
        except Exception as exc:  # a torch RuntimeError, an OSError...: the batch fails, the run goes on
            return [batch.fail(spec, exception_info(exc)) for spec in batch.pairs]

    return RunHooks(run_batch=run_one)


def new_run_id() -> str:
    """A unique run id for runs without an orchestrator's id (time first, so ids sort; claims tell runs apart by it)."""
    return time.strftime("local-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:8]


@contextlib.contextmanager
def input_spool() -> Iterator[str]:
    """A local directory holding the run's input bytes by sha256, removed when the run ends."""
    with tempfile.TemporaryDirectory(prefix="nst-inputs-") as directory:
        yield directory


def run(
    manifest: str | Manifest,
    options: RunOptions | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    run_id: str | None = None,
    hooks: RunHooks | None = None,
) -> RunSummary:
    """Load, plan, run every batch through `hooks.run_batch`, then write the run summary (nothing on a dry run).

    `overrides` rank above the manifest's `defaults:` and below its per-pair values.
    """
    options = options or RunOptions()
    hooks = hooks or local_hooks()
    run_id = run_id or new_run_id()
    loaded = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, overrides=overrides)
    output = loaded.output
    with input_spool() as spool:
        the_plan = plan(loaded, options, spool=None if options.dry_run else spool)
        planned = make_batches(
            the_plan.to_run,
            the_plan.inputs,
            max_pairs=options.max_batch_pairs,
            output=output,
            run_id=run_id,
            spool=spool,
            leftovers=the_plan.leftovers,
            force=options.force,
            replace_others=options.replace_others,
            input_roots=input_roots(loaded.source),
        )
        if hooks.planned is not None:
            hooks.planned(the_plan, planned)
        older = len(the_plan.older_engine)
        if options.dry_run:
            records = [PairRecord.not_run(p, output, "dry run") for p in the_plan.to_run]
            ordered = _in_manifest_order(loaded, [*records, *the_plan.skipped, *the_plan.refused])
            return RunSummary(run_id, loaded, ordered, dry_run=True, older_engine=older)
        probe_output(output, run_id)
        with contextlib.suppress(NSTError):  # what killed writers left (local outputs only)
            storage.remove_stale_temp(output, older_than_s=STALE_TEMP_S)
        clear_stale_claims(output, the_plan.claimed_done, run_id, hooks.run_is_live)
        records, left = _run_batches(planned, hooks, options.max_failures)
        if the_plan.index:
            write_index(output, the_plan.index)
    reason = f"not started: max_failures={options.max_failures} reached"
    records += [PairRecord.not_run(p, output, reason) for batch in left for p in batch.pairs]
    records = _in_manifest_order(loaded, [*records, *the_plan.skipped, *the_plan.refused])
    summary_uri = write_run_summary(output, run_id, records, manifest=loaded.source, older_engine=older)
    return RunSummary(run_id, loaded, records, summary_uri=summary_uri, older_engine=older)


def _in_manifest_order(manifest: Manifest, records: list[PairRecord]) -> list[PairRecord]:
    return in_pair_order(records, manifest.pairs)


def _run_batches(
    batches: list[Batch], hooks: RunHooks, max_failures: int | None
) -> tuple[list[PairRecord], list[Batch]]:
    """Run batches, `hooks.parallel` at a time; after `max_failures` failed pairs start no more. (records, not run)."""
    records: list[PairRecord] = []
    pending = deque(batches)
    failures = 0
    running: dict[Future[list[PairRecord]], Batch] = {}
    with ThreadPoolExecutor(max(1, hooks.parallel), thread_name_prefix="nst-batch") as pool:
        while pending or running:
            while pending and len(running) < hooks.parallel and (max_failures is None or failures < max_failures):
                batch = pending.popleft()
                context = contextvars.copy_context()  # the caller's context (e.g. its flow run) goes with the batch
                running[pool.submit(context.run, hooks.run_batch, batch)] = batch
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                batch = running.pop(future)
                batch_records = future.result()
                records += batch_records
                failures += sum(r.status == "failed" for r in batch_records)
                if hooks.batch_done is not None:
                    hooks.batch_done(batch, batch_records)
    return records, list(pending)
