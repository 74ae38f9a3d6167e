"""Seconds per step (forward + backward, `LossStep`) at one size, plain and recomputing activations alternately in one
process, one thread; prints one JSON line (docs/performance.md, "Recomputing activations in the backward pass").

Usage: `OMP_NUM_THREADS=1 python -m bench.recompute_cost --size 512 --reps 5`. Random content and style images, the
project's default parameters at that size; the first recomputing call (it loads torch._dynamo) is not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nst.engine.fastpath import FastPath, LossStep
from nst.engine.losses import loss_normalization
from nst.engine.optimize import build_targets, initial_images
from nst.engine.pairs import PairProblem
from nst.engine.vgg import load_vgg
from nst.params import resolve_params


def main() -> None:
    """Time `--reps` plain and `--reps` recomputing steps, alternately, and print their medians and the cost."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = resolve_params({"size": args.size})
    vgg, _ = load_vgg("vgg19", None, layers=[*params.content_layers, *params.style_layers])
    gen = torch.Generator().manual_seed(0)
    side = args.size
    image = torch.rand(1, 3, side, side, generator=gen)
    problems = [PairProblem(image, [torch.rand(1, 3, side, side, generator=gen)], params)]
    cpu = torch.device("cpu")
    targets = build_targets(problems, vgg, side, side, 1.0, cpu, None)
    step = LossStep(vgg, FastPath(), loss_normalization(params.normalization))
    x = vgg.to_model(initial_images(problems, side, side, cpu)).detach().requires_grad_(True)
    alive = torch.ones(1, dtype=torch.bool)
    step(x, targets, alive, True)  # loads torch._dynamo once: not timed
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.reps):
        for recompute in (False, True):
            x.grad = None
            began = time.perf_counter()
            step(x, targets, alive, recompute)
            times[recompute].append(time.perf_counter() - began)
    plain, recomputing = statistics.median(times[False]), statistics.median(times[True])
    out = {
        "size": side,
        "reps": args.reps,
        "plain_s": [round(t, 2) for t in times[False]],
        "recompute_s": [round(t, 2) for t in times[True]],
        "median_plain_s": round(plain, 2),
        "median_recompute_s": round(recomputing, 2),
        "cost": round(recomputing / plain - 1, 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
