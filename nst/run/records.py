"""A pair's JSON record in storage: written after its image, read back as a `PairRecord`; the run's summary."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, ValidationError

import nst
from nst import storage
from nst.engine.images import encode_png, sha256_bytes
from nst.errors import NSTError
from nst.manifest import PairSpec
from nst.params import StyleParams
from nst.results import Status, error_info, now_iso, runner, versions
from nst.run.inputs import Identity, InputFacts, identity
from nst.run.layout import output_uris, summary_uri, write
from nst.safejson import MAX_RECORD_BYTES, read_json
from nst.schedule import START_INIT, START_UPSAMPLED, schedule

if TYPE_CHECKING:
    from PIL import Image

    from nst.engine.pairs import PairResult

RECORD_SCHEMA = 2
# Loss rows a record keeps (evenly thinned past this): the curve, not every iteration of a 100,000-iteration run.
MAX_HISTORY_ROWS = 1000
# A record without an engine revision was made before revisions were counted.
FIRST_REVISION = 1
# Bounds of what a record read back may hold (far above what nst writes): anything past them is not ours.
MAX_NAME = 1024  # a pair id, a manifest's name, a run id, a host
MAX_URI = 16384
MAX_STYLES = 10_000
MAX_COUNT = 2**63 - 1


def _text(limit: int) -> PlainValidator:
    """A string of at most `limit` characters, taken as it is: a non-UTF-8 file name's escapes (lone surrogates,
    which pydantic's own `str` refuses) included."""

    def check(value: object) -> str:
        if not isinstance(value, str) or len(value) > limit:
            raise ValueError(f"not a string of at most {limit} characters")
        return value

    return PlainValidator(check, json_schema_input_type=str)


Name = Annotated[str, _text(MAX_NAME)]
Uri = Annotated[str, _text(MAX_URI)]
Fields = dict[str, Any]  # JSON carried as it was written (parameters, an error, versions): read by no decision
Count = Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)]
# An int stays an int and a float a float (a record read and written again is the same JSON); never NaN or inf.
Number = Annotated[StrictInt, Field(ge=-MAX_COUNT, le=MAX_COUNT)] | Annotated[float, Field(allow_inf_nan=False)]
StoredIdentity = Annotated[dict[str, Count | Name], Field(max_length=8)]  # {size, etag} or {size, mtime_ns}


class _Part(BaseModel):
    """Strict (a wrong type is absent, never coerced), frozen, and keeping keys a newer nst added (written back)."""

    model_config = ConfigDict(
        strict=True, extra="allow", frozen=True, validate_by_name=False, validate_by_alias=True, serialize_by_alias=True
    )


class InputEntry(_Part):
    """One input a pair was made from: its URI, and its sha256 and identity as the run saw them (None: unread)."""

    uri: Uri
    sha256: Name | None = None
    identity: StoredIdentity | None = None


class Inputs(_Part):
    """The content, then each style."""

    content: InputEntry
    styles: Annotated[list[InputEntry], Field(min_length=1, max_length=MAX_STYLES)]


class Weights(_Part):
    """The loss network's weights: where from, their sha256, the network and its input space."""

    source: Uri | None = None
    sha256: Name | None = None
    network: Name | None = None
    preprocessing: Name | None = None


class Output(_Part):
    """Where the pair's files are, and the PNG's sha256 and identity as written (None: no image)."""

    image: Uri | None = None
    json_uri: Uri | None = Field(None, alias="json")
    image_sha256: Name | None = None
    image_identity: StoredIdentity | None = None


class Record(_Part):
    """A pair's JSON record, schema 2 (older records read too: what they lack has its default; only `id`, `status`
    and `inputs` are required, as the readers did before the model).

    Built by `build_record`, written by `store_record` (`record_json`), read by `read_record`: the only three.
    """

    schema_: Annotated[StrictInt, Field(alias="schema", ge=1, le=MAX_COUNT)] = 1  # never missing from ours
    id: Name
    manifest: Name | None = None  # the owner's name (None: written before records named their manifest)
    status: Status
    params: Fields = Field(default_factory=dict)
    inputs: Inputs
    weights: Weights | None = None
    engine_revision: Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)] = FIRST_REVISION
    final_losses: dict[str, Number] | None = None
    history: list[dict[str, Number]] = Field(default_factory=list)
    iterations: Count = 0
    schedule: list[Fields] | None = None
    seconds: Number = 0.0
    device: Name | None = None
    host: Name | None = None
    worker: Name | None = None
    versions: Fields = Field(default_factory=dict)
    output: Output | None = None
    error: Fields | None = None
    warnings: list[Fields] = Field(default_factory=list)
    run_id: Name | None = None
    finished_at: Name | None = None


