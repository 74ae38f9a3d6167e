"""Flow `shard-manifest`: split a manifest's pending pairs across N runs of the `stylize-manifest` deployment.

Past one machine: start one worker per GPU on the GPU work pool (`CUDA_VISIBLE_DEVICES=<i> prefect worker start
--pool gpu-pool --limit 1`), then run this flow; each shard is a `stylize-manifest` flow run with its own `pair_ids`,
picked up by whichever worker is free. Pairs are planned first (done pairs skipped) and whole batches (same shape,
same graph parameters) are dealt to shards, largest first, so that shards are balanced and batches stay full.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Annotated, Any, cast

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Completed, Failed, State
from pydantic import Field

from nst import pipeline
from nst.errors import NSTError
from nst.manifest import ParamOverrides, load_manifest, override_values
from nst.pipeline import Batch
from nst.run_options import RunOptions

POLL_S = 5.0


def split_batches(batches: Sequence[Batch], shards: int) -> list[list[str]]:
    """Deal batches (largest first) to the least-loaded of `shards` shards; pair ids per shard, empty shards dropped."""
    loads: list[list[str]] = [[] for _ in range(max(1, shards))]
    for batch in sorted(batches, key=lambda b: len(b.pairs), reverse=True):
        target = min(loads, key=len)
        target.extend(p.id for p in batch.pairs)
    return [ids for ids in loads if ids]


@flow(name="shard-manifest")
def shard_manifest(
    manifest: str,
    shards: Annotated[int, Field(ge=1, le=1024)] = 2,
    deployment: str = "stylize-manifest/on-demand",
    overrides: ParamOverrides = ParamOverrides(),  # type: ignore[valid-type]  # noqa: B008
    options: RunOptions = RunOptions(),  # noqa: B008
    wait: bool = True,
    timeout_s: Annotated[float, Field(gt=0)] = 24 * 3600,
) -> State[Any]:
    """Run a manifest as `shards` parallel flow runs of the stylize deployment; fails if any shard fails.

    Args:
        manifest: manifest URI (local path as the workers see it, or s3://)
        shards: how many stylize-manifest runs to split the pending pairs into (e.g. the number of GPU workers)
        deployment: the deployment each shard runs
        overrides: engine parameters for every pair, passed to each shard (see stylize-manifest)
        options: run options passed to each shard, with `pair_ids` narrowed to its pairs
        wait: wait for the shards to finish (otherwise return once they are scheduled)
        timeout_s: give up waiting after this many seconds
    """
    logger = get_run_logger()
    parent = str(runtime_flow_run.id or pipeline.new_run_id())
    explicit = override_values(overrides)
    try:
        loaded = load_manifest(manifest, overrides=explicit)
        planned = pipeline.plan(loaded, options)
    except NSTError as exc:
        logger.error("%s", exc)
        return Failed(message=str(exc), data={"error": type(exc).__name__, "message": str(exc)})
    batches = pipeline.make_batches(
        planned.to_run, max_pairs=options.max_batch_pairs, output=loaded.output, run_id=parent
    )
    groups = split_batches(batches, shards)
    logger.info(
        "%d pairs to run (%d already done) in %d shards", len(planned.to_run), len(planned.skipped), len(groups)
    )
    runs = []
    for i, ids in enumerate(groups, start=1):
        key = hashlib.sha256(f"{parent}:{deployment}:{','.join(sorted(ids))}".encode()).hexdigest()
        run = cast(
            FlowRun,
            run_deployment(
                deployment,
                parameters={
                    "manifest": manifest,
                    "overrides": explicit,
                    "options": options.model_copy(update={"pair_ids": ids}).model_dump(mode="json"),
                },
                flow_run_name=f"{loaded.name}-shard-{i}of{len(groups)}",
                idempotency_key=key,  # a restarted parent does not start the same shard twice
                timeout=0,
                tags=["shard"],
            ),
        )
        logger.info("shard %d/%d: flow run %s (%s) with %d pairs", i, len(groups), run.name, run.id, len(ids))
        runs.append(run)
    result = {"shards": [{"flow_run_id": str(r.id), "pair_ids": ids} for r, ids in zip(runs, groups, strict=True)]}
    if not wait or not runs:
        return Completed(message=f"{len(runs)} shards scheduled", data=result)

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            states = [client.read_flow_run(r.id).state for r in runs]
            if all(s is not None and s.is_final() for s in states):
                break
            if time.monotonic() > deadline:
                return Failed(message=f"shards still running after {timeout_s:.0f} s", data=result)
            time.sleep(POLL_S)
    bad = [
        (r.name, s.name if s else "?") for r, s in zip(runs, states, strict=True) if s is None or not s.is_completed()
    ]
    if bad:
        return Failed(message=f"{len(bad)} of {len(runs)} shards did not complete: {bad}", data=result)
    return Completed(message=f"{len(runs)} shards completed", data=result)
