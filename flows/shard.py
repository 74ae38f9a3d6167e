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
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun, State
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.runtime import deployment as runtime_deployment
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Completed
from pydantic import Field

from flows import outcome, report
from nst.errors import NSTError
from nst.images import resized_size
from nst.manifest import Manifest, PairSpec, ParamOverrides, load_manifest, override_values
from nst.manifest.inputs import root_env
from nst.results import error_info
from nst.run import Batch, PairRecord, make_batches, new_run_id, plan, summary_uri, write_run_summary
from nst.run.inputs import InputFacts
from nst.run.layout import READ_THREADS, output_uris, write
from nst.run.planner import listed_ids
from nst.run.records import read_record
from nst.run.runner import IDS_IN_A_MESSAGE
from nst.run_options import RunOptions

POLL_S = 3.0
HISTORY_PAIRS = 50  # pairs whose loss history the parent keeps for the report's curves
SHARD_TAG = "shard"
IDS_IN_A_PARAMETER = 200  # a child's pair ids inline in its options up to this many, else in a file (~40 B each)


@dataclass
class Shard:
    """One child flow run: its name, pairs, and (once started or found) the flow run."""

    name: str
    pair_ids: list[str]
    run: FlowRun | None = None


def pair_cost(spec: PairSpec, inputs: dict[str, InputFacts]) -> int:
    """Work of one pair: output pixels × iterations (1 for an unreadable pair: it fails at once)."""
    dims = inputs[spec.content].dims
    if dims is None or any(inputs[u].error for u in (spec.content, *spec.styles)):
        return 1
    width, height = resized_size(*dims, spec.params.size)
    return width * height * spec.params.iterations


def split_batches(batches: Sequence[Batch], shards: int) -> list[list[str]]:
    """Deal whole batches, costliest first, to the shard with the least pixels × iterations; empty shards dropped."""
    loads = [0] * max(1, shards)
    groups: list[list[str]] = [[] for _ in loads]
    costed = [(sum(pair_cost(p, b.inputs) for p in b.pairs), i, b) for i, b in enumerate(batches)]
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
    """The pairs a child run was given: in its options, or in the ids file they name."""
    options = run.parameters.get("options") or {}
    return list(options.get("pair_ids") or []) + (
        listed_ids(options["pair_ids_file"]) if options.get("pair_ids_file") else []
    )


def child_options(shard: Shard, options: RunOptions, output: str, parent: str, attempt: int) -> RunOptions:
    """The child's run options: its pair ids inline, or (many of them) in `_runs/<parent>-<shard>.ids.json`, so
    that no flow run parameter grows with the manifest."""
    if len(shard.pair_ids) <= IDS_IN_A_PARAMETER:
        return options.model_copy(update={"pair_ids": shard.pair_ids, "pair_ids_file": None})
    uri = summary_uri(output, f"{parent}-{shard.name}-attempt{attempt}", ".ids.json")
    write(uri, json.dumps(shard.pair_ids).encode(), "application/json")
    return options.model_copy(update={"pair_ids": None, "pair_ids_file": uri})


def plan_shards(
    pending: Sequence[PairSpec],
    inputs: dict[str, InputFacts],
    earlier: Sequence[FlowRun],
    shards: int,
    base: str,
    *,
    max_pairs: int,
    output: str,
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
    groups = split_batches(make_batches(fresh, inputs, max_pairs=max_pairs, output=output, run_id=""), shards)
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
    output: str,
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
                "options": child_options(shard, options, output, parent, attempt).model_dump(mode="json"),
            },
            flow_run_name=name,
            idempotency_key=key,
            timeout=0,
            tags=[SHARD_TAG],
            job_variables=child_job_variables(),
        ),
    )


def child_job_variables() -> dict[str, Any]:
    """The parent's root settings (NST_INPUT_ROOTS, ...), passed on so that children may read what it planned."""
    roots = root_env()
    return {"env": roots} if roots else {}


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


def _child_pair(
    output: str, child: FlowRun, spec: PairSpec, entry: dict[str, Any] | None, *, history: bool
) -> PairRecord:
    """One pair of a child: the status its run summary gives (`entry`), else what its record says it wrote."""
    _, json_uri = output_uris(output, spec.id)
    if entry is not None and entry["status"] == "not_run":
        return PairRecord.not_run(spec, output, (entry.get("error") or {}).get("message", "not run"))
    record = read_record(json_uri)
    if record is not None and entry is not None and entry["status"] in ("succeeded", "failed", "skipped"):
        return PairRecord.from_json(spec, record, entry["status"], history=history)
    if record is not None and record.get("run_id") == str(child.id) and record.get("status") == "succeeded":
        return PairRecord.from_json(spec, record, "succeeded", history=history)  # written before the child died
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
        summary = read_record(summary_uri(output, str(c.id))) or {}
        listed[c.id] = {p["id"]: p for p in summary.get("pairs", [])}
    wanted = [(c, pair_id) for c in children for pair_id in _run_pair_ids(c)]

    def one(item: tuple[int, tuple[FlowRun, str]]) -> PairRecord:
        i, (child, pair_id) = item
        entry = listed[child.id].get(pair_id)
        return _child_pair(output, child, specs[pair_id], entry, history=i < HISTORY_PAIRS)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(one, enumerate(wanted)))


