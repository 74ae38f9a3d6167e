"""nst.storage on a local directory and on a real S3 server (SeaweedFS): round trips, atomicity, errors, retries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nst import storage
from nst.errors import StorageError
from nst.storage import s3 as s3store
from nst.storage import s3client
from nst_testing.faults import write_past_a_size_limit
from nst_testing.s3 import FaultProxy, S3Server, free_ports

# ----------------------------------------------------------------------------------------------- both backends


def test_round_trip_bytes_stat(storage_root: str) -> None:
    # storage.exists/delete were removed (only tests used them); absence is a "not found" StorageError.
    uri = storage.join(storage_root, "sub/dir/blob.bin")
    payload = bytes(range(256)) * 7
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(uri)
    storage.write_bytes(uri, payload)
    assert storage.read_bytes(uri) == payload
    info = storage.stat(uri)
    assert info.uri == uri
    assert info.size == len(payload)
    assert (info.etag is not None) == storage.is_s3(uri)
    assert (info.mtime_ns is not None) if not storage.is_s3(uri) else True
    # Overwrite replaces the whole content.
    storage.write_bytes(uri, b"short")
    assert storage.read_bytes(uri) == b"short"
    assert storage.stat(uri).size == 5


def test_list_prefix_recursive(storage_root: str) -> None:
    names = ["a.txt", "b/c.txt", "b/d/e.txt", "b/d/f/g.txt"]
    for i, name in enumerate(names):
        storage.write_bytes(storage.join(storage_root, name), b"x" * (i + 1))
    infos = storage.list_prefix(storage_root)
    assert [i.uri for i in infos] == sorted(storage.join(storage_root, n) for n in names)
    assert {i.uri: i.size for i in infos}[storage.join(storage_root, "b/d/e.txt")] == 3
    sub = storage.join(storage_root, "b/d/")
    assert [i.uri for i in storage.list_prefix(sub)] == [
        storage.join(storage_root, "b/d/e.txt"),
        storage.join(storage_root, "b/d/f/g.txt"),
    ]
    # A directory named without a trailing slash is still a directory, not a name prefix.
    assert [i.uri for i in storage.list_prefix(storage.join(storage_root, "b/d"))] == [
        i.uri for i in storage.list_prefix(sub)
    ]
    assert storage.list_prefix(storage.join(storage_root, "nothing-here/")) == []


def test_glob_star_double_star_and_classes(storage_root: str) -> None:
    names = ["img/a.jpg", "img/b.jpg", "img/c.png", "img/x1.jpg", "img/deep/d.jpg", "img/deep/er/e.jpg", "other/f.jpg"]
    for name in names:
        storage.write_bytes(storage.join(storage_root, name), b"1")

    def g(pattern: str) -> list[str]:
        return [
            uri[len(storage.join(storage_root, "")) :].lstrip("/")
            for uri in storage.glob(storage.join(storage_root, pattern))
        ]

    assert g("img/*.jpg") == ["img/a.jpg", "img/b.jpg", "img/x1.jpg"]
    assert g("img/?.jpg") == ["img/a.jpg", "img/b.jpg"]
    assert g("img/[ac].*") == ["img/a.jpg", "img/c.png"]
    assert g("img/**/*.jpg") == ["img/a.jpg", "img/b.jpg", "img/deep/d.jpg", "img/deep/er/e.jpg", "img/x1.jpg"]
    assert g("**/e.jpg") == ["img/deep/er/e.jpg"]
    assert g("*/*.jpg") == ["img/a.jpg", "img/b.jpg", "img/x1.jpg", "other/f.jpg"]
    assert g("img/deep/*") == ["img/deep/d.jpg"]
    assert g("img/c.png") == ["img/c.png"]
    assert g("img/missing.png") == []
    assert g("nowhere/**/*.jpg") == []
    assert storage.glob(storage.join(storage_root, "img/a.jpg")) == [storage.join(storage_root, "img/a.jpg")]


def test_max_bytes(storage_root: str) -> None:
    uri = storage.join(storage_root, "big.bin")
    storage.write_bytes(uri, b"z" * 1000)
    assert storage.read_bytes(uri, max_bytes=1000) == b"z" * 1000
    with pytest.raises(StorageError, match=r"limit of 999 bytes") as err:
        storage.read_bytes(uri, max_bytes=999)
    assert uri in str(err.value)


def test_missing_object_is_not_found(storage_root: str) -> None:
    uri = storage.join(storage_root, "missing/nothing.png")
    for call in (storage.read_bytes, storage.stat):
        with pytest.raises(StorageError, match="not found") as err:
            call(uri)
        assert uri in str(err.value)
        assert "\n" not in str(err.value)
    assert storage.glob(uri) == []


def test_presigned_url_fetches_the_bytes(storage_root: str) -> None:
    uri = storage.join(storage_root, "pic.png")
    storage.write_bytes(uri, b"\x89PNG-ish")
    url = storage.presigned_url(uri, expires_s=600)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"\x89PNG-ish"


# ------------------------------------------------------------------------------------------- join / parent (pure)


@pytest.mark.parametrize(
    ("base", "relative", "expected"),
    [
        ("s3://b/man/", "content/a.png", "s3://b/man/content/a.png"),
        ("s3://b/man", "content/a.png", "s3://b/man/content/a.png"),
        ("s3://b/", "a.png", "s3://b/a.png"),
        ("s3://b/x/y/", "../z/./a.png", "s3://b/x/z/a.png"),
        ("s3://b/x/", "out/", "s3://b/x/out/"),
        ("s3://b/x/", "s3://other/k.png", "s3://other/k.png"),
        ("s3://b/x/", "/abs/k.png", "/abs/k.png"),
        ("s3://b/x/", "file:///abs/k.png", "file:///abs/k.png"),
        ("/data/m", "c/a.png", "/data/m/c/a.png"),
        ("/data/m/", "./c/../a.png", "/data/m/a.png"),
        ("rel/dir", "a.png", "rel/dir/a.png"),
        ("/data/m", "s3://b/k", "s3://b/k"),
        ("file:///data/m", "c/a b.png", "file:///data/m/c/a%20b.png"),
    ],
)
def test_join(base: str, relative: str, expected: str) -> None:
    assert storage.join(base, relative) == expected


def test_join_above_bucket_root_is_an_error() -> None:
    with pytest.raises(StorageError, match="above the bucket root"):
        storage.join("s3://b/x/", "../../a.png")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://b/a/b/c.png", "s3://b/a/b/"),
        ("s3://b/a/b/", "s3://b/a/"),
        ("s3://b/c.png", "s3://b/"),
        ("/data/m/x.yaml", "/data/m"),
        ("x.yaml", "."),
        ("dir/x.yaml", "dir"),
        ("file:///data/m/x.yaml", "file:///data/m"),
    ],
)
def test_parent(uri: str, expected: str) -> None:
    assert storage.parent(uri) == expected


def test_join_parent_round_trip() -> None:
    for manifest in ("s3://bucket/m/nightly.yaml", "/srv/m/nightly.yaml", "file:///srv/m/nightly.yaml"):
        assert storage.join(storage.parent(manifest), "nightly.yaml") == manifest


def test_is_s3_and_unsupported_scheme() -> None:
    assert storage.is_s3("s3://b/k")
    assert not storage.is_s3("/tmp/x")
    assert not storage.is_s3("file:///tmp/x")
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        storage.read_bytes("gs://bucket/key")
    with pytest.raises(StorageError, match="invalid S3 URI"):
        storage.read_bytes("s3:///key")


# ------------------------------------------------------------------------------------------------------- local


def test_file_uris_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = (tmp_path / "d" / "x y.txt").as_uri()
    storage.write_bytes(uri, b"hello")
    assert (tmp_path / "d" / "x y.txt").read_bytes() == b"hello"
    assert storage.read_bytes(uri) == b"hello"
    assert storage.glob((tmp_path / "d").as_uri() + "/*.txt") == [uri]
    assert [i.uri for i in storage.list_prefix((tmp_path / "d").as_uri())] == [uri]
    assert storage.presigned_url(uri) == uri
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("rel/y.txt", b"rel")
    assert storage.glob("rel/*.txt") == ["rel/y.txt"]
    assert storage.glob("**/y.txt") == ["rel/y.txt"]
    assert [i.uri for i in storage.list_prefix("rel")] == ["rel/y.txt"]


def test_local_write_keeps_no_temp_files_and_sane_mode(tmp_path: Path) -> None:
    target = tmp_path / "out" / "a.json"
    storage.write_bytes(str(target), b"{}")
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    target.chmod(0o640)
    storage.write_bytes(str(target), b"{ }")
    assert target.stat().st_mode & 0o777 == 0o640  # an overwrite keeps the file's mode


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def test_failure_while_writing_leaves_old_target_and_no_temp(tmp_path: Path) -> None:
    """A real write failure (RLIMIT_FSIZE: the kernel refuses bytes past 4 KiB) mid-write, in a subprocess."""
    target = tmp_path / "a.png"
    target.write_bytes(b"old complete image")
    proc = write_past_a_size_limit(f"storage.write_bytes({str(target)!r}, b'n' * 100_000)")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert str(target) in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert target.read_bytes() == b"old complete image"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    # Same failure for a new file: no partial target appears.
    new = tmp_path / "new.png"
    proc = write_past_a_size_limit(f"storage.write_bytes({str(new)!r}, b'n' * 100_000)")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_not_writable_directory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        locked = Path("/sys")  # read-only even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
    with pytest.raises(StorageError, match="permission denied") as err:
        storage.write_bytes(str(locked / "out.json"), b"{}")
    assert str(locked / "out.json") in str(err.value)
    # A path through a regular file is refused the same way.
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="is a file, not a directory"):
        storage.write_bytes(str(tmp_path / "file" / "out.json"), b"{}")


def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="is a directory"):
        storage.read_bytes(str(tmp_path))
    with pytest.raises(StorageError, match="not a regular file"):
        storage.stat(str(tmp_path))


def test_import_does_not_import_boto3() -> None:
    code = (
        "import sys, nst.storage; bad = [m for m in ('boto3', 'botocore', 'prefect') if m in sys.modules]; print(bad)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------- S3


def test_missing_bucket_and_key_are_named(s3_env: S3Server, s3_bucket: str) -> None:
    missing_key = f"s3://{s3_bucket}/no/such.png"
    for call in (storage.read_bytes, storage.stat):
        with pytest.raises(StorageError, match=rf"not found: no such key in bucket '{s3_bucket}'"):
            call(missing_key)
    missing_bucket = "s3://nst-no-such-bucket-7c1/a.png"
    for call in (storage.read_bytes, storage.stat):
        with pytest.raises(StorageError, match=r"not found: bucket 'nst-no-such-bucket-7c1' does not exist"):
            call(missing_bucket)
    with pytest.raises(StorageError, match="does not exist"):
        storage.write_bytes(missing_bucket, b"x")
    with pytest.raises(StorageError, match="does not exist"):
        storage.list_prefix("s3://nst-no-such-bucket-7c1/")


def test_content_type_and_server_side_view(s3_env: S3Server, s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/r/a.png", b"png")
    storage.write_bytes(f"s3://{s3_bucket}/r/a.json", b"{}")
    storage.write_bytes(f"s3://{s3_bucket}/r/blob", b"?", content_type="image/x-test")
    client = s3_env.client()
    assert client.head_object(Bucket=s3_bucket, Key="r/a.png")["ContentType"] == "image/png"
    assert client.head_object(Bucket=s3_bucket, Key="r/a.json")["ContentType"] == "application/json"
    assert client.head_object(Bucket=s3_bucket, Key="r/blob")["ContentType"] == "image/x-test"
    assert client.get_object(Bucket=s3_bucket, Key="r/a.png")["Body"].read() == b"png"


def test_large_write_is_multipart(s3_env: S3Server, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/big.bin"
    data = os.urandom(storage.MULTIPART_THRESHOLD + 1024)
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    etag = storage.stat(uri).etag
    assert etag is not None and etag.endswith("-2")  # a multipart ETag: md5-of-parts "-" part count


def test_listing_is_one_paginated_listing(s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """list_prefix and glob page through one listing (2 keys a page here): no request per object."""
    client = s3_env.client()
    keys = [f"p/{i}.jpg" for i in range(5)] + ["p/sub/x.jpg", "q/y.jpg"]
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"")
    monkeypatch.setattr(s3store, "LIST_PAGE_SIZE", 2)
    with FaultProxy(s3_env.endpoint_url, fail_first=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        infos = storage.list_prefix(f"s3://{s3_bucket}/p/")
        assert [i.uri for i in infos] == [f"s3://{s3_bucket}/{k}" for k in sorted(keys[:6])]
        assert proxy.requests == 3  # ceil(6 / 2) pages
        assert storage.glob(f"s3://{s3_bucket}/p/*.jpg") == [f"s3://{s3_bucket}/{k}" for k in keys[:5]]
        assert proxy.requests == 3 + 3


def test_wrong_credentials_are_reported_without_the_secret(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{s3_bucket}/a.png"
    storage.write_bytes(uri, b"data")
    bad_secret = "WrongSecret-do-not-print-91b2"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    with pytest.raises(StorageError, match=r"rejected the credentials \(SignatureDoesNotMatch\)") as err:
        storage.read_bytes(uri)
    assert uri in str(err.value)
    assert bad_secret not in str(err.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NO-SUCH-KEY-ID")
    with pytest.raises(StorageError, match=r"rejected the credentials \(InvalidAccessKeyId\)") as err:
        storage.write_bytes(uri, b"other")
    assert bad_secret not in str(err.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.access_key)
    assert storage.read_bytes(uri) == b"data"  # the rejected write changed nothing


def test_no_credentials(s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no usable AWS credentials"):
        storage.read_bytes(f"s3://{s3_bucket}/a.png")


def test_endpoint_unreachable_is_fast_and_clear(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"S3 endpoint http://127.0.0.1:{port}/?\S* is unreachable") as err:
        storage.read_bytes("s3://bucket/a.png")
    assert time.monotonic() - start < 10
    assert "s3://bucket/a.png" in str(err.value)


def test_hostname_endpoint_uses_path_style(s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`localhost` is a name, not an IP: without path-style boto3 would address `<bucket>.localhost`."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url.replace("127.0.0.1", "localhost"))
    uri = f"s3://{s3_bucket}/k.txt"
    storage.write_bytes(uri, b"via localhost")
    assert storage.read_bytes(uri) == b"via localhost"
    assert f"/{s3_bucket}/k.txt?" in storage.presigned_url(uri)


def test_transient_503_is_retried_by_botocore(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{s3_bucket}/flaky.bin"
    storage.write_bytes(uri, b"eventually")
    with FaultProxy(s3_env.endpoint_url, fail_first=2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
        assert storage.read_bytes(uri) == b"eventually"
        assert proxy.requests == 3
    with FaultProxy(s3_env.endpoint_url, fail_first=5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        with pytest.raises(StorageError, match=r"S3 service error SlowDown \(gave up after 1 attempt\)"):
            storage.read_bytes(uri)
        assert proxy.requests == 1


def test_client_is_cached_and_reset(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    first = s3client.s3_client()
    assert s3client.s3_client() is first
    storage.reset_clients()
    assert s3client.s3_client() is not first
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    assert s3client.s3_client().meta.config.retries["total_max_attempts"] == 7


def test_presigned_url_lifetime_bounds(s3_env: S3Server, s3_bucket: str) -> None:
    with pytest.raises(StorageError, match="lifetime"):
        storage.presigned_url(f"s3://{s3_bucket}/a.png", expires_s=8 * 24 * 3600)
    url = storage.presigned_url(f"s3://{s3_bucket}/a.png")
    assert "X-Amz-Expires=604800" in url


def test_create_new_has_exactly_one_winner_among_racing_writers(storage_root: str) -> None:
    """The claim primitive: S3 `If-None-Match: *` (SeaweedFS honours it) or local O_EXCL; one of eight wins."""
    from concurrent.futures import ThreadPoolExecutor

    uri = storage.join(storage_root, "out/p.claim")
    with ThreadPoolExecutor(8) as pool:
        won = [bool(info) for info in pool.map(lambda i: storage.create_new(uri, f"writer {i}".encode()), range(8))]
    assert won.count(True) == 1
    assert storage.read_bytes(uri) == f"writer {won.index(True)}".encode()
    assert storage.create_new(uri, b"late") is None
    storage.delete(uri)
    storage.delete(uri)  # gone already: not an error
    assert storage.create_new(uri, b"again") is not None


def test_permanent_and_transient_errors_are_told_apart(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StorageError) as missing:
        storage.write_bytes("s3://no-such-bucket-nst/x.json", b"{}")
    assert not missing.value.transient
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.reset_clients()
    with pytest.raises(StorageError) as unreachable:
        storage.write_bytes("s3://any-bucket/x.json", b"{}")
    assert unreachable.value.transient
