"""Whole-process seconds per pair, ours against neural-style-pt, interleaved A B C A B C with the same thread count.

Each run is one fresh process (interpreter start, imports, weights, the run, the PNG write), timed from outside:

    python -m bench.cpu_ab --neural-style-pt /path/to/neural-style-pt --rounds 2 --out docs/bench/quality-cpu-ab.jsonl

Variants: `ours-fp32`, `ours-bf16` (`nst stylize` with the defaults and that precision) and `neural-style-pt` (its
defaults, `-gpu c`, the same converted VGG19 that bench/quality.py gives it). Prints one JSON line per run and a
summary with each variant's median and its ratio to neural-style-pt.
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
from collections.abc import Sequence
from pathlib import Path

from bench.quality import PAINTINGS, convert_weights_for_neural_style_pt

VARIANTS = ("ours-fp32", "ours-bf16", "neural-style-pt")


def command(variant: str, content: Path, style: Path, size: int, iterations: int, out: Path, nspt: Path) -> list[str]:
    """The command line of one variant."""
    if variant.startswith("ours"):
        precision = variant.removeprefix("ours-")
        ours = ["-m", "bench.cpu_ab", "--one", str(content), str(style), str(out), str(size), str(iterations)]
        return [sys.executable, *ours, precision]
    model = convert_weights_for_neural_style_pt()
    inputs = ["-content_image", str(content), "-style_image", str(style), "-output_image", str(out)]
    options = ["-image_size", str(size), "-num_iterations", str(iterations), "-gpu", "c", "-model_file", str(model)]
    quiet = ["-disable_check", "-seed", "0", "-print_iter", "0", "-save_iter", "0"]
    return [sys.executable, str(nspt / "neural_style.py"), *inputs, *options, *quiet]


def stylize_one(argv: Sequence[str]) -> int:
    """One pair with the product's defaults, as `nst stylize` runs it (engine, PNG write): content style out size
    iterations precision."""
    from nst.engine.images import load_image
    from nst.engine.stylizer import stylize
    from nst.params import resolve_params

    content, style, out, size, iterations, precision = argv
    params = resolve_params({"size": int(size), "iterations": int(iterations), "precision": precision, "device": "cpu"})
    load = [load_image(Path(p), label=p, max_pixels=10**8) for p in (content, style)]
    result = stylize(load[0], load[1:], params)
    assert result.image is not None, result.error
    result.image.save(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--one"]:
        return stylize_one(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neural-style-pt", type=Path, required=True, help="a neural-style-pt checkout")
    parser.add_argument("--content", type=Path, default=PAINTINGS / "amber.jpg")
    parser.add_argument("--style", type=Path, default=PAINTINGS / "candy.jpg")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP/MKL threads for every run")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    out_file = args.out.open("w") if args.out else None
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for variant in args.variants.split(","):
                out = Path(tmp) / f"{variant}-{rnd}.png"
                cmd = command(variant, args.content, args.style, args.size, args.iterations, out, args.neural_style_pt)
                start = time.perf_counter()
                cwd = args.neural_style_pt if "neural" in variant else None
                proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    raise SystemExit(f"{variant} failed:\n{proc.stderr[-2000:]}")
                seconds.setdefault(variant, []).append(wall)
                record = {"kind": "run", "variant": variant, "round": rnd, "seconds": wall, "threads": args.threads}
                line = json.dumps({**record, "size": args.size, "iterations": args.iterations})
                print(line, flush=True)
                if out_file is not None:
                    out_file.write(line + "\n")
                    out_file.flush()
    medians = {v: statistics.median(s) for v, s in seconds.items()}
    reference = medians.get("neural-style-pt")
    summary = {
        "kind": "summary",
        "median_seconds": medians,
        "speed_vs_neural_style_pt": {v: reference / m for v, m in medians.items()} if reference else None,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(summary), flush=True)
    if out_file is not None:
        out_file.write(json.dumps(summary) + "\n")
        out_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
