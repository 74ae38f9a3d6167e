"""Plan a run: which pairs are done (skipped) and which run, reading as little as possible.

A pair is done when its JSON record says succeeded, with the same result parameters, the same inputs (sha256), the
same weights (sha256) and this engine revision, and the PNG beside it is the one the record describes (size + ETag or
mtime, as its write returned). Input hashes are reused from the record while an input's size + ETag/mtime are
unchanged; only new or changed inputs, and the inputs of pairs that will run, are downloaded. PNGs are never read
(except once for records written before the image's identity was recorded).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import nst
from nst import storage
from nst.engine import canonical_params
from nst.errors import ManifestError, NSTError
from nst.images import sha256_bytes
from nst.manifest import Manifest, PairSpec
from nst.manifest.inputs import InputSettings
from nst.params import Role, StyleParams, fields_with
from nst.run.inputs import InputFacts, identity, read_inputs, stat_inputs
from nst.run.layout import READ_THREADS, claim_uri, output_uris
from nst.run.records import PairRecord, read_record
from nst.run_options import RunOptions
from nst.weights import weights_digest

# Records written before image identities were recorded: their PNG is read (at most this many bytes) and hashed once.
MAX_LEGACY_PNG_BYTES = 512 * 2**20
# A record without an engine revision was made before revisions were counted.
FIRST_REVISION = 1
Verdict = Literal["run", "done", "older_engine", "check_inputs"]


@dataclass
class Plan:
    """What a run will do: pairs to run (with the facts of their inputs) and pairs already done."""

    manifest: Manifest
    to_run: list[PairSpec]
    inputs: dict[str, InputFacts]  # every input of the manifest's selected pairs; read (sha256, dims) if it runs
    skipped: list[PairRecord]
    older_engine: list[str] = field(default_factory=list)  # done by an older ENGINE_REVISION (skipped unless asked)
    claimed_done: list[str] = field(default_factory=list)  # done pairs whose claim file is still there


@dataclass
class _Found:
    """What plan needs of one existing record (the record itself is not kept: it may hold a long history)."""

    verdict: Verdict
    hashes: dict[str, tuple[str | None, Any]]  # input URI -> (recorded sha256, recorded identity)
    skipped: PairRecord | None = None
    older: bool = False  # made by another engine revision


def selected(manifest: Manifest, options: RunOptions) -> list[PairSpec]:
    """The manifest's pairs that `options.pair_ids` selects (unknown ids are an error), layer names canonical."""
    specs = manifest.pairs
    if options.pair_ids is not None:
        wanted = set(options.pair_ids)
        unknown = sorted(wanted - {p.id for p in specs})
        if unknown:
            shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
            raise ManifestError(f"{manifest.source}: pair_ids not in the manifest: {shown}")
        specs = [p for p in specs if p.id in wanted]
    return [p.model_copy(update={"params": canonical_params(p.params)}) for p in specs]


def plan(manifest: Manifest, options: RunOptions, *, spool: str | None = None) -> Plan:
    """Decide which pairs run; read (into `spool`) only the inputs of pairs that run or whose identity changed."""
    specs = selected(manifest, options)
    inputs = stat_inputs(sorted({u for p in specs for u in (p.content, *p.styles)}))
    listing = {} if options.force else {i.uri: i for i in _list_output(manifest.output)}
    found = {} if options.force else _existing(manifest.output, specs, listing)
    settings = InputSettings.from_env()
    max_pixels = max((p.params.max_input_pixels for p in specs), default=1)

    def read(uris: set[str]) -> None:
        read_inputs(
            [inputs[u] for u in sorted(uris)], spool=spool, max_bytes=settings.max_input_bytes, max_pixels=max_pixels
        )

    changed = {
        u
        for f in found.values()
        if f.verdict == "check_inputs"
        for u, (_, ident) in f.hashes.items()
        if ident is None or ident != inputs[u].identity
    }
    read(changed)
    to_run, skipped, older = [], [], []
    for spec in specs:
        verdict = _with_inputs(found[spec.id], inputs) if spec.id in found else "run"
        if verdict == "older_engine" and options.rerun_older_engine:
            verdict = "run"
        if verdict == "run":
            to_run.append(spec)
            continue
        skipped.append(found[spec.id].skipped)  # type: ignore[arg-type]
        if verdict == "older_engine":
            older.append(spec.id)
    read({u for p in to_run for u in (p.content, *p.styles)})
    claims = [r.id for r in skipped if claim_uri(manifest.output, r.id) in listing]
    return Plan(manifest, to_run, inputs, skipped, older_engine=older, claimed_done=claims)


