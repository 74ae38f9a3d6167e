"""A sharded run's logic on plain data: the cost model, dealing batches to shards, a retry's shards, and how each pair
of a child run ended. The Prefect part (start the children, wait, artifacts) is flows/shard.py.

A child run is seen as a `Child` (id, name, the pairs it was given, how it ended), read by the flow from Prefect's
flow run; nothing here imports Prefect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nst.engine.images import resized_size
from nst.manifest import Manifest, PairSpec
from nst.results import error_info
from nst.run.batches import Batch, make_batches
from nst.run.inputs import InputFacts
from nst.run.layout import READ_THREADS, output_uris, read_json, summary_uri, write
from nst.run.order import in_pair_order
from nst.run.planner import listed_ids
from nst.run.records import PairRecord, read_record
from nst.run_options import RunOptions
from nst.safejson import MAX_RECORD_BYTES
from nst.schedule import schedule

HISTORY_PAIRS = 50  # pairs whose loss history the parent keeps for the report's curves
IDS_IN_A_PARAMETER = 200  # a child's pair ids inline in its options up to this many, else in a file (~40 B each)


@dataclass
class Shard:
    """One child run to start: its name and pairs."""

    name: str
    pair_ids: list[str]


@dataclass(frozen=True)
class Child:
    """A child run as the parent sees it: its id, name, the pairs it was given, and its state (once final, how it
    ended)."""

    id: str
    name: str
    pair_ids: list[str] = field(default_factory=list)
    state: str = "Unknown"
    message: str | None = None


def given_ids(options: Mapping[str, Any]) -> list[str]:
    """The pairs a child run was given: in its options (its `options` parameter), or in the ids file they name."""
    return list(options.get("pair_ids") or []) + (
        listed_ids(options["pair_ids_file"]) if options.get("pair_ids_file") else []
    )


def pair_cost(spec: PairSpec, inputs: dict[str, InputFacts]) -> int:
    """Work of one pair: pixels × steps at each scale of its schedule, summed (one scale: output pixels ×
    iterations; 1 for an unreadable pair: it fails at once)."""
    dims = inputs[spec.content].dims
    if dims is None or any(inputs[u].error for u in (spec.content, *spec.styles)):
        return 1
    width, height = resized_size(*dims, spec.params.size)
    params = spec.params
    scales = schedule(height, width, params.scales, params.iterations, params.init)
    return sum(s.height * s.width * s.iterations for s in scales)


def split_batches(batches: Sequence[Batch], shards: int) -> list[list[str]]:
    """Deal whole batches, costliest first, to the shard with the least work (`pair_cost`); empty shards dropped."""
    loads = [0] * max(1, shards)
    groups: list[list[str]] = [[] for _ in loads]
    costed = [(sum(pair_cost(p, b.inputs) for p in b.pairs), i, b) for i, b in enumerate(batches)]
    for cost, _, batch in sorted(costed, key=lambda c: (-c[0], c[1])):
        target = min(range(len(loads)), key=lambda i: (loads[i], len(groups[i])))
        loads[target] += cost
        groups[target].extend(p.id for p in batch.pairs)
    return [ids for ids in groups if ids]


def plan_shards(
    pending: Sequence[PairSpec],
    inputs: dict[str, InputFacts],
    earlier: Sequence[Child],
    shards: int,
    base: str,
    *,
    max_pairs: int,
    output: str,
) -> list[Shard]:
    """One shard per earlier shard with pending pairs (those pairs only); other pairs' batches dealt to `shards`."""
    origin: dict[str, Child] = {}
    for run in earlier:  # oldest first: a pair's origin is the first shard that had it
        for pair_id in run.pair_ids:
            origin.setdefault(pair_id, run)
    again: dict[str, Shard] = {}
    for pair in pending:
        if pair.id in origin:
            run = origin[pair.id]
            again.setdefault(run.id, Shard(re.sub(r"-attempt\d+$", "", run.name), [])).pair_ids.append(pair.id)
    fresh = [p for p in pending if p.id not in origin]
    groups = split_batches(make_batches(fresh, inputs, max_pairs=max_pairs, output=output, run_id=""), shards)
    return [*again.values(), *(Shard(f"{base}-shard-{i}of{len(groups)}", ids) for i, ids in enumerate(groups, 1))]


def child_options(shard: Shard, options: RunOptions, output: str, parent: str, attempt: int) -> RunOptions:
    """The child's run options: its pair ids inline, or (many of them) in `_runs/<parent>-<shard>.ids.json`, so
    that no flow run parameter grows with the manifest."""
    if len(shard.pair_ids) <= IDS_IN_A_PARAMETER:
        return options.model_copy(update={"pair_ids": shard.pair_ids, "pair_ids_file": None})
    uri = summary_uri(output, f"{parent}-{shard.name}-attempt{attempt}", ".ids.json")
    write(uri, json.dumps(shard.pair_ids).encode(), "application/json")
    return options.model_copy(update={"pair_ids": None, "pair_ids_file": uri})


def child_pair(output: str, child: Child, spec: PairSpec, entry: dict[str, Any] | None, *, history: bool) -> PairRecord:
    """One pair of a child: the status its run summary gives (`entry`), else what its record says it wrote; a pair
    that a dead child left undone is failed, naming the child and its state."""
    _, json_uri = output_uris(output, spec.id)
    status = entry.get("status") if entry is not None else None
    if entry is not None and status == "not_run":
        return PairRecord.not_run(spec, output, (entry.get("error") or {}).get("message", "not run"))
    record = read_record(json_uri)
    if record is not None and status in ("succeeded", "failed", "skipped"):
        return PairRecord.of(spec, record, status, history=history)
    if record is not None and record.run_id == child.id and record.status == "succeeded":
        return PairRecord.of(spec, record, "succeeded", history=history)  # written before the child died
    detail = f": {child.message}" if child.message else ""
    error = error_info(
        child.state, f"shard {child.name} ({child.id}) ended {child.state}{detail}; the pair did not finish"
    )
    return PairRecord.failed(spec, output, error)


def collect(manifest: Manifest, children: Sequence[Child], specs: dict[str, PairSpec]) -> list[PairRecord]:
    """Each child's pairs as it left them: its run summary's status, the pair's record; a dead child's pairs failed.

    Loss histories are kept for the first HISTORY_PAIRS pairs only (the report's curves): at ~50 KB a record, a
    100,000-pair run would otherwise hold gigabytes.
    """
    output = manifest.output
    listed: dict[str, dict[str, dict[str, Any]]] = {}
    for c in children:
        found = read_json(summary_uri(output, c.id), max_bytes=MAX_RECORD_BYTES)  # no `_runs` link followed
        summary = found if isinstance(found, dict) else {}
        listed[c.id] = {p["id"]: p for p in summary.get("pairs", [])}
    wanted = [(c, pair_id) for c in children for pair_id in c.pair_ids]

    def one(item: tuple[int, tuple[Child, str]]) -> PairRecord:
        i, (child, pair_id) = item
        entry = listed[child.id].get(pair_id)
        return child_pair(output, child, specs[pair_id], entry, history=i < HISTORY_PAIRS)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(one, enumerate(wanted)))


def aggregate(
    manifest: Manifest, children: Sequence[Child], to_run: Sequence[PairSpec], skipped: Sequence[PairRecord]
) -> list[PairRecord]:
    """Every pair of the run in manifest order: the children's as they left them, and those already done."""
    return in_pair_order([*collect(manifest, children, {p.id: p for p in to_run}), *skipped], manifest.pairs)
