"""Plan a run: which pairs are done (skipped) and which run, reading as little as possible.

A pair is done when its JSON record says succeeded, with the same result parameters, the same inputs (sha256), the
same weights (sha256) and this engine revision, made on the schedule (scales and steps) these parameters run now, and
the PNG beside it is the one the record describes (size + ETag or mtime, as its write returned). Input hashes are
reused from the record while an input's size + ETag/mtime are unchanged; only new or changed inputs, and the inputs of
pairs that will run, are downloaded. PNGs are never read (except once for records written before the image's identity
was recorded).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import nst
from nst import safejson, storage
from nst.engine.images import sha256_bytes
from nst.engine.weights import weights_digest
from nst.errors import ManifestError, NSTError
from nst.manifest import Manifest, PairSpec
from nst.manifest.inputs import InputSettings, input_roots
from nst.params import StyleParams, canonical_params
from nst.results import error_info
from nst.run.index import Index, Written, params_digest, read_index
from nst.run.inputs import Identity, InputFacts, identity, read_inputs, stat_inputs
from nst.run.layout import READ_THREADS, claim_uri, output_uris, summary_uri
from nst.run.layout import read as read_runs_file
from nst.run.records import PairRecord, Steps, read_record, schedule_steps
from nst.run_options import RunOptions
from nst.schedule import scale_sizes, schedule

# Records written before image identities were recorded: their PNG is read (at most this many bytes) and hashed once.
MAX_LEGACY_PNG_BYTES = 512 * 2**20
MAX_IDS_FILE_BYTES = 64 * 2**20
ITERATION_PNG = re.compile(r"([^/]+)\.iter\d{6}\.png")
# Shown of another manifest's name (read from its record): at most this many characters.
MAX_OWNER_CHARS = 100
Verdict = Literal["run", "done", "older_engine", "check_inputs", "foreign"]


@dataclass
class Plan:
    """What a run will do: pairs to run (with the facts of their inputs) and pairs already done."""

    manifest: Manifest
    to_run: list[PairSpec]
    inputs: dict[str, InputFacts]  # every input of the manifest's selected pairs; read (sha256, dims) if it runs
    skipped: list[PairRecord]
    older_engine: list[str] = field(default_factory=list)  # done by an older ENGINE_REVISION (skipped unless asked)
    claimed_done: list[str] = field(default_factory=list)  # done pairs whose claim file is still there
    leftovers: dict[str, list[str]] = field(default_factory=dict)  # intermediate images earlier runs left, by pair
    index: Index = field(default_factory=dict)  # to store when the run ends (if new)
    refused: list[PairRecord] = field(default_factory=list)  # failed: another manifest's result would be replaced


@dataclass(slots=True)
class _Found:
    """What plan needs of one existing record (the record itself is not kept: it may hold a long history)."""

    verdict: Verdict
    unverified: dict[str, str | None]  # input URI -> recorded sha256, for inputs whose identity is not the recorded one
    skipped: PairRecord | None = None  # None: not done even if every input is unchanged
    older: bool = False  # made by another engine revision
    owner: str | None = None  # another manifest whose succeeded result this is (None: ours, or nobody's)


def selected(manifest: Manifest, options: RunOptions) -> list[PairSpec]:
    """The manifest's pairs that `options.pair_ids` selects (unknown ids are an error), layer names canonical."""
    specs = manifest.pairs
    if options.pair_ids is not None or options.pair_ids_file is not None:
        wanted = set(options.pair_ids or []) | set(_listed_ids(manifest.output, options.pair_ids_file))
        unknown = sorted(wanted - {p.id for p in specs})
        if unknown:
            shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
            raise ManifestError(f"{manifest.source}: pair_ids not in the manifest: {shown}")
        specs = [p for p in specs if p.id in wanted]
    canonical: dict[int, StyleParams] = {}  # pairs of a grid share one parameters object: canonicalise it once
    out = []
    for spec in specs:
        params = canonical.get(id(spec.params))
        if params is None:
            params = canonical[id(spec.params)] = canonical_params(spec.params)
        out.append(spec if params == spec.params else spec.model_copy(update={"params": params}))
    return out


