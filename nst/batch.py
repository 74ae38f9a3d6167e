"""Run a manifest's pairs: plan (skip what is done) → group into batches → stylize → write outputs.

Used by the Prefect flow (one task per batch) and by `run_manifest`, the plain in-process runner.
Per-pair failures (bad image, NaN) become failed records, never exceptions; output-write errors do raise, so that a
caller such as a Prefect task can retry them.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from nst import storage
from nst.errors import ManifestError, NSTError, OutOfMemory
from nst.images import encode_png, load_image, sha256_bytes
from nst.manifest import Manifest, PairSpec, load_manifest
from nst.optimize import ProgressCallback
from nst.results import build_record, inputs_section, is_done, now_iso
from nst.stylize import PairJob, PairResult, Stylizer, canonical_params, output_size

READ_THREADS = 16


@dataclass
class PairTask:
    """A pair planned to run: its spec, the sha256 of every input (None if unreadable) and the content's size."""

    spec: PairSpec
    input_hashes: dict[str, str | None]
    content_size: tuple[int, int] | None = None  # (width, height) of the decoded content image
    input_error: str | None = None

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass
class PairRecord:
    """How one pair ended, with the JSON record that was written for it."""

    id: str
    status: str  # succeeded | failed | skipped | not_run
    content_uri: str
    style_uris: list[str]
    image_uri: str | None
    json_uri: str
    final_losses: dict[str, float] | None = None
    seconds: float = 0.0
    error: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What a run will do: pairs to run, pairs already done, and requested ids the manifest lacks."""

    to_run: list[PairTask]
    skipped: list[PairRecord]
    unknown_ids: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    """The outcome of a whole run."""

    run_id: str
    manifest: str
    output: str
    records: list[PairRecord]
    summary_uri: str | None = None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def failed_ids(self) -> list[str]:
        return [r.id for r in self.records if r.status in ("failed", "not_run")]


def output_uris(output: str, pair_id: str) -> tuple[str, str]:
    """(`<output>/<id>.png`, `<output>/<id>.json`)."""
    base = output.rstrip("/") + "/"
    return storage.join(base, f"{pair_id}.png"), storage.join(base, f"{pair_id}.json")


def _hash_and_size(uri: str, max_bytes: int | None) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """sha256 and (width, height) from the header of one input; an error message instead if unreadable."""
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
    except NSTError as exc:
        return None, None, str(exc)
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF rotations by 90°: decoded image is transposed
                size = (size[1], size[0])
    except Exception:  # an undecodable image fails later with a precise ImageError
        size = None
    return sha256_bytes(data), size, None


def plan(manifest: Manifest, *, pair_ids: Sequence[str] | None = None, force: bool = False) -> Plan:
    """Hash the inputs (each unique URI once, in parallel) and skip pairs whose JSON says they are done."""
    specs = manifest.pairs
    unknown: list[str] = []
    if pair_ids is not None:
        wanted = set(pair_ids)
        unknown = sorted(wanted - {p.id for p in specs})
        specs = [p for p in specs if p.id in wanted]
    uris = sorted({u for p in specs for u in (p.content, *p.styles)})
    with ThreadPoolExecutor(READ_THREADS) as pool:
        read = dict(zip(uris, pool.map(lambda u: _hash_and_size(u, None), uris), strict=True))
    existing = {} if force else _existing_records(manifest.output, [p.id for p in specs])
    to_run, skipped = [], []
    for spec in specs:
        spec = spec.model_copy(update={"params": canonical_params(spec.params)})
        hashes = {u: read[u][0] for u in (spec.content, *spec.styles)}
        errors = [read[u][2] for u in (spec.content, *spec.styles) if read[u][2]]
        inputs = inputs_section(spec.content, spec.styles, hashes)
        old = existing.get(spec.id)
        if old is not None and not errors and is_done(old, spec.params, inputs):
            image_uri, json_uri = output_uris(manifest.output, spec.id)
            skipped.append(
                PairRecord(
                    id=spec.id,
                    status="skipped",
                    content_uri=spec.content,
                    style_uris=spec.styles,
                    image_uri=image_uri,
                    json_uri=json_uri,
                    final_losses=old.get("final_losses"),
                    seconds=0.0,
                    history=old.get("history") or [],
                    record=old,
                )
            )
            continue
        to_run.append(PairTask(spec, hashes, read[spec.content][1], errors[0] if errors else None))
    return Plan(to_run=to_run, skipped=skipped, unknown_ids=unknown)


def _existing_records(output: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The JSON records already in the output directory for these ids (one listing, then one read each)."""
    present = {info.uri for info in storage.list_prefix(output.rstrip("/") + "/")}
    found: dict[str, dict[str, Any]] = {}
    for pair_id in ids:
        _, json_uri = output_uris(output, pair_id)
        if json_uri in present:
            try:
                found[pair_id] = json.loads(storage.read_bytes(json_uri))
            except (NSTError, ValueError):
                continue  # unreadable record: the pair simply runs again
    return found


