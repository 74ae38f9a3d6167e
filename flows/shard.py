"""Flow `shard-manifest`: split a manifest's pending pairs into child runs of the `stylize-manifest` deployment.

Past one machine (docs/scaling.md): GPU workers poll `gpu-pool` at `--limit 1`, one per GPU; this parent runs on
`parent-pool`. It plans (done pairs skipped), deals whole batches (same shape, same graph parameters) to shards
balanced by pixels × iterations, starts one child flow run per shard with `run_deployment`, waits, and aggregates
the children's run summaries and pair records into `_runs/<parent-id>.json` and one report.

Retry of the parent (UI or `prefect flow-run retry`) plans again, so only pairs that are not done run; they go to new
child runs, one per earlier shard that had such pairs (the idempotency key holds the parent's attempt, so a retry never
returns an old finished child). Children of earlier attempts still running are waited for, not started twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Completed, Failed, State
from pydantic import Field

from flows import report
from nst import pipeline, storage
from nst.engine import output_size
from nst.errors import NSTError
from nst.manifest import Manifest, PairSpec, ParamOverrides, load_manifest, override_values
from nst.pipeline import Batch, PairRecord, PlannedPair
from nst.results import Status, error_info
from nst.run_options import RunOptions

POLL_S = 3.0
READ_THREADS = 16
HISTORY_PAIRS = 50  # pairs whose loss history the parent keeps for the report's curves
INPUT_ROOTS_ENV = "NST_INPUT_ROOTS"  # nst.manifest.inputs.InputSettings reads it
SHARD_TAG = "shard"


@dataclass
class Shard:
    """One child flow run: its name, pairs, and (once started or found) the flow run."""

    name: str
    pair_ids: list[str]
    run: FlowRun | None = None


def pair_cost(pair: PlannedPair) -> int:
    """Work of one pair: output pixels × iterations (1 for an unreadable pair: it fails at once)."""
    if pair.content_size is None or pair.input_error:
        return 1
    width, height = output_size(*pair.content_size, pair.spec.params.size)
    return width * height * pair.spec.params.iterations


def split_batches(batches: Sequence[Batch], shards: int) -> list[list[str]]:
    """Deal whole batches, costliest first, to the shard with the least pixels × iterations; empty shards dropped."""
    loads = [0] * max(1, shards)
    groups: list[list[str]] = [[] for _ in loads]
    costed = [(sum(pair_cost(p) for p in b.pairs), i, b) for i, b in enumerate(batches)]
    for cost, _, batch in sorted(costed, key=lambda c: (-c[0], c[1])):
        target = min(range(len(loads)), key=lambda i: (loads[i], len(groups[i])))
        loads[target] += cost
        groups[target].extend(p.id for p in batch.pairs)
    return [ids for ids in groups if ids]


def child_runs(client: SyncPrefectClient, parent_id: str) -> list[FlowRun]:
    """Every child flow run of this parent (all attempts), oldest first."""
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(parent_id)])),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )


def _run_pair_ids(run: FlowRun) -> list[str]:
    return list((run.parameters.get("options") or {}).get("pair_ids") or [])


def plan_shards(
    pending: Sequence[PlannedPair], earlier: Sequence[FlowRun], shards: int, base: str, *, max_pairs: int, output: str
) -> list[Shard]:
    """One shard per earlier shard with pending pairs (those pairs only); other pairs' batches dealt to `shards`."""
    origin: dict[str, FlowRun] = {}
    for run in earlier:  # oldest first: a pair's origin is the first shard that had it
        for pair_id in _run_pair_ids(run):
            origin.setdefault(pair_id, run)
    again: dict[UUID, Shard] = {}
    for pair in pending:
        if pair.id in origin:
            run = origin[pair.id]
            again.setdefault(run.id, Shard(re.sub(r"-attempt\d+$", "", run.name), [])).pair_ids.append(pair.id)
    fresh = [p for p in pending if p.id not in origin]
    groups = split_batches(pipeline.make_batches(fresh, max_pairs=max_pairs, output=output, run_id=""), shards)
    return [*again.values(), *(Shard(f"{base}-shard-{i}of{len(groups)}", ids) for i, ids in enumerate(groups, 1))]


