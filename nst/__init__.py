"""Batch neural style transfer (Gatys et al.): a plain library; imports neither prefect nor boto3."""

__version__ = "0.1.0"
# Bumped whenever the engine's results change (losses, optimiser, defaults, image I/O): records made by an older
# revision are reported as stale by `plan` (tests/test_engine_revision.py fails on a forgotten bump).
ENGINE_REVISION = 4
