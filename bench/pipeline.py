"""GPU-busy fraction of the whole batch runner: optimisation time / wall time on a 64-pair manifest on local disk.

The manifest is generated into a temporary directory from the sample images (manifests/images/: three contents of two
shapes x three styles), so batches form as they would in production (same shape and parameters). Optimisation time
is the union of the intervals spent inside `stylize_batch` (nst.engine.optimize); everything else (hashing inputs,
decoding, resizing, PNG encoding, JSON records, the runner's own overhead) is what keeps the GPU idle. Target: >= 90 %.
Each batch's first step (loss targets, torch.compile for a new shape, cuDNN autotuning) keeps the GPU mostly idle
too: `busy_fraction_steady` counts it as idle, `busy_fraction` as busy.

GPU:        python bench/pipeline.py --out docs/bench/pipeline-h100.jsonl
CPU proxy:  python bench/pipeline.py --cpu
Runners: `batch` (nst.run.run, the plain run path: one batch after another) and `flow` (the Prefect flow
flows.stylize.stylize_manifest, which overlaps one batch's I/O with another's optimisation).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import nst.engine.optimize
from nst.engine.memory import auto_batch_pairs
from nst.params import resolve_params
from nst.run_options import RunOptions
from nst_testing.manifests import copy_samples, write_manifest


def pipeline_manifest(directory: Path, pairs: int, size: int, iterations: int) -> Path:
    """A manifest of `pairs` pairs cycling over copies of the sample contents x styles, output beside it."""
    copy_samples(directory)
    contents = sorted(p.name for p in (directory / "content").glob("*.jpg"))
    styles = sorted(p.name for p in (directory / "styles").glob("*.jpg"))
    combos = [(c, s) for c in contents for s in styles]
    entries = []
    for i in range(pairs):
        c, s = combos[i % len(combos)]
        entries.append(
            {"id": f"p{i:03d}-{c[:-4]}-{s[:-4]}", "content": f"content/{c}", "style": f"styles/{s}", "seed": i}
        )
    defaults = {"preset": "gatys", "size": size, "iterations": iterations, "log_every": 50}
    return write_manifest(directory, entries, name="bench-pipeline", **defaults)


class IntervalTimer:
    """Records the [start, end] host-time intervals of calls to a function (thread-safe)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.intervals: list[tuple[float, float]] = []
        self.first_steps: list[float] = []  # per call: start -> first step done (targets, compile, autotuning)
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            inner = kwargs.get("callback")

            def callback(event: Any) -> None:
                if event.iteration == 1:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    with self._lock:
                        self.first_steps.append(time.perf_counter() - start)
                if inner is not None:
                    inner(event)

            kwargs["callback"] = callback
            try:
                return fn(*args, **kwargs)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                with self._lock:
                    self.intervals.append((start, time.perf_counter()))

        return timed

    def busy_seconds(self) -> float:
        """Length of the union of the intervals (overlapping calls on one device count once)."""
        total, end = 0.0, -float("inf")
        for a, b in sorted(self.intervals):
            if b <= end:
                continue
            total += b - max(a, end)
            end = b
        return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the manifest, run it with the chosen runner, and measure busy time against wall time."""
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    params = resolve_params({"preset": "gatys", "size": args.size, "iterations": args.iterations})
    batch = args.max_batch_pairs
    if batch == "auto":
        batch = auto_batch_pairs(args.size, args.size, params, device)
    batch = int(batch)
    timer = IntervalTimer(device)
    original = nst.engine.optimize.stylize_batch
    nst.engine.optimize.stylize_batch = timer.wrap(original)  # Stylizer.stylize calls it through the module
    try:
        with tempfile.TemporaryDirectory(prefix="nst-bench-pipeline-") as tmp:
            manifest = pipeline_manifest(Path(tmp), args.pairs, args.size, args.iterations)
            start = time.perf_counter()
            options = RunOptions(force=True, max_batch_pairs=batch)
            if args.runner == "flow":
                from flows.stylize import stylize_manifest

                stylize_manifest(manifest=str(manifest), options=options, return_state=True)
            else:
                from nst.run import run as run_path

                run_path(str(manifest), options)
            wall = time.perf_counter() - start
            written = len(list((Path(tmp) / "out").glob("*.png")))
    finally:
        nst.engine.optimize.stylize_batch = original
    busy = timer.busy_seconds()
    first = min((a for a, _ in timer.intervals), default=start)
    return {
        "kind": "pipeline",
        "runner": args.runner,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "pairs": args.pairs,
        "images_written": written,
        "size": args.size,
        "iterations": args.iterations,
        "max_batch_pairs": batch,
        "batches": len(timer.intervals),
        "wall_s": round(wall, 2),
        "optimisation_s": round(busy, 2),
        "busy_fraction": round(busy / wall, 4),
        "before_first_batch_s": round(first - start, 2),
        "busy_fraction_after_first_batch_start": round(busy / (start + wall - first), 4),
        "first_steps_s": round(sum(timer.first_steps), 2),
        "busy_fraction_steady": round((busy - sum(timer.first_steps)) / wall, 4),
        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--cpu", action="store_true", help="tiny CPU proxy: 32 px, 5 iterations")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--size", type=int, help="output long side (default 512, --cpu 32)")
    p.add_argument("--iterations", type=int, help="iterations per pair (default 500, --cpu 5)")
    p.add_argument("--runner", choices=["batch", "flow"], default="batch")
    p.add_argument(
        "--max-batch-pairs", default="auto", help="pairs per batch, or auto (nst.engine.memory.auto_batch_pairs)"
    )
    p.add_argument("--out", type=Path, help="append the JSON line to this file")
    args = p.parse_args(argv)
    args.size = args.size or (32 if args.cpu else 512)
    args.iterations = args.iterations or (5 if args.cpu else 500)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.runner == "flow":
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    record = run(args)
    line = json.dumps(record)
    print(line, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(line + "\n")
    print(
        f"\n{record['runner']}: {record['pairs']} pairs in {record['batches']} batches, wall {record['wall_s']} s, "
        f"optimising {record['optimisation_s']} s -> busy {100 * record['busy_fraction']:.1f} % "
        f"({100 * record['busy_fraction_after_first_batch_start']:.1f} % after the first batch started)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
