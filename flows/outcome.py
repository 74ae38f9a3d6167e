"""How both flows end: the report artifacts and the final state, bounded in size however many pairs a run has.

Messages and states name at most `IDS_IN_A_MESSAGE` pairs, then a count; the full list is in `_runs/<id>.json`.
A failed state carries a `RunFailed` exception (Prefect resolves a failed state's data into an exception, so a
plain dict there makes a worker's engine log a traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from flows import report
from nst.manifest import Manifest
from nst.run import PairRecord, some_ids, summary_uri
from nst.run.layout import write
from nst.run_options import RunOptions

TABLE_ROWS = 200  # rows of the pairs table artifact: failed pairs first, then the rest in manifest order
CURVES_PAIRS = 50  # pairs whose loss curves the report plots


class RunFailed(Exception):
    """The data of a Failed flow run state: its message (the pairs' details are in the run summary)."""


def _not_our_failure(record: logging.LogRecord) -> bool:
    """Drop the engine's "unexpected exception" record for a run that ended Failed by our own hand.

    In a worker's flow-run process Prefect's engine re-raises a Failed run's exception and logs it with a traceback of
    its own frames. Our failures were already logged once, with their message; real crashes keep their traceback.
    """
    return not (record.exc_info and isinstance(record.exc_info[1], RunFailed))


logging.getLogger("prefect.flow_runs").addFilter(_not_our_failure)


def failed(message: str) -> State[Any]:
    """A Failed state with this message, logged once; its data resolves into an exception."""
    get_run_logger().error("%s", message)
    return Failed(message=message, data=RunFailed(message))


def dry_run_state(would_run: list[str], would_skip: list[str], older_engine: int) -> State[Any]:
    """Completed, saying how many pairs would run and be skipped (the first ids of each in its data)."""
    older = f" ({older_engine} made by an older engine revision)" if older_engine else ""
    return Completed(
        message=f"dry run: {len(would_run)} pairs would run, {len(would_skip)} would be skipped{older}",
        data={"would_run": would_run[: 10 * TABLE_ROWS], "would_skip": would_skip[: 10 * TABLE_ROWS]},
    )


def final_state(
    records: Sequence[PairRecord], run_id: str, summary: str, options: RunOptions, *, extra: str = ""
) -> State[Any]:
    """Completed, or Failed naming (the first of) the failed and not-run pairs, so that Retry runs them again."""
    counts = {s: n for s, n in report.counts(records).items() if n}
    text = (", ".join(f"{n} {s}" for s, n in counts.items()) or "no pairs") + extra
    failed_ids = [r.id for r in records if r.status == "failed"]
    not_run = [r for r in records if r.status == "not_run"]
    data = {"run_id": run_id, "summary": summary, "counts": counts}
    if not (failed_ids or not_run):
        get_run_logger().info("%s. Summary: %s", text, summary)
        return Completed(message=text, data=data)
    message = f"{len(failed_ids)} of {len(records)} pairs failed: {some_ids(failed_ids)}" if failed_ids else ""
    if not_run:
        reasons = sorted({str((r.error or {}).get("message", "")) for r in not_run[:TABLE_ROWS]})
        why = f"max_failures={options.max_failures}" if options.max_failures is not None else "; ".join(reasons[:3])
        message += ("; " if message else "") + f"{len(not_run)} not run ({why[:500]})"
    return failed(f"{message}. Retry runs only these again. ({text}) Summary: {summary}")


def _table(records: Sequence[PairRecord]) -> list[PairRecord]:
    bad = [r for r in records if r.status in ("failed", "not_run")]
    return [*bad, *(r for r in records if r.status not in ("failed", "not_run"))][:TABLE_ROWS]


def publish_report(
    manifest: Manifest,
    run_id: str,
    records: Sequence[PairRecord],
    *,
    summary: str | None,
    dry_run: bool = False,
    appendix: str = "",
) -> None:
    """Table and markdown artifacts keyed by the manifest's name; the loss plot is written beside the outputs."""
    name, slug = manifest.name, report.slugify(manifest.name)
    try:
        shown = f" (first {TABLE_ROWS} of {len(records)}; all in the run summary)" if len(records) > TABLE_ROWS else ""
        create_table_artifact(
            key=f"{slug}-pairs",
            table=report.table_rows(_table(records)),
            description=f"{name}: pairs of flow run {run_id}{shown}" + (" (dry run: nothing ran)" if dry_run else ""),
        )
        curves_url = None
        with_history = [r for r in records if r.history][:CURVES_PAIRS]
        png = None if dry_run else report.loss_curves_png(with_history, title=f"{name} · {run_id}")
        if png is not None:
            curves_uri = summary_uri(manifest.output, run_id, "-losses.png")
            write(curves_uri, png, "image/png")  # a run file: `_runs` refused if it is a symlink
            curves_url = report.display_url(curves_uri)
        markdown = report.markdown_report(
            name=name, run_id=run_id, records=records, summary_uri=summary, curves_url=curves_url, dry_run=dry_run
        )
        create_markdown_artifact(
            key=f"{slug}-report", markdown=markdown + appendix, description=f"{name}: report of flow run {run_id}"
        )
    except Exception as exc:  # the report is for people; the pairs' JSON and the run summary are the record
        get_run_logger().warning("could not publish the report: %s: %s", type(exc).__name__, exc)