def _list_output(output: str) -> list[storage.ObjectInfo]:
    try:
        return storage.list_prefix(output.rstrip("/") + "/")
    except NSTError:  # not there yet, or not listable: nothing is done (writing will say what is wrong)
        return []


def _with_inputs(found: _Found, inputs: dict[str, InputFacts]) -> Verdict:
    """The verdict once inputs are known: a recorded sha256 holds while the identity is unchanged, else the new one."""
    if found.verdict != "check_inputs":
        return found.verdict
    for uri, (sha, ident) in found.hashes.items():
        fact = inputs[uri]
        if fact.sha256 is not None:
            current = fact.sha256  # read this run
        else:
            current = sha if ident is not None and ident == fact.identity else None
        if current is None or current != sha:
            return "run"
    return "older_engine" if found.older else "done"


def _existing(output: str, specs: list[PairSpec], listing: dict[str, storage.ObjectInfo]) -> dict[str, _Found]:
    """Each pair's existing record, judged on everything but the input hashes (read in parallel, then dropped)."""
    digests: dict[tuple[str, str | None], str | None] = {}
    for spec in specs:
        key = (spec.params.network, spec.params.weights)
        if key not in digests and output_uris(output, spec.id)[1] in listing:
            try:
                digests[key] = weights_digest(*key)
            except NSTError:
                digests[key] = None  # the pair runs, and fails there saying why

    def one(spec: PairSpec) -> tuple[str, _Found] | None:
        image_uri, json_uri = output_uris(output, spec.id)
        if json_uri not in listing:
            return None
        record = read_record(json_uri)
        if record is None:
            return None
        weights = digests.get((spec.params.network, spec.params.weights))
        return spec.id, _judge(spec, record, weights, listing.get(image_uri))

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return dict(item for item in pool.map(one, specs) if item is not None)


def _judge(spec: PairSpec, record: dict[str, Any], weights: str | None, png: storage.ObjectInfo | None) -> _Found:
    """A record judged on status, parameters, weights, revision and the PNG beside it (inputs come after)."""
    output = record.get("output") or {}
    recorded = _recorded_inputs(spec, record)
    ok = (
        record.get("status") == "succeeded"
        and record.get("id") == spec.id
        and recorded is not None
        and weights is not None
        and (record.get("weights") or {}).get("sha256") == weights
        and _same_params(spec, record)
        and png is not None
        and output.get("image") == png.uri
        and _png_intact(output, png)
    )
    if not ok or recorded is None:
        return _Found("run", {})
    older = record.get("engine_revision", FIRST_REVISION) != nst.ENGINE_REVISION
    return _Found("check_inputs", recorded, PairRecord.from_json(spec, record, "skipped", history=False), older)


def _recorded_inputs(spec: PairSpec, record: dict[str, Any]) -> dict[str, tuple[str | None, Any]] | None:
    """Input URI -> (sha256, identity) as the record has them; None unless it names exactly this pair's inputs."""
    section = record.get("inputs") or {}
    entries = [section.get("content") or {}, *(section.get("styles") or [])]
    if [e.get("uri") for e in entries if isinstance(e, dict)] != [spec.content, *spec.styles]:
        return None
    return {e["uri"]: (e.get("sha256"), e.get("identity")) for e in entries}


def _same_params(spec: PairSpec, record: dict[str, Any]) -> bool:
    """Whether the record was made with the same result parameters (device, logging... may differ)."""
    skip = set(fields_with(StyleParams, Role.NOT_RESULT))
    old = {k: v for k, v in (record.get("params") or {}).items() if k not in skip}
    return old == spec.params.result_values()


def _png_intact(output: dict[str, Any], png: storage.ObjectInfo) -> bool:
    """Whether the PNG is the one the record describes: its listed identity, or (older records) its sha256."""
    if output.get("image_identity") is not None:
        return bool(output["image_identity"] == identity(png))
    if not output.get("image_sha256"):
        return False
    try:
        return sha256_bytes(storage.read_bytes(png.uri, max_bytes=MAX_LEGACY_PNG_BYTES)) == output["image_sha256"]
    except NSTError:
        return False
