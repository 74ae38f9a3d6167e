"""A stand-in for the engine's `Stylizer` where what is tested is the pipeline around the engine (planning, "done",
records, claims), not the optimisation: no network is built and no weights file is parsed (the unit tier)."""

from collections.abc import Sequence
from typing import Any

from PIL import Image

from nst.engine.images import resize_long_side
from nst.engine.pairs import PairProblem, PairResult
from nst.engine.steplog import ProgressCallback
from nst.engine.stylizer import Stylizer
from nst.engine.weights import WeightsInfo, weights_digest
from nst.results import error_info


class FakeEngine:
    """Each pair succeeds with its content image at `size` px, recording the sha256 of the weights file its
    parameters name (what the done rule compares: hashed, never loaded). Same constructor as the Stylizer."""

    def __init__(self, read_bytes: Any = None) -> None:
        self.read_bytes = read_bytes

    def stylize(self, jobs: list[PairProblem[Any]], **kwargs: Any) -> list[PairResult[Any]]:
        """One succeeded result per job."""
        return [self.one(job) for job in jobs]

    def one(self, job: PairProblem[Any]) -> PairResult[Any]:
        """The job's content image at its size, with the weights its parameters name."""
        p = job.params
        sha = weights_digest(p.network, p.weights, read_bytes=self.read_bytes)
        weights = WeightsInfo(f"fake:{p.weights or 'default'}", sha, p.network, "caffe")
        image = resize_long_side(job.content, p.size)
        return PairResult(job.id, "succeeded", p, image, {"total": 0.0}, [], p.iterations, weights=weights)


class NaNStylizer(Stylizer):
    """Every pair fails as a loss gone NaN at its first step would (no network loaded)."""

    def stylize(
        self,
        jobs: Sequence[PairProblem[Image.Image]],
        *,
        callback: ProgressCallback | None = None,
        input_roots: Sequence[str] | None = None,
    ) -> list[PairResult[Image.Image]]:
        error = error_info("NonFiniteLoss", "loss became NaN/inf at iteration 1", 1)
        return [PairResult(j.id, "failed", j.params, None, None, [], 1, error=error) for j in jobs]