def _listed_ids(output: str, uri: str | None) -> list[str]:
    """The pair ids a `pair_ids_file` lists; it must lie under the output's `_runs/` (a parameter is not a path to
    open anywhere)."""
    if uri is None:
        return []
    runs = summary_uri(output, "")[: -len(".json")]
    if not uri.startswith(runs) or ".." in uri[len(runs) :].split("/"):
        raise ManifestError(f"options.pair_ids_file: {uri} is not under {runs}")
    try:
        return listed_ids(uri, strict=True)
    except (NSTError, ValueError, TypeError) as exc:
        raise ManifestError(f"options.pair_ids_file: {uri} is not a readable JSON list of pair ids ({exc})") from None


def listed_ids(uri: str, *, strict: bool = False) -> list[str]:
    """The JSON list of pair ids in a shard's ids file; [] if unreadable (an error with `strict`)."""
    try:
        ids = safejson.loads(read_runs_file(uri, MAX_IDS_FILE_BYTES))  # beneath the output: no `_runs` link followed
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise TypeError("not a list of strings")
        return ids
    except (NSTError, ValueError, TypeError):
        if strict:
            raise
        return []


def plan(manifest: Manifest, options: RunOptions, *, spool: str | None = None) -> Plan:
    """Decide which pairs run; read (into `spool`) only the inputs of pairs that run or whose identity changed."""
    specs = selected(manifest, options)
    roots = input_roots(manifest.source)  # inputs are stat'ed and read beneath them, never through a symlink out
    inputs = stat_inputs(sorted({u for p in specs for u in (p.content, *p.styles)}), roots=roots)
    listing = {i.uri: i for i in _list_output(manifest.output)}
    index = read_index(manifest.output)  # read even with force: whose results these are still counts
    found, seen = _existing(manifest.output, specs, listing, index, inputs, roots)
    settings = InputSettings.from_env()
    max_pixels = max((p.params.max_input_pixels for p in specs), default=1)

    def read(uris: set[str]) -> None:
        read_inputs(
            [inputs[u] for u in sorted(uris)],
            spool=spool,
            max_bytes=settings.max_input_bytes,
            max_pixels=max_pixels,
            roots=roots,
        )

    read({u for f in found.values() if f.verdict == "check_inputs" for u in f.unverified})
    the_plan = _decide(manifest, specs, found, inputs, options)
    read({u for p in the_plan.to_run for u in (p.content, *p.styles)})
    the_plan.claimed_done = [r.id for r in the_plan.skipped if claim_uri(manifest.output, r.id) in listing]
    the_plan.leftovers = _intermediates(manifest.output, listing, {p.id for p in the_plan.to_run})
    the_plan.index = {**index, **seen} if any(index.get(i) != entry for i, entry in seen.items()) else {}
    return the_plan


def _decide(
    manifest: Manifest,
    specs: list[PairSpec],
    found: dict[str, _Found],
    inputs: dict[str, InputFacts],
    options: RunOptions,
) -> Plan:
    """Each pair's final verdict: run, skipped (done, or by an older engine) or refused (another manifest's result)."""
    the_plan = Plan(manifest, [], inputs, [])
    for spec in specs:
        entry = found.get(spec.id)
        verdict = _with_inputs(entry, inputs) if entry is not None else "run"
        if verdict == "foreign" and not options.replace_others:
            the_plan.refused.append(_refused(spec, manifest.output, (entry.owner if entry else None) or "?"))
            continue
        rerun = verdict == "older_engine" and options.rerun_older_engine
        if verdict == "foreign" or rerun or (options.force and verdict in ("done", "older_engine")):
            verdict = "run"
        if verdict == "run":
            the_plan.to_run.append(spec)
            continue
        record = entry.skipped if entry is not None else None
        assert record is not None  # a record judged done or older has its skipped record
        the_plan.skipped.append(record)
        if verdict == "older_engine":
            the_plan.older_engine.append(spec.id)
    return the_plan