def make_batches(tasks: Sequence[PairTask], *, max_pairs: int) -> list[list[PairTask]]:
    """Group tasks with the same output shape and graph parameters into batches of at most `max_pairs`."""
    groups: dict[Any, list[PairTask]] = {}
    for task in tasks:
        if task.content_size is None or task.input_error:
            key: Any = ("alone", task.id)  # unreadable: fails on its own without holding up a batch
        else:
            key = (output_size(*task.content_size, task.spec.params.size), task.spec.params.graph_key())
        groups.setdefault(key, []).append(task)
    batches = []
    for group in groups.values():
        for start in range(0, len(group), max(1, max_pairs)):
            batches.append(group[start : start + max_pairs])
    return batches


def record_failure(
    task: PairTask, output: str, error: dict[str, Any], run_id: str | None, *, best_effort: bool = False
) -> PairRecord:
    """Write a failed JSON record for a pair; `best_effort` swallows write errors (storage may be what failed)."""
    _, json_uri = output_uris(output, task.id)
    record = build_record(
        pair_id=task.id,
        status="failed",
        params=task.spec.params,
        inputs=inputs_section(task.spec.content, task.spec.styles, task.input_hashes),
        image_uri=None,
        json_uri=json_uri,
        error=error,
        run_id=run_id,
    )
    try:
        return _store_record(task, record)
    except NSTError:
        if not best_effort:
            raise
        return _pair_record(task, record)


def _error(exc: BaseException, iteration: int | None = None) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "iteration": iteration}


def _load_job(task: PairTask) -> PairJob:
    """Read and decode a task's images (errors name the pair, the field and the file)."""
    spec = task.spec
    if task.input_error:
        raise NSTError(f"pair {spec.id}: {task.input_error}")
    limit = spec.params.max_input_pixels
    content = load_image(
        storage.read_bytes(spec.content), label=f"pair {spec.id}: content {spec.content!r}", max_pixels=limit
    )
    styles = [
        load_image(storage.read_bytes(s), label=f"pair {spec.id}: style {s!r}", max_pixels=limit) for s in spec.styles
    ]
    return PairJob(spec.id, content, styles, spec.params)


def write_pair_result(
    task: PairTask, result: PairResult, image_uri: str, json_uri: str, run_id: str | None
) -> PairRecord:
    """Write the image, then the JSON (each atomically), so a JSON always means a complete pair.

    Intermediate images (`save_every`) go to `<image stem>.iter<N>.png` beside the image.
    """
    if result.image is not None:
        storage.write_bytes(image_uri, encode_png(result.image), content_type="image/png")
        stem = image_uri[: -len(".png")] if image_uri.endswith(".png") else image_uri
        for iteration, img in result.intermediates:
            storage.write_bytes(f"{stem}.iter{iteration:06d}.png", encode_png(img), content_type="image/png")
    record = build_record(
        pair_id=task.id,
        status=result.status,
        params=result.params,
        inputs=inputs_section(task.spec.content, task.spec.styles, task.input_hashes),
        image_uri=image_uri if result.image is not None else None,
        json_uri=json_uri,
        weights=result.weights.to_dict() if result.weights else None,
        final_losses=result.final_losses,
        history=result.history,
        iterations=result.iterations,
        seconds=result.seconds,
        device=result.device,
        error=result.error,
        run_id=run_id,
    )
    return _store_record(task, record)


def _store_record(task: PairTask, record: dict[str, Any]) -> PairRecord:
    storage.write_bytes(
        record["output"]["json"], json.dumps(record, indent=2).encode(), content_type="application/json"
    )
    return _pair_record(task, record)


def _pair_record(task: PairTask, record: dict[str, Any]) -> PairRecord:
    return PairRecord(
        id=task.id,
        status=record["status"],
        content_uri=task.spec.content,
        style_uris=task.spec.styles,
        image_uri=record["output"]["image"],
        json_uri=record["output"]["json"],
        final_losses=record["final_losses"],
        seconds=record["seconds"],
        error=record["error"],
        history=record["history"],
        record=record,
    )


FaultHook = Callable[[Sequence[PairJob]], None]


