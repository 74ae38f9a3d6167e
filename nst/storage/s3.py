"""`S3Store`: `s3://bucket/key` URIs on AWS S3 or an S3-compatible server (SeaweedFS, MinIO, Ceph ...).

A write is one PUT (a multipart upload from MULTIPART_THRESHOLD on); conditional writes and deletes are single
requests with `If-None-Match: *` or `If-Match: <etag>`, which AWS (PutObject since 2024-11, DeleteObject since
2025-09) and SeaweedFS 4.48 honour. A server that refuses them (501 NotImplemented) is an error, never a silent
unconditional write; a server that ignores the header cannot be detected from here.
"""

from __future__ import annotations

import contextlib
import mimetypes
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from nst.errors import StorageError
from nst.storage.base import MAGIC_RE, MAX_PRESIGN_S, ObjectInfo, match, too_big
from nst.storage.s3client import (
    CONDITION_FAILED_STATUS,
    NO_BUCKET_CODES,
    NOT_FOUND_CODES,
    error_code,
    error_status,
    s3_client,
    s3_errors,
)

# Keys per listing request (S3's maximum).
LIST_PAGE_SIZE = 1000
# Data at least this large is uploaded as a multipart upload, in parts of this size (S3's minimum part: 5 MiB).
MULTIPART_THRESHOLD = 8 * 1024 * 1024
# Parts uploaded at once.
PART_CONCURRENCY = 4


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); key may be empty."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: invalid S3 URI (expected s3://bucket/key)")
    return bucket, key


def s3_uri(bucket: str, key: str) -> str:
    """The URI of an object."""
    return f"s3://{bucket}/{key}"


def _require_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri}: names a prefix, not an object (expected s3://bucket/key)")
    return bucket, key


def _etag(raw: Any) -> str:
    return str(raw).strip('"')


def _mtime_ns(last_modified: Any) -> int | None:
    if not isinstance(last_modified, datetime):
        return None
    return int(last_modified.timestamp()) * 1_000_000_000 + last_modified.microsecond * 1000


def _content_type(key: str, content_type: str | None) -> str:
    return content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"


def _expected_etag(expected: ObjectInfo) -> str:
    if expected.etag is None:
        raise StorageError(f"{expected.uri}: expected version has no ETag (not an S3 object's info)")
    return f'"{expected.etag}"'


def _condition_failed(exc: Any) -> bool:
    """Whether a ClientError says the If-Match / If-None-Match condition did not hold (or the key is gone)."""
    return error_status(exc) in CONDITION_FAILED_STATUS or error_code(exc) in NOT_FOUND_CODES


def _unsupported(exc: Any, uri: str) -> StorageError | None:
    if error_code(exc) == "NotImplemented" or error_status(exc) == 501:
        return StorageError(f"{uri}: the S3 server does not support conditional requests (If-Match/If-None-Match)")
    return None


def _multipart_upload(client: Any, bucket: str, key: str, data: bytes, content_type: str) -> str:
    """Upload in parts and return CompleteMultipartUpload's ETag (boto3's upload_fileobj discards that response)."""
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type)["UploadId"]
    starts = range(0, len(data), MULTIPART_THRESHOLD)

    def part(number: int) -> dict[str, Any]:
        body = data[starts[number - 1] : starts[number - 1] + MULTIPART_THRESHOLD]
        resp = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": resp["ETag"]}

    try:
        with ThreadPoolExecutor(min(PART_CONCURRENCY, len(starts))) as pool:
            parts = list(pool.map(part, range(1, len(starts) + 1)))
        done = client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    return _etag(done["ETag"])


