"""Batches: same-shape pairs grouped, claimed, decoded, optimised together and written one by one.

Per-pair failures (bad image, NaN, an output that cannot be written) become failed records, never exceptions: a write
is retried on its own (transient errors only), never the optimisation. Batches are sized to the worker's memory by the
memory model (nst.engine.memory) before they run; one that still runs out of memory is halved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from nst import storage
from nst.engine.images import load_image, resized_size
from nst.engine.memory import WorkerMemory, pairs_that_fit, worker_memory
from nst.engine.pairs import PairProblem, PairResult
from nst.errors import NSTError, OutOfMemory, StorageError
from nst.manifest import PairSpec
from nst.results import exception_info
from nst.run.claims import CLAIM_TTL_S, RunIsLive, claim_pair, release_pair
from nst.run.inputs import InputFacts, spooled
from nst.run.order import in_pair_order
from nst.run.planner import done_now
from nst.run.records import PairRecord, record_failure, write_pair_result

if TYPE_CHECKING:  # the engine (torch) is imported when a batch runs, not when a run is planned
    from nst.engine.optimize import ProgressCallback
    from nst.engine.stylizer import Stylizer

HoldDevice = Callable[[], AbstractContextManager[str]]
Problem = PairProblem[Image.Image]
Result = PairResult[Image.Image]


@dataclass
class Batch:
    """One unit of work, complete in itself (plain data, so it can be a task parameter): same-shape pairs to run."""

    label: str
    pairs: list[PairSpec]
    inputs: dict[str, InputFacts]  # the facts of these pairs' inputs (sha256, pixel size), as planned
    output: str
    run_id: str
    spool: str | None = None  # where plan() left the inputs' bytes, by sha256 (None: read them from storage)
    leftovers: dict[str, list[str]] = field(default_factory=dict)  # earlier runs' intermediate images, by pair
    force: bool = False  # recompute done pairs (no re-check of "done" once a pair is claimed)
    replace_others: bool = False  # replace another manifest's result (else a pair that became one is refused)
    input_roots: list[str] | None = None  # a local `weights:` file is read beneath them (no symlink followed)

    def fail(self, spec: PairSpec, error: dict[str, Any]) -> PairRecord:
        """Record one of this batch's pairs failed (best effort: storage may be what failed)."""
        return record_failure(spec, self.inputs, self.output, self.run_id, error, best_effort=True)


def _shape_key(spec: PairSpec, inputs: dict[str, InputFacts]) -> Any:
    """Pairs with equal keys can share a batch: same output shape and graph parameters."""
    facts = [inputs[u] for u in (spec.content, *spec.styles)]
    content = facts[0]
    if content.dims is None or any(f.error for f in facts):
        return ("alone", spec.id)  # unreadable: fails on its own without holding up a batch
    return (resized_size(*content.dims, spec.params.size), spec.params.graph_key())


def make_batches(
    pairs: Sequence[PairSpec],
    inputs: dict[str, InputFacts],
    *,
    max_pairs: int,
    output: str,
    run_id: str,
    spool: str | None = None,
    leftovers: dict[str, list[str]] | None = None,
    force: bool = False,
    replace_others: bool = False,
    input_roots: list[str] | None = None,
    memory: WorkerMemory | None = None,
) -> list[Batch]:
    """Group pairs with the same output shape and graph parameters into batches of at most `max_pairs`, and of at
    most what fits the worker's memory by the memory model (`memory`; default: `nst.engine.memory.worker_memory()`)."""
    memory = memory or worker_memory()
    groups: dict[Any, list[PairSpec]] = {}
    for spec in pairs:
        groups.setdefault(_shape_key(spec, inputs), []).append(spec)
    chunks = []
    for key, group in groups.items():
        most = max(1, max_pairs)
        if memory is not None and key[0] != "alone":
            (width, height), params = key[0], group[0].params
            most = max(1, min(most, pairs_that_fit(height, width, params, memory)))
        chunks += [group[i : i + most] for i in range(0, len(group), most)]
    n = len(chunks)
    left = leftovers or {}
    return [
        Batch(
            f"{i}of{n}",
            chunk,
            {u: inputs[u] for p in chunk for u in (p.content, *p.styles)},
            output,
            run_id,
            spool,
            {p.id: left[p.id] for p in chunk if p.id in left},
            force,
            replace_others,
            input_roots,
        )
        for i, chunk in enumerate(chunks, start=1)
    ]


def _load_problem(spec: PairSpec, batch: Batch) -> Problem:
    """Decode a pair's images from the bytes plan() read (errors name the pair, the field and the file)."""
    facts = [batch.inputs[u] for u in (spec.content, *spec.styles)]
    roles = ["content", *("style" for _ in spec.styles)]
    if errors := [(role, f.error) for role, f in zip(roles, facts, strict=True) if f.error]:
        raise NSTError(f"pair {spec.id}: {errors[0][0]} {errors[0][1]}")  # the field, then the file and why

    def image(fact: InputFacts, role: str) -> Image.Image:
        local = batch.spool is not None and fact.sha256 is not None
        data = storage.read_bytes(spooled(batch.spool, fact.sha256) if local else fact.uri)  # type: ignore[arg-type]
        # `size`: an image too thin for VGG at the size it is resized to fails here, naming the pair and the file.
        size = spec.params.size if role == "content" else (spec.params.style_size or spec.params.size)
        label = f"pair {spec.id}: {role} {fact.uri!r}"
        return load_image(data, label=label, max_pixels=spec.params.max_input_pixels, size=size)

    return PairProblem(image(facts[0], "content"), [image(f, "style") for f in facts[1:]], spec.params, spec.id)


