"""Faults the real parts cannot produce on demand."""

import subprocess
import sys
import textwrap
from typing import Any


class FaultyStylizer:
    """A real Stylizer whose `stylize` first calls `fault(jobs)`, for faults the real parts cannot make (OOM)."""

    def __init__(self, inner: Any, fault: Any) -> None:
        self.inner, self.fault = inner, fault

    def stylize(self, jobs: Any, **kwargs: Any) -> Any:
        """`fault(jobs)`, then the real Stylizer's stylize."""
        self.fault(jobs)
        return self.inner.stylize(jobs, **kwargs)


def write_past_a_size_limit(call: str, limit: int = 4096) -> subprocess.CompletedProcess[str]:
    """Run `call` (an nst.storage write of more than `limit` bytes) in a subprocess whose kernel refuses bytes past
    `limit` (RLIMIT_FSIZE): a real write failure mid-write. Exit 3 and `StorageError: <message>` on stdout if it
    raised StorageError."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        from nst import storage
        from nst.errors import StorageError
        try:
            {call}
        except StorageError as exc:
            print("StorageError:", exc)
            sys.exit(3)
        """
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