def start_shard(
    shard: Shard,
    *,
    deployment: str,
    manifest: str,
    overrides: dict[str, Any],
    options: RunOptions,
    parent: str,
    attempt: int,
) -> FlowRun:
    """One child flow run of `deployment` for the shard's pairs; the idempotency key holds the parent's attempt."""
    ids = ",".join(sorted(shard.pair_ids))
    key = hashlib.sha256(f"{parent}:{attempt}:{deployment}:{ids}".encode()).hexdigest()
    name = shard.name if attempt == 1 else f"{shard.name}-attempt{attempt}"
    return cast(
        FlowRun,
        run_deployment(
            deployment,
            parameters={
                "manifest": manifest,
                "overrides": overrides,
                "options": options.model_copy(update={"pair_ids": shard.pair_ids}).model_dump(mode="json"),
            },
            flow_run_name=name,
            idempotency_key=key,
            timeout=0,
            tags=[SHARD_TAG],
            job_variables=child_job_variables(),
        ),
    )


def child_job_variables() -> dict[str, Any]:
    """The parent's input roots (NST_INPUT_ROOTS), passed on so that children may read what the parent planned."""
    roots = os.environ.get(INPUT_ROOTS_ENV)
    return {"env": {INPUT_ROOTS_ENV: roots}} if roots else {}


def wait_for(client: SyncPrefectClient, runs: Sequence[FlowRun], timeout_s: float) -> list[FlowRun] | None:
    """Poll (one API call per round) until every run is final; the runs as last read, or None on timeout."""
    deadline = time.monotonic() + timeout_s
    ids = [r.id for r in runs]
    while True:
        found = {r.id: r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))}
        latest = [found.get(i) for i in ids]
        if all(r is not None and r.state is not None and r.state.is_final() for r in latest):
            return cast(list[FlowRun], latest)
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)


def _state_name(run: FlowRun) -> str:
    return (run.state.name if run.state else None) or run.state_name or "Unknown"


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(storage.read_bytes(uri))
        return data
    except (NSTError, ValueError):
        return None


def _from_record(spec: PairSpec, record: dict[str, Any], status: Status, *, history: bool) -> PairRecord:
    """A PairRecord of a pair's JSON record found in storage (its loss history only if `history`)."""
    output = record.get("output") or {}
    return PairRecord(
        id=spec.id,
        status=status,
        content_uri=spec.content,
        style_uris=spec.styles,
        image_uri=output.get("image"),
        json_uri=output.get("json") or "",
        final_losses=record.get("final_losses"),
        seconds=0.0 if status == "skipped" else float(record.get("seconds") or 0.0),
        error=record.get("error"),
        history=(record.get("history") or []) if history else [],
    )


def _child_pair(
    output: str, child: FlowRun, spec: PairSpec, entry: dict[str, Any] | None, *, history: bool
) -> PairRecord:
    """One pair of a child: the status its run summary gives (`entry`), else what its record says it wrote."""
    _, json_uri = pipeline.output_uris(output, spec.id)
    if entry is not None and entry["status"] == "not_run":
        reason = (entry.get("error") or {}).get("message", "not run")
        return pipeline.not_run_record(PlannedPair(spec, {}), output, reason)
    record = _read_json(json_uri)
    if record is not None and entry is not None and entry["status"] in ("succeeded", "failed", "skipped"):
        return _from_record(spec, record, entry["status"], history=history)
    if record is not None and record.get("run_id") == str(child.id) and record.get("status") == "succeeded":
        return _from_record(spec, record, "succeeded", history=history)  # written before the child died
    state_name = _state_name(child)
    message = child.state.message if child.state else None
    detail = f": {message}" if message else ""
    error = error_info(
        state_name, f"shard {child.name} ({child.id}) ended {state_name}{detail}; the pair did not finish"
    )
    return PairRecord(spec.id, "failed", spec.content, spec.styles, None, json_uri, error=error)