def run_batch(
    batch: Batch,
    *,
    stylizer: Stylizer,
    hold_device: HoldDevice | None = None,
    on_progress: ProgressCallback | None = None,
    run_is_live: RunIsLive | None = None,
    claim_ttl_s: float = CLAIM_TTL_S,
) -> list[PairRecord]:
    """Claim, decode, stylize and write one batch; a pair another live run is producing is left `not_run`, and one
    that became done since planning (another run finished it) is `skipped`, its claim released.

    With `hold_device`, the optimisation (not the reading and writing) runs while holding a device, and pairs set to
    `device: auto` run on that device.
    """
    records, claimed = _claim_all(batch, claim_ttl_s, run_is_live)
    try:
        problems: list[tuple[PairSpec, Problem]] = []
        for spec in claimed:
            try:
                problems.append((spec, _load_problem(spec, batch)))
            except NSTError as exc:
                records.append(batch.fail(spec, exception_info(exc)))

        def stylize(subset: list[Problem]) -> list[Result]:
            if hold_device is None:
                return stylizer.stylize(subset, callback=on_progress, input_roots=batch.input_roots)
            with hold_device() as device:
                pinned = [_pinned(p, device) for p in subset]
                return stylizer.stylize(pinned, callback=on_progress, input_roots=batch.input_roots)

        records += _stylize_and_write(problems, batch, stylize)
    finally:
        for spec in claimed:
            release_pair(batch.output, spec.id, batch.run_id)
    return in_pair_order(records, batch.pairs)


def _claim_all(
    batch: Batch, claim_ttl_s: float, run_is_live: RunIsLive | None
) -> tuple[list[PairRecord], list[PairSpec]]:
    """Claim each pair, then re-check it is still to do: (records of pairs not run or now done, pairs claimed to run).

    The re-check comes after the claim, so of two runs planning one pair, the later claimer sees the other's result.
    """
    records: list[PairRecord] = []
    claimed: list[PairSpec] = []
    for spec in batch.pairs:
        busy = claim_pair(batch.output, spec.id, batch.run_id, ttl_s=claim_ttl_s, run_is_live=run_is_live)
        if busy is not None:
            records.append(PairRecord.not_run(spec, batch.output, f"pair {spec.id}: {busy}; not run, retry later"))
            continue
        done = done_now(
            spec,
            batch.output,
            batch.inputs,
            force=batch.force,
            replace_others=batch.replace_others,
            roots=batch.input_roots,
        )
        if done is None:
            claimed.append(spec)
        else:
            release_pair(batch.output, spec.id, batch.run_id)
            records.append(done)
    return records, claimed


def _pinned(problem: Problem, device: str) -> Problem:
    if problem.params.device != "auto":
        return problem
    return dataclasses.replace(problem, params=problem.params.model_copy(update={"device": device}))


def _stylize_and_write(
    jobs: list[tuple[PairSpec, Problem]], batch: Batch, stylize: Callable[[list[Problem]], list[Result]]
) -> list[PairRecord]:
    """Stylize the pairs as one batch and write each; out of memory, split the batch in halves and try again."""
    if not jobs:
        return []
    oom: dict[str, Any] | None = None
    try:
        results = stylize([j for _, j in jobs])
    except OutOfMemory as exc:
        oom = exception_info(exc)
    except NSTError as exc:  # a problem of the whole batch's parameters (unknown layer, missing weights...)
        return [batch.fail(spec, exception_info(exc)) for spec, _ in jobs]
    if oom is not None:  # out of the except block: the failed batch's tensors are unreachable now
        from nst.engine.stylizer import free_memory

        free_memory()
        if len(jobs) == 1:
            return [batch.fail(jobs[0][0], oom)]
        half = len(jobs) // 2
        return _stylize_and_write(jobs[:half], batch, stylize) + _stylize_and_write(jobs[half:], batch, stylize)
    return [_write_or_fail(spec, result, batch) for (spec, _), result in zip(jobs, results, strict=True)]


def _write_or_fail(spec: PairSpec, result: Result, batch: Batch) -> PairRecord:
    """Write a pair's outputs (retrying transient errors), then release its claim at once, not at the batch's end;
    if they cannot be written, record the pair failed."""
    try:
        leftovers = batch.leftovers.get(spec.id, [])
        return write_pair_result(spec, batch.inputs, result, batch.output, batch.run_id, leftovers=leftovers)
    except StorageError as exc:
        return batch.fail(spec, exception_info(exc))
    finally:
        release_pair(batch.output, spec.id, batch.run_id)
