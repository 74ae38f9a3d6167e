"""Single scale against the coarse-to-fine schedule at (about) equal wall time, one pair, judged on the two axes.

    nice -n 10 taskset -c 1 python -m bench.coarse_to_fine --size 512 --single 40 --scales 3 \
        --out docs/quality/coarse-to-fine-512.jsonl --sheet docs/quality/coarse-to-fine-512.jpg

Single-thread CPU. The single-scale run takes `--single` iterations; the schedule (`--scales`, each finer scale half
the steps of the one before) gets as many steps as cost the same by pixels (4x fewer per halving), and both are timed.
Each final image is judged at the output size by bench.quality's GatysJudge (content_err, style_err, Gatys total).
One JSON line per run; the sheet shows content, style, single scale, schedule, and a 1:1 crop of each result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from bench.quality import GatysJudge, Pair, painting_pairs
from nst.engine.color import image_to_tensor
from nst.engine.images import resize_long_side
from nst.engine.pairs import PairProblem
from nst.engine.stylizer import Stylizer
from nst.params import StyleParams, canonical_params, resolve_params
from nst.schedule import scale_iterations


def equal_cost_iterations(single: int, scales: int) -> int:
    """Steps of a `scales`-scale schedule that cost about `single` steps at the output size (cost ~ pixels)."""
    shares = scale_iterations(1000 * scales, scales)
    per_step: float = sum(n / 4.0 ** (scales - 1 - k) for k, n in enumerate(shares)) / sum(shares)
    return max(scales, round(single / per_step))


def run(
    stylizer: Stylizer, pair: Pair, size: int, scales: int, iterations: int, style_weight: float | None = None
) -> tuple[Image.Image, float]:
    """One stylization with the defaults at this size, scales and iterations; the image and its wall seconds."""
    values = {"size": size, "scales": scales, "iterations": iterations, "style_weight": style_weight}
    params = canonical_params(resolve_params(values))
    started = time.perf_counter()
    (result,) = stylizer.stylize([PairProblem(pair.content, [pair.style], params, pair.id)])
    assert result.image is not None, result.error
    return result.image, time.perf_counter() - started


def sheet(pair: Pair, images: list[tuple[str, Image.Image]], size: int) -> Image.Image:
    """Content, style and each result in a row (labels of up to two lines); below, each result's centre at 1:1."""
    tile, crop, head = 256, 256, 30
    row = [("content", pair.content), ("style", pair.style), *images]
    out = Image.new("RGB", (tile * len(row), tile * 2 + head), "white")
    draw = ImageDraw.Draw(out)
    for i, (label, img) in enumerate(row):
        out.paste(resize_long_side(img, tile).convert("RGB"), (i * tile, head))
        draw.multiline_text((i * tile + 4, 2), label, fill="black", spacing=1)
    for i, (_, img) in enumerate(images, start=2):
        w, h = img.size
        box = ((w - crop) // 2, (h - crop) // 2, (w + crop) // 2, (h + crop) // 2)
        out.paste(img.crop(box).convert("RGB"), (i * tile, tile + head))
    draw.text((4, tile + head + 4), f"below: centre {crop} px of the {size} px results, 1:1", fill="black")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--single", type=int, default=40, help="iterations of the single-scale run")
    parser.add_argument("--scales", type=int, default=3)
    parser.add_argument("--schedule-iterations", type=int, help="the schedule's steps (default: equal cost by pixels)")
    parser.add_argument("--only", choices=["single", "schedule"], help="run only this one")
    parser.add_argument("--style-weight", type=float, help="default: the project's")
    parser.add_argument("--pair", default="amber__candy")
    parser.add_argument("--out", help="append the JSON lines here")
    parser.add_argument("--sheet", help="write the side-by-side pictures here (jpg)")
    parser.add_argument("--keep", help="also save each result as PNG in this folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pair = next(p for p in painting_pairs() if p.id == args.pair)
    stylizer, judge = Stylizer(), GatysJudge(torch.device("cpu"))
    run(stylizer, pair, 64, 1, 1)  # the network loaded and warm: not timed below
    schedule_steps = args.schedule_iterations or equal_cost_iterations(args.single, args.scales)
    images: list[tuple[str, Image.Image]] = []
    runs = [("single", 1, args.single), ("schedule", args.scales, schedule_steps)]
    for label, scales, iterations in [r for r in runs if args.only in (None, r[0])]:
        image, seconds = run(stylizer, pair, args.size, scales, iterations, args.style_weight)
        content = image_to_tensor(pair.content.resize(image.size, Image.Resampling.LANCZOS))
        style = image_to_tensor(resize_long_side(pair.style, max(image.size)))
        judged = judge.measures(image_to_tensor(image), judge.targets(content, style))
        line: dict[str, Any] = {
            "bench": "coarse_to_fine",
            "pair": pair.id,
            "size": args.size,
            "run": label,
            "scales": scales,
            "iterations": iterations,
            "style_weight": args.style_weight or StyleParams().style_weight,
            "per_scale": scale_iterations(iterations, scales),
            "seconds": round(seconds, 1),
            "content_err": round(judged["content_err"], 4),
            "style_err": round(judged["style_err"], 4),
            "gatys_total": float(f"{judged['gatys']['total']:.4g}"),
        }
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(line) + "\n")
        images.append((f"{label}: {iterations} it, {seconds:.0f} s", image))
        if args.keep:
            name = f"{pair.id}-{args.size}-{label}-{iterations}-sw{args.style_weight or 'default'}.png"
            image.save(Path(args.keep) / name)
    if args.sheet:
        Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
        sheet(pair, images, args.size).save(args.sheet, quality=88)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