def collect(manifest: Manifest, children: Sequence[FlowRun], specs: dict[str, PairSpec]) -> list[PairRecord]:
    """Each child's pairs as it left them: its run summary's status, the pair's record; a dead child's pairs failed.

    Loss histories are kept for the first HISTORY_PAIRS pairs only (the report's curves): at ~50 KB a record, a
    100,000-pair run would otherwise hold gigabytes.
    """
    output = manifest.output
    listed: dict[UUID, dict[str, dict[str, Any]]] = {}
    for c in children:
        summary = _read_json(storage.join(output.rstrip("/") + "/", f"_runs/{c.id}.json")) or {}
        listed[c.id] = {p["id"]: p for p in summary.get("pairs", [])}
    wanted = [(c, pair_id) for c in children for pair_id in _run_pair_ids(c)]

    def one(item: tuple[int, tuple[FlowRun, str]]) -> PairRecord:
        i, (child, pair_id) = item
        entry = listed[child.id].get(pair_id)
        return _child_pair(output, child, specs[pair_id], entry, history=i < HISTORY_PAIRS)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(one, enumerate(wanted)))


def publish_report(
    manifest: Manifest, run_id: str, records: Sequence[PairRecord], summary_uri: str, shards: Sequence[dict[str, Any]]
) -> None:
    """The table and markdown report of the whole sharded run (flows/report.py), plus a table of its shards."""
    slug = report.slugify(manifest.name)
    try:
        create_table_artifact(
            key=f"{slug}-pairs",
            table=report.table_rows(records),
            description=f"{manifest.name}: pairs of sharded flow run {run_id} ({len(shards)} shards)",
        )
        curves_url = None
        png = report.loss_curves_png(records, title=f"{manifest.name} · {run_id}")
        if png is not None:
            curves_uri = storage.join(manifest.output.rstrip("/") + "/", f"_runs/{run_id}-losses.png")
            storage.write_bytes(curves_uri, png, content_type="image/png")
            curves_url = report.display_url(curves_uri)
        markdown = report.markdown_report(
            name=manifest.name, run_id=run_id, records=records, summary_uri=summary_uri, curves_url=curves_url
        )
        lines = ["", "## Shards", "", "| shard | flow run | state | pairs |", "|---|---|---|---:|"]
        lines += [
            f"| {report.md_text(s['name'])} | `{s['flow_run_id']}` | {s['state']} | {len(s['pair_ids'])} |"
            for s in shards
        ]
        create_markdown_artifact(
            key=f"{slug}-report",
            markdown=markdown + "\n".join(lines) + "\n",
            description=f"{manifest.name}: report of sharded flow run {run_id}",
        )
    except Exception as exc:  # the report is for people; the pairs' JSON and the run summary are the record
        get_run_logger().warning("could not publish the report: %s: %s", type(exc).__name__, exc)


