"""Batch neural style transfer (Gatys et al.): a plain library; imports neither prefect nor boto3.

`from nst import stylize` is the Python API (nst/api.py); torch is imported only when it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nst.api import Stylized, StylizeFailed, stylize
    from nst.params import StyleParams

__version__ = "0.1.0"
# Bumped whenever the engine's results change (losses, optimiser, defaults, image I/O): records made by an older
# revision are reported as stale by `plan` (tests/test_engine_revision.py fails on a forgotten bump).
ENGINE_REVISION = 4

# The public API, imported on first use: `import nst` loads no pydantic, PIL or torch.
_LAZY = {"stylize": "nst.api", "Stylized": "nst.api", "StylizeFailed": "nst.api", "StyleParams": "nst.params"}
__all__ = ["ENGINE_REVISION", "StyleParams", "StylizeFailed", "Stylized", "__version__", "stylize"]


def __getattr__(name: str) -> Any:
    """The API's names, from their modules on first access."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nst' has no attribute {name!r}")
