"""The shard parent's parts without workers: the split, the retry's shards, the aggregation, the GPU slot.

Real manifests, plans and storage (local files). The logic is `nst.run.shards` on plain data (`Child`); where the flow's
view of a Prefect flow run matters, FlowRun objects stand for children (only their id, name, state and parameters).
The whole story with real workers is tests/test_shard_e2e.py.
"""

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import FlowRun
from prefect.states import Completed, Crashed

import flows.shard
import nst.run.planner
import nst.run.shards
from flows.shard import as_child
from flows.stylize import DeviceSlots
from nst import run as pipeline
from nst.manifest import load_manifest
from nst.run.order import in_pair_order
from nst.run.records import build_record, record_json
from nst.run.shards import (
    Child,
    Shard,
    aggregate,
    child_options,
    collect,
    given_ids,
    pair_cost,
    plan_shards,
    split_batches,
)
from nst.run_options import RunOptions
from nst.schedule import schedule
from nst_testing.paths import REPO, SAMPLES

CHELSEA = SAMPLES / "content" / "chelsea.jpg"  # landscape: 32x21 at size 32
ASTRONAUT = SAMPLES / "content" / "astronaut.jpg"  # square
BRICK = SAMPLES / "styles" / "brick.jpg"


def planned(tmp_path: Path, pairs: list[dict[str, Any]], max_pairs: int = 4) -> tuple[Any, Any, list[pipeline.Batch]]:
    """(manifest, plan, batches) of a local manifest with these pairs (32 px, 2 iterations by default)."""
    doc = {"version": 1, "name": "t", "output": "out/", "defaults": {"size": 32, "iterations": 2}, "pairs": pairs}
    path = tmp_path / "manifest.yaml"
    path.write_text(json.dumps(doc, default=str))
    manifest = load_manifest(str(path))
    plan = pipeline.plan(manifest, RunOptions())
    batches = pipeline.make_batches(
        plan.to_run, plan.inputs, max_pairs=max_pairs, output=manifest.output, run_id="parent"
    )
    return manifest, plan, batches


def child(name: str, pair_ids: list[str], state: Any = None) -> FlowRun:
    return FlowRun(
        id=uuid.uuid4(),
        name=name,
        flow_id=uuid.uuid4(),
        parameters={"options": {"pair_ids": pair_ids}},
        state=state,
    )


def test_split_balances_pixels_times_iterations_and_keeps_batches_whole(tmp_path: Path) -> None:
    big = [{"id": "big", "content": CHELSEA, "style": BRICK, "size": 64, "iterations": 8}]
    small = [{"id": f"s{i}", "content": CHELSEA, "style": BRICK} for i in range(4)]
    square = [{"id": f"q{i}", "content": ASTRONAUT, "style": BRICK} for i in range(4)]
    _, plan, batches = planned(tmp_path, big + small + square)
    costs = {p.id: pair_cost(p, plan.inputs) for p in plan.to_run}
    assert costs["big"] == 64 * 42 * 8 and costs["s0"] == 32 * 21 * 2 and costs["q0"] == 32 * 32 * 2
    shards = split_batches(batches, 2)
    # By pair count the 4+4 pairs would go to two shards and `big` (the most work) on top of one of them.
    assert sorted(map(sorted, shards)) == [["big"], sorted(["q0", "q1", "q2", "q3", "s0", "s1", "s2", "s3"])]
    assert split_batches(batches, 10) == [["big"], ["q0", "q1", "q2", "q3"], ["s0", "s1", "s2", "s3"]]


def test_a_pairs_cost_follows_its_schedule(tmp_path: Path) -> None:
    """Coarse-to-fine work is mostly at the coarse scales: the cost sums pixels x steps per scale, not the output's."""
    pairs = [
        {"id": "one", "content": ASTRONAUT, "style": BRICK, "size": 128, "iterations": 70},
        {"id": "three", "content": ASTRONAUT, "style": BRICK, "size": 128, "iterations": 70, "scales": 3},
    ]
    _, plan, _ = planned(tmp_path, pairs)
    costs = {p.id: pair_cost(p, plan.inputs) for p in plan.to_run}
    assert costs["one"] == 128 * 128 * 70
    assert (
        costs["three"]
        == sum(s.height * s.width * s.iterations for s in schedule(128, 128, 3, 70, "content"))
        < costs["one"] / 3
    )


