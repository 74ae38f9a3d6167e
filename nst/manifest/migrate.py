"""`nst migrate-ids`: move outputs made under an earlier id rule to the ids this manifest derives now.

A record names the inputs it was made from, so each `<old>.json` is matched to this manifest's pair with the same
content and style URIs, whatever rule (and whatever other files) made its old id. Its `<old>.png`, intermediates
(`<old>.iter<N>.png`) and JSON move to the new id: copies first, the rewritten JSON last, then the old files go.
"""

from __future__ import annotations

import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nst import safejson, storage
from nst.errors import NSTError, OutputError
from nst.manifest.model import Manifest
from nst.run.claims import claim_pair, release_pair
from nst.run.records import Record, read_record

READ_THREADS = 16
MAX_RECORD_BYTES = 64 * 2**20


@dataclass
class Move:
    """One pair's outputs from `old` to `new`: (from, to) URIs, the JSON last."""

    old: str
    new: str
    files: list[tuple[str, str]] = field(default_factory=list)


def _inputs_key(record: Record) -> tuple[str, tuple[str, ...]]:
    """(content URI, style URIs) a record names."""
    return record.inputs.content.uri, tuple(s.uri for s in record.inputs.styles)


def plan_moves(manifest: Manifest) -> tuple[list[Move], list[str]]:
    """The moves this manifest's output needs, and a line for each record left where it is (and why)."""
    prefix = manifest.output.rstrip("/") + "/"
    names = {info.uri[len(prefix) :] for info in storage.list_prefix(prefix)}
    stems = sorted(n[: -len(".json")] for n in names if n.endswith(".json") and "/" not in n)
    with ThreadPoolExecutor(min(READ_THREADS, max(1, len(stems)))) as pool:
        # Bounded (nst.safejson) and typed: a corrupt record, or one not shaped like ours, is left where it is.
        records = dict(
            zip(stems, pool.map(lambda s: read_record(storage.join(prefix, f"{s}.json")), stems), strict=True)
        )
    new_ids = {(p.content, tuple(p.styles)): p.id for p in manifest.pairs}
    moves: list[Move] = []
    notes: list[str] = []
    taken = set(stems)
    for old, record in records.items():
        key = _inputs_key(record) if record is not None else None
        new = new_ids.get(key) if key is not None else None
        if new is None or new == old:
            continue
        if new in taken:
            notes.append(f"left {old}: {new} already has a record")
            continue
        if f"{old}.claim" in names:
            notes.append(f"left {old}: claimed by a run ({old}.claim); try again when it is over")
            continue
        if note := _busy(new, names):
            notes.append(f"left {old}: {note}")
            continue
        taken.add(new)
        own = re.compile(re.escape(old) + r"(\.iter\d+)?\.png")
        files = sorted(n for n in names if own.fullmatch(n))
        moves.append(Move(old, new, [(f, new + f[len(old) :]) for f in files] + [(f"{old}.json", f"{new}.json")]))
    return moves, notes


def _busy(new: str, names: set[str]) -> str | None:
    """Why the new id's files are not ours to write: a run holds its claim, or wrote its image (JSON to come)."""
    if f"{new}.claim" in names:
        return f"{new} is claimed by a run ({new}.claim); try again when it is over"
    own = re.compile(re.escape(new) + r"(\.iter\d+)?\.png")
    written = sorted(n for n in names if own.fullmatch(n))
    return f"{written[0]} already exists" if written else None


def _moved_record(record: dict[str, Any], move: Move, prefix: str) -> dict[str, Any]:
    """The record with its id and its own URIs (and the image's stored identity, if it keeps one) for the new id."""
    uris = {storage.join(prefix, a): storage.join(prefix, b) for a, b in move.files}
    output = dict(record.get("output") or {})
    for key, value in output.items():
        if isinstance(value, str) and value in uris:
            output[key] = uris[value]
    if output.get("image_identity") is not None and isinstance(output.get("image"), str):
        output["image_identity"] = storage.stat(output["image"]).identity()
    return {**record, "id": move.new, "output": output}


def apply_move(manifest: Manifest, move: Move) -> None:
    """Holding both ids' claims (no run writes either meanwhile), move the pair: OutputError if a run took one or wrote
    the new id since `plan_moves`, and nothing moves."""
    token = f"migrate-ids-{uuid.uuid4().hex[:12]}"
    held: list[str] = []
    try:
        for pair_id in (move.old, move.new):
            if busy := claim_pair(manifest.output, pair_id, token):
                raise OutputError(f"{pair_id}: {busy}; nothing moved, try again when it is over")
            held.append(pair_id)
        prefix = manifest.output.rstrip("/") + "/"
        for name in (f"{move.new}.png", f"{move.new}.json"):
            if _exists(storage.join(prefix, name)):
                raise OutputError(f"{name} was written since the move was planned; nothing moved")
        _move(manifest, move)
    finally:
        for pair_id in held:
            release_pair(manifest.output, pair_id, token)


def _exists(uri: str) -> bool:
    try:
        storage.stat(uri)
    except NSTError:
        return False
    return True


def _move(manifest: Manifest, move: Move) -> None:
    """Copy the images, write the rewritten JSON (a complete pair under the new id), then delete the old files."""
    prefix = manifest.output.rstrip("/") + "/"
    *images, (old_json, new_json) = move.files
    for old, new in images:
        storage.write_bytes(storage.join(prefix, new), storage.read_bytes(storage.join(prefix, old)))
    try:
        record = safejson.loads(storage.read_bytes(storage.join(prefix, old_json), max_bytes=MAX_RECORD_BYTES))
    except ValueError:
        raise OutputError(f"{old_json}: not a readable record any more; nothing moved") from None
    if not isinstance(record, dict):
        raise OutputError(f"{old_json}: not a readable record any more; nothing moved")
    body = json.dumps(_moved_record(record, move, prefix), indent=2).encode()
    storage.write_bytes(storage.join(prefix, new_json), body, content_type="application/json")
    for old, _ in [(old_json, new_json), *images]:
        storage.delete(storage.join(prefix, old))
