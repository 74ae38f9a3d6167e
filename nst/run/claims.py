"""Per-pair claims: `<id>.claim` beside the outputs says which run is producing the pair right now.

A claim is written whole (a local temp file linked into place, one S3 PUT), taken only if absent (`If-None-Match: *`,
`link`). Only its holder releases it: the run token is compared first, then a conditional delete. A claim past its
expiry, of a run that is over, or unreadable for longer than a grace period, is taken over by a conditional write.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from nst import safejson, storage
from nst.errors import NSTError, StorageError
from nst.results import now_iso
from nst.run.layout import claim_uri, with_retries

# A pair's claim lapses after this long, so a dead run's claims do not block others.
CLAIM_TTL_S = 6 * 3600.0
# An unreadable claim (left empty by a crash or a full disk, by an older version) lapses once this old.
UNREADABLE_GRACE_S = 60.0
_PLAIN = re.compile(r"[A-Za-z0-9._:+-]{1,128}")  # a run id (UUID, local-<time>-<hex>) or an ISO time
RunIsLive = Callable[[str], bool]  # whether the run of this id may still be writing (False: its claims are stale)


def _held(uri: str) -> tuple[storage.ObjectInfo, dict[str, Any] | None] | None:
    """The claim's identity and content (None content: unreadable), or None when there is no claim."""
    try:
        data, info = with_retries(lambda: storage.read_with_info(uri, max_bytes=64 * 1024))
    except StorageError as exc:
        if exc.transient:
            raise
        return None
    return info, parse_claim(data)


def parse_claim(data: bytes) -> dict[str, Any] | None:
    """A claim's body if it is shaped like one we write (bounded parse, a plain run id, numeric expiry), else None.

    Its run id and time are quoted in messages, so anything else a file could hold there is treated as unreadable.
    """
    try:
        held = safejson.loads(data)
    except ValueError:
        return None
    ok = (
        isinstance(held, dict)
        and isinstance(held.get("run_id"), str)
        and _PLAIN.fullmatch(held["run_id"]) is not None
        and isinstance(held.get("expires_at", 0), int | float)
        and not isinstance(held.get("expires_at"), bool)
        and ("claimed_at" not in held or _PLAIN.fullmatch(str(held["claimed_at"])) is not None)
    )
    return held if ok else None


def _lapsed(info: storage.ObjectInfo, held: dict[str, Any] | None, run_is_live: RunIsLive | None) -> bool:
    if held is None:  # mtime: the file's, or S3's LastModified
        return info.mtime_ns is None or time.time() - info.mtime_ns / 1e9 > UNREADABLE_GRACE_S
    if float(held.get("expires_at") or 0) < time.time():
        return True
    return run_is_live is not None and not run_is_live(str(held["run_id"]))


def _take_over(uri: str, body: bytes, lapsed: storage.ObjectInfo) -> bool:
    """Replace a lapsed claim only if it is still the one judged lapsed (a conditional write)."""
    return bool(with_retries(lambda: storage.replace_if(uri, body, expected=lapsed)))


def claim_pair(
    output: str, pair_id: str, run_id: str, *, ttl_s: float = CLAIM_TTL_S, run_is_live: RunIsLive | None = None
) -> str | None:
    """Take the pair's claim; None when this run holds it, else why it cannot (another live run holds it)."""
    uri = claim_uri(output, pair_id)
    body = json.dumps({"run_id": run_id, "expires_at": time.time() + ttl_s, "claimed_at": now_iso()}).encode()
    held: dict[str, Any] | None = None
    for _ in range(5):
        if with_retries(lambda: storage.create_new(uri, body)):
            return None
        found = _held(uri)
        if found is None:
            continue  # released meanwhile: try again
        info, held = found
        if held is not None and held["run_id"] == run_id:
            return None
        if not _lapsed(info, held, run_is_live):
            break
        if _take_over(uri, body, info):
            return None
    if held is None:
        return f"claim {uri} is unreadable; it lapses {UNREADABLE_GRACE_S:.0f} s after it was written"
    return f"claimed by run {held['run_id']} (since {held.get('claimed_at', '?')})"


def release_pair(output: str, pair_id: str, run_id: str) -> None:
    """Drop this run's claim on the pair, if it still holds it (best effort: an unreleased claim lapses)."""
    uri = claim_uri(output, pair_id)
    with contextlib.suppress(NSTError):
        found = _held(uri)
        if found is not None and found[1] is not None and found[1]["run_id"] == run_id:
            with_retries(lambda: storage.delete(uri, expected=found[0]))


def clear_stale_claims(output: str, pair_ids: Sequence[str], run_id: str, run_is_live: RunIsLive | None) -> None:
    """Remove the claims left on done pairs by runs that are over (killed between writing a pair and releasing it).

    A claim is cleared the way `claim_pair` takes one over, so a live run's claim (say, re-running with force) stays.
    """
    for pair_id in pair_ids:
        with contextlib.suppress(NSTError):
            if claim_pair(output, pair_id, run_id, run_is_live=run_is_live) is None:
                release_pair(output, pair_id, run_id)
