"""Manifests for tests and benchmarks, written into a directory."""

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from nst_testing.paths import SAMPLES

# One pair (chelsea x brick, id p) at 32 px and 2 iterations, as YAML text; inputs relative to the manifest's folder.
ONE_PAIR_MANIFEST = """\
version: 1
output: out/
defaults: {size: 32, iterations: 2}
pairs:
  - {id: p, content: content/chelsea.jpg, style: styles/brick.jpg}
"""


def write_manifest(root: Path, pairs: list[dict[str, Any]], *, name: str | None = None, **defaults: Any) -> Path:
    """`root`/manifest.yaml with `pairs` and tiny default settings (32 px, 2 iterations) that `defaults` override."""
    doc = {
        "version": 1,
        "name": name or f"test-{uuid.uuid4().hex[:8]}",
        "output": "out/",
        "defaults": {"size": 32, "iterations": 2, **defaults},
        "pairs": [{k: str(v) if isinstance(v, Path) else v for k, v in p.items()} for p in pairs],
    }
    path = root / "manifest.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def copy_samples(root: Path) -> None:
    """Copy the sample images into `root`/content and `root`/styles (inputs must lie under a manifest's directory)."""
    root.mkdir(parents=True, exist_ok=True)
    for kind in ("content", "styles"):
        shutil.copytree(SAMPLES / kind, root / kind)
