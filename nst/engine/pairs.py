"""The engine's two pair types: what goes in (`PairProblem`) and what comes out (`PairResult`).

Each is generic over the image type: PIL images at the engine's door (stylizer.py), [1,3,H,W] tensors in [0,1] inside
the optimisation loop (nst.engine.optimize). No torch or PIL import here: planning code imports this module cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from nst.params import StyleParams
from nst.results import Status

if TYPE_CHECKING:
    from nst.engine.weights import WeightsInfo

ImageT = TypeVar("ImageT")


@dataclass
class PairProblem(Generic[ImageT]):
    """One content/style pair to stylize, with its resolved parameters."""

    content: ImageT
    styles: list[ImageT]
    params: StyleParams
    id: str = "pair"


@dataclass
class PairResult(Generic[ImageT]):
    """What came of one pair: the image, or None and the error that stopped it; the losses and how it ran."""

    id: str
    status: Status  # succeeded | failed
    params: StyleParams
    image: ImageT | None
    final_losses: dict[str, float] | None
    history: list[dict[str, float]]
    iterations: int
    error: dict[str, Any] | None = None
    warnings: list[dict[str, Any]] = field(default_factory=list)  # e.g. a later step went NaN; best iterate kept
    seconds: float = 0.0  # per pair: the batch's wall time over its pairs (set by the engine)
    device: str = ""
    weights: WeightsInfo | None = None
    intermediates: list[tuple[int, ImageT]] = field(default_factory=list)  # (iteration, image), `save_every`
