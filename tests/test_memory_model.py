"""The memory model: its scaling, the optimisers' own state, and its two uses before a run: batches split
to the worker's memory, and `nst validate` refusing a pair too big for it, naming the size that fits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nst.cli import main
from nst.engine import memory
from nst.engine.memory import (
    WorkerMemory,
    largest_size,
    needs_recompute,
    pairs_that_fit,
    parse_memory,
    step_memory,
    too_big,
    worker_memory,
)
from nst.engine.steppers import AdamStepper, ProjectedLBFGS
from nst.errors import ManifestError, ParamsError
from nst.manifest import PairSpec, load_manifest
from nst.params import StyleParams, resolve_params
from nst.run import make_batches
from nst.run.inputs import InputFacts

pytestmark = pytest.mark.unit
GIB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU is seen, whatever machine runs the tests; no stated memory unless a test sets one."""
    monkeypatch.setattr(memory, "gpu_memory_bytes", lambda: None)
    monkeypatch.delenv(memory.WORKER_MEMORY_ENV, raising=False)


def test_model_grows_with_pixels_and_scales_with_them() -> None:
    params = StyleParams()
    totals = [step_memory(s, s, params, "cpu").total(1) for s in (256, 512, 1024, 2048)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    per_pair = [step_memory(s, s, params, "cpu").per_pair for s in (1024, 2048)]
    assert per_pair[1] / per_pair[0] == pytest.approx(4, rel=0.01)  # per pixel, past the tiny Gram terms
    model = step_memory(512, 512, params, "cpu")
    assert model.total(3) - model.total(2) == model.per_pair  # each pair of a batch adds the same


def test_model_orders_precisions_optimisers_and_history() -> None:
    def per_pair(**values: object) -> int:
        return step_memory(1024, 1024, resolve_params(dict(values)), "cuda").per_pair

    assert per_pair(precision="bf16") < per_pair(precision="fp32")
    assert per_pair(optimizer="adam") < per_pair(optimizer="lbfgs")
    assert per_pair(history_size=5) < per_pair(history_size=20) < per_pair(history_size=40)
    # On a CPU `auto` is bf16 only where the CPU computes it natively; the planner, not knowing, assumes fp32.
    auto = StyleParams(precision="auto")
    assert (
        step_memory(512, 512, auto, "cpu").per_pair
        == step_memory(512, 512, StyleParams(precision="fp32"), "cpu").per_pair
    )
    assert step_memory(512, 512, auto, "cpu", native_bf16=True).per_pair < step_memory(512, 512, auto, "cpu").per_pair


def test_recomputing_keeps_less_and_peaks_lower() -> None:
    params = StyleParams()
    for side in (1024, 2048):
        plain, recompute = (step_memory(side, side, params, "cpu", recompute=r) for r in (False, True))
        assert recompute.saved_per_pair < plain.saved_per_pair / 2  # only the layers the losses read are kept
        assert recompute.per_pair < plain.per_pair and recompute.total(1) < plain.total(1)
        assert recompute.fixed > plain.fixed  # torch.utils.checkpoint loads torch._dynamo: once per process
        assert recompute.state_per_pair == plain.state_per_pair  # the optimiser's state is what it is
    per_pair = [step_memory(s, s, params, "cpu", recompute=True).per_pair for s in (1024, 2048)]
    assert per_pair[1] / per_pair[0] == pytest.approx(4, rel=0.01)
    # 2048 px, the defaults on a CPU (fp32): over 12 GB by the plain model, under it recomputing.
    assert (
        step_memory(2048, 2048, params, "cpu").total(1)
        > 12e9
        > step_memory(2048, 2048, params, "cpu", recompute=True).total(1)
    )


def test_recompute_only_where_the_plain_step_does_not_fit() -> None:
    params = StyleParams()
    twelve = WorkerMemory(12 * 10**9, "cpu", "NST_WORKER_MEMORY=12GB")
    assert needs_recompute(2048, 2048, params, "cpu", memory=twelve)
    assert not needs_recompute(1024, 1024, params, "cpu", memory=twelve)
    assert needs_recompute(1024, 1024, params, "cpu", pairs=4, memory=twelve)  # a batch counts all its pairs
    assert not needs_recompute(2048, 2048, params, "cpu", memory=WorkerMemory(64 * GIB, "cpu", "x"))
    # Nothing stated: half the RAM free now (this process already holds its own share).
    assert needs_recompute(2048, 2048, params, "cpu", free_bytes=22 * GIB)
    assert not needs_recompute(2048, 2048, params, "cpu", free_bytes=24 * GIB)
    assert not needs_recompute(1024, 1024, params, "cpu", free_bytes=8 * GIB)
    assert needs_recompute(2048, 2048, params, "cuda", free_bytes=12 * GIB)  # the GPU's: 85 % of its free memory
    assert not needs_recompute(2048, 2048, params, "cuda", free_bytes=24 * GIB)


def test_a_pair_that_fits_only_recomputing_is_accepted() -> None:
    params = StyleParams(size=2048)
    plain, recompute = (step_memory(2048, 2048, params, "cpu", recompute=r).total(1) for r in (False, True))
    between = WorkerMemory((plain + recompute) // 2, "cpu", "test")
    assert pairs_that_fit(2048, 2048, params, between) == 1 and too_big("p", params, between) is None
    assert largest_size(params, between) >= 2048
    # Where one pair fits plainly, batches are not made bigger by recomputing (it costs a forward pass a step).
    two = WorkerMemory(step_memory(1024, 1024, params, "cpu").total(2), "cpu", "test")
    assert pairs_that_fit(1024, 1024, params, two) == 2
    below = WorkerMemory(recompute - 1, "cpu", "test")
    assert pairs_that_fit(2048, 2048, params, below) == 0
    assert "size 2048 needs about" in (too_big("p", params, below) or "")


@pytest.mark.parametrize("history", [3, 20])
def test_lbfgs_state_is_what_the_model_counts(history: int) -> None:
    params = StyleParams(history_size=history)
    b, h, w = 2, 24, 16
    x = torch.rand(b, 3, h, w)
    box = torch.zeros(1, 3, h, w), torch.ones(1, 3, h, w)
    stepper = ProjectedLBFGS(tuple(x.shape), lower=box[0], upper=box[1], history_size=history)
    image = 3 * h * w * 4
    stated = b * memory.optimizer_state_images(params) * image + 2 * image  # per pair + the bounds, per batch
    assert stepper.state_bytes() == pytest.approx(stated, rel=0.02)


def test_adam_state_is_what_the_model_counts() -> None:
    params = StyleParams(optimizer="adam")
    b, h, w = 2, 24, 16
    x = torch.rand(b, 3, h, w, requires_grad=True)
    stepper = AdamStepper(
        x,
        lr=0.1,
        beta1=0.9,
        eps=1e-8,
        keep_best=torch.ones(b, dtype=torch.bool),
        low=x.new_zeros(()),
        high=x.new_ones(()),
    )
    stepper.step(x, torch.rand_like(x), torch.rand(b), torch.ones(b, dtype=torch.bool))
    stated = b * memory.optimizer_state_images(params) * 3 * h * w * 4
    assert stepper.state_bytes() == pytest.approx(stated, rel=0.02)


def test_cudnn_cap_matches_the_fast_path() -> None:
    from nst.engine.fastpath import CUDNN_WORKSPACE_CAP_MIB

    assert memory.CUDNN_WORKSPACE_CAP_MIB == CUDNN_WORKSPACE_CAP_MIB


def test_the_model_needs_no_torch() -> None:
    # Planning (batches, validate) uses the model without loading the engine.
    code = (
        "import sys; from nst.engine.memory import step_memory, too_big, WorkerMemory; "
        "from nst.params import StyleParams; "
        "step_memory(512, 512, StyleParams(), 'cpu'); too_big('p', StyleParams(), WorkerMemory(1 << 30, 'cpu', 'x')); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_stated_memory_is_parsed() -> None:
    assert parse_memory("8GiB") == 8 * GIB
    assert parse_memory("512MiB") == 512 << 20
    assert parse_memory("12G") == 12 * 10**9
    assert parse_memory("1.5gib") == 3 * GIB // 2
    assert parse_memory("4096") == 4096
    for bad in ("", "lots", "-3GiB", "8 GiBs", "0"):
        with pytest.raises(ParamsError, match="NST_WORKER_MEMORY"):
            parse_memory(bad)
    assert worker_memory({}) is None
    stated = worker_memory({"NST_WORKER_MEMORY": "8GiB"})
    assert stated == WorkerMemory(8 * GIB, "cpu", "NST_WORKER_MEMORY=8GiB")


def test_largest_size_is_the_edge_of_what_fits() -> None:
    params, stated = StyleParams(), WorkerMemory(4 * GIB, "cpu", "test")
    edge = largest_size(params, stated)
    assert 512 < edge < 2048
    assert pairs_that_fit(edge, edge, params, stated) >= 1
    assert pairs_that_fit(edge + 1, edge + 1, params, stated) == 0
    gpu = WorkerMemory(80 * GIB, "cuda", "test")
    assert largest_size(params, gpu) > largest_size(params, WorkerMemory(24 * GIB, "cuda", "test")) > 2048


def _manifest(tmp_path: Path, size: int) -> str:
    for folder, name in (("content", "astronaut.jpg"), ("styles", "brick.jpg")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes((ROOT / "manifests/images" / folder / name).read_bytes())
    path = tmp_path / "big.yaml"
    path.write_text(
        "version: 1\noutput: out/\npairs:\n"
        "  - {id: small, content: content/astronaut.jpg, style: styles/brick.jpg, size: 256}\n"
        f"  - {{id: poster, content: content/astronaut.jpg, style: styles/brick.jpg, size: {size}}}\n"
    )
    return str(path)


def test_validate_refuses_a_pair_too_big_for_the_stated_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _manifest(tmp_path, 4096)
    assert main(["validate", path]) == 0  # no stated memory: nothing refused
    capsys.readouterr()
    monkeypatch.setenv("NST_WORKER_MEMORY", "4GiB")
    fits = largest_size(StyleParams(size=4096), WorkerMemory(4 * GIB, "cpu", ""))
    with pytest.raises(ManifestError) as refused:
        load_manifest(path)
    message = str(refused.value)
    assert "pair poster: size 4096" in message and "NST_WORKER_MEMORY=4GiB" in message
    assert f"the largest size that fits is {fits}" in message
    assert "pair small" not in message  # 256 px fits
    assert main(["validate", path]) == 1
    err = capsys.readouterr().err
    assert "pair poster: size 4096" in err and f"fits is {fits}" in err and "Traceback" not in err
    monkeypatch.setenv("NST_WORKER_MEMORY", "lots")
    assert main(["validate", path]) == 1
    assert "NST_WORKER_MEMORY='lots': not a memory size" in capsys.readouterr().err


def _spec(i: int, size: int) -> PairSpec:
    return PairSpec(id=f"p{i}", content=f"/in/c{i}.jpg", styles=["/in/s.jpg"], params=StyleParams(size=size))


def test_batches_split_to_the_stated_memory() -> None:
    specs = [_spec(i, 1024) for i in range(5)] + [_spec(i, 256) for i in range(5, 8)]
    inputs = {s.content: InputFacts(s.content, sha256="x", dims=(1024, 1024)) for s in specs}
    inputs["/in/s.jpg"] = InputFacts("/in/s.jpg", sha256="y", dims=(512, 512))
    big = StyleParams(size=1024)
    one = step_memory(1024, 1024, big, "cpu")
    stated = WorkerMemory(one.total(2) + one.per_pair // 2, "cpu", "test")  # two 1024 px pairs fit, not three
    assert pairs_that_fit(1024, 1024, big, stated) == 2
    batches = make_batches(specs, inputs, max_pairs=8, output="/out", run_id="r", memory=stated)
    assert [len(b.pairs) for b in batches] == [2, 2, 1, 3]  # the 256 px pairs (fewer bytes each) stay together
    unstated = make_batches(specs, inputs, max_pairs=8, output="/out", run_id="r")
    assert [len(b.pairs) for b in unstated] == [5, 3]
