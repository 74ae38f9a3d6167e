"""The coarse-to-fine schedule: which scales a pair runs and how its `iterations` (all steps) are split over them.

Torch-free, so that `StyleParams` (the default `scales`) and the JSON record (what schedule ran) use it too. Below
COARSE_TO_FINE_FROM px one scale runs every step; from there the default is jcjohnson/neural-style's multires recipe
(256 -> 512 -> 1024, each initialised from the previous result, fewer steps at each finer scale). From a content
start, each finer scale also gets back the content's detail that the coarser one could not hold (`START_DETAIL`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MIN_SCALE_SIDE = 32  # the coarsest scale keeps at least this many pixels on its short side
COARSE_TO_FINE_FROM = 1024  # the output size (long side) from which `scales` is coarse-to-fine unless set
COARSEST_SIDE = 256  # the default schedule's coarsest scale is 256-511 px (neural-style's multires starts at 256)
MAX_SCALES = 8

# How a scale's image starts, as its record lists it. The first scale starts from `init`; each finer one from the
# previous result upsampled, plus (from a content start) the content's band between the two scales: the content at
# this scale minus itself blurred through the coarser one, a Laplacian pyramid's level. Records made before the band
# was added list no start: `START_UPSAMPLED` is what their finer scales did.
START_INIT = "init"
START_UPSAMPLED = "upsampled"
START_DETAIL = "upsampled+content detail"


def default_scales(size: int) -> int:
    """The scales a pair of this output size runs when `scales` is unset: 1 below COARSE_TO_FINE_FROM, else enough
    halvings for the coarsest scale to be COARSEST_SIDE to twice that (1024 px: 3 scales, 2048: 4)."""
    if size < COARSE_TO_FINE_FROM:
        return 1
    return min(MAX_SCALES, (size // COARSEST_SIDE).bit_length())


def scale_sizes(height: int, width: int, scales: int) -> list[tuple[int, int, float]]:
    """(height, width, factor) per scale, coarse to fine; each scale doubles the previous; tiny scales are dropped."""
    sizes = []
    for k in range(scales - 1, -1, -1):
        factor = 0.5**k
        h, w = max(1, round(height * factor)), max(1, round(width * factor))
        if k == 0 or min(h, w) >= MIN_SCALE_SIDE:
            sizes.append((h, w, factor))
    return sizes


@dataclass(frozen=True)
class Scale:
    """One scale of a schedule: its image size, its factor of the output size, its steps and how its image starts."""

    height: int
    width: int
    factor: float
    iterations: int
    start: str = START_INIT

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the pair's JSON record."""
        return asdict(self)


def scale_iterations(iterations: int, scales: int) -> list[int]:
    """Steps per scale, coarse to fine, summing to `iterations` (>= `scales`): each finer scale gets half the steps
    of the one before (neural-style's multires: 1000, 500, 200), at least one each."""
    weights = [2 ** (scales - 1 - k) for k in range(scales)]
    extra, total = iterations - scales, sum(weights)  # one step each, the rest by weight (largest remainder)
    counts = [1 + extra * w // total for w in weights]
    by_remainder = sorted(range(scales), key=lambda k: (-(extra * weights[k] % total), k))
    for k in by_remainder[: iterations - sum(counts)]:
        counts[k] += 1
    return counts


def schedule(height: int, width: int, scales: int, iterations: int, init: str) -> list[Scale]:
    """The scales a pair of this output shape and `init` runs, coarse to fine, with `iterations` (all steps) split
    over them.

    One scale runs every step at the output size. Scales whose short side would fall under MIN_SCALE_SIDE are
    dropped, and so are the coarsest ones when there are fewer steps than scales.
    """
    sizes = scale_sizes(height, width, scales)[-iterations:]
    counts = scale_iterations(iterations, len(sizes))
    finer = START_DETAIL if init == "content" else START_UPSAMPLED  # noise or style: no photo detail put back
    return [
        Scale(h, w, factor, n, START_INIT if k == 0 else finer)
        for k, ((h, w, factor), n) in enumerate(zip(sizes, counts, strict=True))
    ]


__all__ = [
    "COARSEST_SIDE",
    "COARSE_TO_FINE_FROM",
    "MIN_SCALE_SIDE",
    "START_DETAIL",
    "START_INIT",
    "START_UPSAMPLED",
    "Scale",
    "default_scales",
    "scale_iterations",
    "scale_sizes",
    "schedule",
]
