"""A forgotten ENGINE_REVISION bump fails here: a tiny fixed run's losses are stored with the revision they belong to.

The product's defaults (plus 32 px, 5 iterations, fp32, CPU) on two sample images. If the engine's results change,
bump `nst.ENGINE_REVISION` (records of older revisions are then reported, see README "Outputs") and store the new
losses: `python -m tests.test_engine_revision --update`.
"""

import json
import math
import sys
from pathlib import Path
from typing import Any

import nst
from nst_testing.paths import SAMPLES

GOLDEN = Path(__file__).parent / "golden" / "engine_revision.json"
# Relative tolerance. Measured here: repeated runs agree exactly; 1, 2 and 3 torch threads differ by up to 0.7 % in the
# content term and 0.1 % in the total (fp32 sums in another order). An engine change moves them by more than 2 %.
RTOL = 2e-2
PARAMS: dict[str, Any] = {"size": 32, "iterations": 5, "precision": "fp32", "device": "cpu", "seed": 0}


def final_losses() -> dict[str, float]:
    """The final losses of the fixed run, with this checkout's engine and defaults."""
    from nst.engine.images import load_image
    from nst.engine.stylizer import stylize
    from nst.params import resolve_params

    content = load_image(SAMPLES / "content" / "chelsea.jpg", label="content", max_pixels=10**8)
    style = load_image(SAMPLES / "styles" / "brick.jpg", label="style", max_pixels=10**8)
    result = stylize(content, [style], resolve_params(PARAMS))
    assert result.status == "succeeded" and result.final_losses is not None
    return {k: float(v) for k, v in result.final_losses.items()}


def test_results_change_only_with_a_new_engine_revision() -> None:
    golden = json.loads(GOLDEN.read_text())
    losses = final_losses()
    if golden["engine_revision"] == nst.ENGINE_REVISION:
        moved = {
            k: (golden["final_losses"][k], v)
            for k, v in losses.items()
            if not math.isclose(v, golden["final_losses"][k], rel_tol=RTOL, abs_tol=1e-6)
        }
        assert not moved, (
            f"the engine's results changed ({moved}) but nst.ENGINE_REVISION is still {nst.ENGINE_REVISION}: "
            "bump ENGINE_REVISION, then run `python -m tests.test_engine_revision --update`"
        )
    else:
        assert golden["engine_revision"] < nst.ENGINE_REVISION, "ENGINE_REVISION went down"
        raise AssertionError(
            f"ENGINE_REVISION is {nst.ENGINE_REVISION}, the stored losses are revision {golden['engine_revision']}: "
            "run `python -m tests.test_engine_revision --update`"
        )


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    GOLDEN.write_text(
        json.dumps({"engine_revision": nst.ENGINE_REVISION, "params": PARAMS, "final_losses": final_losses()}, indent=2)
        + "\n"
    )
    print(f"stored revision {nst.ENGINE_REVISION}: {GOLDEN}")
