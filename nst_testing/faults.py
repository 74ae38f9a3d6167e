"""Faults the real parts cannot produce on demand."""

from typing import Any


class FaultyStylizer:
    """A real Stylizer whose `stylize` first calls `fault(jobs)`, for faults the real parts cannot make (OOM)."""

    def __init__(self, inner: Any, fault: Any) -> None:
        self.inner, self.fault = inner, fault

    def stylize(self, jobs: Any, **kwargs: Any) -> Any:
        """`fault(jobs)`, then the real Stylizer's stylize."""
        self.fault(jobs)
        return self.inner.stylize(jobs, **kwargs)
