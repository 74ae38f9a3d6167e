"""URI in, bytes out: plain local paths, `file://` URIs and `s3://bucket/key` behind one small interface.

Local writes are atomic (temp file in the target's directory + `os.replace`); S3 writes are one PUT (a managed
multipart upload for large data). boto3 is imported lazily, only on the S3 code path. The S3 client comes from
boto3's default chain (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL[_S3], AWS_REGION,
AWS_RETRY_MODE, AWS_MAX_ATTEMPTS, ~/.aws/config ...); retries are botocore's. With a custom endpoint (SeaweedFS,
MinIO, Ceph ...) path-style addressing is used unless the config file sets `s3 = addressing_style = ...`.
Every failure is raised as a one-line `StorageError` naming the URI.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import io
import mimetypes
import os
import posixpath
import re
import stat as _stat
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nst.errors import StorageError

__all__ = [
    "ObjectInfo",
    "StorageError",
    "create_new",
    "delete",
    "glob",
    "is_s3",
    "join",
    "list_prefix",
    "local_path",
    "parent",
    "presigned_url",
    "read_bytes",
    "reset_clients",
    "stat",
    "write_bytes",
]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MAGIC_RE = re.compile(r"[*?[]")
_TMP_SUFFIX = ".nst-tmp"
# Upper bound of a SigV4 presigned URL's lifetime.
MAX_PRESIGN_S = 7 * 24 * 3600
# Total attempts (first try included) when neither AWS_MAX_ATTEMPTS nor the config file sets max_attempts.
DEFAULT_MAX_ATTEMPTS = 5
# Keys per listing request (S3's maximum).
LIST_PAGE_SIZE = 1000
# Data at least this large is uploaded as a multipart upload (boto3's managed transfer).
MULTIPART_THRESHOLD = 8 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One file or object: its URI, size in bytes and ETag (S3) or ISO-8601 UTC modification time (local)."""

    uri: str
    size: int
    etag_or_mtime: str


# --------------------------------------------------------------------------------------------------- URI parsing


def _scheme(uri: str) -> str:
    """The lower-cased URI scheme, or "" for a plain path."""
    m = _SCHEME_RE.match(uri)
    return m.group(1).lower() if m else ""


def is_s3(uri: str) -> bool:
    """Whether `uri` is an `s3://` URI."""
    return _scheme(uri) == "s3"


def _split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); key may be empty."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: invalid S3 URI (expected s3://bucket/key)")
    return bucket, key


def _s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def local_path(uri: str) -> str:
    """The filesystem path of a plain path or `file://` URI; any other scheme is a StorageError."""
    scheme = _scheme(uri)
    if not scheme:
        if not uri:
            raise StorageError("empty path")
        return uri
    if scheme != "file":
        raise StorageError(f"{uri}: unsupported URI scheme {scheme!r} (use a local path, file:// or s3://)")
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise StorageError(f"{uri}: file:// URIs on another host ({parsed.netloc}) are not supported")
    path = urllib.request.url2pathname(parsed.path)
    if not path:
        raise StorageError(f"{uri}: file:// URI without a path")
    return path


def _file_uri(path: str, *, trailing_slash: bool = False) -> str:
    uri = Path(os.path.abspath(path)).as_uri()
    return uri + "/" if trailing_slash and not uri.endswith("/") else uri


def _is_file_uri(uri: str) -> bool:
    return _scheme(uri) == "file"


