"""Where a run's files live beside its outputs, and how they are written (transient storage errors retried).

The run's own folder `<output>/_runs` is never a symlink: locally, a file in it is written and read through the output
folder without following one (`storage.beneath`), so a `_runs` link planted in the output can neither send a summary
elsewhere nor feed the plan an index, an ids file or a summary from elsewhere (a refused read is an absent file).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from nst import safejson, storage
from nst.errors import NSTError, StorageError
from nst.storage import beneath

# Threads for the run path's storage reads (records, inputs).
READ_THREADS = 16
# Waits between attempts of one output write, on transient storage errors (on top of botocore's own retries):
# together they ride out an S3 endpoint that is down for about a minute.
WRITE_RETRY_DELAYS_S: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 30.0)
# The run's own folder beside the outputs: summaries, the records index, shard id lists, loss curves.
RUNS = "_runs"


def _in(output: str, name: str) -> str:
    return storage.join(output.rstrip("/") + "/", name)


def output_uris(output: str, pair_id: str) -> tuple[str, str]:
    """(`<output>/<id>.png`, `<output>/<id>.json`)."""
    return _in(output, f"{pair_id}.png"), _in(output, f"{pair_id}.json")


def claim_uri(output: str, pair_id: str) -> str:
    """`<output>/<id>.claim`: who is producing this pair right now."""
    return _in(output, f"{pair_id}.claim")


def summary_uri(output: str, run_id: str, suffix: str = ".json") -> str:
    """`<output>/_runs/<run_id>.json` (or another suffix, e.g. `-losses.png`): the run's own files."""
    return _in(output, f"{RUNS}/{run_id}{suffix}")


def with_retries(action: Callable[[], Any], delays: Sequence[float] = WRITE_RETRY_DELAYS_S) -> Any:
    """Run a storage action, again after each delay while it fails with a transient StorageError."""
    for delay in (*delays, None):
        try:
            return action()
        except StorageError as exc:
            if not exc.transient or delay is None:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def write(uri: str, data: bytes, content_type: str) -> Any:
    """Write one output (atomically, retrying transient errors); returns what the store says it wrote.

    A local file in `_runs/` is written beneath the output folder, `_runs` refused if it is a symlink.
    """
    if in_runs(uri):
        return with_retries(lambda: beneath.write_in(uri, data))
    return with_retries(lambda: storage.write_bytes(uri, data, content_type=content_type))


def read(uri: str, max_bytes: int) -> bytes:
    """The bytes of one of the run's files; a local one in `_runs/` only if it resolves inside the real
    `<output>/_runs/`, opened along that path with no symlink followed (a `_runs` link: a StorageError)."""
    if not in_runs(uri):
        return storage.read_bytes(uri, max_bytes=max_bytes)
    path = os.path.abspath(storage.local_path(uri))
    runs = os.path.join(os.path.realpath(os.path.dirname(os.path.dirname(path))), RUNS) + os.sep
    if not beneath.under(os.path.realpath(path), [runs]):  # said plainly here; the read below checks it as opened
        raise StorageError(f"{uri}: not read: it resolves outside {runs} ({beneath.NOT_A_LINK})")
    return storage.read_with_info(uri, max_bytes=max_bytes, roots=[runs])[0]


def read_json(uri: str, *, max_bytes: int, inflated_max: int | None = None) -> Any:
    """The JSON of one of the run's files (read as `read` does; gzip-inflated to at most `inflated_max` if given), or
    None when it is absent, refused or not parseable within nst.safejson's limits."""
    try:
        data = read(uri, max_bytes)
        return safejson.loads(safejson.gunzip(data, inflated_max) if inflated_max is not None else data)
    except (NSTError, OSError, ValueError):
        return None


def in_runs(uri: str) -> bool:
    """Whether `uri` is a local file in a run folder (`<output>/_runs/<name>`)."""
    if storage.is_s3(uri):
        return False
    return os.path.basename(os.path.dirname(os.path.abspath(storage.local_path(uri)))) == RUNS
