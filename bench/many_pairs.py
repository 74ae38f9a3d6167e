"""A manifest of N tiny pairs (default 2,000) through the `stylize-manifest` flow on one process; prints JSON.

Figures for docs/reliability.md: plan time, wall time, task runs, peak RSS, and how fast the Prefect API answers
while the run is going (a probe thread times `read_flow_run` every 2 s). Uses the API in PREFECT_API_URL, else
Prefect's ephemeral one. Usage: `.venv/bin/python -m bench.many_pairs [--pairs 2000] [--dir /tmp/many]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_inputs(root: Path, pairs: int) -> Path:
    """`pairs` pairs as a grid of 50 contents x pairs/50 styles, 32x32 random images, one Adam step through VGG19's
    first three convolutions; returns the manifest."""
    contents, styles = 50, max(1, pairs // 50)
    rng = np.random.default_rng(0)
    for sub, n in (("content", contents), ("styles", styles)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / sub / f"{sub[0]}{i:03d}.png")
    manifest = root / "many.yaml"
    manifest.write_text(
        "version: 1\nname: many-pairs\noutput: out/\n"
        # The load is on the orchestration (tasks, records, the server), not the network: VGG19 up to relu2_1 only,
        # a third of the full network's work a pair (2,000 pairs: ~250 -> ~75 s of CPU).
        "defaults: {size: 32, iterations: 1, optimizer: adam,\n"
        "  content_layers: [relu2_1], style_layers: [relu1_1, relu2_1]}\n"
        "grid: {contents: [content/*.png], styles: [styles/*.png]}\n"
    )
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--dir", default="/tmp/nst-many-pairs")
    parser.add_argument("--max-batch-pairs", type=int, default=16)
    args = parser.parse_args()
    manifest = make_inputs(Path(args.dir), args.pairs)

    from prefect.client.orchestration import get_client

    import nst.run
    from flows.stylize import stylize_manifest
    from nst.manifest import load_manifest
    from nst.run_options import RunOptions

    options = RunOptions(max_batch_pairs=args.max_batch_pairs)
    started = time.perf_counter()
    plan = nst.run.plan(load_manifest(str(manifest)), options)
    plan_s = time.perf_counter() - started

    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with get_client(sync_client=True) as client:
            while not done.wait(2.0):
                t = time.perf_counter()
                client.read_flows(limit=1)
                latencies.append(time.perf_counter() - t)

    prober = threading.Thread(target=probe, daemon=True)
    started = time.perf_counter()
    prober.start()
    state = stylize_manifest(str(manifest), options=options, return_state=True)
    wall_s = time.perf_counter() - started
    done.set()
    prober.join(timeout=10)
    result = state.result(raise_on_failure=False) if state.is_completed() else None
    batches = nst.run.make_batches(
        plan.to_run, plan.inputs, max_pairs=options.max_batch_pairs, output=plan.manifest.output, run_id="count"
    )
    print(
        json.dumps(
            {
                "pairs": len(plan.to_run) + len(plan.skipped),
                "state": state.name,
                "counts": (result or {}).get("counts") if isinstance(result, dict) else state.message,
                "plan_s": round(plan_s, 2),
                "wall_s": round(wall_s, 1),
                "batch_tasks": len(batches),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "api_probe_ms": {
                    "n": len(latencies),
                    "median": round(1000 * statistics.median(latencies), 1) if latencies else None,
                    "max": round(1000 * max(latencies), 1) if latencies else None,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
