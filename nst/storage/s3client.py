"""The process-wide S3 client and the translation of boto3/botocore failures into one-line `StorageError`s.

The client comes from boto3's default chain (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL[_S3], AWS_REGION, AWS_RETRY_MODE, AWS_MAX_ATTEMPTS, ~/.aws/config ...); retries are botocore's.
With a custom endpoint (SeaweedFS, MinIO, Ceph ...) path-style addressing is used unless the config file sets
`s3 = addressing_style = ...`. boto3 is imported only when a client is needed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

from nst.errors import StorageError

# Total attempts (first try included) when neither AWS_MAX_ATTEMPTS nor the config file sets max_attempts.
DEFAULT_MAX_ATTEMPTS = 5

# Error codes that mean "no such key" (GET: NoSuchKey; HEAD has no body, so only its status) and "no such bucket".
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
NO_BUCKET_CODES = frozenset({"NoSuchBucket"})
# A condition (If-Match / If-None-Match) did not hold (412), or a concurrent conditional write won (409).
CONDITION_FAILED_STATUS = frozenset({409, 412})
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

_client_lock = threading.Lock()
_clients: dict[tuple[tuple[str, str], ...], Any] = {}


def reset_clients() -> None:
    """Forget cached S3 clients, so the next call builds one from the current environment."""
    with _client_lock:
        _clients.clear()


def _env_key() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


def s3_client() -> Any:
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
        # Listings carry a LastModified per key: botocore's default parser (dateutil) costs ~0.3 ms each, most of a
        # 10,000-key listing's time; ISO-8601 is parsed directly, anything else falls back to the default.
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
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


def _timestamp(value: str) -> Any:
    """An S3 timestamp: ISO-8601 (listings) parsed directly, other forms (HTTP dates) by botocore's parser."""
    import datetime

    from botocore.utils import parse_timestamp

    try:
        return datetime.datetime.fromisoformat(value)
    except ValueError:
        return parse_timestamp(value)


def _is_custom_endpoint(endpoint_url: str | None) -> bool:
    host = (urllib.parse.urlparse(endpoint_url or "").hostname or "").lower()
    return not (host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn"))


def _clients_endpoint() -> str:
    client = _clients.get(_env_key())
    return str(client.meta.endpoint_url) if client is not None else "(default AWS endpoint)"


def error_code(exc: Any) -> str:
    """The S3 error code of a botocore ClientError ("" if none)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def error_status(exc: Any) -> int | None:
    """The HTTP status of a botocore ClientError."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def _client_error(exc: Any, uri: str, bucket: str, action: str) -> StorageError:
    """A ClientError (the server answered) as a StorageError."""
    err = exc.response.get("Error", {})
    code, status = error_code(exc), error_status(exc)
    attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
    if code in NO_BUCKET_CODES:
        return StorageError(f"{uri}: not found: bucket {bucket!r} does not exist")
    if code in NOT_FOUND_CODES:
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
    if (status is not None and status >= 500) or code in {"SlowDown", "Throttling", "ServiceUnavailable"}:
        tries = f"{attempts + 1} attempt" + ("s" if attempts else "")
        return StorageError(
            f"{uri}: cannot {action}: S3 service error {code or status} (gave up after {tries})", transient=True
        )
    message = str(err.get("Message", "")).splitlines()[0] if err.get("Message") else ""
    return StorageError(f"{uri}: cannot {action}: S3 error {code or status}" + (f": {message}" if message else ""))


def s3_error(exc: BaseException, uri: str, bucket: str, action: str) -> StorageError:
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
        return _client_error(exc, uri, bucket, action)
    if isinstance(exc, bce.HTTPClientError):  # the connection broke mid-request
        return StorageError(f"{uri}: cannot {action}: {str(exc).splitlines()[0]}", transient=True)
    if isinstance(exc, bce.BotoCoreError):
        return StorageError(f"{uri}: cannot {action}: {str(exc).splitlines()[0]}")
    return StorageError(f"{uri}: cannot {action}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def s3_errors(uri: str, bucket: str, action: str) -> Iterator[None]:
    """Turn any boto3/botocore exception raised inside into a StorageError."""
    import boto3.exceptions
    import botocore.exceptions

    try:
        yield
    except StorageError:
        raise
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error) as exc:
        raise s3_error(exc, uri, bucket, action) from None
