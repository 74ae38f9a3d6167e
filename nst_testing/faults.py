"""Faults the real parts cannot produce on demand."""

from typing import Any


class FaultyStylizer:
    """A real Stylizer whose `run` first calls `fault(jobs)`: faults the real parts cannot produce on demand (OOM)."""

    def __init__(self, inner: Any, fault: Any) -> None:
        self.inner, self.fault = inner, fault

    def run(self, jobs: Any, **kwargs: Any) -> Any:
        """`fault(jobs)`, then the real Stylizer's run."""
        self.fault(jobs)
        return self.inner.run(jobs, **kwargs)
