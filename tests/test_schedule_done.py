"""Done and the coarse-to-fine schedule (issue 30): a record made on another schedule than its parameters run now is
`older_engine` (skipped and reported, rerun when asked), never done; one scale, the common case, stays done.

Before 3e7dbc1 each of `scales` ran every one of `iterations` and records listed no `schedule`; the parameters'
digest is the same for `scales: 2` then and now, so the record's schedule (or its absence) decides. The engine is
tests/fake_engine.py (the content at `size` px, no network): planning and records are the product's own.
"""

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nst.engine.stylizer
from nst import storage
from nst.run import RunSummary, run
from nst.run.index import Written
from nst.run.planner import _other_schedule
from nst.run.records import parse_record, schedule_steps
from nst.run_options import RunOptions
from nst.schedule import START_UPSAMPLED, schedule
from nst_testing.paths import SAMPLES
from tests.fake_engine import FakeEngine

MANIFEST = """\
version: 1
name: scales
output: out/
defaults: {{size: {size}, iterations: {iterations}{extra}}}
pairs:
  - {{id: a, content: content/chelsea.jpg, style: styles/brick.jpg}}
  - {{id: b, content: content/coffee.jpg, style: styles/hubble.jpg}}
"""
IDS = ["a", "b"]


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run here gets FakeEngine as its engine."""
    monkeypatch.setattr(nst.engine.stylizer, "Stylizer", FakeEngine)


def put(root: Path, size: int, extra: str = "", iterations: int = 4) -> str:
    """The two pairs' images and a manifest of `size` px (`extra`: more defaults) under `root`; its path."""
    for sub, name in (("content", "chelsea"), ("content", "coffee"), ("styles", "brick"), ("styles", "hubble")):
        (root / sub).mkdir(exist_ok=True)
        (root / sub / f"{name}.jpg").write_bytes((SAMPLES / sub / f"{name}.jpg").read_bytes())
    manifest = root / "manifest.yaml"
    manifest.write_text(MANIFEST.format(size=size, extra=extra, iterations=iterations))
    return str(manifest)


def edit(root: Path, pair_id: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a pair's stored record after `change` (what an older nst, or another schedule, would have written)."""
    path = root / "out" / f"{pair_id}.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=2))


def old_style(record: dict[str, Any]) -> None:
    """A record as nst wrote it before 3e7dbc1: no `schedule` key."""
    del record["schedule"]


def verdicts(manifest: str, **options: Any) -> tuple[list[str], list[str], int]:
    """(ran, skipped, older_engine) of a run."""
    summary: RunSummary = run(manifest, RunOptions(**options))
    return summary.ids("succeeded"), summary.ids("skipped"), summary.older_engine


def test_an_old_record_of_two_scales_is_older_engine(tmp_path: Path) -> None:
    manifest = put(tmp_path, 128, ", scales: 2")
    assert verdicts(manifest) == (IDS, [], 0)
    edit(tmp_path, "a", old_style)
    assert verdicts(manifest, dry_run=True) == ([], IDS, 1)
    assert verdicts(manifest) == ([], IDS, 1)  # skipped by default, and reported
    assert verdicts(manifest, rerun_older_engine=True) == (["a"], ["b"], 0)
    assert verdicts(manifest) == ([], IDS, 0)  # its new record lists the schedule it ran


def test_old_records_at_1024_px(tmp_path: Path) -> None:
    """One scale then and now is done; the old default (`scales: 1`) is another digest than unset `scales` (3 at
    1024 px) now, so that pair runs; a schedule-less record of 3 scales has the digest of unset, not its picture."""
    manifest = put(tmp_path, 1024, ", scales: 1")
    assert verdicts(manifest) == (IDS, [], 0)
    edit(tmp_path, "a", old_style)
    assert verdicts(manifest) == ([], IDS, 0)  # one scale: the old picture is the new one
    manifest = put(tmp_path, 1024)
    assert verdicts(manifest) == (IDS, [], 0)
    assert [len(json.loads((tmp_path / "out" / f"{i}.json").read_text())["schedule"]) for i in IDS] == [3, 3]
    edit(tmp_path, "b", old_style)
    assert verdicts(manifest) == ([], IDS, 1)


def test_records_listing_no_starts(tmp_path: Path) -> None:
    """Before scales listed their start, a first scale started from `init` as now and finer ones upsampled: one
    scale stays done; several scales from noise (no detail put back) stay done; from the content they do not."""
    for extra, older in (("", 0), (", scales: 2, init: noise", 0), (", scales: 2", 2)):
        manifest = put(tmp_path, 128, extra, 5)
        run(manifest, RunOptions())
        for pair in IDS:
            edit(tmp_path, pair, lambda r: [scale.pop("start") for scale in r["schedule"]])
        assert verdicts(manifest) == ([], IDS, older)


def test_an_old_record_of_one_scale_below_1024_px_is_done(tmp_path: Path) -> None:
    manifest = put(tmp_path, 128)
    assert verdicts(manifest) == (IDS, [], 0)
    edit(tmp_path, "a", old_style)
    edit(tmp_path, "b", lambda r: r.update(schedule=None))
    assert verdicts(manifest) == ([], IDS, 0)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.reverse(),  # the steps split otherwise
        lambda s: s.pop(0),  # one scale fewer
        lambda s: s[-1].update(iterations=s[-1]["iterations"] + 1),  # more steps
        lambda s: s[0].update(height=str(s[0]["height"])),  # not a schedule
        lambda s: s[-1].pop("start"),  # made before the content's detail was put back (an upsampled start)
        lambda s: s[-1].update(start=START_UPSAMPLED),  # the same, listed
        lambda s: s[-1].update(start=7),  # not a schedule
    ],
)
def test_a_record_whose_schedule_differs_is_not_done(tmp_path: Path, change: Callable[[list[Any]], None]) -> None:
    manifest = put(tmp_path, 128, ", scales: 2", 5)
    assert verdicts(manifest) == (IDS, [], 0)
    edit(tmp_path, "b", lambda r: change(r["schedule"]))
    assert verdicts(manifest) == ([], IDS, 1)
    assert verdicts(manifest, rerun_older_engine=True) == (["b"], ["a"], 0)


