"""Frontiers, not points: content_err against style_err per pair, ours against neural-style-pt, over style weights.

For each pair, ours (each configuration in --configs, content init by default) runs once per --weights value, and
neural-style-pt (an external checkout, the same converted VGG19) once per --nspt-weights value and --nspt-inits
(random: its default; image: `-init image`). Every output is measured by bench/quality.py's judge. The frontier ratio
of a neural-style-pt point is our style_err at its content_err, interpolated (log-log) along our frontier, divided by
its style_err: < 1 means ours matches the photo as well and the painting better. At equal time, neural-style-pt's
point is its intermediate image at the iteration that took it as long as our whole run (--time-ratio: our
whole-process seconds over its, measured by bench/cpu_ab.py).

    python -m bench.frontier --neural-style-pt /tmp/nspt --size 256 --iterations 200 --time-ratio 0.5 \\
        --out docs/bench/quality-frontier.jsonl --plots docs/quality/frontier
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
import torch
from PIL import Image, ImageDraw

from bench import quality
from bench.gallery import THUMB, thumbnail

Point = tuple[float, float]  # (content_err, style_err)


def interpolate(frontier: Sequence[Point], content_err: float, *, bound: bool = False) -> float | None:
    """Our style_err at this content_err along the frontier (log-log, piecewise linear); None outside its range.

    With `bound`, a content_err beyond our largest gets the style_err of our point there: an upper bound, since
    allowing more content error never needs more style error.
    """
    pts = sorted(frontier)
    if bound and pts and content_err > pts[-1][0]:
        return min(s for _, s in pts)
    if not pts or not pts[0][0] <= content_err <= pts[-1][0]:
        return None
    for (c0, s0), (c1, s1) in itertools.pairwise(pts):
        if c0 <= content_err <= c1:
            if c1 == c0:
                return min(s0, s1)
            t = (math.log(content_err) - math.log(c0)) / (math.log(c1) - math.log(c0))
            return math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0)))
    return pts[0][1]


def at_iteration(curve: Sequence[quality.Checkpoint], iteration: float) -> quality.Checkpoint:
    """The checkpoint nearest to `iteration`."""
    return min(curve, key=lambda p: abs(p.iteration - iteration))


def run_series(args: argparse.Namespace, pairs: list[quality.Pair], workdir: Path) -> list[dict[str, Any]]:
    """Every run of the sweep, measured: one record per series, weight and pair."""
    judge = quality.GatysJudge(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cache: dict[tuple[str, tuple[int, int]], dict[str, Any]] = {}
    by_id = {p.id: p for p in pairs}
    runs: list[tuple[str, float, list[dict[str, Any]]]] = []
    every = max(1, args.iterations // 10)
    for config in filter(None, args.configs.split(",")):
        for w in args.weights:
            records = quality.run_ours(
                f"{config}:style_weight={w}", args.init, pairs, args.size, args.iterations, every
            )
            runs.append((f"ours {config}", w, records))
    if args.neural_style_pt is not None:
        for init in filter(None, args.nspt_inits.split(",")):
            for w in args.nspt_weights:
                records = quality.run_neural_style_pt(
                    args.neural_style_pt, pairs, args.size, args.iterations, every, workdir, style_weight=w, init=init
                )
                runs.append((f"neural-style-pt {init}", w, records))
    out = []
    for series, weight, records in runs:
        for rec in records:
            pair = by_id[rec["pair"]]
            row: dict[str, Any] = {"kind": "frontier_run", "series": series, "weight": weight, "pair": pair.id}
            row |= {"status": rec["status"], "seconds": rec["seconds"], "process_seconds": rec.get("process_seconds")}
            if rec["image"] is not None:
                final, points = quality.judge_run(judge, pair, rec["image"], rec["curve"], cache)
                row |= {"content_err": final["content_err"], "style_err": final["style_err"]}
                row |= {
                    "gatys_total": final["gatys"]["total"],
                    **quality.content_preservation(rec["image"], pair.content),
                }
                row["curve"] = [(p.iteration, p.seconds, p.content_err, p.style_err) for p in points]
                name = f"{series.replace(' ', '_')}-{weight}-{pair.id}.png"
                rec["image"].save(workdir / name)
                row["image"] = name
            out.append(row)
    return out


def pair_summary(rows: list[dict[str, Any]], pair: str, iterations: int, time_ratio: float | None) -> dict[str, Any]:
    """Frontier ratios of every neural-style-pt point of one pair, at equal iterations and at equal time."""
    mine = [r for r in rows if r["pair"] == pair and r.get("content_err") is not None]
    ours: dict[str, list[Point]] = {}
    for r in mine:
        if r["series"].startswith("ours"):
            ours.setdefault(r["series"], []).append((r["content_err"], r["style_err"]))
    summary: dict[str, Any] = {"kind": "frontier_pair", "pair": pair, "ours": {}}
    for series, frontier in ours.items():
        ratios: dict[str, list[float | None]] = {"equal_iterations": [], "equal_time": []}
        for r in mine:
            if not r["series"].startswith("neural-style-pt"):
                continue
            at = interpolate(frontier, r["content_err"], bound=True)
            ratios["equal_iterations"].append(at / r["style_err"] if at is not None else None)
            if time_ratio is not None:
                curve = [quality.Checkpoint(it, sec, math.nan, c, s) for it, sec, c, s in r["curve"]]
                point = at_iteration(curve, iterations * min(1.0, time_ratio))
                # Ours slower than it (ratio > 1) would need our intermediates; recorded as not measured.
                at_t = interpolate(frontier, point.content_err, bound=True) if time_ratio <= 1 else None
                ratios["equal_time"].append(at_t / point.style_err if at_t is not None else None)
        summary["ours"][series] = {
            key: {"ratios": v, "max": max((x for x in v if x is not None), default=None), "outside": v.count(None)}
            for key, v in ratios.items()
        }
    return summary


def plot_pair(rows: list[dict[str, Any]], pair: quality.Pair, workdir: Path, path: Path) -> None:
    """content_err vs style_err (log-log) per series, with the outputs as a contact sheet beside it."""
    mine = [r for r in rows if r["pair"] == pair.id and r.get("content_err") is not None]
    series = list(dict.fromkeys(r["series"] for r in mine))
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for name in series:
        pts = sorted((r["content_err"], r["style_err"], r["weight"]) for r in mine if r["series"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        for c, s, w in pts:
            ax.annotate(f"{w:g}", (c, s), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("content_err (relu4_2), lower keeps more of the photo")
    ax.set_ylabel("style_err (Gram, relu1_1..5_1)")
    ax.set_title(pair.id.replace("__", " / "), fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plot_path = workdir / f"plot-{pair.id}.png"
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)
    cells: list[tuple[str, list[Image.Image]]] = [("content / style", [pair.content, pair.style])]
    for name in series:
        shots = sorted((r["weight"], r["image"]) for r in mine if r["series"] == name)
        label = f"{name}  w " + " / ".join(f"{w:g}" for w, _ in shots)
        cells.append((label, [Image.open(workdir / i) for _, i in shots]))
    side = _sheet(cells)
    with Image.open(plot_path) as plot:
        canvas = Image.new("RGB", (plot.width + side.width, max(plot.height, side.height)), "white")
        canvas.paste(plot.convert("RGB"), (0, 0))
    canvas.paste(side, (plot.width, 0))
    canvas.save(path, quality=85)


def _sheet(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """A compact labelled grid (one row per series, half-size thumbnails)."""
    cell, label_h = THUMB // 2 + 4, 24
    cols = max(len(c) for _, c in rows)
    sheet = Image.new("RGB", (cols * cell + 4, len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        y = r * (cell + label_h)
        draw.text((4, y + 2), label.replace("\n", "  "), fill="black")
        for c, img in enumerate(images):
            thumb = thumbnail(img, THUMB // 2)
            sheet.paste(thumb, (4 + c * cell, y + label_h))
    return sheet


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--only", default=",".join(quality.FRONTIER_PAIRS), help="pair ids, comma-separated")
    parser.add_argument("--configs", default="defaults", help="our configurations (style_weight is swept; '' none)")
    parser.add_argument("--init", default="content", help="our init (default content)")
    parser.add_argument("--weights", type=_floats, default=[1.0, 3.0, 10.0, 30.0], help="our style weights")
    parser.add_argument("--neural-style-pt", type=Path, help="a neural-style-pt checkout")
    parser.add_argument("--nspt-weights", type=_floats, default=[25.0, 100.0, 400.0, 1600.0])
    parser.add_argument("--nspt-inits", default="random,image", help="random and/or image ('' none)")
    parser.add_argument("--time-ratio", type=float, help="our whole-process seconds / neural-style-pt's (cpu_ab)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nst-frontier"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plots", type=Path, help="folder for one JPEG per pair (plot + contact sheet)")
    parser.add_argument("--markdown", action="store_true", help="print the per-pair table for docs/quality.md")
    parser.add_argument("--default-weight", type=float, default=3.0, help="our point shown in the table")
    parser.add_argument("--replot", type=Path, nargs="+", help="only summarise and plot these files' runs")
    parser.add_argument("--gallery", type=Path, help="JPEG: per pair, ours and neural-style-pt at their defaults")
    args = parser.parse_args(argv)
    wanted = args.only.split(",")
    pairs = [p for p in quality.benchmark_pairs(quality.ALL_PAIRS) if p.id in wanted]
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        rows = [json.loads(line) for path in args.replot for line in path.read_text().splitlines()]
        rows = [r for r in rows if r["kind"] == "frontier_run"]
    else:
        rows = run_series(args, pairs, args.workdir)
    lines = [*rows, *(pair_summary(rows, p.id, args.iterations, args.time_ratio) for p in pairs)]
    maxima: dict[str, list[float]] = {}
    for line in lines:
        if line["kind"] == "frontier_pair":
            for series, v in line["ours"].items():
                for key in ("equal_iterations", "equal_time"):
                    if v[key]["max"] is not None:
                        maxima.setdefault(series, []).append(v[key]["max"])
    worst = {series: max(values) for series, values in maxima.items()}
    lines.append({"kind": "summary", "size": args.size, "iterations": args.iterations, "worst_ratio": worst})
    text = "\n".join(json.dumps(line) for line in lines if line["kind"] != "frontier_run")
    print(text)
    if args.out:
        args.out.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    if args.markdown:
        summaries = [line for line in lines if line["kind"] == "frontier_pair"]
        print(markdown(rows, summaries, args.default_weight, 100.0))
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        for pair in pairs:
            plot_pair(rows, pair, args.workdir, args.plots / f"{pair.id}.jpg")
    if args.gallery:
        gallery(rows, pairs, args, args.gallery, 100.0)
    return 0


GALLERY_SERIES = ("ours defaults", "neural-style-pt random", "neural-style-pt image")


def gallery(
    rows: list[dict[str, Any]], pairs: list[quality.Pair], args: argparse.Namespace, path: Path, nspt_w: float
) -> None:
    """One row per pair at full size: content, style, then ours and neural-style-pt's two inits at their defaults,
    each captioned with its two errors and its optimisation seconds."""
    ours_w, workdir, side = args.default_weight, args.workdir, args.size
    heads = ["content", "style", f"ours (style {ours_w:g})"]
    heads += [f"nspt random ({nspt_w:g})", f"nspt -init image ({nspt_w:g})"]
    cells: list[list[tuple[Image.Image, str]]] = []
    for pair in pairs:
        row = [(pair.content, pair.id.split("__")[0]), (pair.style, pair.id.split("__")[1])]
        for series, weight in zip(GALLERY_SERIES, (ours_w, nspt_w, nspt_w), strict=True):
            found = [r for r in rows if (r["pair"], r["series"], r["weight"]) == (pair.id, series, weight)]
            if found and found[0].get("image"):
                r = found[0]
                text = f"content {r['content_err']:.2f}  style {r['style_err']:.3f}\n{r['seconds']:.0f} s"
                row.append((Image.open(workdir / r["image"]).convert("RGB"), text))
            else:
                row.append((Image.new("RGB", (8, 8), "white"), "not run"))
        cells.append(row)
    cap, head, pad = 30, 18, 6
    sheet = Image.new("RGB", (len(heads) * (side + pad), head + len(cells) * (side + cap + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(heads):
        draw.text((c * (side + pad) + 2, 3), text, fill="black")
    for i, row in enumerate(cells):
        y = head + i * (side + cap + pad)
        for c, (img, text) in enumerate(row):
            shown = thumbnail(img, side) if max(img.size) != side else img
            sheet.paste(shown, (c * (side + pad) + (side - shown.width) // 2, y + (side - shown.height) // 2))
            draw.multiline_text((c * (side + pad) + 2, y + side + 2), text, fill="black", spacing=2)
    sheet.save(path, quality=88)


def markdown(
    rows: list[dict[str, Any]], summaries: list[dict[str, Any]], ours_weight: float, nspt_weight: float
) -> str:
    """Per pair: our default point, neural-style-pt's default points, and the worst frontier ratio per init."""
    head = "| pair | ours (w {ow:g}) c / s / SSIM(Y) | nspt random (w {nw:g}) | nspt -init image (w {nw:g}) |"
    lines = [head.format(ow=ours_weight, nw=nspt_weight) + " worst ratio vs random / image, equal it. | equal time |"]
    lines.append("|---|---|---|---|---|---|")
    for summary in summaries:
        pair = summary["pair"]

        def point(series: str, weight: float, pair: str = pair) -> str:
            found = [r for r in rows if r["pair"] == pair and r["series"] == series and r["weight"] == weight]
            if not found or found[0].get("content_err") is None:
                return "–"
            r = found[0]
            return f"{r['content_err']:.2f} / {r['style_err']:.3f} / {r['ssim_y']:.2f}"

        ours = next(iter(summary["ours"]), None)
        worst = {}
        for key in ("equal_iterations", "equal_time"):
            for init in ("random", "image"):
                inits = [r for r in rows if r["pair"] == pair and r["series"] == f"neural-style-pt {init}"]
                ratios = summary["ours"][ours][key]["ratios"] if ours else []
                mine = [x for r, x in zip(_nspt_rows(rows, pair), ratios, strict=False) if r in inits]
                known = [x for x in mine if x is not None]
                worst[(key, init)] = f"{max(known):.2f}" if known else "–"
        lines.append(
            f"| {pair.replace('__', ' / ')} | {point(ours or '', ours_weight)} | "
            f"{point('neural-style-pt random', nspt_weight)} | {point('neural-style-pt image', nspt_weight)} | "
            f"{worst[('equal_iterations', 'random')]} / {worst[('equal_iterations', 'image')]} | "
            f"{worst[('equal_time', 'random')]} / {worst[('equal_time', 'image')]} |"
        )
    return "\n".join(lines)


def _nspt_rows(rows: list[dict[str, Any]], pair: str) -> list[dict[str, Any]]:
    """The neural-style-pt rows of a pair in the order pair_summary visits them."""
    return [r for r in rows if r["pair"] == pair and r.get("content_err") is not None and "neural" in r["series"]]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


if __name__ == "__main__":
    raise SystemExit(main())
