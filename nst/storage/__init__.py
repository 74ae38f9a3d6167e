"""URI in, bytes out: plain local paths, `file://` URIs and `s3://bucket/key` behind one small interface.

Each function picks the `Store` for the URI's scheme (`LocalStore` for paths and file://, `S3Store` for s3://) and
hands the call to it. Writes are atomic: locally a complete temp file takes the name in one step; on S3 one PUT (a
multipart upload for large data). Every write returns the `ObjectInfo` of what it wrote, whose `identity()` can be
compared with a later `stat`/listing: (size, ETag) on S3, (size, mtime_ns) locally. Conditional writes and deletes
(`create_new`, `replace_if`, `delete(expected=...)`) are single atomic steps with exactly one winner among racers.
boto3 is imported lazily, only on the S3 code path. Every failure is raised as a one-line `StorageError` naming
the URI.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from nst.errors import StorageError
from nst.storage import beneath
from nst.storage.base import MAX_PRESIGN_S, ObjectInfo, Store, local_path, scheme, too_big
from nst.storage.local import LocalStore
from nst.storage.s3 import LIST_PAGE_SIZE, MULTIPART_THRESHOLD, S3Store
from nst.storage.s3client import DEFAULT_MAX_ATTEMPTS, reset_clients

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "LIST_PAGE_SIZE",
    "MAX_PRESIGN_S",
    "MULTIPART_THRESHOLD",
    "LocalStore",
    "ObjectInfo",
    "S3Store",
    "StorageError",
    "Store",
    "create_new",
    "delete",
    "glob",
    "glob_info",
    "is_s3",
    "join",
    "list_prefix",
    "local_path",
    "parent",
    "presigned_url",
    "read_bytes",
    "read_with_info",
    "remove_stale_temp",
    "replace_if",
    "reset_clients",
    "stat",
    "store_for",
    "write_bytes",
]

_LOCAL = LocalStore()
_S3 = S3Store()


def store_for(uri: str) -> Store:
    """The store for `uri`'s scheme: S3 for s3://, local for plain paths and file://; others are a StorageError."""
    kind = scheme(uri)
    if kind == "s3":
        return _S3
    local_path(uri)  # refuses empty paths and unsupported schemes with a clear message
    return _LOCAL


def is_s3(uri: str) -> bool:
    """Whether `uri` is an `s3://` URI."""
    return scheme(uri) == "s3"


def read_bytes(uri: str, *, max_bytes: int | None = None) -> bytes:
    """The whole content of a file or object; more than `max_bytes` is a StorageError."""
    return read_with_info(uri, max_bytes=max_bytes)[0]


def read_with_info(
    uri: str, *, max_bytes: int | None = None, roots: Sequence[str] | None = None
) -> tuple[bytes, ObjectInfo]:
    """The content and the `ObjectInfo` of the very version read (one GET / one open file).

    With `roots` (resolved, as `nst.manifest.inputs.allowed_roots` gives them), a local file is opened beneath them
    without following a symlink (`beneath.read`): one that resolves outside them, or became a symlink since it was
    checked, is never opened. S3 keys hold no symlinks: the caller checks them against the roots by name.
    """
    if roots is not None and scheme(uri) != "s3":
        data, info = beneath.read(uri, roots, max_bytes)
    else:
        data, info = store_for(uri).read(uri, max_bytes)
    if max_bytes is not None and len(data) > max_bytes:
        raise too_big(uri, len(data), max_bytes)
    return data, info


def write_bytes(uri: str, data: bytes, *, content_type: str | None = None) -> ObjectInfo:
    """Write atomically (local: temp file + rename, parents created; S3: one PUT); the info of what was written.

    S3: the ETag comes from the PUT's (or CompleteMultipartUpload's) response, so it names this write even if
    another writer follows at once; for a multipart upload (MULTIPART_THRESHOLD and up) it is not an MD5 of the
    content. Local: size and mtime_ns are the fsync'd temp file's, which the rename keeps.
    """
    return store_for(uri).write(uri, data, content_type)