def parse_record(data: object) -> Record | None:
    """The record of parsed JSON, or None (absent) if it is not one: never an exception."""
    if not isinstance(data, Mapping):
        return None
    try:
        return Record.model_validate(data)
    except ValidationError:
        return None


def record_json(record: Record) -> bytes:
    """A record's stored JSON: the keys it was built or read with, in order; a NaN fails loudly (JSON has none)."""
    return json.dumps(record.model_dump(exclude_unset=True), indent=2, allow_nan=False).encode()


@dataclass(slots=True)
class PairRecord:
    """How one pair ended: what the report and the run summary need of its JSON record (not the whole record)."""

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
    image_identity: Identity | None = None  # the PNG's size + ETag/mtime as written (checks a Cached batch)

    @classmethod
    def of(cls, spec: PairSpec, record: Record, status: Status | None = None, *, history: bool = True) -> PairRecord:
        """The PairRecord of a stored record (`status` overrides the record's, e.g. `skipped`; history if asked)."""
        status = status or record.status
        output = record.output or Output()
        return cls(
            id=spec.id,
            status=status,
            content_uri=spec.content,
            style_uris=list(spec.styles),
            image_uri=output.image,
            json_uri=output.json_uri or "",
            final_losses=None if record.final_losses is None else dict(record.final_losses),
            seconds=0.0 if status == "skipped" else float(record.seconds),
            error=record.error,
            history=[dict(row) for row in record.history] if history else [],
            image_identity=None if output.image_identity is None else dict(output.image_identity),
        )

    @classmethod
    def skipped(
        cls, spec: PairSpec, json_uri: str, image_uri: str | None, image_identity: Identity | None
    ) -> PairRecord:
        """A pair already done: its image (and that image's identity as written) stay; nothing is written."""
        return cls(
            spec.id, "skipped", spec.content, list(spec.styles), image_uri, json_uri, image_identity=image_identity
        )

    @classmethod
    def not_run(cls, spec: PairSpec, output: str, reason: str) -> PairRecord:
        """A pair that was never started (dry run, `max_failures` reached, claimed elsewhere): nothing is written."""
        _, json_uri = output_uris(output, spec.id)
        error = error_info("NotRun", reason)
        return cls(spec.id, "not_run", spec.content, list(spec.styles), None, json_uri, error=error)

    @classmethod
    def failed(cls, spec: PairSpec, output: str, error: dict[str, Any]) -> PairRecord:
        """A pair failed without a record of this run (refused, or left undone by a dead shard): nothing is written."""
        _, json_uri = output_uris(output, spec.id)
        return cls(spec.id, "failed", spec.content, list(spec.styles), None, json_uri, error=error)


def read_record(uri: str, *, max_bytes: int = MAX_RECORD_BYTES) -> Record | None:
    """A pair's record, or None (absent: the pair simply runs again) when it cannot be read or parsed within the
    limits of nst.safejson (size checked before reading, depth, finite numbers) or is not a `Record`."""
    return parse_record(read_json(uri, max_bytes=max_bytes))


def inputs_section(spec: PairSpec, inputs: dict[str, InputFacts]) -> Inputs:
    """{content: {uri, sha256, identity}, styles: [{uri, sha256, identity}]}: what the pair was made from."""

    def entry(uri: str) -> InputEntry:
        fact = inputs.get(uri) or InputFacts(uri)
        return InputEntry(uri=uri, sha256=fact.sha256, identity=fact.identity)

    return Inputs(content=entry(spec.content), styles=[entry(s) for s in spec.styles])


