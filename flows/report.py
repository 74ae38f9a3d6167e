"""What the flow publishes about a run: table rows, the markdown report and the loss-curve plot (no Prefect here)."""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from nst import storage

STATUSES = ("succeeded", "failed", "skipped", "not_run")
MAX_SHEET_ROWS = 50
MAX_LEGEND = 12


def slugify(name: str) -> str:
    """An artifact-key-safe form of a manifest name: lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:60].strip("-") or "manifest"


def counts(records: Iterable[Any]) -> dict[str, int]:
    """How many pairs ended in each status (every status present, in a fixed order)."""
    seen = Counter(r.status for r in records)
    return {status: seen.get(status, 0) for status in STATUSES}


def _loss(record: Any, key: str) -> float | None:
    losses = record.final_losses or {}
    value = losses.get(key)
    return float(value) if value is not None else None


def table_rows(records: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per pair: id, status, content loss, style loss, seconds, output URI (and the error when failed)."""
    rows = []
    for r in records:
        error = r.error or {}
        rows.append(
            {
                "id": r.id,
                "status": r.status,
                "content loss": _loss(r, "content"),
                "style loss": _loss(r, "style"),
                "seconds": round(float(r.seconds or 0.0), 3),
                "output": r.image_uri or "",
                "error": f"{error.get('type', '')}: {error.get('message', '')}" if error else "",
            }
        )
    return rows


def display_url(uri: str | None, presign: Callable[[str], str] = storage.presigned_url) -> str:
    """Where a browser can open this image: a presigned URL for s3://, the plain path for local files."""
    if not uri:
        return ""
    if storage.is_s3(uri):
        try:
            return presign(uri)
        except Exception:  # a report must not fail the run; show the URI instead
            return uri
    return uri.removeprefix("file://")


def _fmt(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _img(label: str, url: str) -> str:
    return f"![{label}]({url.replace(' ', '%20')})" if url else ""


def markdown_report(
    *,
    name: str,
    run_id: str,
    records: Sequence[Any],
    summary_uri: str | None,
    curves_url: str | None,
    dry_run: bool = False,
    presign: Callable[[str], str] = storage.presigned_url,
) -> str:
    """The run report: counts, failures, a contact sheet (content | style | result) and the loss curves."""
    c = counts(records)
    title = f"# {'Dry run' if dry_run else 'Stylize report'}: {name}"
    verb = "would" if dry_run else ""
    lines = [
        title,
        "",
        f"Flow run `{run_id}` · {len(records)} pairs: " + ", ".join(f"{n} {s}" for s, n in c.items() if n),
    ]
    if dry_run:
        lines.append(f"\nNothing was written. {c['not_run']} pairs {verb} run, {c['skipped']} {verb} be skipped.")
    if summary_uri:
        lines.append(f"\nRun summary: `{summary_uri}`")
    failed = [r for r in records if r.status == "failed"]
    if failed:
        lines += ["", "## Failed pairs", ""]
        for r in failed:
            err = r.error or {}
            at = f" (iteration {err['iteration']})" if err.get("iteration") is not None else ""
            lines.append(f"- **{r.id}**: {err.get('type', 'Error')}: {_md_cell(str(err.get('message', '')))}{at}")
    shown = [r for r in records if r.status in ("succeeded", "skipped", "failed")][:MAX_SHEET_ROWS]
    if shown and not dry_run:
        lines += [
            "",
            "## Contact sheet",
            "",
            "| id | status | content | style | result | content loss | style loss |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in shown:
            style = (r.style_uris or [""])[0]
            result = display_url(r.image_uri, presign) if r.status != "failed" else ""
            lines.append(
                "| "
                + " | ".join(
                    [
                        _md_cell(r.id),
                        r.status,
                        _img("content", display_url(r.content_uri, presign)),
                        _img("style", display_url(style, presign)),
                        _img("result", result),
                        _fmt(_loss(r, "content")),
                        _fmt(_loss(r, "style")),
                    ]
                )
                + " |"
            )
        more = len([r for r in records if r.status in ("succeeded", "skipped", "failed")]) - len(shown)
        if more > 0:
            lines.append(f"\n… and {more} more pairs (see the table artifact).")
    if curves_url:
        lines += ["", "## Loss curves", "", _img("loss curves (log scale)", curves_url)]
    return "\n".join(lines) + "\n"


def loss_curves_png(records: Sequence[Any], *, title: str = "") -> bytes | None:
    """Content, style and total loss against iteration (log scale), one line per pair; None without history."""
    with_history = [r for r in records if r.history]
    if not with_history:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, safe outside the main thread

    fig = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ("content", "style", "total"), strict=True):
        for r in with_history:
            points = [
                (h["iteration"], h[key])
                for h in r.history
                if h.get(key) is not None and math.isfinite(h[key]) and h[key] > 0
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=r.id, linewidth=1.2, marker="o" if len(xs) < 12 else None, markersize=3)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(f"{key} loss")
        ax.grid(True, which="both", alpha=0.3)
    if len(with_history) <= MAX_LEGEND:
        axes[-1].legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