def _refused(spec: PairSpec, output: str, owner: str) -> PairRecord:
    """A pair that would replace another manifest's result: failed, nothing written (its result stays)."""
    shown = owner if owner.isprintable() and len(owner) <= MAX_OWNER_CHARS else owner[:MAX_OWNER_CHARS] + "..."
    message = (
        f"pair {spec.id}: {output_uris(output, spec.id)[1]} is a result of manifest {shown!r} made from other "
        "inputs or parameters; it is kept (--replace-others, or options.replace_others, replaces it)"
    )
    return PairRecord.failed(spec, output, error_info("OwnershipError", message))


def _intermediates(output: str, listing: dict[str, storage.ObjectInfo], ids: set[str]) -> dict[str, list[str]]:
    """The intermediate images (`<id>.iter<N>.png`) earlier runs left for these pairs."""
    base = output_uris(output, "x")[0][: -len("x.png")]
    found: dict[str, list[str]] = {}
    for uri in listing:
        match = ITERATION_PNG.fullmatch(uri[len(base) :]) if uri.startswith(base) else None
        if match and match.group(1) in ids:
            found.setdefault(match.group(1), []).append(uri)
    return found


def _list_output(output: str) -> list[storage.ObjectInfo]:
    try:
        return storage.list_prefix(output.rstrip("/") + "/")
    except NSTError:  # not there yet, or not listable: nothing is done (writing will say what is wrong)
        return []


def _with_inputs(found: _Found, inputs: dict[str, InputFacts]) -> Verdict:
    """The final verdict once this run's inputs are hashed: each input whose identity changed since the record must
    still hash to its recorded sha256, or the pair runs."""
    if found.verdict != "check_inputs":
        return found.verdict
    for uri, sha in found.unverified.items():
        if sha is None or inputs[uri].sha256 != sha:  # read this run (None: unreadable)
            return "foreign" if found.owner else "run"
    if found.skipped is None:  # the same work, but its result is gone or not the one recorded
        return "run"
    return "older_engine" if found.older else "done"


def _existing(
    output: str,
    specs: list[PairSpec],
    listing: dict[str, storage.ObjectInfo],
    index: Index,
    inputs: dict[str, InputFacts],
    roots: list[str],
) -> tuple[dict[str, _Found], Index]:
    """Each pair's existing record judged on all but the input hashes (facts from the index while the record's
    identity is unchanged, else read in parallel), and the index entries of every record seen."""
    digests: dict[tuple[str, str | None], str | None] = {}
    wanted: dict[int, str] = {}  # params digest per parameters object (a grid's pairs share one)
    for spec in specs:
        if id(spec.params) not in wanted:
            wanted[id(spec.params)] = params_digest(spec.params.model_dump(mode="json"))
        key = (spec.params.network, spec.params.weights)
        if key not in digests and output_uris(output, spec.id)[1] in listing:
            try:
                digests[key] = weights_digest(*key, roots=roots)  # a `weights:` file beneath the input roots
            except NSTError:
                digests[key] = None  # the pair runs, and fails there saying why

    def one(spec: PairSpec) -> tuple[PairSpec, Identity, Written, list[Steps] | None] | None:
        info = listing.get(output_uris(output, spec.id)[1])
        if info is None:
            return None
        ident = identity(info)
        cached = index.get(spec.id)
        # An entry whose parameters differ is read again: an older nst digested them otherwise (the weights' path).
        if cached is not None and cached[0] == ident and cached[1].params_digest == wanted[id(spec.params)]:
            return spec, ident, cached[1], cached[1].schedule
        record = read_record(info.uri)
        written = Written.of(record) if record is not None else None
        return (spec, ident, written, schedule_steps(record)) if record is not None and written is not None else None

    with ThreadPoolExecutor(READ_THREADS) as pool:
        seen = [item for item in pool.map(one, specs) if item is not None]
    judged = {}
    for spec, _, written, steps in seen:
        weights = digests.get((spec.params.network, spec.params.weights))
        png = listing.get(output_uris(output, spec.id)[0])
        judged[spec.id] = _judge(spec, written, (weights, wanted[id(spec.params)]), png, inputs, steps)
    return judged, {spec.id: (ident, written) for spec, ident, written, _ in seen}


