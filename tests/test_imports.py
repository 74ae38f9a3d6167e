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


def test_loading_the_flows_imports_no_torch() -> None:
    """`prefect deploy` loads each entrypoint's file to read its parameters: no engine (torch, ~3 s) for that; the flow
    run loads it with its first batch."""
    code = "import sys, flows.stylize, flows.shard; print([m for m in ('torch', 'matplotlib') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
