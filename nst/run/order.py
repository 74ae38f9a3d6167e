"""One rule for the order of a run's records: the order of the pairs they belong to (the manifest's, or a batch's).

A module of its own, below `batches`, `runner` and `shards`, so that each of them can use it without a circle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar


class HasId(Protocol):
    """Anything that names a pair by its id (a `PairSpec`, a `PairRecord`)."""

    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=HasId)


def in_pair_order(records: Iterable[T], pairs: Sequence[HasId]) -> list[T]:
    """`records` sorted by their pair's position in `pairs`; records of pairs not listed last, in their given order."""
    order = {p.id: i for i, p in enumerate(pairs)}
    return sorted(records, key=lambda r: order.get(r.id, len(order)))