def _other_schedule(params: StyleParams, recorded: list[Steps] | None) -> bool:
    """Whether the record's image was made on another schedule than `params` (equal in digest to the record's: the
    same scales, iterations and size) run now, judged from the record alone.

    A record that lists none was made before `iterations` meant all steps: each of its scales ran every step, so it
    differs wherever it ran two scales or more (the output's long side is `size`; its short side, unrecorded, is taken
    as long: a pair whose coarser scales were dropped as too small is judged other, never wrongly done).
    """
    if recorded is None:
        return len(scale_sizes(params.size, params.size, params.scales)) > 1
    if not recorded:
        return True
    height, width, *_ = recorded[-1]  # the finest scale is the output's size
    now = schedule(height, width, params.scales, params.iterations, params.init)
    return recorded != [(s.height, s.width, s.iterations, s.start) for s in now]


def _judge(
    spec: PairSpec,
    written: Written,
    wanted: tuple[str | None, str],
    png: storage.ObjectInfo | None,
    inputs: dict[str, InputFacts],
    steps: list[Steps] | None,
) -> _Found:
    """A record judged on status, parameters, weights (`wanted`: their digests now), revision, schedule (`steps`: the
    one it lists, `schedule_steps`) and the PNG beside it; inputs whose identity is the recorded one are the recorded
    ones, the others are hashed and compared after. Another revision or schedule is `older_engine`.

    Another manifest's succeeded result made from other work (inputs, parameters, weights) is `foreign`: never
    replaced silently. The same work is that manifest's result and ours alike.
    """
    weights, params = wanted
    same_work = (
        written.id == spec.id
        and [uri for uri, _, _ in written.inputs] == [spec.content, *spec.styles]
        and weights is not None
        and written.weights_sha256 == weights
        and written.params_digest == params
    )
    theirs = written.status == "succeeded" and written.manifest not in (None, spec.manifest)
    owner = written.manifest if theirs else None
    if not same_work:
        return _Found("foreign" if owner else "run", {}, owner=owner)
    unverified = {uri: sha for uri, sha, ident in written.inputs if ident is None or ident != inputs[uri].identity}
    intact = (
        written.status == "succeeded" and png is not None and written.image == png.uri and _png_intact(written, png)
    )
    if png is None or not intact:
        return _Found("check_inputs", unverified, owner=owner) if owner else _Found("run", {})
    json_uri = png.uri[: -len(".png")] + ".json"
    skipped = PairRecord.skipped(spec, json_uri, written.image, written.image_identity)
    older = written.engine_revision != nst.ENGINE_REVISION or _other_schedule(spec.params, steps)
    return _Found("check_inputs", unverified, skipped, older, owner)


def _png_intact(written: Written, png: storage.ObjectInfo) -> bool:
    """Whether the PNG is the one the record describes: its listed identity, or (older records) its sha256."""
    if written.image_identity is not None:
        return bool(written.image_identity == identity(png))
    if not written.image_sha256:
        return False
    try:
        return bool(sha256_bytes(storage.read_bytes(png.uri, max_bytes=MAX_LEGACY_PNG_BYTES)) == written.image_sha256)
    except NSTError:
        return False


def done_now(
    spec: PairSpec,
    output: str,
    inputs: dict[str, InputFacts],
    *,
    force: bool = False,
    replace_others: bool = False,
    roots: list[str] | None = None,
) -> PairRecord | None:
    """The pair's record if it must not run now that its claim is held (its record read afresh), else None.

    A concurrent run may have finished it since planning (`skipped`, unless `force`), or another manifest may have
    written its own result there (`failed`, unless `replace_others`): `run_batch` asks once it holds the claim.
    """
    png_uri, json_uri = output_uris(output, spec.id)
    record = read_record(json_uri)
    written = Written.of(record) if record is not None else None
    if written is None or written.status != "succeeded":
        return None
    try:
        weights: str | None = weights_digest(spec.params.network, spec.params.weights, roots=roots)
    except NSTError:
        weights = None
    try:
        png: storage.ObjectInfo | None = storage.stat(png_uri)
    except NSTError:
        png = None
    params = params_digest(spec.params.model_dump(mode="json"))
    found = _judge(spec, written, (weights, params), png, inputs, schedule_steps(record) if record else None)
    verdict = _with_inputs(found, inputs)
    if verdict == "foreign" and not replace_others:
        return _refused(spec, output, found.owner or "?")
    return found.skipped if verdict == "done" and not force else None