def pair_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The pairs' files (records, images, inputs) read from now on (every storage read goes through read_with_info)."""
    reads: Counter[str] = Counter()
    real = storage.read_with_info

    def spy(uri: str, **kwargs: Any) -> Any:
        if uri.endswith((".json", ".png", ".jpg")) and "/_runs/" not in uri:
            reads[uri] += 1
        return real(uri, **kwargs)

    monkeypatch.setattr(storage, "read_with_info", spy)
    return reads


def test_a_new_record_is_done_and_a_rerun_of_one_scale_reads_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = put(tmp_path, 128)
    assert verdicts(manifest) == (IDS, [], 0)
    assert verdicts(manifest) == ([], IDS, 0)  # writes the record index
    reads = pair_reads(monkeypatch)
    assert verdicts(manifest) == ([], IDS, 0)
    assert reads == Counter()


def test_a_rerun_of_several_scales_reads_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = put(tmp_path, 128, ", scales: 2")
    assert verdicts(manifest) == (IDS, [], 0)
    assert verdicts(manifest) == ([], IDS, 0)  # writes the record index
    reads = pair_reads(monkeypatch)
    assert verdicts(manifest) == ([], IDS, 0)
    assert reads == Counter()


def test_schedule_steps_reads_what_build_record_wrote(tmp_path: Path) -> None:
    manifest = put(tmp_path, 128, ", scales: 2", 5)
    run(manifest)
    record = parse_record(json.loads((tmp_path / "out" / "a.json").read_text()))
    assert record is not None and Written.of(record) is not None
    steps = schedule_steps(record)
    assert steps == [(s.height, s.width, s.iterations, s.start) for s in schedule(85, 128, 2, 5, "content")]
    params = nst.params.StyleParams(size=128, scales=2, iterations=5)
    assert not _other_schedule(params, steps)
    assert _other_schedule(params, None) and _other_schedule(params, [])
    tiny = nst.params.StyleParams(size=40, scales=2, iterations=5)  # its coarse scale (20 px) was always dropped
    assert not _other_schedule(tiny, None)