def create_new(uri: str, data: bytes, *, content_type: str = "application/json") -> ObjectInfo | None:
    """Create `uri` only if nothing is there yet: the info of what was written, or None if something exists.

    S3: one PUT with `If-None-Match: *`. Local: a complete temp file hard-linked to the name, so the file is
    never seen empty or partial. Exactly one of several racing creators gets an ObjectInfo (truthy).
    """
    return store_for(uri).create_new(uri, data, content_type)


def replace_if(
    uri: str, data: bytes, expected: ObjectInfo, *, content_type: str = "application/json"
) -> ObjectInfo | None:
    """Overwrite `uri` only if it still is the version `expected` describes: the new info, or None (not replaced).

    For taking over a lapsed claim: among racers holding the same `expected`, exactly one wins. S3: one PUT with
    `If-Match: <expected.etag>`. Local: the expected file is renamed aside (one racer wins the rename), checked
    (size, mtime_ns) and the new content linked into place; for that instant the name is empty, and a concurrent
    `create_new` that takes it wins instead (this call then returns None).
    """
    return store_for(uri).replace_if(uri, data, expected, content_type)


def delete(uri: str, *, expected: ObjectInfo | None = None) -> bool:
    """Remove a file or object (absent already: not an error); False only when `expected` did not match.

    With `expected`, only that version is removed: S3 DeleteObject with `If-Match: <expected.etag>`; locally
    the file is renamed aside, checked (size, mtime_ns) and unlinked, or put back if it is another version.
    """
    return store_for(uri).delete(uri, expected)


def stat(uri: str, *, roots: Sequence[str] | None = None) -> ObjectInfo:
    """Size and ETag (S3; with LastModified as mtime_ns) or size and mtime_ns (local) of one file or object; with
    `roots`, a local file is stat'ed beneath them as `read_with_info` opens it (no symlink followed)."""
    if roots is not None and scheme(uri) != "s3":
        return beneath.stat(uri, roots)
    return store_for(uri).stat(uri)


def list_prefix(prefix_uri: str) -> list[ObjectInfo]:
    """Every file/object under a directory or S3 prefix (taken as a directory), recursively, sorted by URI.

    S3: one ListObjectsV2 request per LIST_PAGE_SIZE keys. Local: one stat per file. Our temp files are skipped.
    """
    return store_for(prefix_uri).list_prefix(prefix_uri)


def glob_info(pattern_uri: str) -> list[ObjectInfo]:
    """Like `glob`, with each match's `ObjectInfo` (from the same listing: no request per object)."""
    return store_for(pattern_uri).glob(pattern_uri)


def glob(pattern_uri: str) -> list[str]:
    """Sorted files/objects matching `*`, `?`, `[..]` (within one path segment) and `**` (any depth)."""
    return [info.uri for info in glob_info(pattern_uri)]


def presigned_url(uri: str, expires_s: int = MAX_PRESIGN_S) -> str:
    """A URL to fetch `uri` without credentials: a presigned S3 GET, or a `file://` URI for local files."""
    return store_for(uri).presigned_url(uri, expires_s)


def join(base_dir_uri: str, relative: str) -> str:
    """Resolve `relative` against a directory or prefix URI; absolute paths and URIs are returned unchanged."""
    if scheme(relative) or os.path.isabs(relative):
        return relative
    return store_for(base_dir_uri).join(base_dir_uri, relative)


def parent(uri: str) -> str:
    """The directory (local) or prefix (S3, with a trailing slash) containing `uri`."""
    return store_for(uri).parent(uri)


def remove_stale_temp(prefix_uri: str, older_than_s: float) -> int:
    """Delete our temp files (`.<name>.<random>.nst-tmp`, left by a killed writer) under a local directory that
    have not changed for `older_than_s` seconds; how many were deleted. A no-op (0) on S3, which leaves none."""
    return store_for(prefix_uri).remove_stale_temp(prefix_uri, older_than_s)
