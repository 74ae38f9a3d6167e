"""Sharded throughput on this machine: pairs/hour with 1, 2, 3 GPU-pool workers, and the fixed overhead per shard.

    python -m bench.shards                      # 1, 2 and 3 workers; 24 pairs of 32 px, 10 iterations, 6 shards
    python -m bench.shards --workers 2 --pairs 48 --shards 12 --out docs/bench/shards-cpu.jsonl

Real parts, as in tests/test_shard_e2e.py: `prefect server start`, deploy/setup.py, `prefect deploy --all`, process
workers at `--limit 1` on gpu-pool (Prefect's default poll interval unless --query-seconds), one on parent-pool,
`shard-manifest/on-demand` on a local manifest (fresh outputs per run, so nothing is skipped). Prints one JSON line per
worker count. Each child shard's time is split with the server's state timestamps and the pairs' records:

- pickup: Scheduled -> Pending (waiting for a free worker and its next poll)
- start-up: Pending -> Running (process start, imports, loading the flow)
- plan: Running -> first batch task (manifest, inputs read and hashed)
- engine: the records' seconds (network load + optimisation), split by an in-process calibration into model load and
  optimisation (a cold run of the same batch against the best of three warm ones)
- finish: last batch task -> final state (summary, artifacts)

overhead = the shard's time from Pending to its end minus its optimisation: what a shard costs besides the work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nst_testing.manifests import copy_samples, write_manifest
from nst_testing.paths import REPO, SAMPLES
from nst_testing.prefect import (
    PrefectServer,
    Worker,
    deploy_all,
    start_process_worker,
    start_server,
    stop_process,
    wait_for_flow_run,
)

CONTENTS = ("chelsea", "coffee", "astronaut")
STYLES = ("brick", "hubble", "ihc")


def shards_manifest(directory: Path, pairs: int, size: int, iterations: int) -> Path:
    """`pairs` pairs cycling over the sample contents x styles (two output shapes), images and output beside it."""
    copy_samples(directory)  # inputs must lie under the manifest's directory (or NST_INPUT_ROOTS)
    entries = [
        {"id": f"p{i:03d}", "content": f"content/{CONTENTS[i % 3]}.jpg", "style": f"styles/{STYLES[(i // 3) % 3]}.jpg"}
        for i in range(pairs)
    ]
    return write_manifest(directory, entries, name=f"bench-shards-{directory.name}", size=size, iterations=iterations)


def calibrate(size: int, iterations: int, batch: int) -> dict[str, float]:
    """Seconds of a cold batch (network load + optimisation) and a warm one (optimisation) in this process."""
    from nst import storage
    from nst.engine.images import load_image
    from nst.engine.pairs import PairProblem
    from nst.engine.stylizer import Stylizer
    from nst.params import StyleParams

    def image(path: Path) -> Any:
        return load_image(path.read_bytes(), label=str(path), max_pixels=10**8)

    content, style = image(SAMPLES / "content" / "chelsea.jpg"), image(SAMPLES / "styles" / "brick.jpg")
    params = StyleParams(size=size, iterations=iterations)
    stylizer = Stylizer(read_bytes=storage.read_bytes)
    times = []
    for _ in range(4):  # cold, then warm three times (the best of them: this machine is shared)
        start = time.perf_counter()
        stylizer.stylize([PairProblem(content, [style], params, f"p{i}") for i in range(batch)])
        times.append(time.perf_counter() - start)
    warm = min(times[1:])
    return {"cold_s": times[0], "warm_s": warm, "model_load_s": max(0.0, times[0] - warm)}


def shard_timings(server: PrefectServer, child: Any, output: Path) -> dict[str, float]:
    """One child shard's phases (seconds), from its state history, its task runs and its pairs' records."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with server.client() as client:
        states = client.read_flow_run_states(child.id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child.id])))
    at: dict[str, Any] = {}
    for state in sorted(states, key=lambda s: s.timestamp):
        at.setdefault(state.type.value, state.timestamp)
    end = max(s.timestamp for s in states)
    batches = [t for t in tasks if t.start_time and t.end_time]
    first_task = min(t.start_time for t in batches)
    last_task = max(t.end_time for t in batches)
    ids = child.parameters["options"]["pair_ids"]
    engine = sum(json.loads((output / f"{i}.json").read_text())["seconds"] for i in ids)
    return {
        "pairs": len(ids),
        "pickup_s": (at["PENDING"] - at["SCHEDULED"]).total_seconds(),
        "startup_s": (at["RUNNING"] - at["PENDING"]).total_seconds(),
        "plan_s": (first_task - at["RUNNING"]).total_seconds(),
        "tasks_s": (last_task - first_task).total_seconds(),
        "engine_s": engine,
        "finish_s": (end - last_task).total_seconds(),
        "pending_to_end_s": (end - at["PENDING"]).total_seconds(),
    }


