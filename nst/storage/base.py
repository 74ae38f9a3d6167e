"""What every store shares: `ObjectInfo`, the `Store` protocol, URI parsing and glob pattern matching."""

from __future__ import annotations

import fnmatch
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nst.errors import StorageError

SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
MAGIC_RE = re.compile(r"[*?[]")
# Suffix of our temp files (`.<name>.<random>.nst-tmp`): listings skip them, `remove_stale_temp` deletes old ones.
TMP_SUFFIX = ".nst-tmp"
# Upper bound of a SigV4 presigned URL's lifetime.
MAX_PRESIGN_S = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One file or object: its URI, size in bytes, ETag (S3) and modification time in ns (local; S3: LastModified).

    `etag` is S3's ETag without quotes (None for local files). For a multipart upload it is not an MD5 of the content
    but `<md5 of the parts' md5s>-<part count>`: still a fine identity of that upload, never compare it to a hash.
    `mtime_ns` is the file's st_mtime_ns locally; on S3 it is LastModified (whole seconds) where the response carries
    it (stat, listings, reads) and None after a write (a PUT's response has no date of the object).
    """

    uri: str
    size: int
    etag: str | None = None
    mtime_ns: int | None = None

    def identity(self) -> dict[str, int | str]:
        """What tells two versions apart: {"size", "etag"} with an ETag (S3), else {"size", "mtime_ns"} (local)."""
        if self.etag is not None:
            return {"size": self.size, "etag": self.etag}
        if self.mtime_ns is not None:
            return {"size": self.size, "mtime_ns": self.mtime_ns}
        raise StorageError(f"{self.uri}: no ETag or modification time is known to identify it")

    def same_version(self, other: ObjectInfo) -> bool:
        """Whether `other` describes the same version (equal identities; the URI is not compared)."""
        return self.identity() == other.identity()


class Store(Protocol):
    """One kind of storage behind `nst.storage`'s functions (URIs in, bytes and `ObjectInfo`s out)."""

    def read(self, uri: str, max_bytes: int | None) -> tuple[bytes, ObjectInfo]:
        """The whole content and the info of the version read."""
        ...

    def write(self, uri: str, data: bytes, content_type: str | None) -> ObjectInfo:
        """Write atomically (replacing what is there); the info of what was written."""
        ...

    def create_new(self, uri: str, data: bytes, content_type: str) -> ObjectInfo | None:
        """Write only if nothing is at `uri`; None if something is."""
        ...

    def replace_if(self, uri: str, data: bytes, expected: ObjectInfo, content_type: str) -> ObjectInfo | None:
        """Overwrite only the version `expected` describes; None if another version (or nothing) is there."""
        ...

    def delete(self, uri: str, expected: ObjectInfo | None) -> bool:
        """Remove it (only the `expected` version, if given); False only when `expected` did not match."""
        ...

    def stat(self, uri: str) -> ObjectInfo:
        """The info of one file or object."""
        ...

    def list_prefix(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every file or object under a directory or prefix, recursively, sorted by URI."""
        ...

    def glob(self, pattern_uri: str) -> list[ObjectInfo]:
        """Every file or object matching a glob pattern, sorted by URI."""
        ...

    def presigned_url(self, uri: str, expires_s: int) -> str:
        """A URL that fetches `uri` without credentials."""
        ...

    def join(self, base_dir_uri: str, relative: str) -> str:
        """`relative` (a relative path) resolved against a directory or prefix."""
        ...

    def parent(self, uri: str) -> str:
        """The directory or prefix holding `uri`."""
        ...

    def remove_stale_temp(self, prefix_uri: str, older_than_s: float) -> int:
        """Delete our temp files under `prefix_uri` older than `older_than_s`; how many were deleted."""
        ...


# --------------------------------------------------------------------------------------------------- URI parsing


def scheme(uri: str) -> str:
    """The lower-cased URI scheme, or "" for a plain path."""
    m = SCHEME_RE.match(uri)
    return m.group(1).lower() if m else ""


def local_path(uri: str) -> str:
    """The filesystem path of a plain path or `file://` URI; any other scheme is a StorageError."""
    kind = scheme(uri)
    if not kind:
        if not uri:
            raise StorageError("empty path")
        return uri
    if kind != "file":
        raise StorageError(f"{uri}: unsupported URI scheme {kind!r} (use a local path, file:// or s3://)")
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise StorageError(f"{uri}: file:// URIs on another host ({parsed.netloc}) are not supported")
    path = urllib.request.url2pathname(parsed.path)
    if not path:
        raise StorageError(f"{uri}: file:// URI without a path")
    return path


def file_uri(path: str, *, trailing_slash: bool = False) -> str:
    """The `file://` URI of a local path (made absolute)."""
    uri = Path(os.path.abspath(path)).as_uri()
    return uri + "/" if trailing_slash and not uri.endswith("/") else uri


def too_big(uri: str, size: int, max_bytes: int) -> StorageError:
    """The error for content over a read's byte limit."""
    return StorageError(f"{uri}: larger than the limit of {max_bytes} bytes ({size} bytes)")


# ------------------------------------------------------------------------------------------------------------ glob


def match(pat: list[str], path: list[str]) -> bool:
    """Whether path segments match pattern segments (`**` = any number of segments, fnmatch within one)."""
    if not pat:
        return not path
    if pat[0] == "**":
        return match(pat[1:], path) or (bool(path) and match(pat, path[1:]))
    return bool(path) and fnmatch.fnmatchcase(path[0], pat[0]) and match(pat[1:], path[1:])


def can_descend(pat: list[str], path: list[str]) -> bool:
    """Whether some file below the directory `path` could match `pat`."""
    if not path:
        return bool(pat)
    if not pat:
        return False
    if pat[0] == "**":
        return can_descend(pat[1:], path) or can_descend(pat, path[1:])
    return fnmatch.fnmatchcase(path[0], pat[0]) and can_descend(pat[1:], path[1:])


def split_pattern(pattern: str) -> tuple[list[str], list[str]]:
    """Pattern path -> (literal leading segments, segments from the first one with a wildcard)."""
    segs = pattern.split("/")
    for i, seg in enumerate(segs):
        if MAGIC_RE.search(seg):
            return segs[:i], segs[i:]
    return segs[:-1], segs[-1:]
