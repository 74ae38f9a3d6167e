"""Hostile input and long nights on the run path (issue 18): bounded work, nothing left behind, the run goes on.

Real engine (32 px, 1-2 iterations), local disk; faults the real parts cannot produce on demand through a
FaultyStylizer.
"""

import json
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import nst.engine.stylizer
import nst.run
import nst.run.runner as run_module
from nst import storage
from nst.run.records import MAX_HISTORY_ROWS, _bounded
from nst.run_options import RunOptions
from nst_testing.faults import FaultyStylizer
from nst_testing.manifests import write_manifest
from nst_testing.paths import SAMPLES

CHELSEA = SAMPLES / "content" / "chelsea.jpg"
ASTRONAUT = SAMPLES / "content" / "astronaut.jpg"
BRICK = SAMPLES / "styles" / "brick.jpg"


def manifest(root: Path, pairs: list[dict[str, Any]], **defaults: Any) -> str:
    """The URI of a tiny manifest named "nights" in `root`."""
    return str(write_manifest(root, pairs, name="nights", **defaults))


def test_a_run_removes_the_temp_files_a_killed_writer_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only old ones: the age is the file's last change (ctime), so this test makes the threshold short instead."""
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".a.png.x1.nst-tmp"
    stale.write_bytes(b"half a png")
    monkeypatch.setattr(run_module, "STALE_TEMP_S", 0.5)
    time.sleep(1.0)
    nst.run.run(manifest(tmp_path, [{"id": "a", "content": CHELSEA, "style": BRICK}]))
    assert not stale.exists() and (out / "a.png").exists()


def test_without_prefect_an_unexpected_error_fails_its_batch_and_the_run_goes_on(tmp_path: Path) -> None:
    """A torch RuntimeError or an OSError is not an NSTError: the batch fails, later batches run, summary written."""
    calls: list[list[str]] = []

    def boom_first(jobs: Any) -> None:
        calls.append([j.id for j in jobs])
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    pairs = [{"id": "wide", "content": CHELSEA, "style": BRICK}, {"id": "square", "content": ASTRONAUT, "style": BRICK}]
    hooks = nst.run.local_hooks(FaultyStylizer(nst.engine.stylizer.Stylizer(), boom_first))  # type: ignore[arg-type]
    summary = nst.run.run(manifest(tmp_path, pairs), hooks=hooks)
    assert len(calls) == 2
    statuses = {r.id: r.status for r in summary.records}
    failed = next(r for r in summary.records if r.status == "failed")
    assert sorted(statuses.values()) == ["failed", "succeeded"]
    assert failed.error is not None and failed.error["type"] == "RuntimeError"
    body = json.loads(storage.read_bytes(summary.summary_uri or ""))
    assert body["counts"] == {"failed": 1, "succeeded": 1} and "status" not in body  # not left `running`


def test_plan_reads_image_headers_only_and_checks_the_pixel_limit_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A huge PNG (small file, many pixels) is never decoded by plan; the pair fails naming the limit."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (6000, 6000)).save(bomb)  # 36 Mpx in a few KB
    loads: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def counting_load(self: Image.Image) -> Any:
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", counting_load)
    uri = manifest(tmp_path, [{"id": "bomb", "content": bomb, "style": BRICK}], max_input_pixels=1_000_000)
    the_plan = nst.run.plan(nst.manifest.load_manifest(uri), RunOptions())
    assert (6000, 6000) not in loads
    assert the_plan.inputs[str(bomb)].dims is None  # refused: it runs alone and fails there
    (record,) = nst.run.run(uri).records
    assert record.status == "failed" and "max_pixels" in (record.error or {}).get("message", "")
    assert (6000, 6000) not in loads


def test_intermediates_never_fail_a_written_pair_and_old_ones_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.iter000099.png").write_bytes(b"an earlier run's intermediate")
    uri = manifest(tmp_path, [{"id": "a", "content": CHELSEA, "style": BRICK}], iterations=4, save_every=2)
    real_write = storage.write_bytes

    def write(target: str, data: bytes, **kwargs: Any) -> Any:
        if ".iter000004." in target:
            raise storage.StorageError(f"{target}: cannot write: disk full")
        return real_write(target, data, **kwargs)

    monkeypatch.setattr(storage, "write_bytes", write)
    (record,) = nst.run.run(uri, RunOptions(force=True)).records
    assert record.status == "succeeded"
    assert sorted(p.name for p in out.glob("a.iter*.png")) == ["a.iter000002.png"]


def test_save_every_counts_every_scale() -> None:
    from nst.errors import ParamsError
    from nst.params import MAX_SAVED_IMAGES, resolve_params

    resolve_params({"iterations": 20 * MAX_SAVED_IMAGES, "save_every": 20})  # 20 images: allowed
    resolve_params({"iterations": 20 * MAX_SAVED_IMAGES, "save_every": 20, "scales": 2})  # iterations: all scales'
    with pytest.raises(ParamsError, match="save_every"):
        resolve_params({"iterations": 20 * MAX_SAVED_IMAGES + 20, "save_every": 20, "scales": 2})


def test_a_records_history_is_bounded() -> None:
    rows = [{"iteration": float(i), "total": 1.0 / (i + 1)} for i in range(1, 800_001)]
    kept = _bounded(rows)
    assert len(kept) <= MAX_HISTORY_ROWS and kept[0] == rows[0] and kept[-1] == rows[-1]
    assert _bounded(rows[:10]) == rows[:10]


def test_a_read_with_a_large_limit_allocates_only_what_the_object_holds(storage_root: str) -> None:
    """read(n) allocates n bytes up front: 16 reader threads x a 64 MB input limit once made plan peak at 1 GB."""
    import tracemalloc

    uri = storage.join(storage_root, "small.json")
    storage.write_bytes(uri, b"{}" * 1000)
    tracemalloc.start()
    try:
        assert storage.read_bytes(uri, max_bytes=256 * 2**20) == b"{}" * 1000
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20
