"""Flow `shard-manifest`: split a manifest's pending pairs into child runs of the `stylize-manifest` deployment.

Past one machine (docs/scaling.md): GPU workers poll `gpu-pool` at `--limit 1`, one per GPU; this parent runs on
`parent-pool`. It plans (done pairs skipped), deals whole batches (same shape, same graph parameters) to shards
balanced by pixels × iterations, starts one child flow run per shard with `run_deployment`, waits, and aggregates
the children's run summaries and pair records into `_runs/<parent-id>.json` and one report.

Retry of the parent (UI or `prefect flow-run retry`) plans again, so only pairs that are not done run; they go to new
child runs, one per earlier shard that had such pairs (the idempotency key holds the parent's attempt, so a retry never
returns an old finished child). Children of earlier attempts still running are waited for, not started twice.

The logic on plain data (cost model, dealing, a retry's shards, a dead child's pairs) is `nst.run.shards`; this module
adds what Prefect brings: child flow runs, waiting for them, the final state and the report artifact.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
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
from nst.manifest import ParamOverrides, load_manifest, override_values
from nst.manifest.inputs import root_env
from nst.run import Child, Shard, aggregate, child_options, given_ids, new_run_id, plan, plan_shards, write_run_summary
from nst.run.runner import IDS_IN_A_MESSAGE
from nst.run_options import RunOptions

POLL_S = 3.0
SHARD_TAG = "shard"


def child_runs(client: SyncPrefectClient, parent_id: str) -> list[FlowRun]:
    """Every child flow run of this parent (all attempts), oldest first."""
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(parent_id)])),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )


def as_child(run: FlowRun, pair_ids: list[str] | None = None) -> Child:
    """The plain view of a child flow run: its pairs (read from its options unless given) and its state."""
    ids = given_ids(run.parameters.get("options") or {}) if pair_ids is None else pair_ids
    state = (run.state.name if run.state else None) or run.state_name or "Unknown"
    return Child(str(run.id), run.name, ids, state, run.state.message if run.state else None)


def start_shard(
    shard: Shard,
    deployment: str,
    manifest: str,
    overrides: dict[str, Any],
    options: RunOptions,
    *,
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
    busy = {i for r in running for i in as_child(r).pair_ids}  # an earlier attempt's child still runs them: wait
    pending = [p for p in planned.to_run if p.id not in busy]
    previous = [as_child(r) for r in earlier]
    shard_plan = plan_shards(
        pending, planned.inputs, previous, shards, loaded.name, max_pairs=options.max_batch_pairs, output=loaded.output
    )
    logger.info(
        "attempt %d: %d pairs to run (%d already done, %d still running in earlier shards) in %d new shards",
        *(attempt, len(pending), len(planned.skipped), len(busy), len(shard_plan)),
    )
    runs = list(running)
    for shard in shard_plan:
        run = start_shard(
            shard, deployment, manifest, explicit, options, parent=parent, attempt=attempt, output=loaded.output
        )
        logger.info("shard %s: flow run %s with %d pairs", shard.name, run.id, len(shard.pair_ids))
        runs.append(run)
    children = [as_child(r) for r in runs]
    shard_list = [{"flow_run_id": c.id, "name": c.name, "pair_ids": c.pair_ids} for c in children]
    if not wait:
        return Completed(message=f"{len(runs)} shards scheduled", data={"shards": _brief(shard_list)})

    with get_client(sync_client=True) as client:
        finished = wait_for(client, runs, timeout_s) if runs else []
    if finished is None:
        return outcome.failed(f"{len(runs)} shards still running after {timeout_s:.0f} s")
    ended = [as_child(r, c.pair_ids) for r, c in zip(finished, children, strict=True)]
    for entry, child in zip(shard_list, ended, strict=True):
        entry["state"] = child.state
    records = aggregate(loaded, ended, planned.to_run, [*planned.skipped, *planned.refused])  # refused: failed
    summary = write_run_summary(
        loaded.output, parent, records, manifest=loaded.source, attempt=attempt, shards=shard_list
    )
    outcome.publish_report(loaded, parent, records, summary=summary, appendix=shards_markdown(_brief(shard_list)))
    return outcome.final_state(records, parent, summary, options, extra=f" in {len(runs)} shards")


def _brief(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shards as a state or report shows them: the first pair ids and a count (the summary has them all)."""
    return [{**s, "pair_ids": s["pair_ids"][:IDS_IN_A_MESSAGE], "pairs": len(s["pair_ids"])} for s in shards]
