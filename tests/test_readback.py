"""Issue 29, items 8-11: odd names, corrupt files read back from storage, long integers, `nst stylize` edges.

Whatever storage holds (a record, the index, a claim, a run summary, an ids file) is parsed bounded and total: a file
that is too big, inflates too far, nests too deeply or holds numbers that overflow is absent, never a traceback. Every
case goes through the real readers and through `nst run --no-prefect` on local disk (32 px, 2 iterations).
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from nst import safejson, storage
from nst.cli import main
from nst.errors import ManifestError
from nst.manifest import load_manifest
from nst.run.claims import claim_pair, parse_claim
from nst.run.index import INDEX_SCHEMA, MAX_INDEX_INFLATED, index_uri, read_index
from nst.run.planner import listed_ids
from nst.run.records import read_record
from nst_testing.manifests import ONE_PAIR_MANIFEST, copy_samples
from nst_testing.paths import REPO, SAMPLES

CONTENT = str(SAMPLES / "content" / "chelsea.jpg")
STYLE = str(SAMPLES / "styles" / "brick.jpg")
DEEP = b"[" * 200_000


def _workspace(root: Path, manifest: str = ONE_PAIR_MANIFEST) -> Path:
    """The sample images under `root` and `manifest` as `root`/m.yaml; the manifest's path."""
    copy_samples(root)
    (root / "out").mkdir()
    path = root / "m.yaml"
    path.write_text(manifest)
    return path


