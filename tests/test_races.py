"""Races between processes: conditional operations on local disk, and concurrent runs of one manifest.

Item 5 of issue 29: eight processes race for lapsed (and absent) claims through `claim_pair`, with random pauses
before every name change (`nst_testing.races.JitteryOS`); every claim ends owned by exactly the one process told it
won. Item 4: two runs of one manifest started a second apart compute each pair once between them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nst import storage
from nst.run.layout import claim_uri
from nst_testing.paths import REPO, SAMPLES
from nst_testing.procs import outputs, race, start
from nst_testing.races import PAIR_SECONDS_ENV, SPY_LOG_ENV, claim_racer, delete_create_racer, racer_run_id

PAIRS = 50
CONTENTS = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
STYLES = ["brick.jpg", "hubble.jpg", "ihc.jpg"]
RACERS = 8
CLAIMS = 90
MAX_PAUSE_S = 0.003


def _claim_body(run_id: str, expires_at: float) -> bytes:
    return json.dumps({"run_id": run_id, "expires_at": expires_at, "claimed_at": "2000-01-01T00:00:00Z"}).encode()


def _race(target: Callable[..., None], *args: object) -> dict[int, list[str]]:
    """Run `target(*args, racer, MAX_PAUSE_S, barrier, results)` in RACERS processes; what each put on `results`."""
    ctx = multiprocessing.get_context("forkserver")  # fresh interpreters forked from one that imported nst once
    ctx.set_forkserver_preload(["nst.run.claims", "nst_testing.races"])
    return race(ctx, RACERS, target, lambda racer, barrier, results: (*args, racer, MAX_PAUSE_S, barrier, results))


def _wrong_owners(uris: list[str], won: dict[int, list[str]], holder: Callable[[str], str]) -> dict[str, object]:
    """The names whose racers told they won are not exactly [the holder]: {uri: (racers, holder)}."""
    wrong: dict[str, object] = {}
    for uri in uris:
        winners = [racer_run_id(r) for r, got in won.items() if uri in got]
        if winners != [holder(uri)]:
            wrong[uri] = (winners, holder(uri))
    return wrong


def test_racing_processes_each_claim_has_exactly_the_owner_told_it_won(tmp_path: Path) -> None:
    """Two of three claims lapsed (a dead run's), one absent; 8 processes claim all: one winner each, still holding."""
    output = str(tmp_path / "out")
    ids = [f"pair{i:03d}" for i in range(CLAIMS)]
    for pair_id in ids[: CLAIMS * 2 // 3]:
        storage.write_bytes(claim_uri(output, pair_id), _claim_body("dead-run", time.time() - 60))
    won = _race(claim_racer, output, ids)
    uris = [claim_uri(output, i) for i in ids]
    wrong = _wrong_owners(uris, won, lambda uri: json.loads(storage.read_bytes(uri))["run_id"])
    assert wrong == {}, f"{len(wrong)} of {CLAIMS} claims: (racers told they won, holder) {wrong}"
    assert sorted(p.name for p in Path(output).iterdir()) == sorted(f"{i}.claim" for i in ids)


def test_racing_processes_delete_expected_then_create_one_creator_holds_each(tmp_path: Path) -> None:
    """4 processes delete the same lapsed versions (`delete(expected=)`), 4 `create_new` the freed names: one creator
    each, still holding."""
    uris = [str(tmp_path / f"pair{i:03d}.claim") for i in range(CLAIMS)]
    lapsed = [storage.write_bytes(uri, _claim_body("dead-run", time.time() - 60)) for uri in uris]
    won = _race(delete_create_racer, lapsed)
    wrong = _wrong_owners(uris, won, lambda uri: storage.read_bytes(uri).decode())
    assert wrong == {}, f"{len(wrong)} of {CLAIMS} names: (racers told they created it, holder) {wrong}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(u).name for u in uris)


# ------------------------------------------------------------------------------------------------- item 4


def _put_manifest(root: str) -> str:
    """Inputs and a 50-pair manifest (32 px, 2 iterations) under `root`; the manifest's URI."""
    for sub, names in (("content", CONTENTS), ("styles", STYLES)):
        for name in names:
            storage.write_bytes(storage.join(root, f"{sub}/{name}"), (SAMPLES / sub / name).read_bytes())
    pairs = [
        {"id": f"p{i:02d}", "content": f"content/{CONTENTS[i % 3]}", "style": f"styles/{STYLES[i // 3 % 3]}"}
        for i in range(PAIRS)
    ]
    doc = {"version": 1, "name": "race", "output": "out/", "defaults": {"size": 32, "iterations": 2}, "pairs": pairs}
    uri = storage.join(root, "race.yaml")
    storage.write_bytes(uri, json.dumps(doc).encode())
    return uri


@pytest.mark.slow
def test_two_runs_started_a_second_apart_compute_each_pair_once(storage_root: str, tmp_path: Path) -> None:
    """Two real `nst run --no-prefect --max-batch-pairs 1` processes, the second 1 s after the first, over one 50-pair
    manifest: 50 optimisations in all (each logged by the engine), each pair succeeded once, by the run its record
    names; the other run reports it skipped (done since planning) or not run (claimed)."""
    manifest = _put_manifest(storage_root)
    spy = tmp_path / "optimised.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), SPY_LOG_ENV: str(spy), PAIR_SECONDS_ENV: "0.1"}
    command = [sys.executable, "-m", "nst_testing.races", "run", manifest, "--no-prefect", "--max-batch-pairs", "1"]
    procs = []
    for _ in range(2):
        procs.append(start(command, env))
        time.sleep(1.0)
    outs = outputs(procs)
    assert [p.returncode for p in procs] <= [1, 1] and "Traceback" not in "".join(outs), outs
    optimised = spy.read_text().split()[1::2]
    assert len(optimised) == PAIRS and len(set(optimised)) == PAIRS, (sorted(optimised), outs)
    out = storage.join(storage_root, "out/")
    runs = storage.list_prefix(storage.join(out, "_runs/"))
    summaries = [json.loads(storage.read_bytes(i.uri)) for i in runs if i.uri.endswith(".json")]
    succeeded = {s["run_id"]: {p["id"] for p in s["pairs"] if p["status"] == "succeeded"} for s in summaries}
    assert len(succeeded) == 2 and sum(len(ids) for ids in succeeded.values()) == PAIRS, outs
    for i in range(PAIRS):
        record = json.loads(storage.read_bytes(storage.join(out, f"p{i:02d}.json")))
        assert record["status"] == "succeeded" and record["id"] in succeeded[record["run_id"]]
