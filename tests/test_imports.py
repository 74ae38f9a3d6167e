"""What importing the planning side costs: no torch (a CUDA build alone is ~500 MB of RSS), no boto3, no Prefect."""

import subprocess
import sys


def test_planning_imports_neither_torch_nor_boto3() -> None:
    """The run path, the manifest and the weights digest load without torch: a shard parent or a dry run stays small."""
    code = (
        "import sys, nst.run, nst.run.planner, nst.engine.weights, nst.manifest; "
        "print(sorted(m for m in ('torch', 'boto3', 'prefect') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