class S3Store:
    """S3 objects behind the `Store` protocol (boto3 imported lazily, through `s3client`)."""

    def read(self, uri: str, max_bytes: int | None) -> tuple[bytes, ObjectInfo]:
        """One GET: the body, and size/ETag/LastModified from its headers."""
        bucket, key = _require_key(uri)
        with s3_errors(uri, bucket, "read"):
            resp = s3_client().get_object(Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                size = int(resp.get("ContentLength", 0))
                if max_bytes is not None and size > max_bytes:
                    raise too_big(uri, size, max_bytes)
                # read(n) allocates n bytes up front: ask for what the object holds (+1 to see a longer body).
                data: bytes = body.read() if max_bytes is None else body.read(min(size, max_bytes) + 1)
            finally:
                body.close()
        return data, ObjectInfo(uri, len(data), _etag(resp.get("ETag")), _mtime_ns(resp.get("LastModified")))

    def write(self, uri: str, data: bytes, content_type: str | None) -> ObjectInfo:
        """One PUT, or a multipart upload for large data; the ETag is the server's answer to this write."""
        bucket, key = _require_key(uri)
        kind = _content_type(key, content_type)
        with s3_errors(uri, bucket, "write"):
            client = s3_client()
            if len(data) < MULTIPART_THRESHOLD:
                etag = _etag(client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=kind)["ETag"])
            else:
                etag = _multipart_upload(client, bucket, key, data, kind)
        return ObjectInfo(uri, len(data), etag, None)

    def _conditional_put(self, uri: str, data: bytes, content_type: str, **condition: str) -> ObjectInfo | None:
        import botocore.exceptions

        bucket, key = _require_key(uri)
        with s3_errors(uri, bucket, "write"):
            try:
                resp = s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, **condition)
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) not in NO_BUCKET_CODES and _condition_failed(exc):
                    return None
                raise _unsupported(exc, uri) or exc from None
        return ObjectInfo(uri, len(data), _etag(resp["ETag"]), None)

    def create_new(self, uri: str, data: bytes, content_type: str) -> ObjectInfo | None:
        """One PUT with `If-None-Match: *` (412: it exists; 409: a concurrent conditional write won)."""
        return self._conditional_put(uri, data, content_type, IfNoneMatch="*")

    def replace_if(self, uri: str, data: bytes, expected: ObjectInfo, content_type: str) -> ObjectInfo | None:
        """One PUT with `If-Match: <expected ETag>`."""
        return self._conditional_put(uri, data, content_type, IfMatch=_expected_etag(expected))

    def delete(self, uri: str, expected: ObjectInfo | None) -> bool:
        """DeleteObject (idempotent); with `expected`, `If-Match: <its ETag>` (412, or 404 if gone: False)."""
        import botocore.exceptions

        bucket, key = _require_key(uri)
        condition = {} if expected is None else {"IfMatch": _expected_etag(expected)}
        with s3_errors(uri, bucket, "delete"):
            try:
                s3_client().delete_object(Bucket=bucket, Key=key, **condition)
            except botocore.exceptions.ClientError as exc:
                if expected is not None and error_code(exc) not in NO_BUCKET_CODES and _condition_failed(exc):
                    return False
                raise _unsupported(exc, uri) or exc from None
        return True

    def stat(self, uri: str) -> ObjectInfo:
        """One HEAD (a 404 is followed by a HEAD of the bucket, to say which of the two is missing)."""
        import botocore.exceptions

        bucket, key = _require_key(uri)
        client = s3_client()
        with s3_errors(uri, bucket, "stat"):
            try:
                head = client.head_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) in NOT_FOUND_CODES:
                    raise _head_not_found(client, uri, bucket) from None
                raise
        return ObjectInfo(uri, int(head["ContentLength"]), _etag(head["ETag"]), _mtime_ns(head.get("LastModified")))

    def _objects(self, uri: str, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under `prefix` (one paginated listing; folder markers skipped)."""
        with s3_errors(uri, bucket, "list"):
            paginator = s3_client().get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE})
            for page in pages:
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        yield ObjectInfo(
                            s3_uri(bucket, obj["Key"]),
                            int(obj["Size"]),
                            _etag(obj["ETag"]),
                            _mtime_ns(obj.get("LastModified")),
                        )

    def list_prefix(self, prefix_uri: str) -> list[ObjectInfo]:
        """One paginated ListObjectsV2 of the prefix (taken as a directory)."""
        bucket, prefix = split_s3(prefix_uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return sorted(self._objects(prefix_uri, bucket, prefix), key=lambda i: i.uri)

    def glob(self, pattern_uri: str) -> list[ObjectInfo]:
        """List from the pattern's literal head, keep the keys whose segments match."""
        bucket, key_pattern = split_s3(pattern_uri)
        pat = key_pattern.split("/")
        m = MAGIC_RE.search(key_pattern)
        listing_prefix = key_pattern[: m.start()] if m else key_pattern
        found = self._objects(pattern_uri, bucket, listing_prefix)
        skip = len(f"s3://{bucket}/")
        return sorted((i for i in found if match(pat, i.uri[skip:].split("/"))), key=lambda i: i.uri)

    def presigned_url(self, uri: str, expires_s: int) -> str:
        """A presigned GET (SigV4: at most MAX_PRESIGN_S)."""
        if not 0 < expires_s <= MAX_PRESIGN_S:
            raise StorageError(f"{uri}: presigned URL lifetime must be 1..{MAX_PRESIGN_S} s, not {expires_s}")
        bucket, key = _require_key(uri)
        with s3_errors(uri, bucket, "presign"):
            url: str = s3_client().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
            )
        return url

    def join(self, base_dir_uri: str, relative: str) -> str:
        """Key arithmetic with posix normpath; never above the bucket root."""
        keep_slash = relative == "" or relative.endswith("/")
        bucket, prefix = split_s3(base_dir_uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        key = posixpath.normpath(prefix + relative) if (prefix + relative) else ""
        if key == ".":
            key = ""
        if key == ".." or key.startswith("../"):
            raise StorageError(f"{relative!r} relative to {base_dir_uri}: goes above the bucket root")
        if keep_slash and key:
            key += "/"
        return s3_uri(bucket, key)

    def parent(self, uri: str) -> str:
        """The prefix holding the key, with a trailing slash."""
        bucket, key = split_s3(uri)
        head = key.rstrip("/").rpartition("/")[0]
        return s3_uri(bucket, head + "/" if head else "")

    def remove_stale_temp(self, prefix_uri: str, older_than_s: float) -> int:
        """Nothing to do: S3 writes leave no temp objects (an aborted multipart upload is aborted)."""
        return 0


def _head_not_found(client: Any, uri: str, bucket: str) -> StorageError:
    """A HEAD 404 carries no body: ask whether the bucket exists to say which is missing."""
    import botocore.exceptions

    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) in NOT_FOUND_CODES | NO_BUCKET_CODES:
            return StorageError(f"{uri}: not found: bucket {bucket!r} does not exist")
    except botocore.exceptions.BotoCoreError:
        pass
    return StorageError(f"{uri}: not found: no such key in bucket {bucket!r}")
