"""nst.storage versions and conditional operations, on a local directory and on real S3 (SeaweedFS).

What a write returns, `read_with_info`, `create_new` (never partial), `replace_if` and `delete(expected=)` with real
racing threads and processes (exactly one winner), and `remove_stale_temp` after a real SIGKILL.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nst import storage
from nst.errors import StorageError
from nst.storage import ObjectInfo
from nst_testing.faults import write_past_a_size_limit
from nst_testing.procs import race

RACERS = 8
ROUNDS = 5


def test_identity_is_etag_on_s3_and_mtime_locally() -> None:
    s3 = ObjectInfo("s3://b/k", 3, etag="abc", mtime_ns=1_700_000_000_000_000_000)
    local = ObjectInfo("/x/k", 3, etag=None, mtime_ns=123)
    assert s3.identity() == {"size": 3, "etag": "abc"}
    assert local.identity() == {"size": 3, "mtime_ns": 123}
    assert s3.same_version(ObjectInfo("s3://b/other", 3, etag="abc"))
    assert not s3.same_version(ObjectInfo("s3://b/k", 4, etag="abc"))
    with pytest.raises(StorageError, match="no ETag or modification time"):
        ObjectInfo("s3://b/k", 3).identity()


def test_write_returns_the_info_that_stat_and_listing_see(storage_root: str) -> None:
    uri = storage.join(storage_root, "d/a.png")
    written = storage.write_bytes(uri, b"first version")
    assert written.uri == uri and written.size == len(b"first version")
    assert (written.etag is not None) == storage.is_s3(uri)
    assert written.same_version(storage.stat(uri))
    (listed,) = storage.list_prefix(storage.join(storage_root, "d/"))
    assert listed.uri == uri and listed.same_version(written)
    (globbed,) = storage.glob_info(storage.join(storage_root, "d/*.png"))
    assert globbed.same_version(written)
    data, read = storage.read_with_info(uri)
    assert data == b"first version" and read.same_version(written)
    # A new version of the same size is a new identity (S3: another ETag; local: another file, a later mtime).
    if not storage.is_s3(uri):
        _wait_for_next_mtime_tick(Path(storage.local_path(uri)))
    again = storage.write_bytes(uri, b"other version")
    assert again.size == written.size and not again.same_version(written)
    assert again.same_version(storage.stat(uri))


def _wait_for_next_mtime_tick(path: Path) -> None:
    """Return once a new file would get a later mtime than `path` (the kernel stamps mtime at its clock tick)."""
    probe = path.with_name(".tick-probe")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe.write_bytes(b"")
        later = probe.stat().st_mtime_ns > path.stat().st_mtime_ns
        probe.unlink()
        if later:
            return
        time.sleep(0.001)
    raise AssertionError("the filesystem clock did not advance")


def test_multipart_write_returns_the_multipart_etag(s3_env: object, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/big.bin"
    data = os.urandom(storage.MULTIPART_THRESHOLD * 2 + 5)
    written = storage.write_bytes(uri, data)
    assert written.etag is not None and written.etag.endswith("-3")  # not an MD5: "<md5 of part md5s>-<parts>"
    assert written.same_version(storage.stat(uri))
    assert storage.read_bytes(uri) == data


def test_read_with_info_respects_max_bytes(storage_root: str) -> None:
    uri = storage.join(storage_root, "m.bin")
    storage.write_bytes(uri, b"x" * 100)
    with pytest.raises(StorageError, match="limit of 99 bytes"):
        storage.read_with_info(uri, max_bytes=99)
    with pytest.raises(StorageError, match="not found"):
        storage.read_with_info(storage.join(storage_root, "none.bin"))


# ------------------------------------------------------------------------------------------------------ create_new


def test_create_new_returns_the_info_of_what_it_wrote(storage_root: str) -> None:
    uri = storage.join(storage_root, "c/p.claim")
    created = storage.create_new(uri, b'{"run": 1}')
    assert created is not None and created.same_version(storage.stat(uri))
    assert storage.create_new(uri, b'{"run": 2}') is None
    assert storage.read_bytes(uri) == b'{"run": 1}'


def test_local_create_new_is_never_seen_partial(tmp_path: Path) -> None:
    """A reader polling the name while a large create_new runs sees nothing, then the whole content."""
    target = tmp_path / "big.claim"
    payload = os.urandom(32 * 1024 * 1024)
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                seen.add(target.stat().st_size)
            except FileNotFoundError:
                seen.add(-1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert storage.create_new(str(target), payload) is not None
    finally:
        done.set()
        watcher.join()
    assert seen <= {-1, len(payload)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.claim"]


def test_local_create_new_failing_mid_write_leaves_nothing(tmp_path: Path) -> None:
    """A real write failure (RLIMIT_FSIZE: no bytes past 4 KiB), in a subprocess: no target, no temp file."""
    target = tmp_path / "p.claim"
    proc = write_past_a_size_limit(f"storage.create_new({str(target)!r}, b'n' * 100_000)")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert str(target) in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------ delete


def test_conditional_delete_removes_only_the_expected_version(storage_root: str) -> None:
    uri = storage.join(storage_root, "q/p.claim")
    old = storage.write_bytes(uri, b"claim of run A")
    if not storage.is_s3(uri):
        _wait_for_next_mtime_tick(Path(storage.local_path(uri)))
    current = storage.write_bytes(uri, b"claim of run B")
    assert storage.delete(uri, expected=old) is False  # S3: If-Match with a stale ETag -> 412, nothing deleted
    assert storage.read_bytes(uri) == b"claim of run B"
    assert storage.delete(uri, expected=current) is True
    with pytest.raises(StorageError, match="not found"):
        storage.stat(uri)
    assert storage.delete(uri, expected=current) is False  # gone: nothing of that version to delete
    assert storage.delete(uri) is True  # unconditional: absent is not an error
    assert storage.list_prefix(storage.join(storage_root, "q/")) == []  # nothing set aside is left behind


def test_expected_info_from_the_other_kind_of_store_is_refused(storage_root: str) -> None:
    uri = storage.join(storage_root, "k.claim")
    storage.write_bytes(uri, b"x")
    foreign = ObjectInfo(uri, 1, etag=None, mtime_ns=1) if storage.is_s3(uri) else ObjectInfo(uri, 1, etag="e")
    with pytest.raises(StorageError, match="expected version has no"):
        storage.delete(uri, expected=foreign)
    with pytest.raises(StorageError, match="expected version has no"):
        storage.replace_if(uri, b"y", foreign)


# ------------------------------------------------------------------------------------------------------ replace_if


def test_replace_if_overwrites_only_the_expected_version(storage_root: str) -> None:
    uri = storage.join(storage_root, "r/p.claim")
    assert storage.replace_if(uri, b"new", ObjectInfo(uri, 1, etag="0" * 32, mtime_ns=1)) is None  # nothing there
    old = storage.write_bytes(uri, b"lapsed claim")
    if not storage.is_s3(uri):
        _wait_for_next_mtime_tick(Path(storage.local_path(uri)))
    current = storage.write_bytes(uri, b"live claim!!")
    assert storage.replace_if(uri, b"takeover", old) is None  # S3: If-Match with a stale ETag -> 412
    assert storage.read_bytes(uri) == b"live claim!!"
    taken = storage.replace_if(uri, b"takeover", current)
    assert taken is not None and taken.same_version(storage.stat(uri))
    assert storage.read_bytes(uri) == b"takeover"
    assert storage.replace_if(uri, b"again", current) is None  # the version it expected is gone
    assert [i.uri for i in storage.list_prefix(storage.join(storage_root, "r/"))] == [uri]


def _race_takeover(uri: str, expected: ObjectInfo, racer: int) -> bool:
    return storage.replace_if(uri, f"taken by racer {racer}".encode(), expected) is not None


@pytest.mark.parametrize("operation", ["replace_if", "delete"])
def test_racing_threads_exactly_one_wins(storage_root: str, operation: str) -> None:
    """Eight threads hold the same expected version; in every round exactly one replaces (or deletes) it."""
    uri = storage.join(storage_root, "race/p.claim")
    for round_ in range(ROUNDS):
        lapsed = storage.write_bytes(uri, f"lapsed claim {round_}".encode())
        barrier = threading.Barrier(RACERS)

        def race(racer: int, lapsed: ObjectInfo = lapsed, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            if operation == "delete":
                return storage.delete(uri, expected=lapsed)
            return _race_takeover(uri, lapsed, racer)

        with ThreadPoolExecutor(RACERS) as pool:
            won = list(pool.map(race, range(RACERS)))
        assert won.count(True) == 1, (round_, won)
        if operation == "delete":
            assert storage.list_prefix(storage.join(storage_root, "race/")) == []
        else:
            assert storage.read_bytes(uri) == f"taken by racer {won.index(True)}".encode()
            assert [i.uri for i in storage.list_prefix(storage.join(storage_root, "race/"))] == [uri]


def _process_racer(uri: str, expected: ObjectInfo, racer: int, barrier: object, results: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    results.put((racer, _race_takeover(uri, expected, racer)))  # type: ignore[attr-defined]


def test_racing_processes_exactly_one_takeover_wins(storage_root: str) -> None:
    """Eight processes (own clients, own interpreters) take over one lapsed claim; exactly one succeeds."""
    ctx = multiprocessing.get_context("spawn")  # no inherited boto3 client or locks
    uri = storage.join(storage_root, "procs/p.claim")
    lapsed = storage.write_bytes(uri, b"lapsed claim")
    outcome = race(ctx, RACERS, _process_racer, lambda racer, barrier, results: (uri, lapsed, racer, barrier, results))
    winners = [racer for racer, won in outcome.items() if won]
    assert len(winners) == 1, outcome
    assert storage.read_bytes(uri) == f"taken by racer {winners[0]}".encode()


def test_takeover_and_create_never_both_win(tmp_path: Path) -> None:
    """20 rounds of a takeover (replace_if of a lapsed claim) racing a create_new of the same name: one of the two
    wins, never both; the file holds the winner's bytes and no temp file is left beside it."""
    uri = str(tmp_path / "p.claim")
    for _ in range(20):
        lapsed = storage.write_bytes(uri, b"lapsed claim")
        barrier = threading.Barrier(2)

        def take(lapsed: ObjectInfo = lapsed, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return storage.replace_if(uri, b"taken", lapsed) is not None

        def create(barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return storage.create_new(uri, b"created") is not None

        with ThreadPoolExecutor(2) as pool:
            took, created = pool.submit(take), pool.submit(create)
            outcome = (took.result(), created.result())
        assert outcome in {(True, False), (False, True)}, outcome
        assert storage.read_bytes(uri) == (b"taken" if outcome[0] else b"created")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.claim"]


# ------------------------------------------------------------------------------------------------ remove_stale_temp


def test_remove_stale_temp_after_a_sigkill_mid_write(tmp_path: Path) -> None:
    """A writer killed with SIGKILL leaves its temp file: listings skip it, remove_stale_temp deletes it."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        from nst import storage
        data = b"x" * (64 * 1024 * 1024)
        print("writing", flush=True)
        while True:
            storage.write_bytes({str(out / "big.png")!r}, data)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 120
        while not _temps(out):
            assert time.monotonic() < deadline, "the writer never had a temp file open"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    left = _temps(out)
    assert left, "SIGKILL mid-write leaves the temp file"
    assert all(not i.uri.endswith(".nst-tmp") for i in storage.list_prefix(str(out)))
    assert storage.remove_stale_temp(str(out), older_than_s=3600) == 0  # young: maybe a write in flight
    assert storage.remove_stale_temp(str(out), older_than_s=0) == len(left)
    assert _temps(out) == []


def _temps(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.nst-tmp")) if directory.is_dir() else []


def test_remove_stale_temp_keeps_young_temps_and_other_files(tmp_path: Path) -> None:
    """Age is measured from a temp file's last change (ctime), which no one can set back: compare two real ages."""
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / ".a.png.0123abcd.nst-tmp"
    stale.write_bytes(b"left by a killed writer")
    born = stale.stat().st_ctime
    while time.time() - born < 2.0:
        time.sleep(0.05)
    young = tmp_path / ".b.png.4567cdef.nst-tmp"
    young.write_bytes(b"a write in flight")
    keep = [tmp_path / "a.png", tmp_path / "notes.nst-tmp"]  # not ours: ours start with a dot
    for path in keep:
        path.write_bytes(b"keep")
    older_than = time.time() - born - 1.0  # the stale file is 1 s older than this, the young one 1 s younger
    assert storage.remove_stale_temp(str(tmp_path), older_than_s=older_than) == 1
    assert not stale.exists() and young.exists() and all(p.exists() for p in keep)
    assert storage.remove_stale_temp(str(tmp_path / "missing"), older_than_s=0) == 0


def test_remove_stale_temp_is_a_no_op_on_s3(s3_env: object, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/out/.a.png.0123.nst-tmp"
    storage.write_bytes(uri, b"an object that merely looks like a temp file")
    assert storage.remove_stale_temp(f"s3://{s3_bucket}/out/", older_than_s=0) == 0
    assert storage.read_bytes(uri).startswith(b"an object")
