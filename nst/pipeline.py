"""The run path: manifest → plan (read each input once, skip what is done) → batches → engine → records → summary.

`run()` is the one path behind `nst run --no-prefect`, the `stylize-manifest` flow and the shard flow's planning.
Callers plug in how a batch runs (`RunHooks.run_batch`: in this thread, or as a Prefect task) and hear when one
finished (`RunHooks.batch_done`). Per-pair failures (bad image, NaN, an output that cannot be written) become failed
records, never exceptions: a write is retried on its own (transient errors only), never the optimisation, and a pair
whose success was written is never downgraded to failed afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from nst import storage
from nst.engine import PairJob, PairResult, Stylizer, canonical_params, free_memory, output_size
from nst.errors import ManifestError, NSTError, OutOfMemory, StorageError
from nst.images import encode_png, load_image, sha256_bytes
from nst.manifest import Manifest, PairSpec, load_manifest
from nst.manifest.inputs import InputSettings
from nst.optimize import ProgressCallback
from nst.results import STATUSES, Status, build_record, error_info, exception_info, inputs_section, is_done, now_iso
from nst.run_options import RunOptions

READ_THREADS = 16
# Waits between attempts of one output write, on transient storage errors (on top of botocore's own retries):
# together they ride out an S3 endpoint that is down for about a minute.
WRITE_RETRY_DELAYS_S: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 30.0)
# A pair's claim (`<id>.claim` beside its outputs) lapses after this long, so a dead run's claims do not block others.
CLAIM_TTL_S = 6 * 3600.0


@dataclass
class PlannedPair:
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
    status: Status
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
    """What a run will do: pairs to run and pairs already done."""

    manifest: Manifest
    to_run: list[PlannedPair]
    skipped: list[PairRecord]
    claimed_done: list[str] = field(default_factory=list)  # done pairs whose claim file is still there


@dataclass
class Batch:
    """One unit of work, complete in itself (plain data, so it can be a task parameter): same-shape pairs to run."""

    label: str
    pairs: list[PlannedPair]
    output: str
    run_id: str
    spool: str | None = None  # where plan() left the inputs' bytes, by sha256 (None: read them from storage)


@dataclass
class RunSummary:
    """The outcome of a whole run."""

    run_id: str
    manifest: Manifest
    records: list[PairRecord]
    summary_uri: str | None = None
    dry_run: bool = False

    def counts(self) -> dict[Status, int]:
        """How many pairs ended in each status (every status present, in a fixed order)."""
        return {s: sum(r.status == s for r in self.records) for s in STATUSES}

    def ids(self, *statuses: Status) -> list[str]:
        """Ids of the pairs that ended in one of these statuses, in manifest order."""
        return [r.id for r in self.records if r.status in statuses]


@dataclass
class RunHooks:
    """How a caller takes part in `run()`: what runs a batch, how many at once, what hears about the run."""

    run_batch: Callable[[Batch], list[PairRecord]]
    parallel: int = 1  # batches in flight at once
    planned: Callable[[Plan, list[Batch]], None] | None = None
    batch_done: Callable[[Batch, list[PairRecord]], None] | None = None
    run_is_live: RunIsLive | None = None  # lets the run clear the leftover claims of runs that are over


def output_uris(output: str, pair_id: str) -> tuple[str, str]:
    """(`<output>/<id>.png`, `<output>/<id>.json`)."""
    base = output.rstrip("/") + "/"
    return storage.join(base, f"{pair_id}.png"), storage.join(base, f"{pair_id}.json")


# ---------------------------------------------------------------------------------------------------------- plan


def _spooled(spool: str, sha256: str) -> str:
    return os.path.join(spool, sha256)


def _read_input(uri: str, spool: str | None, max_bytes: int) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """sha256 and (width, height) of one input, its bytes kept in `spool`; an error message instead if unreadable."""
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)  # validate stat'ed it; a file may grow since
    except NSTError as exc:
        return None, None, str(exc)
    digest = sha256_bytes(data)
    if spool is not None and not os.path.exists(_spooled(spool, digest)):
        storage.write_bytes(_spooled(spool, digest), data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF rotations by 90°: decoded image is transposed
                size = (size[1], size[0])
    except Exception:  # an undecodable image fails later with a precise ImageError
        size = None
    return digest, size, None


def plan(manifest: Manifest, options: RunOptions, *, spool: str | None = None) -> Plan:
    """Read every input once (in parallel; bytes kept in `spool`), and skip pairs whose JSON says they are done."""
    specs = manifest.pairs
    if options.pair_ids is not None:
        wanted = set(options.pair_ids)
        unknown = sorted(wanted - {p.id for p in specs})
        if unknown:
            raise ManifestError(f"{manifest.source}: pair_ids not in the manifest: {', '.join(unknown)}")
        specs = [p for p in specs if p.id in wanted]
    uris = sorted({u for p in specs for u in (p.content, *p.styles)})
    max_bytes = InputSettings.from_env().max_input_bytes
    with ThreadPoolExecutor(READ_THREADS) as pool:
        read = dict(zip(uris, pool.map(lambda u: _read_input(u, spool, max_bytes), uris), strict=True))
    existing, claims = ({}, set()) if options.force else _existing_records(manifest.output, [p.id for p in specs])
    planned: list[tuple[PlannedPair, dict[str, Any] | None]] = []
    for spec in specs:
        spec = spec.model_copy(update={"params": canonical_params(spec.params)})
        hashes = {u: read[u][0] for u in (spec.content, *spec.styles)}
        errors = [read[u][2] for u in (spec.content, *spec.styles) if read[u][2]]
        old = existing.get(spec.id)
        done = (
            old is not None
            and not errors
            and is_done(old, spec.params, inputs_section(spec.content, spec.styles, hashes))
        )
        pair = PlannedPair(spec, hashes, read[spec.content][1], errors[0] if errors else None)
        planned.append((pair, old if done else None))
    # "Done" also means the image beside the record is the one it describes (another run may have replaced it).
    with ThreadPoolExecutor(READ_THREADS) as pool:
        intact = list(pool.map(lambda item: item[1] is not None and _image_matches(item[1]), planned))
    to_run, skipped = [], []
    for (pair, old), ok in zip(planned, intact, strict=True):
        if ok and old is not None:
            skipped.append(_pair_record(pair.spec, old, status="skipped"))
        else:
            to_run.append(pair)
    claimed_done = [r.id for r in skipped if r.id in claims]
    return Plan(manifest=manifest, to_run=to_run, skipped=skipped, claimed_done=claimed_done)


def _existing_records(output: str, ids: Sequence[str]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The JSON records already in the output directory for these ids (one listing, then the reads in parallel), and
    the ids that have a claim file."""
    present = {info.uri for info in storage.list_prefix(output.rstrip("/") + "/")}
    claims = {pair_id for pair_id in ids if claim_uri(output, pair_id) in present}
    listed = [(pair_id, uri) for pair_id in ids if (uri := output_uris(output, pair_id)[1]) in present]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        records = list(pool.map(_read_record, [uri for _, uri in listed]))
    return {pair_id: r for (pair_id, _), r in zip(listed, records, strict=True) if r is not None}, claims