def build_record(
    spec: PairSpec,
    inputs: dict[str, InputFacts],
    output: str,
    run_id: str | None,
    *,
    status: Status,
    params: StyleParams,
    image: tuple[str, Identity] | None = None,
    result: PairResult[Image.Image] | None = None,
    error: dict[str, Any] | None = None,
    image_uri: str | None = None,
) -> Record:
    """One pair's JSON record: what ran, on what inputs and weights, with which engine, and how it ended.

    `image` is the written PNG's (sha256, identity), at `image_uri` if given (`nst stylize -o out.PNG`), else at
    `<output>/<id>.png`. Non-finite numbers never reach a record (JSON has none).
    """
    default_image, json_uri = output_uris(output, spec.id)
    image_uri = image_uri or default_image
    return Record.model_validate(
        {
            "schema": RECORD_SCHEMA,
            "id": spec.id,
            "manifest": spec.manifest or None,  # the owner: another manifest never replaces this result silently
            "status": status,
            "params": params.model_dump(mode="json"),
            "inputs": inputs_section(spec, inputs),
            "weights": Weights(**result.weights.to_dict()) if result and result.weights else None,
            "engine_revision": nst.ENGINE_REVISION,
            "final_losses": result.final_losses if result else None,
            "history": _bounded([row for row in (result.history if result else []) if _finite(row)]),
            "iterations": result.iterations if result else 0,
            "schedule": _schedule(params, result),
            "seconds": round(result.seconds, 3) if result else 0.0,
            "device": result.device if result else None,
            **runner(),
            "versions": versions(),
            "output": {
                "image": image_uri if image else None,
                "json": json_uri,
                "image_sha256": image[0] if image else None,
                "image_identity": image[1] if image else None,
            },
            "error": error,
            "warnings": result.warnings if result else [],
            "run_id": run_id,
            "finished_at": now_iso(),
        }
    )


def _schedule(params: StyleParams, result: PairResult[Image.Image] | None) -> list[dict[str, Any]] | None:
    """The scales the image was made at, coarse to fine, with each one's steps (None: no image)."""
    if result is None or result.image is None:
        return None
    scales = schedule(result.image.height, result.image.width, params.scales, params.iterations, params.init)
    return [scale.to_dict() for scale in scales]


Steps = tuple[int, int, int, str]  # one scale as the planner compares it: (height, width, iterations, start)


def schedule_steps(record: Record) -> list[Steps] | None:
    """The record's schedule as (height, width, iterations, start) per scale, coarse to fine: None when it lists none
    (made before records did, or no image), [] when what it lists is not a schedule (never one a pair runs). A scale
    that lists no start was made before starts were listed: the first from `init`, the others upsampled."""
    if record.schedule is None:
        return None
    steps = []
    for index, scale in enumerate(record.schedule):
        height, width, iterations = (scale.get(k) for k in ("height", "width", "iterations"))
        start = scale.get("start", START_UPSAMPLED if index else START_INIT)
        if type(height) is not int or type(width) is not int or type(iterations) is not int or type(start) is not str:
            return []
        steps.append((height, width, iterations, start))
    return steps


