"""The memory model (nst.engine.memory) against measured peak RSS: one fresh process per size, single thread, CPU.

    nice -n 10 taskset -c 0 python -m bench.memory_model --sizes 256,512,1024,2048 --iterations 3

Each size runs `nst.api.stylize` (project defaults, one pair: manifests/images content astronaut.jpg, a square, and
bench/images/candy.jpg) for a few iterations in its own process, so that its peak RSS (VmHWM) is its own. One JSON
line per size: the model's prediction for the process (`step_memory(...).total(1)` of
nst.engine.memory), the measured peak, their
ratio and the seconds. `--precision`, `--optimizer` and `--history-size` pass through; `--device cuda` measures
the CUDA allocator's peak instead (bench/gpu.sh large), `--schedule` runs the default coarse-to-fine schedule.
`--recompute on|off` forces recomputing activations in the backward pass (default `auto`: the engine's choice,
`nst.engine.memory.needs_recompute`); the prediction is the model of the step the engine took, and `step_seconds`
times each forward + backward (`LossStep`), where recomputing costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONTENT = ROOT / "manifests/images/content/astronaut.jpg"
STYLE = ROOT / "bench/images/candy.jpg"


def vm_kib(field: str) -> int:
    """A VmXXX line of /proc/self/status, in KiB (VmHWM: peak RSS; not ru_maxrss, which survives exec)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def instrument(recompute: str) -> tuple[list[tuple[int, int, bool]], list[float]]:
    """Force (on/off) or record the engine's recompute choice per scale, and time each forward + backward."""
    import nst.engine.fastpath as fastpath
    import nst.engine.optimize as optimize

    choices: list[tuple[int, int, bool]] = []
    step_seconds: list[float] = []
    decide, loss_step = vars(optimize)["needs_recompute"], fastpath.LossStep.__call__

    def needs_recompute(height: int, width: int, *args: Any, **kwargs: Any) -> bool:
        chosen = decide(height, width, *args, **kwargs) if recompute == "auto" else recompute == "on"
        choices.append((height, width, chosen))
        return chosen

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = loss_step(self, *args, **kwargs)
        step_seconds.append(round(time.perf_counter() - started, 2))
        return out

    vars(optimize)["needs_recompute"] = needs_recompute  # the engine looks it up in its module
    fastpath.LossStep.__call__ = timed  # type: ignore[method-assign]
    return choices, step_seconds


def measure(
    size: int, iterations: int, overrides: dict[str, Any], device: str, schedule: bool, recompute: str = "auto"
) -> dict[str, Any]:
    """Stylize one pair at `size` in this process; the prediction and the measurement (CPU: peak RSS; CUDA: the
    allocator's peak reserved bytes, which leave out the CUDA context and library handles)."""
    import torch

    torch.set_num_threads(1)
    from nst import stylize
    from nst.engine.fastpath import cpu_has_native_bf16
    from nst.engine.memory import step_memory
    from nst.params import resolve_params

    choices, step_seconds = instrument(recompute)

    # One scale unless --schedule: the model is of one step at the output size (a schedule's finest scale).
    values = {"size": size, "iterations": iterations, "device": device, **({} if schedule else {"scales": 1})}
    params = resolve_params({**values, **overrides})
    started = time.perf_counter()
    result = stylize(content=str(CONTENT), styles=[str(STYLE)], params=params)
    seconds = time.perf_counter() - started
    height, width = result.image.height, result.image.width
    recomputed = bool(choices and choices[-1][2])  # at the finest scale, whose step the model describes
    native = cpu_has_native_bf16()
    model = step_memory(height, width, result.params, device, native_bf16=native, recompute=recomputed)
    plain = step_memory(height, width, result.params, device, native_bf16=native)
    predicted = model.total(1)
    cuda = device.startswith("cuda")
    measured = torch.cuda.max_memory_reserved() if cuda else vm_kib("VmHWM") * 1024
    return {
        "bench": "memory_model",
        "size": size,
        "height": height,
        "width": width,
        "iterations": iterations,
        "schedule": result.record.get("schedule"),
        "device": result.record.get("device"),
        "precision": result.params.precision,
        "optimizer": result.params.optimizer,
        "history_size": result.params.history_size,
        "recompute": recompute,
        "recomputed": [list(c) for c in choices],
        "predicted_gib": round(predicted / 2**30, 3),
        "plain_model_gib": round(plain.total(1) / 2**30, 3),
        "model_parts_gib": {k: round(v / 2**30, 3) for k, v in vars(model).items()},
        "measured": "cuda max_memory_reserved" if cuda else "peak RSS (VmHWM)",
        "measured_gib": round(measured / 2**30, 3),
        "ratio": round(measured / predicted, 3),
        "seconds": round(seconds, 1),
        "step_seconds": step_seconds,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512,1024", help="comma-separated output sizes (long side, px)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--optimizer", choices=["lbfgs", "adam"])
    parser.add_argument("--history-size", type=int)
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--schedule", action="store_true", help="the default schedule (else one scale)")
    parser.add_argument("--recompute", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # internal: measure this size here
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "precision": args.precision,
            "optimizer": args.optimizer,
            "history_size": args.history_size,
        }.items()
        if v is not None
    }
    if args.measure:
        record = measure(args.measure, args.iterations, overrides, args.device, args.schedule, args.recompute)
        print(json.dumps(record), flush=True)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for size in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, "-m", "bench.memory_model", "--measure", str(size), "--iterations", str(args.iterations)]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
        cmd += ["--device", args.device, "--recompute", args.recompute, *(["--schedule"] if args.schedule else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            line = json.dumps({"bench": "memory_model", "size": size, "failed": done.stderr.strip()[-500:]})
        else:
            line = done.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