def join(base_dir_uri: str, relative: str) -> str:
    """Resolve `relative` against a directory or prefix URI; absolute paths and URIs are returned unchanged."""
    if _scheme(relative) or os.path.isabs(relative):
        return relative
    keep_slash = relative == "" or relative.endswith("/")
    if is_s3(base_dir_uri):
        bucket, prefix = _split_s3(base_dir_uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        key = posixpath.normpath(prefix + relative) if (prefix + relative) else ""
        if key == ".":
            key = ""
        if key == ".." or key.startswith("../"):
            raise StorageError(f"{relative!r} relative to {base_dir_uri}: goes above the bucket root")
        if keep_slash and key:
            key += "/"
        return _s3_uri(bucket, key)
    base = local_path(base_dir_uri)
    path = os.path.normpath(os.path.join(base, relative))
    if _is_file_uri(base_dir_uri):
        return _file_uri(path, trailing_slash=keep_slash)
    return path + os.sep if keep_slash and not path.endswith(os.sep) else path


def parent(uri: str) -> str:
    """The directory (local) or prefix (S3, with a trailing slash) containing `uri`."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        head = key.rstrip("/").rpartition("/")[0]
        return _s3_uri(bucket, head + "/" if head else "")
    path = local_path(uri)
    stripped = path.rstrip(os.sep) or os.sep
    directory = os.path.dirname(stripped) or "."
    return _file_uri(directory) if _is_file_uri(uri) else directory


# ---------------------------------------------------------------------------------------------------- S3 client

_client_lock = threading.Lock()
_clients: dict[tuple[tuple[str, str], ...], Any] = {}


def reset_clients() -> None:
    """Forget cached S3 clients, so the next call builds one from the current environment."""
    with _client_lock:
        _clients.clear()


def _env_key() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


def _s3_client() -> Any:
    """The process-wide S3 client for the current AWS_* environment (boto3 clients are thread-safe)."""
    key = _env_key()
    client = _clients.get(key)
    if client is not None:
        return client
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            client = _make_client()
            _clients[key] = client
        return client


def _make_client() -> Any:
    import boto3
    import botocore.exceptions
    import botocore.session
    from botocore.config import Config

    try:
        core = botocore.session.get_session()
        session = boto3.session.Session(botocore_session=core)
        options: dict[str, Any] = {"signature_version": "s3v4", "connect_timeout": 10, "read_timeout": 60}
        if core.get_config_variable("max_attempts") is None:
            # Only a default: AWS_MAX_ATTEMPTS / the config file win. Mode comes from AWS_RETRY_MODE (standard).
            options["retries"] = {"total_max_attempts": DEFAULT_MAX_ATTEMPTS}
        client = session.client("s3", config=Config(**options))
        user_s3 = core.get_config_variable("s3") or {}
        if _is_custom_endpoint(client.meta.endpoint_url) and "addressing_style" not in user_s3:
            # S3-compatible servers addressed by IP or a plain host name (SeaweedFS, MinIO) need path-style URLs.
            options["s3"] = {"addressing_style": "path"}
            client = session.client("s3", config=Config(**options))
        return client
    except botocore.exceptions.BotoCoreError as exc:
        raise StorageError(f"cannot set up the S3 client: {exc}") from None


def _is_custom_endpoint(endpoint_url: str | None) -> bool:
    host = (urllib.parse.urlparse(endpoint_url or "").hostname or "").lower()
    return not (host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn"))


_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}


def _s3_error(exc: BaseException, uri: str, action: str) -> StorageError:
    """Translate a botocore/boto3 exception into a one-line StorageError for `uri` (secrets never included)."""
    import botocore.exceptions as bce

    endpoint = _clients_endpoint()
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError | bce.CredentialRetrievalError):
        return StorageError(
            f"{uri}: cannot {action}: no usable AWS credentials found "
            "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError | bce.ProxyConnectionError):
        where = getattr(exc, "kwargs", {}).get("endpoint_url") or endpoint
        return StorageError(f"{uri}: cannot {action}: S3 endpoint {where} is unreachable", transient=True)
    if isinstance(exc, bce.ReadTimeoutError | bce.ConnectionClosedError | bce.ResponseStreamingError):
        return StorageError(f"{uri}: cannot {action}: the S3 endpoint {endpoint} stopped answering", transient=True)
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        bucket = _split_s3(uri)[0] if is_s3(uri) else ""
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: not found: bucket {bucket!r} does not exist")
        if code in _NOT_FOUND_CODES:
            return StorageError(f"{uri}: not found: no such key in bucket {bucket!r}")
        if code in _CREDENTIAL_CODES:
            return StorageError(
                f"{uri}: cannot {action}: the S3 endpoint rejected the credentials ({code}); "
                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        if code in _DENIED_CODES:
            return StorageError(f"{uri}: cannot {action}: access denied")
        if code == "InvalidBucketName":
            return StorageError(f"{uri}: invalid bucket name {bucket!r}")
        if (isinstance(status, int) and status >= 500) or code in {"SlowDown", "Throttling", "ServiceUnavailable"}:
            tries = f"{attempts + 1} attempt" + ("s" if attempts else "")
            return StorageError(
                f"{uri}: cannot {action}: S3 service error {code or status} (gave up after {tries})", transient=True
            )
        message = str(err.get("Message", "")).splitlines()[0] if err.get("Message") else ""
        return StorageError(f"{uri}: cannot {action}: S3 error {code or status}" + (f": {message}" if message else ""))
    if isinstance(exc, bce.HTTPClientError):  # the connection broke mid-request
        return StorageError(f"{uri}: cannot {action}: {str(exc).splitlines()[0]}", transient=True)
    if isinstance(exc, bce.BotoCoreError):
        return StorageError(f"{uri}: cannot {action}: {str(exc).splitlines()[0]}")
    return StorageError(f"{uri}: cannot {action}: {type(exc).__name__}: {exc}")


def _clients_endpoint() -> str:
    client = _clients.get(_env_key())
    return str(client.meta.endpoint_url) if client is not None else "(default AWS endpoint)"


@contextlib.contextmanager
def _s3_errors(uri: str, action: str) -> Iterator[None]:
    """Turn any boto3/botocore exception raised inside into a StorageError."""
    import boto3.exceptions
    import botocore.exceptions

    try:
        yield
    except StorageError:
        raise
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error) as exc:
        raise _s3_error(exc, uri, action) from None


def _require_key(uri: str) -> tuple[str, str]:
    bucket, key = _split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri}: names a prefix, not an object (expected s3://bucket/key)")
    return bucket, key


def _head_not_found(client: Any, uri: str, bucket: str) -> StorageError:
    """A HEAD 404 carries no body: ask whether the bucket exists to say which is missing."""
    import botocore.exceptions

    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in {"404", "NoSuchBucket", "NotFound"}:
            return StorageError(f"{uri}: not found: bucket {bucket!r} does not exist")
    except botocore.exceptions.BotoCoreError:
        pass
    return StorageError(f"{uri}: not found: no such key in bucket {bucket!r}")


# --------------------------------------------------------------------------------------------------- local helpers


def _os_error(exc: OSError, uri: str, action: str) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{uri}: not found: no such file or directory")
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri}: cannot {action}: is a directory")
    if isinstance(exc, NotADirectoryError | FileExistsError):
        return StorageError(f"{uri}: cannot {action}: a parent of it is a file, not a directory")
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: cannot {action}: permission denied")
    return StorageError(f"{uri}: cannot {action}: {exc.strerror or exc}")


def _too_big(uri: str, size: int, max_bytes: int) -> StorageError:
    return StorageError(f"{uri}: larger than the limit of {max_bytes} bytes ({size} bytes)")


def _mtime_iso(st: os.stat_result) -> str:
    return _dt.datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=_dt.UTC).isoformat()


_umask_cache: list[int] = []


def _umask() -> int:
    """The process umask, read once (from /proc where possible: os.umask can only be read by setting it)."""
    if not _umask_cache:
        with _client_lock:
            if not _umask_cache:
                current = None
                with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
                    for line in fh:
                        if line.startswith("Umask:"):
                            current = int(line.split()[1], 8)
                if current is None:
                    current = os.umask(0o022)
                    os.umask(current)
                _umask_cache.append(current)
    return _umask_cache[0]


# ----------------------------------------------------------------------------------------------------- public API


def read_bytes(uri: str, *, max_bytes: int | None = None) -> bytes:
    """The whole content of a file or object; more than `max_bytes` is a StorageError."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        with _s3_errors(uri, "read"):
            resp = _s3_client().get_object(Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                size = int(resp.get("ContentLength", 0))
                if max_bytes is not None and size > max_bytes:
                    raise _too_big(uri, size, max_bytes)
                data: bytes = body.read() if max_bytes is None else body.read(max_bytes + 1)
            finally:
                body.close()
    else:
        path = local_path(uri)
        try:
            with open(path, "rb") as fh:
                if max_bytes is None:
                    data = fh.read()
                else:
                    size = os.fstat(fh.fileno()).st_size
                    if size > max_bytes:
                        raise _too_big(uri, size, max_bytes)
                    data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise _os_error(exc, uri, "read") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_big(uri, len(data), max_bytes)
    return data


def write_bytes(uri: str, data: bytes, *, content_type: str | None = None) -> None:
    """Write atomically: a local temp file + rename (parents created), or one S3 PUT (multipart when large)."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        content_type = content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
        with _s3_errors(uri, "write"):
            client = _s3_client()
            if len(data) < MULTIPART_THRESHOLD:
                client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
            else:
                from boto3.s3.transfer import TransferConfig

                client.upload_fileobj(
                    io.BytesIO(data),
                    bucket,
                    key,
                    ExtraArgs={"ContentType": content_type},
                    Config=TransferConfig(multipart_threshold=MULTIPART_THRESHOLD),
                )
        return
    path = local_path(uri)
    directory = os.path.dirname(path) or "."
    tmp: str | None = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=_TMP_SUFFIX, dir=directory)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise _os_error(exc, uri, "write") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def create_new(uri: str, data: bytes, *, content_type: str = "application/json") -> bool:
    """Create `uri` only if nothing is there yet (S3 `If-None-Match: *`, local `O_EXCL`); False if it exists."""
    if is_s3(uri):
        import botocore.exceptions

        bucket, key = _require_key(uri)
        with _s3_errors(uri, "create"):
            try:
                _s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, IfNoneMatch="*")
            except botocore.exceptions.ClientError as exc:
                # 412: it exists; 409: a concurrent conditional write to the same key is in flight.
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    return False
                raise
        return True
    path = local_path(uri)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    except OSError as exc:
        raise _os_error(exc, uri, "create") from None
    with os.fdopen(fd, "wb") as fh:  # a reader may see it empty for a moment: claims treat that as "taken"
        fh.write(data)
    return True


def delete(uri: str) -> None:
    """Remove a file or object; one that is not there is not an error."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        with _s3_errors(uri, "delete"):
            _s3_client().delete_object(Bucket=bucket, Key=key)
        return
    try:
        os.unlink(local_path(uri))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _os_error(exc, uri, "delete") from None


def stat(uri: str) -> ObjectInfo:
    """Size and ETag (S3) or modification time (local) of one file or object."""
    if is_s3(uri):
        import botocore.exceptions

        bucket, key = _require_key(uri)
        client = _s3_client()
        with _s3_errors(uri, "stat"):
            try:
                head = client.head_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES:
                    raise _head_not_found(client, uri, bucket) from None
                raise
        return ObjectInfo(uri=uri, size=int(head["ContentLength"]), etag_or_mtime=str(head["ETag"]).strip('"'))
    path = local_path(uri)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _os_error(exc, uri, "stat") from None
    if not os.path.isfile(path):
        raise StorageError(f"{uri}: cannot stat: not a regular file")
    return ObjectInfo(uri=uri, size=st.st_size, etag_or_mtime=_mtime_iso(st))


def _s3_objects(uri: str, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every object under `prefix` (one paginated listing; folder markers skipped)."""
    with _s3_errors(uri, "list"):
        paginator = _s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE}):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    yield obj


def _walk_files(root: str, can_descend: Any = None) -> Iterator[tuple[list[str], os.stat_result]]:
    """(relative path segments, stat) of every regular file under `root`; temp files of writes in flight skipped."""

    def onerror(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        rel = os.path.relpath(dirpath, root)
        rel_segs = [] if rel == os.curdir else rel.split(os.sep)
        if can_descend is not None:
            dirnames[:] = [d for d in dirnames if can_descend([*rel_segs, d])]
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if _stat.S_ISREG(st.st_mode):
                yield [*rel_segs, name], st


def list_prefix(prefix_uri: str) -> list[ObjectInfo]:
    """Every file/object under a directory or S3 prefix (taken as a directory), recursively, sorted by URI."""
    if is_s3(prefix_uri):
        bucket, prefix = _split_s3(prefix_uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        infos = [
            ObjectInfo(_s3_uri(bucket, o["Key"]), int(o["Size"]), str(o["ETag"]).strip('"'))
            for o in _s3_objects(prefix_uri, bucket, prefix)
        ]
        return sorted(infos, key=lambda i: i.uri)
    root = local_path(prefix_uri)
    if not os.path.isdir(root):
        return []
    as_uri = _is_file_uri(prefix_uri)
    out = []
    try:
        for segs, st in _walk_files(root):
            path = os.path.join(root, *segs)
            out.append(ObjectInfo(_file_uri(path) if as_uri else path, st.st_size, _mtime_iso(st)))
    except OSError as exc:
        raise _os_error(exc, prefix_uri, "list") from None
    return sorted(out, key=lambda i: i.uri)


# ------------------------------------------------------------------------------------------------------------ glob


def _match(pat: list[str], path: list[str]) -> bool:
    """Whether path segments match pattern segments (`**` = any number of segments, fnmatch within one)."""
    if not pat:
        return not path
    if pat[0] == "**":
        return _match(pat[1:], path) or (bool(path) and _match(pat, path[1:]))
    return bool(path) and fnmatch.fnmatchcase(path[0], pat[0]) and _match(pat[1:], path[1:])


def _can_descend(pat: list[str], path: list[str]) -> bool:
    """Whether some file below the directory `path` could match `pat`."""
    if not path:
        return bool(pat)
    if not pat:
        return False
    if pat[0] == "**":
        return _can_descend(pat[1:], path) or _can_descend(pat, path[1:])
    return fnmatch.fnmatchcase(path[0], pat[0]) and _can_descend(pat[1:], path[1:])


def _split_pattern(pattern: str) -> tuple[list[str], list[str]]:
    """Pattern path -> (literal leading segments, segments from the first one with a wildcard)."""
    segs = pattern.split("/")
    for i, seg in enumerate(segs):
        if _MAGIC_RE.search(seg):
            return segs[:i], segs[i:]
    return segs[:-1], segs[-1:]


def glob(pattern_uri: str) -> list[str]:
    """Sorted files/objects matching `*`, `?`, `[..]` (within one path segment) and `**` (any depth)."""
    if is_s3(pattern_uri):
        bucket, key_pattern = _split_s3(pattern_uri)
        pat = key_pattern.split("/")
        m = _MAGIC_RE.search(key_pattern)
        listing_prefix = key_pattern[: m.start()] if m else key_pattern
        return sorted(
            _s3_uri(bucket, o["Key"])
            for o in _s3_objects(pattern_uri, bucket, listing_prefix)
            if _match(pat, o["Key"].split("/"))
        )
    literal, wild = _split_pattern(local_path(pattern_uri).replace(os.sep, "/"))
    head = "/".join(literal)  # "" for a relative pattern starting with a wildcard or for the root "/"
    root = (head or "/") if literal else os.curdir
    if not os.path.isdir(root):
        return []
    as_uri = _is_file_uri(pattern_uri)
    out = []
    try:
        for segs, _st in _walk_files(root, lambda segs: _can_descend(wild, segs)):
            if _match(wild, segs):
                path = (head + "/" if literal else "") + "/".join(segs)
                out.append(_file_uri(path) if as_uri else path)
    except OSError as exc:
        raise _os_error(exc, pattern_uri, "list") from None
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------- URLs


def presigned_url(uri: str, expires_s: int = MAX_PRESIGN_S) -> str:
    """A URL to fetch `uri` without credentials: a presigned S3 GET, or a `file://` URI for local files."""
    if not is_s3(uri):
        return _file_uri(local_path(uri))
    if not 0 < expires_s <= MAX_PRESIGN_S:
        raise StorageError(f"{uri}: presigned URL lifetime must be 1..{MAX_PRESIGN_S} s, not {expires_s}")
    bucket, key = _require_key(uri)
    with _s3_errors(uri, "presign"):
        url: str = _s3_client().generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
        )
    return url
