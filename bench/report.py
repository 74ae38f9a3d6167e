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


def _table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table after a blank line; `align` has one letter per column: l (left) or r (right)."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return ["", "| " + " | ".join(header) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows)]


def _kind(records: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == kind]


def _throughput_row(r: dict[str, Any]) -> list[str]:
    head = [r["config"], r["optimizer"], str(r["batch"])]
    if "error" in r:
        return [*head, r["error"][:80], "", "", "", "", ""]
    return [
        *head,
        _fmt(r["image_iterations_per_s"]),
        _fmt(r.get("ratio_to_reference"), 2),
        _fmt(r.get("pct_of_measured_bf16_ceiling")),
        f"{_gib(r.get('peak_memory_bytes'))} ({_gib(r.get('memory_model_bytes'))})",
        _pct_list(r.get("final_loss_rel_diff")),
        _pct_list(r.get("last_iterate_rel_diff")),
    ]


def _sweep_rows(sweep: Sequence[dict[str, Any]], batches: Sequence[int]) -> list[list[str]]:
    rows = []
    for name in dict.fromkeys(r["config"] for r in sweep):
        cells = [name]
        for b in batches:
            point = [x for x in sweep if x["config"] == name and x["batch"] == b]
            cells.append(
                "–" if not point else "x" if "error" in point[0] else _fmt(point[0].get("image_iterations_per_s"))
            )
        rows.append(cells)
    return rows


def _ttq_row(r: dict[str, Any]) -> list[str]:
    note = r.get("reached") or r.get("error") or ""
    if "best_loss_over_target" in r:
        note += f"; best loss / target {r['best_loss_over_target']}"
    speed = [_fmt(r.get("seconds_per_pair"), 2), _fmt(r.get("speedup_vs_reference"), 2)]
    return [r["config"], r["optimizer"], str(r["scales"]), *speed, note]


def _history_row(r: dict[str, Any]) -> list[str]:
    losses = " / ".join(f"{v:.4g}" for v in r["final_loss"])
    last = " / ".join(f"{v:.4g}" for v in r.get("last_iterate_loss", []))
    return [str(r["history_size"]), _fmt(r.get("image_iterations_per_s")), losses, last or "–"]


def _cold_row(r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return [r["case"], f"error: {r['error'][-80:]}", "", ""]
    return [r["case"], _fmt(r["import_s"], 2), _fmt(r["weights_loaded_s"], 2), _fmt(r["first_step_s"], 2)]


def _pipeline_row(r: dict[str, Any]) -> list[str]:
    counts = [
        r["pairs"],
        r["size"],
        r["iterations"],
        r["max_batch_pairs"],
        r["batches"],
        r["wall_s"],
        r["optimisation_s"],
    ]
    busy = [f"{100 * r['busy_fraction']:.1f} %", f"{100 * r.get('busy_fraction_steady', 0):.1f} %"]
    return [r["runner"], r["device"], *map(str, counts), *busy]


def tables(records: Sequence[dict[str, Any]]) -> str:
    """Every section present in the records, as markdown."""
    out: list[str] = [
        f"Device: {env['device']}, torch {env['torch']}, {env['size']} px; "
        f"{env['flops_per_image_iteration'] / 1e9:.1f} GFLOP per image-iteration (x{env['flop_factor']}); "
        f"measured matmul bf16 {_fmt(env.get('matmul_tflops_bf16'), 3)} / fp32 "
        f"{_fmt(env.get('matmul_tflops_fp32'), 3)} TFLOP/s; default here: {env.get('default_config')}."
        for env in _kind(records, "env")
    ]
    if rows := _kind(records, "throughput"):
        header = ["config", "optimizer", "batch", "image-it/s", "x reference", "% bf16 ceiling", "peak GiB (model)"]
        header += ["final loss vs reference, per pair (%)", "last iterate vs reference (%)"]
        out += _table(header, "llrrrrrll", [_throughput_row(r) for r in rows])
    if sweep := _kind(records, "sweep"):
        batches = sorted({r["batch"] for r in sweep})
        header = ["config \\ pairs per batch", *map(str, batches)]
        out += _table(header, "l" + "r" * len(batches), _sweep_rows(sweep, batches))
    if ttq := _kind(records, "ttq"):
        header = ["config", "optimizer", "scales", "seconds per pair", "speed-up", "note"]
        out += _table(header, "llrrrl", [_ttq_row(r) for r in ttq])
    if hist := _kind(records, "history"):
        header = ["L-BFGS history", "image-it/s", "final loss per pair", "last iterate per pair"]
        out += _table(header, "rrll", [_history_row(r) for r in hist])
    if cold := _kind(records, "cold_start"):
        header = ["cold start case", "import s", "weights loaded s", "first step done s"]
        out += _table(header, "lrrr", [_cold_row(r) for r in cold])
    if pipe := _kind(records, "pipeline"):
        header = ["runner", "device", "pairs", "px", "its", "batch", "batches", "wall s", "optimising s", "busy"]
        header += ["busy, first steps idle"]
        out += _table(header, "llrrrrrrrrr", [_pipeline_row(r) for r in pipe])
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
