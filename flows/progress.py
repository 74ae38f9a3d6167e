"""Progress of a flow run: finished pairs plus running batches' fractions, as a progress artifact and log lines."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.artifacts import update_progress_artifact

from nst.run import Batch

if TYPE_CHECKING:  # the engine (torch) loads when a batch runs, not when Prefect loads the flow to deploy it
    from nst.engine.optimize import ProgressCallback, ProgressEvent

PROGRESS_UPDATE_S = 5.0
LOG_EVERY_S = 30.0


class Progress:
    """Finished pairs plus the fraction done of running batches, mirrored into a progress artifact (throttled)."""

    def __init__(self, total: int, artifact_id: Any) -> None:
        self.total = total
        self.done = 0
        self.running: dict[str, float] = {}  # batch label -> pairs-equivalent done
        self.artifact_id = artifact_id
        self._lock = threading.Lock()
        self._last = 0.0

    @property
    def percent(self) -> float:
        """Progress in percent (100 when there is nothing to do)."""
        if self.total == 0:
            return 100.0
        return min(100.0, 100.0 * (self.done + sum(self.running.values())) / self.total)

    def step(self, label: str, pairs: int, fraction: float) -> None:
        """A running batch of `pairs` pairs is `fraction` done."""
        with self._lock:
            self.running[label] = pairs * min(max(fraction, 0.0), 1.0)
            self._publish(force=False)

    def finish(self, label: str, pairs: int) -> None:
        """A batch of `pairs` pairs ended (in any state)."""
        with self._lock:
            self.running.pop(label, None)
            self.done += pairs
            self._publish(force=True)

    def _publish(self, force: bool) -> None:
        now = time.monotonic()
        if self.artifact_id is None or (not force and now - self._last < PROGRESS_UPDATE_S):
            return
        self._last = now
        with contextlib.suppress(Exception):  # progress is cosmetic: never fail a run over it
            update_progress_artifact(
                self.artifact_id, self.percent, description=f"{self.done}/{self.total} pairs finished"
            )


def progress_callback(progress: Progress, batch: Batch) -> ProgressCallback:
    """on_progress for run_batch: feeds the progress artifact and logs losses now and then."""
    logger = get_run_logger()
    last_log = [time.monotonic()]

    def on_progress(event: ProgressEvent) -> None:
        progress.step(batch.label, len(batch.pairs), event.iteration / max(1, event.total_iterations))
        now = time.monotonic()
        if event.losses and now - last_log[0] >= LOG_EVERY_S:
            last_log[0] = now
            best = min(loss["total"] for loss in event.losses)
            logger.info(
                "batch %s: iteration %d/%d, best total loss %.4g",
                batch.label,
                event.iteration,
                event.total_iterations,
                best,
            )

    return on_progress