def test_retry_reruns_only_shards_with_pending_pairs_and_only_those_pairs(tmp_path: Path) -> None:
    pairs = [{"id": f"s{i}", "content": CHELSEA, "style": BRICK} for i in range(6)]
    pairs.append({"id": "new", "content": ASTRONAUT, "style": BRICK})
    _, plan, _ = planned(tmp_path, pairs)
    first = [  # plain data: what the flow reads of each earlier child flow run
        Child("run-1", "t-shard-1of3", ["s0", "s1"]),
        Child("run-2", "t-shard-2of3-attempt2", ["s2", "s3"]),
        Child("run-3", "t-shard-3of3-attempt2", ["s4", "s5"]),
        Child("run-4", "t-shard-3of3-attempt3", ["s4"]),  # a later child with one of them: the first is its origin
    ]
    pending = [p for p in plan.to_run if p.id in {"s1", "s4", "s5", "new"}]
    shards = plan_shards(pending, plan.inputs, first, 3, "t", max_pairs=4, output="out/")
    assert [(s.name, s.pair_ids) for s in shards] == [
        ("t-shard-1of3", ["s1"]),
        ("t-shard-3of3", ["s4", "s5"]),
        ("t-shard-1of1", ["new"]),  # in no earlier shard (the manifest grew): a shard of its own
    ]
    assert plan_shards([], {}, first, 3, "t", max_pairs=4, output="out/") == []  # nothing pending: nothing runs


def test_collect_reads_summaries_and_fails_what_a_dead_shard_left_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = [{"id": i, "content": CHELSEA, "style": BRICK} for i in ("a", "b", "c", "d")]
    manifest, plan, _ = planned(tmp_path, pairs)
    specs = {p.id: p for p in plan.to_run}
    ok = child("t-shard-1of2", ["a", "b"], Completed())
    dead = child("t-shard-2of2", ["c", "d"], Crashed(message="No heartbeat for 90 s"))
    out = tmp_path / "out"

    def write(pair_id: str, run_id: str, status: Any = "succeeded") -> dict[str, Any]:
        spec = specs[pair_id]
        image = ("0" * 64, {"size": 1, "mtime_ns": 1}) if status == "succeeded" else None
        record = build_record(spec, {}, str(out), run_id, status=status, params=spec.params, image=image)
        record = record.model_copy(
            update={
                "final_losses": {"content": 1.0, "style": 2.0, "tv": 0.0, "total": 3.0},
                "history": [{"iteration": 1, "content": 1.0, "style": 2.0, "tv": 0.0, "total": 3.0}],
            }
        )
        (out / f"{pair_id}.json").write_bytes(record_json(record))
        return record.model_dump()

    out.mkdir()
    write("a", str(ok.id))
    write("b", str(ok.id), "failed")
    pipeline.write_run_summary(
        str(out),
        str(ok.id),
        [pipeline.PairRecord("a", "succeeded", "", [], None, ""), pipeline.PairRecord("b", "failed", "", [], None, "")],
    )
    write("c", str(dead.id))  # written before the shard died
    write("d", "an-earlier-run", "failed")  # an old record: not this shard's
    children = [as_child(ok), as_child(dead)]  # the flow's plain view: pair ids from the options, state and message
    assert children[1].state == "Crashed" and children[1].message == "No heartbeat for 90 s"
    records = {r.id: r for r in collect(manifest, children, specs)}
    assert {i: r.status for i, r in records.items()} == {
        "a": "succeeded",
        "b": "failed",
        "c": "succeeded",
        "d": "failed",
    }
    assert records["a"].history and records["a"].image_uri == str(out / "a.png")
    assert records["d"].error is not None and records["d"].error["type"] == "Crashed"
    assert str(dead.id) in records["d"].error["message"]
    monkeypatch.setattr(nst.run.shards, "HISTORY_PAIRS", 1)  # histories kept for the report's curves only
    again = {r.id: r for r in collect(manifest, children, specs)}
    assert again["a"].history and not again["c"].history and again["c"].final_losses
    skipped = [pipeline.PairRecord(i, "skipped", "", [], None, "") for i in ("b", "a")]  # already done
    everything = aggregate(manifest, children[1:], [specs["c"], specs["d"]], skipped)  # a retry: a, b were done
    assert [(r.id, r.status) for r in everything] == [
        ("a", "skipped"),
        ("b", "skipped"),
        ("c", "succeeded"),
        ("d", "failed"),
    ]