def _read_record(uri: str) -> dict[str, Any] | None:
    """A record's JSON, or None when it cannot be read or parsed (the pair simply runs again)."""
    try:
        record = json.loads(storage.read_bytes(uri))
    except (NSTError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def make_batches(
    pairs: Sequence[PlannedPair], *, max_pairs: int, output: str, run_id: str, spool: str | None = None
) -> list[Batch]:
    """Group pairs with the same output shape and graph parameters into batches of at most `max_pairs`."""
    groups: dict[Any, list[PlannedPair]] = {}
    for pair in pairs:
        if pair.content_size is None or pair.input_error:
            key: Any = ("alone", pair.id)  # unreadable: fails on its own without holding up a batch
        else:
            key = (output_size(*pair.content_size, pair.spec.params.size), pair.spec.params.graph_key())
        groups.setdefault(key, []).append(pair)
    chunks = [group[i : i + max_pairs] for group in groups.values() for i in range(0, len(group), max(1, max_pairs))]
    n = len(chunks)
    return [Batch(f"{i}of{n}", chunk, output, run_id, spool) for i, chunk in enumerate(chunks, start=1)]


# ----------------------------------------------------------------------------------------------------- a batch


def _load_job(pair: PlannedPair, spool: str | None) -> PairJob:
    """Decode a pair's images from the bytes plan() hashed (errors name the pair, the field and the file)."""
    spec = pair.spec
    if pair.input_error:
        raise NSTError(f"pair {spec.id}: {pair.input_error}")

    def image(uri: str, role: str) -> Image.Image:
        digest = pair.input_hashes.get(uri)
        data = storage.read_bytes(_spooled(spool, digest) if spool and digest else uri)
        # `size`: an image too thin for VGG at the size it is resized to fails here, naming the pair and the file.
        size = spec.params.size if role == "content" else (spec.params.style_size or spec.params.size)
        label = f"pair {spec.id}: {role} {uri!r}"
        return load_image(data, label=label, max_pixels=spec.params.max_input_pixels, size=size)

    return PairJob(spec.id, image(spec.content, "content"), [image(s, "style") for s in spec.styles], spec.params)


FaultHook = Callable[[Sequence[PairJob]], None]
HoldDevice = Callable[[], AbstractContextManager[str]]
RunIsLive = Callable[[str], bool]  # whether the run of this id may still be writing (False: its claims are stale)


def claim_uri(output: str, pair_id: str) -> str:
    """`<output>/<id>.claim`: who is producing this pair right now."""
    return storage.join(output.rstrip("/") + "/", f"{pair_id}.claim")


def claim_pair(
    output: str, pair_id: str, run_id: str, *, ttl_s: float = CLAIM_TTL_S, run_is_live: RunIsLive | None = None
) -> str | None:
    """Take the pair's claim (create-if-absent); None when this run holds it, else why it cannot.

    A claim of this same run (a retry) is ours; one past its expiry, or of a run `run_is_live` says is over, is taken
    over. Local claims use O_EXCL, S3 claims a conditional PUT (`If-None-Match: *`).
    """
    uri = claim_uri(output, pair_id)
    body = json.dumps({"run_id": run_id, "expires_at": time.time() + ttl_s, "claimed_at": now_iso()}).encode()
    held: dict[str, Any] = {}
    for _ in range(3):
        if with_retries(lambda: storage.create_new(uri, body)):
            return None
        try:
            held = json.loads(with_retries(lambda: storage.read_bytes(uri)))
        except StorageError as exc:
            if exc.transient:
                raise
            continue  # released meanwhile: try again
        except ValueError:
            held = {}  # being written by its owner this very moment
        holder = str(held.get("run_id", ""))
        if holder == run_id:
            return None
        expired = float(held.get("expires_at") or 0) < time.time()
        if held and (expired or (run_is_live is not None and not run_is_live(holder))):
            with_retries(lambda: storage.delete(uri))
            continue
        break
    return f"claimed by run {held.get('run_id', '?')} (since {held.get('claimed_at', '?')})"


def release_pair(output: str, pair_id: str) -> None:
    """Drop this pair's claim (best effort: an unreleased claim lapses at its expiry)."""
    with contextlib.suppress(NSTError):
        with_retries(lambda: storage.delete(claim_uri(output, pair_id)))


def clear_stale_claims(output: str, pair_ids: Sequence[str], run_id: str, run_is_live: RunIsLive | None) -> None:
    """Remove the claims left on done pairs by runs that are over (killed between writing a pair and releasing it).

    A claim is cleared the way `claim_pair` takes one over, so a live run's claim (say, re-running with force) stays.
    """
    for pair_id in pair_ids:
        with contextlib.suppress(NSTError):
            if claim_pair(output, pair_id, run_id, run_is_live=run_is_live) is None:
                release_pair(output, pair_id)


def run_batch(
    batch: Batch,
    *,
    stylizer: Stylizer,
    hold_device: HoldDevice | None = None,
    on_progress: ProgressCallback | None = None,
    fault_hook: FaultHook | None = None,
    run_is_live: RunIsLive | None = None,
    claim_ttl_s: float = CLAIM_TTL_S,
) -> list[PairRecord]:
    """Stylize one batch and write its outputs; a batch that runs out of memory is split in halves and retried.

    Each pair is claimed first (`claim_pair`): a pair another live run is producing is left `not_run`, so two runs
    never interleave one pair's image and JSON. With `hold_device`, the optimisation (not the reading and writing)
    runs while holding a device, and pairs set to `device: auto` run on that device.
    """
    records: list[PairRecord] = []
    claimed: list[PlannedPair] = []
    for pair in batch.pairs:
        busy = claim_pair(batch.output, pair.id, batch.run_id, ttl_s=claim_ttl_s, run_is_live=run_is_live)
        if busy is None:
            claimed.append(pair)
        else:
            records.append(not_run_record(pair, batch.output, f"pair {pair.id}: {busy}; not run, retry later"))
    try:
        records += _claimed_batch(batch, claimed, stylizer, hold_device, on_progress, fault_hook)
    finally:
        for pair in claimed:
            release_pair(batch.output, pair.id)
    order = {p.id: i for i, p in enumerate(batch.pairs)}
    return sorted(records, key=lambda r: order[r.id])


def _claimed_batch(
    batch: Batch,
    pairs: list[PlannedPair],
    stylizer: Stylizer,
    hold_device: HoldDevice | None,
    on_progress: ProgressCallback | None,
    fault_hook: FaultHook | None,
) -> list[PairRecord]:
    records: list[PairRecord] = []
    jobs: list[tuple[PlannedPair, PairJob]] = []
    for pair in pairs:
        try:
            jobs.append((pair, _load_job(pair, batch.spool)))
        except NSTError as exc:
            records.append(record_failure(pair, batch, exception_info(exc), best_effort=True))

    def optimise(subset: list[PairJob]) -> list[PairResult]:
        if fault_hook is not None:
            fault_hook(subset)
        if hold_device is None:
            return stylizer.run(subset, callback=on_progress)
        with hold_device() as device:
            pinned = [_pinned(j, device) for j in subset]
            return stylizer.run(pinned, callback=on_progress)

    return records + _run_jobs(jobs, batch, optimise)


def _pinned(job: PairJob, device: str) -> PairJob:
    if job.params.device != "auto":
        return job
    return PairJob(job.id, job.content, job.styles, job.params.model_copy(update={"device": device}))


def _run_jobs(
    jobs: list[tuple[PlannedPair, PairJob]], batch: Batch, optimise: Callable[[list[PairJob]], list[PairResult]]
) -> list[PairRecord]:
    if not jobs:
        return []
    oom: dict[str, Any] | None = None
    try:
        results = optimise([j for _, j in jobs])
    except OutOfMemory as exc:
        oom = exception_info(exc)
    except NSTError as exc:  # a problem of the whole batch's parameters (unknown layer, missing weights...)
        return [record_failure(p, batch, exception_info(exc), best_effort=True) for p, _ in jobs]
    if oom is not None:  # out of the except block: the failed batch's tensors are unreachable now
        free_memory()
        if len(jobs) == 1:
            return [record_failure(jobs[0][0], batch, oom, best_effort=True)]
        half = len(jobs) // 2
        return _run_jobs(jobs[:half], batch, optimise) + _run_jobs(jobs[half:], batch, optimise)
    return [_write_or_fail(pair, result, batch) for (pair, _), result in zip(jobs, results, strict=True)]


def _write_or_fail(pair: PlannedPair, result: PairResult, batch: Batch) -> PairRecord:
    """Write a pair's outputs (retrying transient errors), then release its claim at once, not at the batch's end;
    if they cannot be written, record the pair failed."""
    try:
        return write_pair_result(pair, result, *output_uris(batch.output, pair.id), batch.run_id)
    except StorageError as exc:
        return record_failure(pair, batch, exception_info(exc), best_effort=True)
    finally:
        release_pair(batch.output, pair.id)


def with_retries(action: Callable[[], Any], delays: Sequence[float] = WRITE_RETRY_DELAYS_S) -> Any:
    """Run a storage action, again after each delay while it fails with a transient StorageError."""
    for delay in (*delays, None):
        try:
            return action()
        except StorageError as exc:
            if not exc.transient or delay is None:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------------ records


def write_pair_result(
    pair: PlannedPair, result: PairResult, image_uri: str, json_uri: str, run_id: str | None
) -> PairRecord:
    """Write the image, then the JSON (each atomically), so a JSON always means a complete pair.

    Intermediate images (`save_every`) go to `<image stem>.iter<N>.png` beside the image.
    """
    image_sha256 = None
    if result.image is not None:
        png = encode_png(result.image)
        image_sha256 = sha256_bytes(png)
        _write(image_uri, png, "image/png")
        stem = image_uri[: -len(".png")] if image_uri.endswith(".png") else image_uri
        for iteration, img in result.intermediates:
            _write(f"{stem}.iter{iteration:06d}.png", encode_png(img), "image/png")
    record = build_record(
        pair_id=pair.id,
        status=result.status,
        params=result.params,
        inputs=inputs_section(pair.spec.content, pair.spec.styles, pair.input_hashes),
        image_uri=image_uri if result.image is not None else None,
        image_sha256=image_sha256,
        json_uri=json_uri,
        weights=result.weights.to_dict() if result.weights else None,
        final_losses=result.final_losses,
        history=result.history,
        iterations=result.iterations,
        seconds=result.seconds,
        device=result.device,
        error=result.error,
        warnings=result.warnings,
        run_id=run_id,
    )
    return _store_record(pair.spec, record)


def _write(uri: str, data: bytes, content_type: str) -> None:
    with_retries(lambda: storage.write_bytes(uri, data, content_type=content_type))


def record_failure(pair: PlannedPair, batch: Batch, error: dict[str, Any], *, best_effort: bool = False) -> PairRecord:
    """Write a failed JSON record for a pair; `best_effort` swallows write errors (storage may be what failed).

    A pair whose success is already in storage (written by this batch before it failed) keeps it: never downgraded.
    """
    _, json_uri = output_uris(batch.output, pair.id)
    written = _written_success(pair, json_uri)
    if written is not None:
        return _pair_record(pair.spec, written)
    record = build_record(
        pair_id=pair.id,
        status="failed",
        params=pair.spec.params,
        inputs=inputs_section(pair.spec.content, pair.spec.styles, pair.input_hashes),
        image_uri=None,
        json_uri=json_uri,
        error=error,
        run_id=batch.run_id,
    )
    try:
        return _store_record(pair.spec, record)
    except NSTError:
        if not best_effort:
            raise
        return _pair_record(pair.spec, record)


def not_run_record(pair: PlannedPair, output: str, reason: str) -> PairRecord:
    """A pair that was never started (dry run, `max_failures` reached); nothing is written for it."""
    _, json_uri = output_uris(output, pair.id)
    return PairRecord(
        id=pair.id,
        status="not_run",
        content_uri=pair.spec.content,
        style_uris=pair.spec.styles,
        image_uri=None,
        json_uri=json_uri,
        error=error_info("NotRun", reason),
    )


def _written_success(pair: PlannedPair, json_uri: str) -> dict[str, Any] | None:
    """The success record of this pair (same inputs, parameters, image intact) already in storage, if any."""
    record = _read_record(json_uri)
    inputs = inputs_section(pair.spec.content, pair.spec.styles, pair.input_hashes)
    if record is None or not is_done(record, pair.spec.params, inputs):
        return None
    return record if _image_matches(record) else None


def _image_matches(record: dict[str, Any]) -> bool:
    """Whether the image beside a record is the one it describes (its sha256)."""
    output = record.get("output") or {}
    expected, image_uri = output.get("image_sha256"), output.get("image")
    if not expected or not image_uri:
        return False
    try:
        return bool(sha256_bytes(storage.read_bytes(image_uri)) == expected)
    except NSTError:
        return False


def _store_record(spec: PairSpec, record: dict[str, Any]) -> PairRecord:
    body = json.dumps(record, indent=2, allow_nan=False).encode()  # a NaN would not be JSON: fail loudly instead
    _write(record["output"]["json"], body, "application/json")
    return _pair_record(spec, record)


def _pair_record(spec: PairSpec, record: dict[str, Any], status: Status | None = None) -> PairRecord:
    """The PairRecord of a JSON record written now, or of one found in storage (`status="skipped"`)."""
    return PairRecord(
        id=spec.id,
        status=status or record["status"],
        content_uri=spec.content,
        style_uris=spec.styles,
        image_uri=record["output"]["image"],
        json_uri=record["output"]["json"],
        final_losses=record.get("final_losses"),
        seconds=0.0 if status == "skipped" else record.get("seconds", 0.0),
        error=record.get("error"),
        history=record.get("history") or [],
        record=record,
    )


def probe_output(output: str, run_id: str) -> None:
    """Write `_runs/<run_id>.json` (status running) before any work: no write access fails the run now, not later."""
    uri = storage.join(output.rstrip("/") + "/", f"_runs/{run_id}.json")
    body = {"run_id": run_id, "status": "running", "started_at": now_iso()}
    _write(uri, json.dumps(body, indent=2).encode(), "application/json")


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
    _write(uri, json.dumps(body, indent=2, allow_nan=False).encode(), "application/json")
    return uri


# -------------------------------------------------------------------------------------------------- the run


def local_hooks(stylizer: Stylizer | None = None, on_progress: ProgressCallback | None = None) -> RunHooks:
    """Run batches one after another in this process (`nst run --no-prefect`)."""
    engine = stylizer or Stylizer(read_bytes=storage.read_bytes)
    return RunHooks(run_batch=lambda batch: run_batch(batch, stylizer=engine, on_progress=on_progress))


def new_run_id() -> str:
    """A unique run id for runs without an orchestrator's id (time first, so ids sort; claims tell runs apart by it)."""
    return time.strftime("local-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:8]


@contextlib.contextmanager
def input_spool() -> Iterator[str]:
    """A local directory holding the run's input bytes by sha256, removed when the run ends."""
    with tempfile.TemporaryDirectory(prefix="nst-inputs-") as directory:
        yield directory


def run(
    manifest: str | Manifest,
    options: RunOptions | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    run_id: str | None = None,
    hooks: RunHooks | None = None,
) -> RunSummary:
    """Load, plan, run every batch through `hooks.run_batch`, then write the run summary (nothing on a dry run).

    `overrides` rank above the manifest's `defaults:` and below its per-pair values.
    """
    options = options or RunOptions()
    hooks = hooks or local_hooks()
    run_id = run_id or new_run_id()
    loaded = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, overrides=overrides)
    with input_spool() as spool:
        the_plan = plan(loaded, options, spool=None if options.dry_run else spool)
        output = loaded.output
        batches = make_batches(
            the_plan.to_run, max_pairs=options.max_batch_pairs, output=output, run_id=run_id, spool=spool
        )
        if hooks.planned is not None:
            hooks.planned(the_plan, batches)
        if options.dry_run:
            records = [not_run_record(p, output, "dry run") for p in the_plan.to_run]
            return RunSummary(run_id, loaded, _in_manifest_order(loaded, [*records, *the_plan.skipped]), dry_run=True)
        probe_output(output, run_id)
        clear_stale_claims(output, the_plan.claimed_done, run_id, hooks.run_is_live)
        records, left = _run_batches(batches, hooks, options.max_failures)
    reason = f"not started: max_failures={options.max_failures} reached"
    records += [not_run_record(p, output, reason) for batch in left for p in batch.pairs]
    records = _in_manifest_order(loaded, [*records, *the_plan.skipped])
    summary_uri = write_run_summary(output, run_id, records, manifest=loaded.source)
    return RunSummary(run_id, loaded, records, summary_uri=summary_uri)


def _in_manifest_order(manifest: Manifest, records: list[PairRecord]) -> list[PairRecord]:
    order = {p.id: i for i, p in enumerate(manifest.pairs)}
    return sorted(records, key=lambda r: order.get(r.id, len(order)))


def _run_batches(
    batches: list[Batch], hooks: RunHooks, max_failures: int | None
) -> tuple[list[PairRecord], list[Batch]]:
    """Run batches, `hooks.parallel` at a time; after `max_failures` failed pairs start no more. (records, not run)."""
    records: list[PairRecord] = []
    pending = deque(batches)
    failures = 0
    running: dict[Future[list[PairRecord]], Batch] = {}
    with ThreadPoolExecutor(max(1, hooks.parallel), thread_name_prefix="nst-batch") as pool:
        while pending or running:
            while pending and len(running) < hooks.parallel and (max_failures is None or failures < max_failures):
                batch = pending.popleft()
                context = contextvars.copy_context()  # the caller's context (e.g. its flow run) goes with the batch
                running[pool.submit(context.run, hooks.run_batch, batch)] = batch
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                batch = running.pop(future)
                batch_records = future.result()
                records += batch_records
                failures += sum(r.status == "failed" for r in batch_records)
                if hooks.batch_done is not None:
                    hooks.batch_done(batch, batch_records)
    return records, list(pending)