def run_batch(
    batch: Sequence[PairTask],
    *,
    output: str,
    stylizer: Stylizer | None = None,
    device: str | None = None,
    on_progress: ProgressCallback | None = None,
    fault_hook: FaultHook | None = None,
    run_id: str | None = None,
) -> list[PairRecord]:
    """Stylize one batch and write its outputs; a batch that runs out of memory is split in halves and retried."""
    stylizer = stylizer or Stylizer(read_bytes=storage.read_bytes)
    records: list[PairRecord] = []
    jobs: list[tuple[PairTask, PairJob]] = []
    for task in batch:
        try:
            job = _load_job(task)
        except NSTError as exc:
            records.append(record_failure(task, output, _error(exc), run_id))
            continue
        if device is not None:
            job.params = job.params.model_copy(update={"device": device})
        jobs.append((task, job))
    records += _run_jobs(jobs, output, stylizer, on_progress, fault_hook, run_id)
    order = {t.id: i for i, t in enumerate(batch)}
    return sorted(records, key=lambda r: order[r.id])


def _run_jobs(
    jobs: list[tuple[PairTask, PairJob]],
    output: str,
    stylizer: Stylizer,
    on_progress: ProgressCallback | None,
    fault_hook: FaultHook | None,
    run_id: str | None,
) -> list[PairRecord]:
    if not jobs:
        return []
    try:
        if fault_hook is not None:
            fault_hook([j for _, j in jobs])
        results = stylizer.run_batch([j for _, j in jobs], callback=on_progress)
    except OutOfMemory as exc:
        if len(jobs) == 1:
            task = jobs[0][0]
            return [record_failure(task, output, _error(exc), run_id)]
        half = len(jobs) // 2
        return _run_jobs(jobs[:half], output, stylizer, on_progress, fault_hook, run_id) + _run_jobs(
            jobs[half:], output, stylizer, on_progress, fault_hook, run_id
        )
    except NSTError as exc:  # a problem of the whole batch's parameters (unknown layer, missing weights...)
        return [record_failure(t, output, _error(exc), run_id) for t, _ in jobs]
    return [
        write_pair_result(task, result, *output_uris(output, task.id), run_id)
        for (task, _), result in zip(jobs, results, strict=True)
    ]


def not_run_record(task: PairTask, output: str, reason: str) -> PairRecord:
    """A pair that was never started (e.g. `max_failures` reached); nothing is written for it."""
    _, json_uri = output_uris(output, task.id)
    return PairRecord(
        id=task.id,
        status="not_run",
        content_uri=task.spec.content,
        style_uris=task.spec.styles,
        image_uri=None,
        json_uri=json_uri,
        error={"type": "NotRun", "message": reason, "iteration": None},
    )


def write_run_summary(output: str, run_id: str, records: Sequence[PairRecord], **extra: Any) -> str:
    """Write `_runs/<run_id>.json` listing every pair's status; returns its URI."""
    uri = storage.join(output.rstrip("/") + "/", f"_runs/{run_id}.json")
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    body = {
        "run_id": run_id,
        "finished_at": now_iso(),
        "counts": counts,
        "pairs": [
            {
                "id": r.id,
                "status": r.status,
                "image": r.image_uri,
                "json": r.json_uri,
                "final_losses": r.final_losses,
                "seconds": r.seconds,
                "error": r.error,
            }
            for r in records
        ],
        **extra,
    }
    storage.write_bytes(uri, json.dumps(body, indent=2).encode(), content_type="application/json")
    return uri


def run_manifest(
    uri: str,
    *,
    pair_ids: Sequence[str] | None = None,
    force: bool = False,
    max_batch_pairs: int = 4,
    run_id: str | None = None,
    on_progress: ProgressCallback | None = None,
    on_batch: Callable[[list[PairRecord]], None] | None = None,
) -> RunSummary:
    """Run a whole manifest in this process without Prefect (the flow does the same with one task per batch)."""
    manifest = load_manifest(uri)
    the_plan = plan(manifest, pair_ids=pair_ids, force=force)
    if the_plan.unknown_ids:
        raise ManifestError(f"{uri}: pair_ids not in the manifest: {', '.join(the_plan.unknown_ids)}")
    run_id = run_id or time.strftime("local-%Y%m%dT%H%M%S")
    stylizer = Stylizer(read_bytes=storage.read_bytes)
    records = list(the_plan.skipped)
    for batch in make_batches(the_plan.to_run, max_pairs=max_batch_pairs):
        done = run_batch(batch, output=manifest.output, stylizer=stylizer, on_progress=on_progress, run_id=run_id)
        records += done
        if on_batch is not None:
            on_batch(done)
    summary = RunSummary(run_id=run_id, manifest=uri, output=manifest.output, records=records)
    summary.summary_uri = write_run_summary(manifest.output, run_id, records, manifest=uri)
    return summary