@flow(name="shard-manifest")
def shard_manifest(
    manifest: str,
    shards: Annotated[int, Field(ge=1, le=1024)] = 2,
    deployment: str = "stylize-manifest/on-demand",
    overrides: ParamOverrides = {},  # type: ignore[valid-type]  # noqa: B006  # Prefect validates it
    options: RunOptions = RunOptions(),  # noqa: B008
    wait: bool = True,
    timeout_s: Annotated[float, Field(gt=0)] = 24 * 3600,
) -> State[Any]:
    """Run a manifest's pending pairs as `shards` child runs of the stylize deployment; fails naming failed pairs.

    Args:
        manifest: manifest URI (local path as the workers see it, or s3://)
        shards: how many child runs to split the pending pairs into (e.g. 2-4 per GPU worker)
        deployment: the deployment each shard runs (on the GPU pool)
        overrides: engine parameters for every pair, passed to each shard (see stylize-manifest)
        options: run options passed to each shard, with `pair_ids` narrowed to its pairs
        wait: wait for the shards and aggregate their results (otherwise return once they are scheduled)
        timeout_s: give up waiting after this many seconds
    """
    logger = get_run_logger()
    parent = str(runtime_flow_run.id or pipeline.new_run_id())
    attempt = max(1, int(runtime_flow_run.run_count or 1))
    explicit = override_values(overrides)
    try:
        loaded = load_manifest(manifest, overrides=explicit)
        planned = pipeline.plan(loaded, options)
    except NSTError as exc:
        logger.error("%s", exc)
        return Failed(message=str(exc), data={"error": type(exc).__name__, "message": str(exc)})
    if options.dry_run:
        would_run, would_skip = [p.id for p in planned.to_run], [r.id for r in planned.skipped]
        return Completed(
            message=f"dry run: {len(would_run)} pairs would run, {len(would_skip)} would be skipped",
            data={"would_run": would_run, "would_skip": would_skip},
        )

    with get_client(sync_client=True) as client:
        earlier = child_runs(client, parent) if runtime_flow_run.id and attempt > 1 else []
    running = [r for r in earlier if r.state is None or not r.state.is_final()]
    busy = {i for r in running for i in _run_pair_ids(r)}  # an earlier attempt's child still runs them: wait for it
    pending = [p for p in planned.to_run if p.id not in busy]
    plan = plan_shards(pending, earlier, shards, loaded.name, max_pairs=options.max_batch_pairs, output=loaded.output)
    logger.info(
        "attempt %d: %d pairs to run (%d already done, %d still running in earlier shards) in %d new shards",
        attempt,
        len(pending),
        len(planned.skipped),
        len(busy),
        len(plan),
    )
    for shard in plan:
        shard.run = start_shard(
            shard,
            deployment=deployment,
            manifest=manifest,
            overrides=explicit,
            options=options,
            parent=parent,
            attempt=attempt,
        )
        logger.info("shard %s: flow run %s with %d pairs", shard.name, shard.run.id, len(shard.pair_ids))
    runs = [*running, *(cast(FlowRun, s.run) for s in plan)]
    shard_list: list[dict[str, Any]] = [
        {"flow_run_id": str(r.id), "name": r.name, "pair_ids": _run_pair_ids(r)} for r in runs
    ]
    if not wait:
        return Completed(message=f"{len(runs)} shards scheduled", data={"shards": shard_list})

    with get_client(sync_client=True) as client:
        finished = wait_for(client, runs, timeout_s) if runs else []
    if finished is None:
        return Failed(message=f"shards still running after {timeout_s:.0f} s", data={"shards": shard_list})
    for entry, run in zip(shard_list, finished, strict=True):
        entry["state"] = _state_name(run)
    specs = {p.id: p.spec for p in planned.to_run}
    records = [*collect(loaded, finished, specs), *planned.skipped]
    order = {p.id: i for i, p in enumerate(loaded.pairs)}
    records.sort(key=lambda r: order.get(r.id, len(order)))
    summary_uri = pipeline.write_run_summary(
        loaded.output, parent, records, manifest=loaded.source, attempt=attempt, shards=shard_list
    )
    publish_report(loaded, parent, records, summary_uri, shard_list)
    counts = {s: n for s, n in report.counts(records).items() if n}
    failed = [r.id for r in records if r.status in ("failed", "not_run")]
    data = {"run_id": parent, "summary": summary_uri, "counts": counts, "failed": failed, "shards": shard_list}
    text = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no pairs"
    if failed:
        bad = [s["name"] for s in shard_list if s["state"] != "Completed"]
        message = f"{len(failed)} of {len(records)} pairs failed: {', '.join(failed)}"
        logger.error("%s (shards not completed: %s). Summary: %s", message, ", ".join(bad) or "none", summary_uri)
        return Failed(message=f"{message}. Retry runs only these again. ({text})", data=data)
    logger.info("%s in %d shards. Summary: %s", text, len(runs), summary_uri)
    return Completed(message=f"{text} in {len(runs)} shards", data=data)
