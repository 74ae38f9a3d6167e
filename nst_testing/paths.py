"""Where things are in this checkout."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "manifests" / "images"  # the sample images: content/*.jpg and styles/*.jpg
