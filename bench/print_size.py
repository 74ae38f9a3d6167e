"""Issue 30 at print size: our coarse-to-fine default against one scale and neural-style-pt's multires recipe.

Pairs: pytorch/examples' photo with its four paintings, each at its full resolution (bench/images/full). Per style
weight (--weights), our default (coarse-to-fine from 1024 px: 256 -> 512 -> 1024) and our engine at one scale each run
--iterations steps, the pairs in one batch as `nst run` batches them, keeping an image every --iterations / 20 steps
(on a GPU every shape is compiled and autotuned first, untimed). neural-style-pt (an external checkout) runs the recipe
of its examples/scripts/starry_stanford.sh: 1000 -> 500 -> 200 steps at size / 4 -> size / 2 -> size, each
`-init image` from the last, `-tv_weight 0`, `-style_weight 500`, cuDNN autotuned on a GPU; its seconds are its
optimisation's (from "Running optimization" to its last step, summed over the three processes). Every image is judged
at the output size by bench.quality's GatysJudge (coarse images upsampled, as the next scale starts from them); each
final image (and each image at the schedule's time) is also judged taken down to --smaller long sides (default size/2
and size/4: `judged_smaller`), where the coarse scales' motifs are, which a Gram at the output size barely sees.

Issue 30's goals, per pair (`"kind": "print_size_pair"`):
- `schedule_vs_single`: the schedule at the default weight against the single-scale frontier: its style_err over the
  frontier's at its content_err (goal: <= 1.0), and its seconds over the single scale's at that weight (<= 1/3);
- `equal_time`: every other run's image at the schedule's time (its last checkpoint by then) against the schedule's
  frontier: our style_err at its content_err over its style_err (goal: <= 0.8);
- `equal_time_smaller`: the same with every image taken down to each --smaller side (the schedule's final images
  against the others' at the schedule's time), where the coarse scales' motifs are judged.

    python -m bench.print_size --workdir W --out W/ours.jsonl                                  # ours (a GPU)
    python -m bench.print_size --series nspt --neural-style-pt /tmp/nspt --reference W/ours.jsonl \\
        --workdir W --out W/nspt.jsonl
    python -m bench.print_size --replot W/ours.jsonl W/nspt.jsonl --workdir W --sheets docs/quality/print-size \\
        --markdown
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench import coarse_to_fine, quality
from bench.frontier import interpolate
from nst.engine.images import resize_long_side
from nst.params import StyleParams
from nst.schedule import default_scales, schedule

FULL = quality.PAINTINGS / "full"  # the pytorch/examples originals (bench/images keeps them downscaled)
SCHEDULE, SINGLE, NSPT = "ours coarse-to-fine", "ours one scale", "neural-style-pt multires"
SERIES = {"schedule": SCHEDULE, "single": SINGLE, "nspt": NSPT}
NSPT_STEPS = (1000, 500, 200)  # starry_stanford.sh at 256, 512, 1024 px
NSPT_WEIGHT = 500.0  # its -style_weight there


def full_pairs() -> list[quality.Pair]:
    """pytorch/examples' photo with each of its four paintings, at their full resolution."""
    return [quality.load_pair(FULL / quality.PAINTING_CONTENT, FULL / s) for s in quality.PAINTING_STYLES]


def our_scales(series: str, args: argparse.Namespace) -> int:
    """The scales of one of our series: one for `single`, else --scales or the project's default at --size."""
    return 1 if series == "single" else args.scales or default_scales(args.size)


