"""Markdown tables from benchmark JSON lines (bench/throughput.py, bench/pipeline.py), for docs/performance.md.

python -m bench.report docs/bench/h100.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _pct_list(values: Sequence[float] | None) -> str:
    if not values:
        return "–"
    return " / ".join(f"{100 * v:+.2f}" for v in values)


def _gib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**30:.2f}"


def tables(records: Sequence[dict[str, Any]]) -> str:
    """Every section present in the records, as markdown."""
    out: list[str] = []
    for env in (r for r in records if r.get("kind") == "env"):
        out.append(
            f"Device: {env['device']}, torch {env['torch']}, {env['size']} px; "
            f"{env['flops_per_image_iteration'] / 1e9:.1f} GFLOP per image-iteration (x{env['flop_factor']}); "
            f"measured matmul bf16 {_fmt(env.get('matmul_tflops_bf16'), 3)} / fp32 "
            f"{_fmt(env.get('matmul_tflops_fp32'), 3)} TFLOP/s; default here: {env.get('default_config')}."
        )
    rows = [r for r in records if r.get("kind") == "throughput"]
    if rows:
        out += [
            "",
            "| config | optimizer | batch | image-it/s | x reference | % bf16 ceiling | peak GiB (model) "
            "| final loss vs reference, per pair (%) | last iterate vs reference (%) |",
            "|---|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['config']} | {r['optimizer']} | {r['batch']} | {r['error'][:80]} | | | | | |")
                continue
            peak = f"{_gib(r.get('peak_memory_bytes'))} ({_gib(r.get('memory_model_bytes'))})"
            out.append(
                f"| {r['config']} | {r['optimizer']} | {r['batch']} | {_fmt(r['image_iterations_per_s'])} "
                f"| {_fmt(r.get('ratio_to_reference'), 2)} | {_fmt(r.get('pct_of_measured_bf16_ceiling'))} | {peak} "
                f"| {_pct_list(r.get('final_loss_rel_diff'))} | {_pct_list(r.get('last_iterate_rel_diff'))} |"
            )
    sweep = [r for r in records if r.get("kind") == "sweep"]
    if sweep:
        batches = sorted({r["batch"] for r in sweep})
        out += [
            "",
            "| config \\ pairs per batch | " + " | ".join(map(str, batches)) + " |",
            "|---|" + "---:|" * len(batches),
        ]
        for name in dict.fromkeys(r["config"] for r in sweep):
            cells = []
            for b in batches:
                point = [x for x in sweep if x["config"] == name and x["batch"] == b]
                if not point:
                    cells.append("–")
                else:
                    cells.append("x" if "error" in point[0] else _fmt(point[0].get("image_iterations_per_s")))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    ttq = [r for r in records if r.get("kind") == "ttq"]
    if ttq:
        out += [
            "",
            "| config | optimizer | scales | seconds per pair | speed-up | note |",
            "|---|---|---:|---:|---:|---|",
        ]
        for r in ttq:
            note = r.get("reached") or r.get("error") or ""
            if "best_loss_over_target" in r:
                note += f"; best loss / target {r['best_loss_over_target']}"
            out.append(
                f"| {r['config']} | {r['optimizer']} | {r['scales']} | {_fmt(r.get('seconds_per_pair'), 2)} "
                f"| {_fmt(r.get('speedup_vs_reference'), 2)} | {note} |"
            )
    hist = [r for r in records if r.get("kind") == "history"]
    if hist:
        out += [
            "",
            "| L-BFGS history | image-it/s | final loss per pair | last iterate per pair |",
            "|---:|---:|---|---|",
        ]
        for r in hist:
            losses = " / ".join(f"{v:.4g}" for v in r["final_loss"])
            last = " / ".join(f"{v:.4g}" for v in r.get("last_iterate_loss", []))
            out.append(f"| {r['history_size']} | {_fmt(r.get('image_iterations_per_s'))} | {losses} | {last or '–'} |")
    cold = [r for r in records if r.get("kind") == "cold_start"]
    if cold:
        out += ["", "| cold start case | import s | weights loaded s | first step done s |", "|---|---:|---:|---:|"]
        for r in cold:
            if "error" in r:
                out.append(f"| {r['case']} | error: {r['error'][-80:]} | | |")
                continue
            out.append(
                f"| {r['case']} | {_fmt(r['import_s'], 2)} | {_fmt(r['weights_loaded_s'], 2)} "
                f"| {_fmt(r['first_step_s'], 2)} |"
            )
    pipe = [r for r in records if r.get("kind") == "pipeline"]
    if pipe:
        out += [
            "",
            "| runner | device | pairs | px | its | batch | batches | wall s | optimising s | busy | busy, "
            "first steps idle |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in pipe:
            out.append(
                f"| {r['runner']} | {r['device']} | {r['pairs']} | {r['size']} | {r['iterations']} "
                f"| {r['max_batch_pairs']} | {r['batches']} | {r['wall_s']} | {r['optimisation_s']} "
                f"| {100 * r['busy_fraction']:.1f} % | {100 * r.get('busy_fraction_steady', 0):.1f} % |"
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(argv if argv is not None else sys.argv[1:])
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    records = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    print(tables(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
