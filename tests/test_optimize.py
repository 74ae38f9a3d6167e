"""The batched optimiser: per-pair L-BFGS vs torch's, batched == single, NaN isolation, determinism, multi-scale."""

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from nst.engine.optimize import PairProblem, ProgressEvent, scale_sizes, stylize_batch
from nst.engine.steppers import LBFGSHistory, first_step_size
from nst.params import resolve_params
from tests.tiny_extractor import TinyExtractor

LAYERS: dict[str, Any] = {
    "content_layers": ["block3_conv1"],
    "style_layers": ["block1_conv1", "block2_conv1", "block3_conv1"],
}


def _image(seed: int, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _problem(image_seed: int, **overrides: Any) -> PairProblem:
    params = resolve_params({**LAYERS, "iterations": 12, "style_weight": 1e2, **overrides})
    return PairProblem(content=_image(image_seed), styles=[_image(image_seed + 100, 24, 40)], params=params)


def _rosenbrock_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    a, b = x[:, ::2] - shift[:, None], x[:, 1::2]
    return ((1 - a) ** 2 + 10 * (b - a**2) ** 2).sum(1)


def _torch_lbfgs_path(x0: torch.Tensor, shift: torch.Tensor, steps: int, history: int) -> torch.Tensor:
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1, history_size=history, line_search_fn=None)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _rosenbrock_rows(x[None], shift).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return x.detach()


class _UnboundedLBFGS:
    """torch.optim.LBFGS(max_iter=1, no line search) per row, on the product's L-BFGS memory and two-loop recursion."""

    def __init__(self, batch: int, dim: int, history_size: int) -> None:
        self.history = LBFGSHistory(batch, dim, history_size, "cpu", torch.float32)
        self.prev_grad = torch.zeros(batch, dim)
        self.direction = torch.zeros(batch, dim)
        self.step_size = torch.zeros(batch)
        self.n_iter = 0

    def step(self, x: torch.Tensor, g: torch.Tensor) -> None:
        self.n_iter += 1
        if self.n_iter == 1:
            d = -g
        else:
            y, s = g - self.prev_grad, self.direction * self.step_size[:, None]
            ys = torch.linalg.vecdot(y, s)
            self.history.remember(s, y, ys, ys > 1e-10)
            d = self.history.two_loop(-g)
        self.prev_grad = g.clone()
        first = first_step_size(g, 1.0, None)
        self.step_size = first if self.n_iter == 1 else torch.where(self.history.has_curvature, 1.0, first)
        self.direction = d
        x.addcmul_(d, self.step_size[:, None])


def test_lbfgs_memory_and_two_loop_equal_torch_lbfgs_per_row() -> None:
    """The curvature memory and two-loop recursion ProjectedLBFGS uses, driven as torch drives them, match torch."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 10, generator=gen, dtype=torch.float64).float() * 0.5
    shift = torch.tensor([0.0, 0.3, -0.2])
    x = x0.clone()
    opt = _UnboundedLBFGS(3, 10, history_size=4)
    for _ in range(25):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_rosenbrock_rows(xg, shift).sum(), xg)
        opt.step(x, grad)
    for row in range(3):
        expected = _torch_lbfgs_path(x0[row], shift[row : row + 1], 25, 4)
        torch.testing.assert_close(x[row], expected, rtol=1e-4, atol=1e-5)
    # and it actually optimised
    assert (_rosenbrock_rows(x, shift) < _rosenbrock_rows(x0, shift)).all()


@pytest.fixture
def float64() -> Iterator[None]:
    """Exactness checks run in float64: batched and single convs then agree to rounding, so any coupling shows."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# Tolerances: in float64 a batched pair must match its single run to 1e-9 (no coupling at all). In float32 the
# batched convolutions sum in another order (~1e-7 relative); Adam is per-element, so that noise stays far below
# one 8-bit grey level (0.0039); L-BFGS without line search amplifies it, which is why its exactness is checked in fp64.
@pytest.mark.parametrize(
    ("optimizer", "dtype", "image_tol"),
    [("lbfgs", "float64", 1e-9), ("adam", "float64", 1e-9), ("adam", "float32", 1e-3)],
)
def test_batched_equals_single(optimizer: str, dtype: str, image_tol: float) -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        net = TinyExtractor().to(torch.get_default_dtype())
        lr = 1.0 if optimizer == "lbfgs" else 3.0
        problems = [
            _problem(1, optimizer=optimizer, lr=lr),
            _problem(2, optimizer=optimizer, lr=lr, style_weight=5e2, content_weight=2.0),
            _problem(3, optimizer=optimizer, lr=lr, init="noise", seed=7),
        ]
        batched = stylize_batch(problems, net)
        for problem, result in zip(problems, batched, strict=True):
            (single,) = stylize_batch([problem], net)
            assert result.status == single.status == "succeeded"
            assert result.image is not None and single.image is not None
            assert (result.image - single.image).abs().max().item() < image_tol
            assert result.final_losses is not None and single.final_losses is not None
            assert result.final_losses["total"] == pytest.approx(single.final_losses["total"], rel=max(image_tol, 1e-9))
            assert result.final_losses["total"] < result.history[0]["total"]
    finally:
        torch.set_default_dtype(previous)


