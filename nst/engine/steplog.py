"""What each step of a batch leaves: each pair's loss rows, the progress events, which pairs failed where, results."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nst.engine.pairs import PairProblem, PairResult
from nst.results import error_info

LOSS_TERMS = ("content", "style", "tv", "total")


@dataclass
class ProgressEvent:
    """Sent after every step; `losses` (per pair) only every `log_every` steps, `images` only every `save_every`."""

    scale: int
    scales: int
    height: int
    width: int
    iteration: int  # 1-based, counted across all scales
    total_iterations: int
    seconds: float
    losses: list[dict[str, float]] | None = None
    images: Tensor | None = None  # [B,3,H,W] in [0,1]
    failed: list[bool] = field(default_factory=list)


ProgressCallback = Callable[[ProgressEvent], None]


def stack_losses(losses: dict[str, Tensor]) -> Tensor:
    """Per-pair losses as one [B, len(LOSS_TERMS)] fp32 tensor."""
    return torch.stack([losses[k].detach().float() for k in LOSS_TERMS], 1)


def read_losses(stacked: Tensor) -> list[dict[str, float]]:
    """Copy per-pair losses [B, len(LOSS_TERMS)] to the host (one sync)."""
    return [dict(zip(LOSS_TERMS, row, strict=True)) for row in stacked.cpu().tolist()]


class StepLog:
    """Counts iterations, marks pairs failed at their first non-finite loss, logs loss rows and sends progress."""

    def __init__(
        self,
        pairs: int,
        device: torch.device,
        *,
        scales: int,
        iterations: int,
        log_every: int,
        save_every: int,
        callback: ProgressCallback | None,
    ) -> None:
        self.pairs, self.device = pairs, device
        self.scales, self.iterations = scales, iterations  # `iterations`: all steps, across the scales
        self.total_iterations = iterations
        self.log_every, self.save_every = log_every, save_every
        self.callback = callback
        self.alive = torch.ones(pairs, dtype=torch.bool, device=device)
        self.failed_at = torch.full((pairs,), -1, dtype=torch.long, device=device)
        self.histories: list[list[dict[str, float]]] = [[] for _ in range(pairs)]
        self.start = time.perf_counter()
        self.iteration = 0
        self.begin_scale(0, 0, 0, iterations)

    def begin_scale(self, scale: int, height: int, width: int, steps: int) -> None:
        """A new scale of `steps` steps: its logged losses start empty; a NaN from here on may still be rescued by its
        kept iterate."""
        self.scale, self.height, self.width, self.steps = scale, height, width, steps
        self.scale_start = self.iteration
        self.current = torch.zeros(self.pairs, len(LOSS_TERMS), device=self.device)  # each pair's current iterate

    def evaluated(self, total: Tensor) -> Tensor:
        """Count one evaluation of the batch; a pair whose loss is not finite fails here. Returns the alive pairs."""
        self.iteration += 1
        finite = torch.isfinite(total)
        self.failed_at = torch.where(self.alive & ~finite, self.iteration, self.failed_at)
        self.alive = self.alive & finite
        return self.alive

    def log_step(
        self, step: int, losses: dict[str, Tensor], iterates: Tensor | None, shown: Callable[[], Tensor]
    ) -> None:
        """Log the current iterates' losses every `log_every` steps and send the progress event.

        `iterates` [B]: the rows whose evaluated point is an iterate (None: all); `shown()` gives the images to save.
        """
        stacked = stack_losses(losses)
        self.current = stacked if iterates is None else torch.where(iterates[:, None], stacked, self.current)
        log_now = (step + 1) % self.log_every == 0 or step == 0 or step + 1 == self.steps
        read = read_losses(self.current) if log_now else None
        if read is not None:
            dead = self.failed_at.cpu().tolist()
            for i, row in enumerate(read):
                if dead[i] < 0:
                    self.histories[i].append({"iteration": self.iteration, "scale": self.scale, **row})
        if self.callback is None:
            return
        save_now = self.save_every > 0 and self.iteration % self.save_every == 0
        event = ProgressEvent(
            scale=self.scale,
            scales=self.scales,
            height=self.height,
            width=self.width,
            iteration=self.iteration,
            total_iterations=self.total_iterations,
            seconds=time.perf_counter() - self.start,
            losses=read,
            images=shown() if save_now else None,
            failed=(self.failed_at >= 0).cpu().tolist() if read is not None else [],
        )
        self.callback(event)

    def rescued(self, kept_finite: Tensor) -> Tensor:
        """Pairs that went non-finite at this scale but whose kept iterate had a finite loss: not lost [B]."""
        return kept_finite & (self.failed_at > self.scale_start)

    def outcomes(
        self,
        problems: Sequence[PairProblem[Tensor]],
        images: Tensor,
        final_losses: list[dict[str, float]],
        rescued: Tensor,
    ) -> list[PairResult[Tensor]]:
        """One result per pair; a success never has a non-finite final loss."""
        failed_list = self.failed_at.cpu().tolist()
        rescued_list = rescued.cpu().tolist()
        return [
            self._outcome(problem, i, images, final_losses[i], failed_list[i], rescued_list[i])
            for i, problem in enumerate(problems)
        ]

    def _outcome(
        self, problem: PairProblem[Tensor], i: int, images: Tensor, losses: dict[str, float], failed: int, rescued: bool
    ) -> PairResult[Tensor]:
        pair, history = problem.id, self.histories[i]
        finite = all(math.isfinite(v) for v in losses.values())
        if failed >= 0 and not (rescued and finite):
            error = error_info("NonFiniteLoss", f"loss became NaN/inf at iteration {failed}", failed)
            return PairResult(pair, "failed", problem.params, None, None, history, failed, error=error)
        if not finite:  # e.g. the last step's image evaluates to NaN
            error = error_info("NonFiniteLoss", "the final image's loss is NaN/inf", self.total_iterations)
            return PairResult(pair, "failed", problem.params, None, None, history, self.total_iterations, error=error)
        warnings = []
        if failed >= 0:
            message = f"loss became NaN/inf at iteration {failed}; kept the best iterate"
            warnings.append(error_info("NonFiniteLoss", message, failed))
        image = images[i : i + 1].detach().cpu()
        return PairResult(
            pair, "succeeded", problem.params, image, losses, history, self.total_iterations, warnings=warnings
        )