def wait_online(server: PrefectServer, pool: str, count: int, timeout: float = 180) -> None:
    """Until `count` workers of `pool` are online (so start-up of the worker processes is not measured)."""
    deadline = time.monotonic() + timeout
    while True:
        with server.client() as client:
            online = [w for w in client.read_workers_for_work_pool(pool) if str(w.status.value) == "ONLINE"]
        if len(online) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(online)} of {count} workers online on {pool}")
        time.sleep(1)


def run_once(
    server: PrefectServer, work: Path, workers: int, args: argparse.Namespace, worker_env: dict[str, str]
) -> dict[str, Any]:
    """One sharded run of a fresh manifest on `workers` GPU-pool workers; its throughput and per-shard phases."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    started: list[Worker] = []
    try:
        for i in range(workers):
            home = work / f"gpu{workers}-{i}"
            started.append(start_process_worker(server, "gpu-pool", home, env=worker_env, cwd=REPO, limit=1))
        wait_online(server, "gpu-pool", workers)
        manifest = shards_manifest(work / f"run{workers}", args.pairs, args.size, args.iterations)
        with server.client() as client:
            deployment = client.read_deployment_by_name("shard-manifest/on-demand")
            parameters = {
                "manifest": str(manifest),
                "shards": args.shards,
                "options": {"max_batch_pairs": args.batch},
            }
            parent_id = client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id
        parent = wait_for_flow_run(server, parent_id, timeout=3600)
        if not parent.state.is_completed():
            raise RuntimeError(f"parent {parent_id} ended {parent.state_name}: {parent.state.message}")
        with server.client() as client:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
            )
            first_child_start = min(
                s.timestamp for c in children for s in client.read_flow_run_states(c.id) if s.type.value == "SCHEDULED"
            )
        shards = [shard_timings(server, c, manifest.parent / "out") for c in children]
        # Children's span: from the first shard scheduled to the last one's end (the parent's own planning excluded).
        span = (max(c.end_time for c in children) - first_child_start).total_seconds()
        wall = (parent.end_time - parent.start_time).total_seconds()
        return {
            "workers": workers,
            "pairs": args.pairs,
            "shards": len(children),
            "size": args.size,
            "iterations": args.iterations,
            "batch": args.batch,
            "query_seconds": args.query_seconds,
            "parent_wall_s": round(wall, 1),
            "shards_span_s": round(span, 1),
            "pairs_per_hour": round(args.pairs / wall * 3600),
            "pairs_per_hour_shards": round(args.pairs / span * 3600),
            "median": {k: round(statistics.median(s[k] for s in shards), 2) for k in shards[0]},
            "per_shard": [{k: round(v, 2) for k, v in s.items()} for s in shards],
        }
    finally:
        for worker in started:
            stop_process(worker.proc, grace_s=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="GPU-pool worker counts to run")
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="max_batch_pairs")
    parser.add_argument(
        "--query-seconds", type=float, default=10.0, help="PREFECT_WORKER_QUERY_SECONDS (Prefect's default: 10)"
    )
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)

    calibration = {k: round(v, 2) for k, v in calibrate(args.size, args.iterations, args.batch).items()}
    lines = [{"calibration": calibration, "batch": args.batch, "size": args.size, "iterations": args.iterations}]
    worker_env = {
        "PREFECT_WORKER_QUERY_SECONDS": str(args.query_seconds),
        "PREFECT_WORKER_PREFETCH_SECONDS": "10",
        "CUDA_VISIBLE_DEVICES": "",
    }
    with tempfile.TemporaryDirectory(prefix="nst-bench-shards-") as tmp:
        work = Path(tmp)
        server = start_server(work / "server")
        parent_worker = None
        try:
            setup = subprocess.run(
                [sys.executable, str(REPO / "deploy" / "setup.py"), "--gpu-shards", str(max(args.workers))],
                env=server.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if setup.returncode != 0:
                raise RuntimeError(setup.stdout + setup.stderr)
            deploy_all(server, REPO)
            parent_worker = start_process_worker(server, "parent-pool", work / "parent", env=worker_env, cwd=REPO)
            for workers in args.workers:
                lines.append(run_once(server, work, workers, args, worker_env))
                print(json.dumps(lines[-1]), flush=True)
        finally:
            if parent_worker is not None:
                stop_process(parent_worker.proc, grace_s=30)
            assert server.proc is not None
            stop_process(server.proc)
    print(json.dumps(lines[0]), flush=True)
    if args.out:
        with args.out.open("a") as out:
            for line in lines:
                out.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