def run_ours(
    pairs: Sequence[quality.Pair], size: int, iterations: int, weight: float, scales: int
) -> list[dict[str, Any]]:
    """Our defaults at this style weight and number of scales, the pairs batched as `nst run` batches them."""
    config = f"defaults:style_weight={weight}:scales={scales}"
    return quality.run_ours(config, None, pairs, size, iterations, max(1, iterations // 20))


def run_multires(
    checkout: Path, pair: quality.Pair, size: int, steps: Sequence[int], weight: float, workdir: Path
) -> dict[str, Any]:
    """neural-style-pt's multires recipe for one pair: each stage twice the last's size, from its image."""
    gpu = ["-backend", "cudnn", "-cudnn_autotune"] if torch.cuda.is_available() else []
    curve: list[tuple[int, float, Image.Image]] = []
    done, seconds, process_seconds, init = 0, 0.0, 0.0, None
    for k, n in enumerate(steps):
        side = max(1, round(size / 2 ** (len(steps) - 1 - k)))
        out = workdir / "nspt" / f"multires-{weight:g}-{pair.id}-{side}.png"  # and its intermediates beside it
        out.parent.mkdir(parents=True, exist_ok=True)
        extra = ["-style_weight", f"{weight:g}", "-tv_weight", "0", *gpu]
        extra += ["-init", "image", "-init_image", str(init.resolve())] if init is not None else []
        run = quality.neural_style_pt_process(checkout, pair, side, n, max(1, n // 10), out, extra)
        curve += [(done + it, seconds + sec, img) for it, sec, img in run.curve]
        done, seconds, process_seconds = done + n, seconds + run.seconds, process_seconds + run.process_seconds
        init = out
    return {
        "pair": pair.id,
        "status": "succeeded",
        "image": curve[-1][2],
        "curve": curve,
        "seconds": seconds,
        "process_seconds": process_seconds,
    }


def at_time(curve: Sequence[Sequence[float]], seconds: float) -> Sequence[float] | None:
    """The last (iteration, seconds, content_err, style_err) checkpoint at or before `seconds`; None if none was."""
    by_then = [p for p in curve if not math.isnan(p[1]) and p[1] <= seconds]
    return max(by_then, key=lambda p: p[1]) if by_then else None


def schedule_seconds(rows: Sequence[dict[str, Any]], weight: float) -> dict[str, float]:
    """Per pair, the seconds of the schedule at this weight: the time every other run is judged at."""
    return {r["pair"]: r["seconds"] for r in rows if r["series"] == SCHEDULE and r["weight"] == weight}


def judged_smaller(
    judge: quality.GatysJudge,
    cache: dict[tuple[str, tuple[int, int]], dict[str, Any]],
    pair: quality.Pair,
    image: Image.Image,
    sides: Sequence[int],
) -> dict[str, tuple[float, float]]:
    """(content_err, style_err) of `image` taken down to each long side in `sides` (the motifs' scale: a Gram at the
    output size sees only strokes), judged against the content and the painting at that side."""
    judged = {}
    for side in sides:
        final, _ = quality.judge_run(judge, pair, resize_long_side(image, side), [], cache)
        judged[str(side)] = (final["content_err"], final["style_err"])
    return judged


def judged_row(
    judge: quality.GatysJudge,
    cache: dict[tuple[str, tuple[int, int]], dict[str, Any]],
    pair: quality.Pair,
    series: str,
    weight: float,
    record: dict[str, Any],
    reference: dict[str, float],
    workdir: Path,
    smaller: Sequence[int] = (),
) -> dict[str, Any]:
    """One run judged at the output size (and its final image at each side in `smaller`), its final image (and its
    image at the schedule's time, judged the same) saved in workdir."""
    final, points = quality.judge_run(judge, pair, record["image"], record["curve"], cache)
    stem = f"{series.replace(' ', '_')}-{weight:g}-{pair.id}"
    record["image"].save(workdir / f"{stem}.jpg", quality=95)  # judged above from the image itself
    row: dict[str, Any] = {"kind": "print_size_run", "series": series, "weight": weight, "pair": pair.id}
    row |= {"size": max(record["image"].size), "seconds": record["seconds"]}
    row |= {"process_seconds": record.get("process_seconds"), "batch": record.get("batch", 1)}
    row |= {
        "content_err": final["content_err"],
        "style_err": final["style_err"],
        "gatys_total": final["gatys"]["total"],
    }
    row["curve"] = [(p.iteration, p.seconds, p.content_err, p.style_err) for p in points]
    row["image"] = f"{stem}.jpg"
    row["judged_smaller"] = judged_smaller(judge, cache, pair, record["image"], smaller)
    if series != SCHEDULE and pair.id in reference:
        point = at_time(row["curve"], reference[pair.id])
        images = {it: img for it, _, img in record["curve"]}  # the judged curve's iterations
        if point is not None:
            at = images[int(point[0])].resize(record["image"].size, Image.Resampling.BICUBIC)
            at.save(workdir / f"{stem}-at.jpg", quality=95)
            row["image_at_schedule_time"] = f"{stem}-at.jpg"
            row["judged_smaller_at_schedule_time"] = judged_smaller(judge, cache, pair, at, smaller)
    return row


def run_series(
    args: argparse.Namespace, pairs: list[quality.Pair], reference_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every run asked for, judged: the schedule first, so that the others know its time."""
    judge = quality.GatysJudge(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cache: dict[tuple[str, tuple[int, int]], dict[str, Any]] = {}
    by_id = {p.id: p for p in pairs}
    rows: list[dict[str, Any]] = []
    if torch.cuda.is_available():  # compile and autotune every shape before anything is timed
        for scales in {our_scales(k, args) for k in ("schedule", "single") if k in args.series}:
            run_ours(pairs, args.size, max(2, scales), args.default_weight, scales)
    for key in [k for k in SERIES if k in args.series]:
        series = SERIES[key]
        for weight in args.nspt_weights if key == "nspt" else args.weights:
            if key == "nspt":
                records = [
                    run_multires(args.neural_style_pt, p, args.size, args.nspt_steps, weight, args.workdir)
                    for p in pairs
                ]
            else:
                records = run_ours(pairs, args.size, args.iterations, weight, our_scales(key, args))
            reference = schedule_seconds([*reference_rows, *rows], args.default_weight)
            for record in records:
                pair = by_id[record["pair"]]
                row = judged_row(judge, cache, pair, series, weight, record, reference, args.workdir, args.smaller)
                if key != "nspt":
                    w, h = record["image"].size
                    steps = schedule(h, w, our_scales(key, args), args.iterations, StyleParams().init)
                    row["schedule"] = [x.to_dict() for x in steps]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
                if args.out:  # as it comes: a run cut short (a device command's time limit) keeps what it measured
                    with args.out.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
    return rows


def pair_summary(rows: Sequence[dict[str, Any]], pair: str, weight: float) -> dict[str, Any]:
    """Issue 30's two goals for one pair: the schedule against the single-scale frontier, and everyone at its time."""
    mine = [r for r in rows if r["pair"] == pair]
    fronts = {s: [(r["content_err"], r["style_err"]) for r in mine if r["series"] == s] for s in (SCHEDULE, SINGLE)}
    main = next((r for r in mine if r["series"] == SCHEDULE and r["weight"] == weight), None)
    single = next((r for r in mine if r["series"] == SINGLE and r["weight"] == weight), None)
    summary: dict[str, Any] = {"kind": "print_size_pair", "pair": pair, "weight": weight}
    if main is not None and single is not None:
        at = interpolate(fronts[SINGLE], main["content_err"])  # None outside the frontier: no claim either way
        summary["schedule_vs_single"] = {
            "frontier_ratio": main["style_err"] / at if at is not None else None,
            "time_fraction": main["seconds"] / single["seconds"],
        }
    equal_time = []
    for r in mine:
        if main is None or r["series"] == SCHEDULE:
            continue
        point = at_time(r["curve"], main["seconds"])
        entry: dict[str, Any] = {"series": r["series"], "weight": r["weight"], "ratio": None}
        if point is not None:
            at = interpolate(fronts[SCHEDULE], point[2], bound=True)
            entry |= {"iteration": point[0], "seconds": point[1], "content_err": point[2], "style_err": point[3]}
            entry["ratio"] = at / point[3] if at is not None else None
        equal_time.append(entry)
    summary["equal_time"] = equal_time
    summary["worst_equal_time"] = _worst(equal_time)
    if main is not None:
        summary["equal_time_smaller"] = equal_time_smaller(mine, main)
        summary["worst_equal_time_smaller"] = {k: _worst(v) for k, v in summary["equal_time_smaller"].items()}
    return summary


def equal_time_smaller(mine: Sequence[dict[str, Any]], main: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Goal 2's ratios with every image taken down to each side in the schedule's `judged_smaller`: the schedule's
    frontier there against each other run's image at the schedule's time judged there (<= 0.8 is ours ahead)."""
    ratios: dict[str, list[dict[str, Any]]] = {}
    for side in main.get("judged_smaller", {}):
        front: list[tuple[float, float]] = []
        for r in mine:
            if r["series"] == SCHEDULE and side in r.get("judged_smaller", {}):
                content_err, style_err = r["judged_smaller"][side]
                front.append((content_err, style_err))
        ratios[side] = []
        for r in mine:
            theirs = r.get("judged_smaller_at_schedule_time", {}).get(side)
            if r["series"] == SCHEDULE or theirs is None:
                continue
            at = interpolate(front, theirs[0], bound=True)
            entry = {"series": r["series"], "weight": r["weight"], "content_err": theirs[0], "style_err": theirs[1]}
            ratios[side].append(entry | {"ratio": at / theirs[1] if at is not None else None})
    return ratios


def _worst(entries: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Per series (one scale, neural-style-pt's), its worst equal-time ratio; None where none was measured."""
    return {
        s: max((e["ratio"] for e in entries if e["series"] == s and e["ratio"] is not None), default=None)
        for s in (SINGLE, NSPT)
    }


def sheet(
    rows: Sequence[dict[str, Any]], pair: quality.Pair, weights: tuple[float, float], size: int, workdir: Path
) -> Image.Image:
    """bench.coarse_to_fine's sheet of the results at `weights` (ours, neural-style-pt's): finals, and the others at
    the schedule's time."""
    cells: list[tuple[str, Image.Image]] = []
    for r in rows:
        if r["pair"] != pair.id or r["weight"] != weights[r["series"] == NSPT]:
            continue
        text = f"{r['series']} w {r['weight']:g}\nc {r['content_err']:.2f} s {r['style_err']:.3f} {r['seconds']:.0f} s"
        if (workdir / r["image"]).exists():
            cells.append((text, Image.open(workdir / r["image"]).convert("RGB")))
        at = r.get("image_at_schedule_time")
        if at and (workdir / at).exists():
            cells.append((f"{r['series']}\nat the schedule's time", Image.open(workdir / at).convert("RGB")))
    return coarse_to_fine.sheet(pair, cells, size)


def markdown(rows: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]]) -> str:
    """Per pair: the schedule's and the single scale's default points, goal 1's two ratios and goal 2's worst."""

    def point(pair: str, series: str, weight: float) -> str:
        r = next((r for r in rows if (r["pair"], r["series"], r["weight"]) == (pair, series, weight)), None)
        return f"{r['content_err']:.3f} / {r['style_err']:.4f} / {r['seconds']:.1f} s" if r else "–"

    def num(x: float | None) -> str:
        return f"{x:.2f}" if x is not None else "–"

    lines = [
        "| pair | coarse-to-fine c / s / time | one scale c / s / time | frontier ratio vs one scale (≤ 1) "
        "| time fraction (≤ 0.33) | equal time: worst ratio vs one scale / vs nspt multires (≤ 0.8) "
        "| the same judged smaller (side: vs one scale / vs nspt) |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for s in summaries:
        vs = s.get("schedule_vs_single", {})
        worst = s["worst_equal_time"]
        smaller = "; ".join(
            f"{side}: {num(w[SINGLE])} / {num(w[NSPT])}" for side, w in s.get("worst_equal_time_smaller", {}).items()
        )
        lines.append(
            f"| {s['pair'].replace('__', ' / ')} | {point(s['pair'], SCHEDULE, s['weight'])} | "
            f"{point(s['pair'], SINGLE, s['weight'])} | {num(vs.get('frontier_ratio'))} | "
            f"{num(vs.get('time_fraction'))} | {num(worst[SINGLE])} / {num(worst[NSPT])} | {smaller} |"
        )
    return "\n".join(lines)


def _worst_of(worsts: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Per series, the worst of the pairs' worst ratios; None where no pair has one."""
    return _worst([{"series": series, "ratio": ratio} for w in worsts for series, ratio in w.items()])


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _read(paths: Sequence[Path]) -> list[dict[str, Any]]:
    return [
        row
        for p in paths
        for line in p.read_text().splitlines()
        if (row := json.loads(line))["kind"] == "print_size_run"
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=500, help="our steps in all (the schedule's across scales)")
    parser.add_argument("--weights", type=_floats, default=[1.0, 3.0, 10.0], help="our style weights")
    parser.add_argument("--default-weight", type=float, default=StyleParams().style_weight)
    parser.add_argument("--scales", type=int, help="the schedule's scales (default: the project's at --size)")
    parser.add_argument("--series", default="schedule,single", help="of schedule, single, nspt; comma-separated")
    parser.add_argument("--neural-style-pt", type=Path, help="a neural-style-pt checkout (series nspt)")
    parser.add_argument("--nspt-weights", type=_floats, default=[NSPT_WEIGHT])
    parser.add_argument("--nspt-steps", type=_ints, default=list(NSPT_STEPS), help="per stage, coarse to fine")
    parser.add_argument("--reference", type=Path, nargs="*", default=[], help="earlier runs (the schedule's times)")
    parser.add_argument("--only", help="pair ids, comma-separated (default: all four)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nst-print-size"))
    parser.add_argument("--out", type=Path, help="write the runs and summaries here (JSON lines)")
    parser.add_argument("--sheets", type=Path, help="folder for one JPEG per pair: pictures and 1:1 crops")
    parser.add_argument("--markdown", action="store_true", help="print the table for docs/quality.md")
    parser.add_argument("--replot", type=Path, nargs="+", help="only summarise these files' runs")
    parser.add_argument("--smaller", type=_ints, help="also judge each final image at these long sides (size/2, /4)")
    args = parser.parse_args(argv)
    args.smaller = args.smaller if args.smaller is not None else [args.size // 2, args.size // 4]
    args.series = [s for s in args.series.split(",") if s]
    if unknown := set(args.series) - set(SERIES):
        parser.error(f"--series: unknown {', '.join(sorted(unknown))}; known: {', '.join(SERIES)}")
    if "nspt" in args.series and args.neural_style_pt is None:
        parser.error("--series nspt needs --neural-style-pt")
    pairs = [p for p in full_pairs() if args.only is None or p.id in args.only.split(",")]
    if not pairs:
        parser.error(f"--only: no such pair; known: {', '.join(p.id for p in full_pairs())}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    earlier = _read(args.reference)
    if args.replot:
        rows = _read(args.replot)
    else:
        if args.out:
            args.out.write_text("")  # run_series appends each run as it is judged
        rows = run_series(args, pairs, earlier)
    everything = [*earlier, *rows]
    summaries = [pair_summary(everything, p.id, args.default_weight) for p in pairs]
    ratios = [s["schedule_vs_single"] for s in summaries if "schedule_vs_single" in s]
    total = {
        "kind": "summary",
        "size": args.size,
        "max_frontier_ratio_vs_single": max((r["frontier_ratio"] for r in ratios if r["frontier_ratio"]), default=None),
        "max_time_fraction": max((r["time_fraction"] for r in ratios), default=None),
        "worst_equal_time": _worst_of([s["worst_equal_time"] for s in summaries]),
        "worst_equal_time_smaller": {  # the sides the runs were judged at (--replot's --smaller may differ)
            side: _worst_of([s.get("worst_equal_time_smaller", {}).get(side, {}) for s in summaries])
            for side in dict.fromkeys(side for s in summaries for side in s.get("worst_equal_time_smaller", {}))
        },
    }
    for line in [*summaries, total]:
        print(json.dumps(line))
    if args.out:
        with args.out.open("w" if args.replot else "a") as fh:
            fh.write("".join(json.dumps(line) + "\n" for line in [*(rows if args.replot else []), *summaries, total]))
    if args.markdown:
        print(markdown(everything, summaries))
    if args.sheets:
        args.sheets.mkdir(parents=True, exist_ok=True)
        for pair in pairs:
            weights = (args.default_weight, args.nspt_weights[0])
            sheet(everything, pair, weights, args.size, args.workdir).save(args.sheets / f"{pair.id}.jpg", quality=88)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
