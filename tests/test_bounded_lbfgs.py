"""Bounded L-BFGS: the iterate stays in the valid pixel range, so the saved image is the optimised one."""

from typing import Any

import pytest
import torch

from nst.engine.optimize import FastPath, PairProblem, stylize_batch
from nst.engine.steppers import ProjectedLBFGS
from nst.engine.vgg import VGGFeatures, load_vgg
from nst.params import PRESETS, resolve_params
from tests.tiny_extractor import TinyExtractor

TINY_LAYERS: dict[str, Any] = {
    "content_layers": ["block3_conv1"],
    "style_layers": ["block1_conv1", "block2_conv1", "block3_conv1"],
    "style_layer_weights": [1 / 3] * 3,
}


def _image(seed: int, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _quadratic(x: torch.Tensor, centre: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
    return (curvature * (x - centre) ** 2).sum(1)


def test_bounded_lbfgs_stays_in_the_box_and_finds_the_constrained_minimum() -> None:
    # Separable quadratics whose minima lie partly outside [-1, 1]: the box minimum is the clamped centre.
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(3, 40, generator=gen) * 2
    curvature = torch.rand(3, 40, generator=gen) * 10 + 0.1
    lower, upper = torch.full((40,), -1.0), torch.full((40,), 1.0)
    opt = ProjectedLBFGS((3, 40), history_size=5, lower=lower, upper=upper)
    x = torch.zeros(3, 40)
    for _ in range(60):
        xg = x.clone().requires_grad_(True)
        loss = _quadratic(xg, centre, curvature)
        (grad,) = torch.autograd.grad(loss.sum(), xg)
        opt.step(x, grad, loss.detach(), torch.ones(3, dtype=torch.bool))
        assert (x >= lower).all() and (x <= upper).all()
    torch.testing.assert_close(opt.accepted_x, centre.clamp(-1, 1), atol=1e-3, rtol=0)


def test_bounded_lbfgs_line_search_never_accepts_a_worse_point() -> None:
    # A step size far too large for the problem: the safeguard backtracks instead of diverging.
    gen = torch.Generator().manual_seed(1)
    centre = torch.rand(2, 30, generator=gen) - 0.5
    curvature = torch.rand(2, 30, generator=gen) * 100 + 1
    opt = ProjectedLBFGS((2, 30), lr=50.0, history_size=5, lower=torch.tensor(-1.0), upper=torch.tensor(1.0))
    x = torch.full((2, 30), 0.9)
    accepted = []
    for _ in range(40):
        xg = x.clone().requires_grad_(True)
        loss = _quadratic(xg, centre, curvature)
        (grad,) = torch.autograd.grad(loss.sum(), xg)
        opt.step(x, grad, loss.detach(), torch.ones(2, dtype=torch.bool))
        accepted.append(opt.accepted_loss.clone())
    values = torch.stack(accepted)
    assert (values[1:] <= values[:-1]).all()
    assert (values[-1] < 1e-2 * values[0]).all()


def test_bounded_rows_are_independent() -> None:
    gen = torch.Generator().manual_seed(2)
    centre = torch.randn(3, 20, generator=gen) * 2
    curvature = torch.rand(3, 20, generator=gen) * 50 + 0.1

    def run(rows: list[int]) -> torch.Tensor:
        x = torch.zeros(len(rows), 20, dtype=torch.float64)
        opt = ProjectedLBFGS(
            (len(rows), 20), lr=3.0, history_size=4, lower=torch.tensor(-1.0), upper=torch.tensor(1.0), dtype=x.dtype
        )
        c, k = centre[rows].double(), curvature[rows].double()
        for _ in range(30):
            xg = x.clone().requires_grad_(True)
            loss = _quadratic(xg, c, k)
            (grad,) = torch.autograd.grad(loss.sum(), xg)
            opt.step(x, grad, loss.detach(), torch.ones(len(rows), dtype=torch.bool))
        return opt.accepted_x

    batched = run([0, 1, 2])
    for row in range(3):
        torch.testing.assert_close(batched[row], run([row])[0], rtol=0, atol=1e-12)


def _problem(preset: str | None, size: int, tiny: bool, **overrides: Any) -> PairProblem:
    values: dict[str, Any] = {"preset": preset, "size": size, "style_size": None, "iterations": 30, "log_every": 1}
    if tiny:
        values.update(TINY_LAYERS)
    if preset == "vgg16":
        values["network"] = "vgg19"  # no offline VGG16 weights; the preset's optimiser settings are what is tested
    params = resolve_params({**values, **overrides})
    return PairProblem(content=_image(1, size, size), styles=[_image(2, size, size)], params=params)


def _assert_saved_equals_last_logged(problem: PairProblem, net: Any) -> None:
    (result,) = stylize_batch([problem], net, fast=FastPath())
    assert result.status == "succeeded" and result.final_losses is not None and result.image is not None
    last = result.history[-1]
    assert last["total"] < result.history[0]["total"]  # it optimised
    if problem.params.optimizer == "lbfgs":
        # The line search only accepts descent, so the last logged iterate is also the best one.
        totals = [h["total"] for h in result.history]
        assert totals == sorted(totals, reverse=True)
    # Every step is logged (log_every 1): the returned iterate is the last one, or the best one under keep_best.
    kept = min(result.history, key=lambda h: h["total"]) if problem.params.keep_best else last
    for term in ("content", "style", "total"):
        assert result.final_losses[term] == pytest.approx(kept[term], rel=1e-2, abs=1e-6 * kept["total"]), term


@pytest.mark.parametrize("preset", [None, *PRESETS])
@pytest.mark.parametrize("init", ["content", "noise"])
def test_saved_image_losses_equal_the_last_logged_losses_tiny(preset: str | None, init: str) -> None:
    _assert_saved_equals_last_logged(_problem(preset, 32, tiny=True, init=init), TinyExtractor())


@pytest.fixture(scope="module")
def vgg() -> VGGFeatures:
    layers = ["block4_conv2", "block5_conv2", "block5_conv4", "block5_conv3"]
    style = ["block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1"]
    deep = ["block1_conv2", "block2_conv2", "block3_conv4", "block4_conv4", "block5_conv4"]
    net, _ = load_vgg("vgg19", None, layers=[*layers, *style, *deep])
    return net


@pytest.mark.parametrize("preset", [None, "gatys", "tf-keras", "deep-style"])
def test_saved_image_losses_equal_the_last_logged_losses_vgg19(vgg: VGGFeatures, preset: str | None) -> None:
    _assert_saved_equals_last_logged(_problem(preset, 32, tiny=False, iterations=20), vgg)
