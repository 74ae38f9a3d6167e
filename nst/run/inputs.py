"""What a run knows of each input: its identity in storage (size + ETag or mtime), its sha256 and its pixel size.

Identities are cheap (one listing per S3 folder holding many inputs, else one stat each); an input is downloaded and
hashed only when no record vouches for its identity, and only its bytes are kept (in the run's spool) for the batches.
Given the input roots, a local input is stat'ed and read beneath them without following a symlink
(`nst.storage.beneath`): one swapped for a link out of them since the manifest was checked is never opened, and fails
its pairs.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from nst import storage
from nst.engine.images import sha256_bytes, upright_size
from nst.errors import NSTError, StorageError
from nst.manifest.inputs import is_allowed
from nst.run.layout import READ_THREADS

# An S3 folder holding at least this many of a run's inputs is listed (1 request per 1,000 keys), not HEADed per key.
LIST_AT = 8
Identity = dict[str, Any]  # {"size": n, "etag": "..."} (S3) or {"size": n, "mtime_ns": n} (local)


@dataclass(slots=True)
class InputFacts:
    """One input as this run saw it; `sha256`/`dims` are filled once it is read, `error` if it cannot be."""

    uri: str
    identity: Identity | None = None
    sha256: str | None = None
    dims: tuple[int, int] | None = None  # (width, height) as decoded; None: not an image load_image accepts
    error: str | None = None

    @property
    def read(self) -> bool:
        """Whether its bytes were read this run (hashed and spooled), or found unreadable."""
        return self.sha256 is not None or self.error is not None


def identity(info: storage.ObjectInfo) -> Identity:
    """The identity of a stored object: size plus ETag (S3) or modification time in ns (local files)."""
    return dict(info.identity())


def _outside(uri: str) -> StorageError:
    return StorageError(f"{uri}: not opened: outside the allowed input roots")


def _stat(uri: str, roots: Sequence[str] | None) -> storage.ObjectInfo:
    """The info of one input; a local one beneath `roots`, if given (S3 keys hold no symlinks: checked by name)."""
    if roots is not None and storage.is_s3(uri) and not is_allowed(uri, roots):
        raise _outside(uri)
    return storage.stat(uri, roots=roots)


def _read(uri: str, roots: Sequence[str] | None, max_bytes: int) -> tuple[bytes, storage.ObjectInfo]:
    """The bytes of one input and the info of the very version read; a local one beneath `roots`, if given."""
    if roots is not None and storage.is_s3(uri) and not is_allowed(uri, roots):
        raise _outside(uri)
    return storage.read_with_info(uri, max_bytes=max_bytes, roots=roots)


def stat_inputs(uris: Iterable[str], *, roots: Sequence[str] | None = None) -> dict[str, InputFacts]:
    """The identity of each input (local ones beneath `roots`, if given); one that cannot be stat'ed has none (it is
    read, and fails, if its pair runs)."""
    facts = {uri: InputFacts(uri) for uri in uris}
    by_folder: dict[str, list[str]] = defaultdict(list)
    for uri in facts:
        by_folder[storage.parent(uri) if storage.is_s3(uri) else ""].append(uri)
    singles = [u for folder, us in by_folder.items() if not folder or len(us) < LIST_AT for u in us]
    for folder in (f for f, us in by_folder.items() if f and len(us) >= LIST_AT):
        try:
            listed = {info.uri: info for info in storage.list_prefix(folder)}
        except NSTError:
            singles += by_folder[folder]
            continue
        for uri in by_folder[folder]:
            if uri in listed:
                facts[uri].identity = identity(listed[uri])
            else:
                singles.append(uri)

    def one(uri: str) -> None:
        try:
            facts[uri].identity = identity(_stat(uri, roots))
        except NSTError:
            facts[uri].identity = None

    with ThreadPoolExecutor(READ_THREADS) as pool:
        list(pool.map(one, singles))
    return facts


def spooled(spool: str, sha256: str) -> str:
    """Where the run's spool keeps an input's bytes."""
    return os.path.join(spool, sha256)


def read_inputs(
    facts: Iterable[InputFacts],
    *,
    spool: str | None,
    max_bytes: int,
    max_pixels: int,
    roots: Sequence[str] | None = None,
) -> None:
    """Download and hash these inputs in parallel (local ones opened once, beneath `roots` if given), keeping their
    bytes in `spool`; fills sha256, dims and identity (of the bytes read), or error (and no identity)."""

    def one(fact: InputFacts) -> None:
        try:
            data, info = _read(fact.uri, roots, max_bytes)
            fact.identity = identity(info)  # of the very version read, whatever the stat saw before
        except NSTError as exc:
            fact.error, fact.identity = str(exc), None  # nothing read: no size or time of whatever is there
            return
        fact.sha256 = sha256_bytes(data)
        if spool is not None and not os.path.exists(spooled(spool, fact.sha256)):
            storage.write_bytes(spooled(spool, fact.sha256), data)
        fact.dims = upright_size(data, max_pixels=max_pixels)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        list(pool.map(one, [f for f in facts if not f.read]))
