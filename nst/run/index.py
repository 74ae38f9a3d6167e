"""The record index: what each pair's JSON record says, cached by the record's identity, in one object per output.

A nightly over N done pairs reads this one object and the listing instead of N records. An entry counts only while
the record's listed identity (size + ETag, or size + mtime) is the one it was taken from, so a stale, missing or
corrupt index costs reads, never a wrong skip. Runs rewrite it when they end (the last writer wins).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from nst.errors import NSTError
from nst.params import Role, StyleParams, fields_with
from nst.run.inputs import Identity
from nst.run.layout import read_json, summary_uri, write
from nst.run.records import Output, Record, Steps, parse_record, schedule_steps

# 2: entries keep the record's schedule; 3: with each scale's start. An older index is read as none: its records are
# read once.
INDEX_SCHEMA = 3
MAX_INDEX_BYTES = 64 * 2**20  # gzip-compressed
MAX_INDEX_INFLATED = 256 * 2**20  # ~250,000 pairs' entries


@dataclass(slots=True)
class Written:
    """The facts of one stored record that decide whether its pair is done (the rest, losses included, is not kept:
    a skipped pair's losses are in its own JSON)."""

    id: str
    status: str
    params_digest: str
    weights_sha256: str | None
    engine_revision: int
    inputs: list[tuple[str, str | None, Identity | None]]  # (uri, sha256, identity): the content, then each style
    image: str | None
    image_sha256: str | None
    image_identity: Identity | None
    manifest: str | None = None  # the name of the manifest that wrote it (None: written before records named one)
    schedule: list[Steps] | None = None  # (height, width, iterations, start) per scale as the record lists them

    @classmethod
    def of(cls, record: Record | Mapping[str, Any]) -> Written | None:
        """The facts of a record (or of its parsed JSON; None if that is not a record)."""
        parsed = record if isinstance(record, Record) else parse_record(record)
        if parsed is None:
            return None
        output = parsed.output or Output()
        entries = [parsed.inputs.content, *parsed.inputs.styles]
        weights = parsed.weights.sha256 if parsed.weights else None
        # Strings most records share (status, digests, style URIs) are interned: 100,000 of them cost one each.
        return cls(
            id=parsed.id,
            status=sys.intern(parsed.status),
            params_digest=sys.intern(params_digest(parsed.params)),
            weights_sha256=sys.intern(weights) if weights is not None else None,
            engine_revision=parsed.engine_revision,
            inputs=[(sys.intern(e.uri), e.sha256, _identity(e.identity)) for e in entries],
            image=output.image,
            image_sha256=output.image_sha256,
            image_identity=_identity(output.image_identity),
            manifest=sys.intern(parsed.manifest) if parsed.manifest is not None else None,
            schedule=schedule_steps(parsed),
        )


def _identity(stored: Mapping[str, int | str] | None) -> Identity | None:
    """A stored identity as the plain dict the index keeps (None: not recorded)."""
    return None if stored is None else dict(stored)


Index = dict[str, tuple[Identity, Written]]  # pair id -> (its record's identity, the record's facts)
# Checks every entry against Written's own field types (a field added to Written is checked too).
_INDEX: TypeAdapter[Index] = TypeAdapter(Index)


def params_digest(params: dict[str, Any]) -> str:
    """A digest of the parameters that decide the image (all but Role.NOT_RESULT), as JSON values.

    The weights count by content (a record's weights sha256 is compared apart), not by path: a `weights` path is
    digested as if unset, so a copy of the same file elsewhere is the same work, and the digest of a record that never
    set weights is what it always was.
    """
    skip = set(fields_with(StyleParams, Role.NOT_RESULT))
    kept = {k: v for k, v in params.items() if k not in skip}
    if kept.get("weights") is not None:
        kept["weights"] = None
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def index_uri(output: str) -> str:
    """`<output>/_runs/records-index.json.gz`."""
    return summary_uri(output, "records-index", ".json.gz")


def read_index(output: str) -> Index:
    """Pair id -> (the record's identity, its facts); empty when there is no usable index (too large, inflating past
    MAX_INDEX_INFLATED, nested too deeply, out-of-range numbers, or not shaped like an index: never an error)."""
    # Read beneath the output (`layout.read_json`): an index behind a `_runs` symlink is absent, never trusted.
    body = read_json(index_uri(output), max_bytes=MAX_INDEX_BYTES, inflated_max=MAX_INDEX_INFLATED)
    if not isinstance(body, dict) or body.get("schema") != INDEX_SCHEMA:
        return {}
    try:
        return _INDEX.validate_python(body.get("records"))
    except ValidationError:
        return {}


def write_index(output: str, entries: Index) -> None:
    """Store the index (best effort: without it the next run reads the records instead)."""
    body = {"schema": INDEX_SCHEMA, "records": {i: [ident, asdict(w)] for i, (ident, w) in entries.items()}}
    with contextlib.suppress(NSTError):
        write(index_uri(output), gzip.compress(json.dumps(body).encode(), compresslevel=5), "application/gzip")
