"""Outside the roots: an input swapped for a symlink after validation is never opened, and the run's own folders are
never redirected by a symlink (issue 29, items 6 and 7). Real local disk; the swaps are made deterministically between
the steps of a run, not raced."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nst.run.planner
from nst.cli import main
from nst.errors import StorageError
from nst.manifest import load_manifest
from nst.run import run
from nst.run.inputs import InputFacts, read_inputs, stat_inputs
from nst.run_options import RunOptions
from nst.storage import beneath
from nst_testing.paths import SAMPLES

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