def shards_markdown(shards: Sequence[dict[str, Any]]) -> str:
    """The report's appendix: a table of the shards (name, flow run, state, pairs)."""
    lines = ["", "## Shards", "", "| shard | flow run | state | pairs |", "|---|---|---|---:|"]
    lines += [
        f"| {report.md_text(s['name'])} | `{s['flow_run_id']}` | {s.get('state', '')} | {s['pairs']} |" for s in shards
    ]
    return "\n".join(lines) + "\n"


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
    parent = str(runtime_flow_run.id or new_run_id())
    attempt = max(1, int(runtime_flow_run.run_count or 1))
    explicit = override_values(overrides)
    try:
        loaded = load_manifest(manifest, overrides=explicit, confined=runtime_deployment.id is not None)
        planned = plan(loaded, options)
    except NSTError as exc:
        return outcome.failed(str(exc))
    if options.dry_run:
        would_skip = [r.id for r in planned.skipped]
        return outcome.dry_run_state([p.id for p in planned.to_run], would_skip, len(planned.older_engine))

    with get_client(sync_client=True) as client:
        earlier = child_runs(client, parent) if runtime_flow_run.id and attempt > 1 else []
    running = [r for r in earlier if r.state is None or not r.state.is_final()]
    busy = {i for r in running for i in _run_pair_ids(r)}  # an earlier attempt's child still runs them: wait for it
    pending = [p for p in planned.to_run if p.id not in busy]
    shard_plan = plan_shards(
        pending, planned.inputs, earlier, shards, loaded.name, max_pairs=options.max_batch_pairs, output=loaded.output
    )
    logger.info(
        "attempt %d: %d pairs to run (%d already done, %d still running in earlier shards) in %d new shards",
        attempt,
        len(pending),
        len(planned.skipped),
        len(busy),
        len(shard_plan),
    )
    for shard in shard_plan:
        shard.run = start_shard(
            shard,
            deployment=deployment,
            manifest=manifest,
            overrides=explicit,
            options=options,
            parent=parent,
            attempt=attempt,
            output=loaded.output,
        )
        logger.info("shard %s: flow run %s with %d pairs", shard.name, shard.run.id, len(shard.pair_ids))
    runs = [*running, *(cast(FlowRun, s.run) for s in shard_plan)]
    shard_list = [{"flow_run_id": str(r.id), "name": r.name, "pair_ids": _run_pair_ids(r)} for r in runs]
    if not wait:
        return Completed(message=f"{len(runs)} shards scheduled", data={"shards": _brief(shard_list)})

    with get_client(sync_client=True) as client:
        finished = wait_for(client, runs, timeout_s) if runs else []
    if finished is None:
        return outcome.failed(f"{len(runs)} shards still running after {timeout_s:.0f} s")
    for entry, run in zip(shard_list, finished, strict=True):
        entry["state"] = _state_name(run)
    records = _aggregate(loaded, finished, planned.to_run, planned.skipped)
    summary = write_run_summary(
        loaded.output, parent, records, manifest=loaded.source, attempt=attempt, shards=shard_list
    )
    outcome.publish_report(loaded, parent, records, summary=summary, appendix=shards_markdown(_brief(shard_list)))
    return outcome.final_state(records, parent, summary, options, extra=f" in {len(runs)} shards")


def _brief(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shards as a state or report shows them: the first pair ids and a count (the summary has them all)."""
    return [{**s, "pair_ids": s["pair_ids"][:IDS_IN_A_MESSAGE], "pairs": len(s["pair_ids"])} for s in shards]


def _aggregate(
    manifest: Manifest, finished: Sequence[FlowRun], to_run: Sequence[PairSpec], skipped: Sequence[PairRecord]
) -> list[PairRecord]:
    """Every pair of the run in manifest order: the children's as they left them, and those already done."""
    records = [*collect(manifest, finished, {p.id: p for p in to_run}), *skipped]
    order = {p.id: i for i, p in enumerate(manifest.pairs)}
    return sorted(records, key=lambda r: order.get(r.id, len(order)))