def test_nan_pair_fails_and_batch_mates_finish(float64: None) -> None:
    net = TinyExtractor().double()
    good = _problem(1)
    bad = _problem(2)
    bad.content[..., 5, 5] = float("nan")  # what an overflow in reduced precision produces: a NaN feature
    results = stylize_batch([good, bad], net)
    assert results[1].status == "failed"
    assert results[1].error is not None and results[1].error["iteration"] == 1
    assert results[1].image is None
    assert results[0].status == "succeeded"
    (alone,) = stylize_batch([good], net)
    assert results[0].image is not None and alone.image is not None
    assert (results[0].image - alone.image).abs().max().item() < 1e-9


def test_seed_makes_noise_init_deterministic() -> None:
    net = TinyExtractor()
    a = stylize_batch([_problem(1, init="noise", seed=3, iterations=3)], net)[0].image
    b = stylize_batch([_problem(1, init="noise", seed=3, iterations=3)], net)[0].image
    c = stylize_batch([_problem(1, init="noise", seed=4, iterations=3)], net)[0].image
    assert a is not None and b is not None and c is not None
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 0.05


def test_multiscale_runs_coarse_to_fine_and_reports_progress() -> None:
    net = TinyExtractor()
    events: list[ProgressEvent] = []
    problem = _problem(1, scales=2, iterations=5, log_every=2)
    problem.content = _image(1, 64, 96)
    (result,) = stylize_batch([problem], net, callback=events.append)
    assert result.image is not None and result.image.shape == (1, 3, 64, 96)
    assert [(e.height, e.width) for e in events[:1] + events[-1:]] == [(32, 48), (64, 96)]
    assert len(events) == 5 and events[-1].iteration == 5  # `iterations`: all steps, 3 coarse + 2 fine
    assert [e.scale for e in events] == [0, 0, 0, 1, 1]
    logged = [e.iteration for e in events if e.losses is not None]
    assert logged == [1, 2, 3, 4, 5]
    assert [h["iteration"] for h in result.history] == logged


def test_scale_sizes_drop_scales_below_the_minimum() -> None:
    assert scale_sizes(512, 256, 3) == [(128, 64, 0.25), (256, 128, 0.5), (512, 256, 1.0)]
    assert scale_sizes(64, 64, 4) == [(32, 32, 0.5), (64, 64, 1.0)]


def test_keep_best_returns_the_lowest_loss_iterate() -> None:
    net = TinyExtractor()
    # A far too large Adam step makes the loss bounce; the best iterate must still be returned.
    problem = _problem(1, optimizer="adam", lr=60.0, iterations=8, log_every=1)
    (result,) = stylize_batch([problem], net)
    assert result.final_losses is not None
    best_logged = min(h["total"] for h in result.history)
    assert result.final_losses["total"] <= best_logged * 1.01


def test_keep_best_is_per_pair_and_does_not_split_batches() -> None:
    """keep_best is not a graph parameter: pairs that differ only there share a batch and each gets its own rule."""
    net = TinyExtractor()
    best = _problem(1, optimizer="adam", lr=60.0, iterations=8, log_every=1)
    last = _problem(1, optimizer="adam", lr=60.0, iterations=8, log_every=1, keep_best=False)
    assert best.params.graph_key() == last.params.graph_key()
    batched = stylize_batch([best, last], net)
    for problem, result in zip([best, last], batched, strict=True):
        (single,) = stylize_batch([problem], net)
        assert result.image is not None and single.image is not None
        assert (result.image - single.image).abs().max().item() < 1e-3
    assert batched[0].final_losses is not None and batched[1].final_losses is not None
    # The bouncing run's last iterate is worse than its best: the two rules really differ.
    assert batched[0].final_losses["total"] < batched[1].final_losses["total"]