def test_record_names_host_and_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, plan, _ = planned(tmp_path, [{"id": "a", "content": CHELSEA, "style": BRICK}])
    monkeypatch.setenv("PREFECT__WORKER_NAME", "gpu-box-7-gpu0")  # set by every Prefect worker for its flow runs
    spec = plan.to_run[0]
    record = build_record(spec, {}, "x", None, status="failed", params=spec.params)
    assert record.worker == "gpu-box-7-gpu0" and record.host


@pytest.mark.usefixtures("prefect_harness")
def test_device_slot_holds_a_gpu_shards_slot_and_runs_without_the_limit() -> None:
    from prefect.client.orchestration import get_client

    name = f"gpu-shards-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2))
        slots = DeviceSlots(["cpu"], limit=name)
        with slots.take() as device:
            assert device == "cpu"
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 1
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0
    with DeviceSlots(["cpu"], limit=f"missing-{name}").take() as device:  # no such limit: a warning, and it runs
        assert device == "cpu"


def test_children_get_the_parents_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    # A child refuses manifests, inputs and outputs outside its roots: it gets the roots the parent planned with.
    for name in ("NST_INPUT_ROOTS", "NST_OUTPUT_ROOTS", "NST_MANIFEST_ROOTS"):
        monkeypatch.delenv(name, raising=False)
    assert flows.shard.child_job_variables() == {}
    monkeypatch.setenv("NST_INPUT_ROOTS", "s3://photos/incoming/,s3://styles/")
    monkeypatch.setenv("NST_MANIFEST_ROOTS", "s3://photos/manifests/")
    assert flows.shard.child_job_variables() == {
        "env": {"NST_INPUT_ROOTS": "s3://photos/incoming/,s3://styles/", "NST_MANIFEST_ROOTS": "s3://photos/manifests/"}
    }


def test_a_long_shard_passes_its_pair_ids_in_a_file_and_its_child_reads_them(tmp_path: Path) -> None:
    """No flow run parameter grows with the manifest: 300 ids go to `_runs/` and the child plans exactly those."""
    pairs = [{"id": f"p{i:03d}", "content": CHELSEA, "style": BRICK} for i in range(300)]
    manifest, _, _ = planned(tmp_path, pairs)
    shard = Shard("t-shard-1of1", [str(p["id"]) for p in pairs[:250]])
    options = child_options(shard, RunOptions(), manifest.output, "parent", 1)
    assert options.pair_ids is None and options.pair_ids_file is not None
    assert len(json.dumps(options.model_dump(mode="json"))) < 10_000
    assert [p.id for p in nst.run.planner.selected(manifest, options)] == shard.pair_ids
    assert as_child(child("t-shard-1of1", [])).pair_ids == given_ids({}) == []
    run = child("t-shard-1of1", [])
    run.parameters["options"] = options.model_dump(mode="json")
    assert as_child(run).pair_ids == given_ids(run.parameters["options"]) == shard.pair_ids
    few = child_options(Shard("s", ["p000"]), RunOptions(), manifest.output, "parent", 1)
    assert few.pair_ids == ["p000"] and few.pair_ids_file is None


def test_a_pair_ids_file_outside_the_outputs_runs_is_refused(tmp_path: Path) -> None:
    from nst.errors import ManifestError

    manifest, _, _ = planned(tmp_path, [{"id": "a", "content": CHELSEA, "style": BRICK}])
    secret = tmp_path / "ids.json"
    secret.write_text('["a"]')
    with pytest.raises(ManifestError, match="pair_ids_file"):
        nst.run.planner.selected(manifest, RunOptions(pair_ids_file=str(secret)))


def test_records_follow_their_pairs_order() -> None:
    """One rule for a run's order (runner, batches, shard parent): the pairs' order, unlisted pairs last."""
    pairs = [Child(i, i) for i in ("c", "a", "b")]  # anything with an id stands for a PairSpec
    records = [pipeline.PairRecord(i, "succeeded", "", [], None, "") for i in ("x", "a", "b", "y", "c")]
    assert [r.id for r in in_pair_order(records, pairs)] == ["c", "a", "b", "x", "y"]
    assert in_pair_order([], pairs) == []


def test_the_shard_logic_is_plain_and_the_flow_thin() -> None:
    """nst.run.shards loads neither Prefect, boto3 nor torch; flows/shard.py keeps only the Prefect part."""
    code = "import sys, nst.run.shards; print(sorted(m for m in ('torch', 'boto3', 'prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
    assert len((REPO / "flows" / "shard.py").read_text().splitlines()) <= 200
