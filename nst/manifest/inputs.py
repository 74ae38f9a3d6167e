"""Input checks: every explicitly named input (and weights file) exists, one listing per parent prefix."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from nst import storage
from nst.errors import Loc, StorageError
from nst.manifest.source import Problems


def same_uri(uri: str) -> str:
    """Comparable form of a URI (local paths normalised)."""
    if storage.is_s3(uri):
        return uri
    return os.path.normpath(os.path.abspath(storage.local_path(uri)))


@dataclass
class InputRef:
    uri: str
    loc: Loc
    pair_id: str | None


def storage_reason(exc: StorageError, uri: str) -> str:
    """A StorageError's message without its leading `uri: ` and `cannot <verb>: ` (the caller says both)."""
    return re.sub(r"^cannot \w+: ", "", str(exc).removeprefix(f"{uri}: "))


def check_inputs(problems: Problems, refs: Sequence[InputRef]) -> None:
    """Every explicitly named input (and weights file) exists: one listing per parent prefix, not one per file."""
    by_parent: dict[str, list[InputRef]] = {}
    for ref in refs:
        by_parent.setdefault(storage.parent(ref.uri), []).append(ref)  # checked when the path was resolved
    reported: set[tuple[str, Loc]] = set()
    for parent, group in by_parent.items():
        try:
            listed = {same_uri(info.uri) for info in storage.list_prefix(parent)}
        except StorageError as exc:
            problems.add((), f"cannot list the inputs under {parent}: {storage_reason(exc, parent)}")
            continue
        for ref in group:
            if same_uri(ref.uri) not in listed and (ref.uri, ref.loc) not in reported:
                reported.add((ref.uri, ref.loc))
                pair = f" (pair {ref.pair_id})" if ref.pair_id else ""
                problems.add(ref.loc, f"not found: {ref.uri}{pair}")