def _gz_bomb(inflated: int) -> bytes:
    """A gzip member of `inflated` zero bytes (about 1 MB per GiB), made a MiB at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(2**20)
    parts = [packer.compress(chunk) for _ in range(inflated // 2**20)]
    return b"".join([*parts, packer.flush()])


def _record(**changes: object) -> bytes:
    """A record shaped like ours, with `changes`; numbers that json.dumps cannot write are spliced in as text."""
    body = {"schema": 2, "id": "p", "status": "succeeded", "params": {}, "engine_revision": 1, "output": {}}
    body["inputs"] = {"content": {"uri": "c", "sha256": None}, "styles": [{"uri": "s", "sha256": None}]}
    text = json.dumps({**body, **{k: "@@" + k for k in changes}})
    for key, raw in changes.items():
        text = text.replace(f'"@@{key}"', str(raw))
    return text.encode()


CORRUPT = {
    "record-deep": ("p.json", DEEP),
    "record-1e400": ("p.json", _record(engine_revision="1e400")),
    "record-4200-digit-int": ("p.json", _record(engine_revision="9" * 4200)),
    "record-nan": ("p.json", _record(seconds="NaN")),
    "index-deep": ("_runs/records-index.json.gz", gzip.compress(DEEP)),
    "index-1e400": (
        "_runs/records-index.json.gz",
        gzip.compress(b'{"schema": %d, "records": {"p": 1e400}}' % INDEX_SCHEMA),
    ),
    "index-not-an-index": (
        "_runs/records-index.json.gz",
        gzip.compress(b'{"schema": %d, "records": {"p": [1, 2]}}' % INDEX_SCHEMA),
    ),
    "claim-deep": ("p.claim", b"[" * 60_000),
    "claim-huge-expiry": ("p.claim", b'{"run_id": "x", "expires_at": 1' + b"0" * 4000 + b"}"),
    "claim-1e400": ("p.claim", b'{"run_id": "x", "expires_at": 1e400}'),
    "claim-text-expiry": ("p.claim", b'{"run_id": "x", "expires_at": "soon"}'),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_file_is_absent_to_its_reader(tmp_path: Path, case: str) -> None:
    name, data = CORRUPT[case]
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if name.endswith(".json"):
        assert read_record(str(path)) is None
    elif name.endswith(".gz"):
        assert read_index(str(tmp_path)) == {}
    else:
        assert parse_claim(data) is None
        os.utime(path, (time.time() - 3600, time.time() - 3600))  # unreadable and old: lapsed, so taken over
        assert claim_pair(str(tmp_path), "p", "me") is None
        assert json.loads(path.read_bytes())["run_id"] == "me"


@pytest.mark.parametrize("case", sorted(CORRUPT))
@pytest.mark.vgg  # runs the engine with the real VGG19 (32 px, 2 iterations)
def test_a_corrupt_file_costs_a_rerun_never_a_crash(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _workspace(tmp_path)
    name, data = CORRUPT[case]
    path = tmp_path / "out" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    old = time.time() - 3600
    os.utime(path, (old, old))
    code = main(["run", "--no-prefect", str(manifest)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 0, err
    assert "1 succeeded" in out
    assert json.loads((tmp_path / "out" / "p.json").read_bytes())["status"] == "succeeded"
    assert main(["run", "--no-prefect", str(manifest)]) == 0  # and the next run reads what this one wrote
    assert "1 skipped" in capsys.readouterr().out


def test_a_3_gb_sparse_record_is_not_read(tmp_path: Path) -> None:
    record = tmp_path / "p.json"
    with open(record, "wb") as fh:
        fh.truncate(3 * 2**30)  # sparse: no disk used
    tracemalloc.start()
    try:
        assert read_record(str(record)) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


@pytest.mark.vgg  # runs the engine with the real VGG19 (32 px, 2 iterations)
def test_a_3_gb_sparse_record_costs_a_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _workspace(tmp_path)
    with open(tmp_path / "out" / "p.json", "wb") as fh:
        fh.truncate(3 * 2**30)
    assert main(["run", "--no-prefect", str(manifest)]) == 0
    assert "1 succeeded" in capsys.readouterr().out


def test_a_gzip_bomb_index_is_absent_and_never_inflated_whole(tmp_path: Path) -> None:
    uri = index_uri(str(tmp_path))
    storage.write_bytes(uri, _gz_bomb(MAX_INDEX_INFLATED + 64 * 2**20))
    tracemalloc.start()
    try:
        assert read_index(str(tmp_path)) == {}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_INDEX_INFLATED + 32 * 2**20  # the cap and a little, not the whole inflated size


def test_an_ids_file_nested_deeply_is_no_list(tmp_path: Path) -> None:
    path = tmp_path / "ids.json"
    path.write_bytes(DEEP)
    assert listed_ids(str(path)) == []
    with pytest.raises(ValueError):
        listed_ids(str(path), strict=True)


def test_bounded_json_refuses_what_could_overflow_and_keeps_what_we_write() -> None:
    for bad in [DEEP, b'{"a": 1e400}', b"[-1e400]", b"[NaN]", b"[Infinity]", b"[" + b"1" * 41 + b"]", b"\xff"]:
        with pytest.raises(ValueError):
            safejson.loads(bad)
    ours = {"uri": "a[[[[.jpg", "digits": "1" * 100, "n": 1733500000123456789, "x": 1e-300, "deep": [[[[1]]]]}
    assert safejson.loads(json.dumps(ours).encode()) == ours  # brackets and digits inside strings do not count


# --- item 8: a file name that is not UTF-8


def _non_utf8_workspace(root: Path) -> Path:
    """A grid whose glob matches `a.jpg` and `caf\\xe9.jpg` (a Latin-1 name, not UTF-8) on disk."""
    (root / "content").mkdir()
    (root / "styles").mkdir()
    shutil.copy(CONTENT, root / "content" / "a.jpg")
    with open(os.fsencode(root / "content") + b"/caf\xe9.jpg", "wb") as fh:
        fh.write(Path(CONTENT).read_bytes())
    shutil.copy(STYLE, root / "styles" / "s.jpg")
    path = root / "m.yaml"
    grid = "grid: {contents: [content/*.jpg], styles: [styles/s.jpg]}\n"
    path.write_text("version: 1\noutput: out/\ndefaults: {size: 32, iterations: 2}\n" + grid)
    return path


@pytest.mark.vgg  # runs the engine with the real VGG19 (32 px, 2 iterations)
def test_a_non_utf8_file_name_is_a_pair_with_a_stable_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _non_utf8_workspace(tmp_path)
    ids = sorted(p.id for p in load_manifest(str(manifest)).pairs)
    assert ids[0] == "a__s" and ids[1].startswith("caf_-") and ids[1].endswith("__s")
    assert sorted(p.id for p in load_manifest(str(manifest)).pairs) == ids  # stable
    assert main(["validate", str(manifest)]) == 0
    assert main(["run", "--no-prefect", str(manifest)]) == 0
    out, err = capsys.readouterr()
    assert "2 succeeded" in out and "Traceback" not in err
    assert (tmp_path / "out" / f"{ids[1]}.png").is_file()
    assert main(["run", "--no-prefect", str(manifest)]) == 0
    assert "2 skipped" in capsys.readouterr().out  # its record names the same file: done, not rerun


def test_a_non_utf8_file_name_prints_on_a_strict_utf8_terminal(tmp_path: Path) -> None:
    manifest = _non_utf8_workspace(tmp_path)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # strict, as on a UTF-8 locale
    done = subprocess.run(
        [sys.executable, "-m", "nst.cli", "validate", str(manifest)], capture_output=True, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    assert b"caf\\udce9.jpg" in done.stdout


# --- item 10: integers counted by the digits Python would make of them


@pytest.mark.parametrize(
    "value", ["0x" + "f" * 4000, "0b" + "1" * 14000, "0" + "7" * 4500, "1_" * 4001 + "1", "1" + ":59" * 2500]
)
def test_a_long_integer_in_any_notation_is_refused_at_validate(
    tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _workspace(tmp_path, ONE_PAIR_MANIFEST.replace("brick.jpg}", f"brick.jpg, log_every: {value}}}"))
    assert main(["validate", str(manifest)]) == 1
    err = capsys.readouterr().err
    assert "pairs[0].log_every" in err and "integer is too long" in err and "Traceback" not in err
    with pytest.raises(ManifestError):
        load_manifest(str(manifest))


def test_a_tag_that_cannot_be_read_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for value in ['!!int ""', '!!float ""', "!!bool maybe", "!!timestamp now"]:
        manifest = _workspace(
            tmp_path / value[2:5], ONE_PAIR_MANIFEST.replace("brick.jpg}", f"brick.jpg, seed: {value}}}")
        )
        assert main(["validate", str(manifest)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("nst: error:") and "Traceback" not in err, err


# --- item 11: `nst stylize` edges


def test_stylize_on_cuda_without_cuda_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if pytest.importorskip("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "o.png"
    code = main(["stylize", CONTENT, STYLE, "-o", str(out), "--size", "32", "--iterations", "2", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("nst: error: device:") and "CUDA" in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.vgg  # runs the engine with the real VGG19 (32 px, 2 iterations)
def test_stylize_writes_exactly_the_name_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.PNG"
    assert main(["stylize", CONTENT, STYLE, "-o", str(out), "--size", "32", "--iterations", "2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.PNG", "out.json"]
    record = json.loads((tmp_path / "out.json").read_bytes())
    assert record["output"]["image"] == str(out)
    assert record["output"]["image_identity"]["size"] == out.stat().st_size


def test_migrate_ids_leaves_a_deeply_nested_record_where_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _workspace(tmp_path)
    (tmp_path / "out" / "old-id.json").write_bytes(DEEP)
    assert main(["migrate-ids", str(manifest)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "out" / "old-id.json").read_bytes() == DEEP