def _bounded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most MAX_HISTORY_ROWS rows, evenly spaced, the last one kept: records do not grow with iterations."""
    if len(rows) <= MAX_HISTORY_ROWS:
        return rows
    step = -(-(len(rows) - 1) // (MAX_HISTORY_ROWS - 1))
    return [*rows[:-1:step], rows[-1]]


def _finite(values: dict[str, Any] | None) -> bool:
    """Whether every number of a loss row is finite (JSON has no NaN)."""
    return values is not None and all(
        math.isfinite(v) for v in values.values() if isinstance(v, float | int) and not isinstance(v, bool)
    )


def write_pair_result(
    spec: PairSpec,
    inputs: dict[str, InputFacts],
    result: PairResult[Image.Image],
    output: str,
    run_id: str | None,
    *,
    leftovers: Sequence[str] = (),
    image_uri: str | None = None,
) -> PairRecord:
    """Write the image, then the JSON (each atomically), so a JSON always describes the complete pair beside it.

    Then, best effort, the intermediate images (`save_every`: `<id>.iter<N>.png`) and the removal of `leftovers`
    (an earlier run's intermediates) that this run did not write again: they never fail a written pair.
    """
    image = None
    image_uri = image_uri or output_uris(output, spec.id)[0]
    if result.image is not None:
        if result.status == "succeeded" and not _finite(result.final_losses):
            raise ValueError(f"pair {spec.id}: a succeeded record needs finite final losses")
        png = encode_png(result.image)
        image = (sha256_bytes(png), identity(write(image_uri, png, "image/png")))
    record = build_record(
        spec,
        inputs,
        output,
        run_id,
        status=result.status,
        params=result.params,
        image=image,
        result=result,
        error=result.error,
        image_uri=image_uri,
    )
    stored = store_record(spec, record)
    written = set()
    for iteration, img in result.intermediates if result.image is not None else []:
        uri = image_uri[: -len(".png")] + f".iter{iteration:06d}.png"
        with contextlib.suppress(NSTError):
            write(uri, encode_png(img), "image/png")
            written.add(uri)
    for uri in set(leftovers) - written:
        with contextlib.suppress(NSTError):
            storage.delete(uri)
    return stored


def record_failure(
    spec: PairSpec,
    inputs: dict[str, InputFacts],
    output: str,
    run_id: str | None,
    error: dict[str, Any],
    *,
    best_effort: bool = False,
) -> PairRecord:
    """Write a failed JSON record for a pair; `best_effort` swallows write errors (storage may be what failed).

    A pair whose success this run already wrote (before its batch failed) keeps it: never downgraded.
    """
    written = _written_success(spec, output, run_id)
    if written is not None:
        return written
    record = build_record(spec, inputs, output, run_id, status="failed", params=spec.params, error=error)
    try:
        return store_record(spec, record)
    except NSTError:
        if not best_effort:
            raise
        return PairRecord.of(spec, record)


def _written_success(spec: PairSpec, output: str, run_id: str | None) -> PairRecord | None:
    """The success this run already wrote for the pair, if its record and the image it describes are both there."""
    image_uri, json_uri = output_uris(output, spec.id)
    written = read_record(json_uri)
    if not run_id or written is None or written.status != "succeeded" or written.run_id != run_id:
        return None
    stored = written.output.image_identity if written.output else None
    try:
        intact = stored is not None and identity(storage.stat(image_uri)) == stored
    except NSTError:
        return None
    return PairRecord.of(spec, written) if intact else None


def verify_written(records: list[PairRecord]) -> list[PairRecord]:
    """The succeeded records whose image or JSON is no longer what they say (e.g. deleted since a cached batch)."""

    def gone(r: PairRecord) -> bool:
        try:
            storage.stat(r.json_uri)
            return r.image_uri is None or identity(storage.stat(r.image_uri)) != r.image_identity
        except NSTError:
            return True

    return [r for r in records if r.status == "succeeded" and gone(r)]


def store_record(spec: PairSpec, record: Record) -> PairRecord:
    """Write a pair's JSON record (after its image) at its `output.json`; a NaN would not be JSON: fail loudly."""
    if record.output is None or not record.output.json_uri:
        raise ValueError(f"pair {spec.id}: a record to store names its JSON's URI")
    write(record.output.json_uri, record_json(record), "application/json")
    return PairRecord.of(spec, record)


def probe_output(output: str, run_id: str) -> None:
    """Write `_runs/<run_id>.json` (status running) before any work: no write access fails the run now, not later."""
    body = {"run_id": run_id, "status": "running", "started_at": now_iso()}
    write(summary_uri(output, run_id), json.dumps(body, indent=2).encode(), "application/json")


def write_run_summary(output: str, run_id: str, records: Sequence[PairRecord], **extra: Any) -> str:
    """Write `_runs/<run_id>.json` listing every pair's status, one pair per line; returns its URI.

    Built pair by pair (no list of dicts): a 100,000-pair summary is ~40 MB of text, not several times that in objects.
    """
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    head = {"run_id": run_id, "finished_at": now_iso(), "counts": counts, **extra}
    lines = (
        json.dumps(
            {
                "id": r.id,
                "status": r.status,
                "image": r.image_uri,
                "json": r.json_uri,
                "final_losses": r.final_losses,
                "seconds": r.seconds,
                "error": r.error,
            },
            allow_nan=False,
        )
        for r in records
    )
    body = json.dumps(head, allow_nan=False)[:-1] + ', "pairs": [\n' + ",\n".join(lines) + "\n]}\n"
    uri = summary_uri(output, run_id)
    write(uri, body.encode(), "application/json")
    return uri
