"""Recomputing activations in the backward pass (checkpoints over the VGG runs between the layers the losses read):
bit-identical losses, gradients and images on the CPU, and the engine takes it only where the plain step does not fit.

Engine tests (VGGFeatures is built: a small random-weight VGG19, and the real one at 32 px): marked `vgg`.
"""

from typing import Any

import pytest
import torch

import nst.engine.optimize as optimize
from nst.engine import memory
from nst.engine.color import tensor_to_image
from nst.engine.fastpath import FastPath, autocast
from nst.engine.losses import Gatys, total_losses
from nst.engine.optimize import PairProblem, build_targets, initial_images, stylize_batch
from nst.engine.vgg import VGGFeatures, load_vgg
from nst.layers import LAYER_NAMES
from nst.params import StyleParams, resolve_params

pytestmark = pytest.mark.vgg
CPU = torch.device("cpu")
LAYERS = ["block4_conv2", "block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1"]


def _small_vgg(pooling: str = "max", post_relu: bool = True) -> VGGFeatures:
    """VGG19's layers with few channels and seeded random weights: every segment shape, in milliseconds."""
    gen = torch.Generator().manual_seed(0)
    weights, c_in = {}, 3
    for name in LAYER_NAMES["vgg19"]:
        if not name.endswith("_pool"):
            c_out = (4, 6, 8, 8, 8)[int(name[5]) - 1]
            std = (2 / (9 * c_in)) ** 0.5 / 40  # Caffe-scale input (±128): keep activations near 1
            weights[name] = (torch.randn(c_out, c_in, 3, 3, generator=gen) * std, torch.zeros(c_out))
            c_in = c_out
    return VGGFeatures(weights, layers=LAYERS, pooling=pooling, post_relu=post_relu)


def _problems(size: int, iterations: int, **values: Any) -> list[PairProblem]:
    params = resolve_params({"size": size, "iterations": iterations, "content_layers": LAYERS[:1], **values})
    gen = torch.Generator().manual_seed(3)
    return [
        PairProblem(torch.rand(1, 3, size, size, generator=gen), [torch.rand(1, 3, size, size, generator=gen)], params)
        for _ in range(2)
    ]


@pytest.mark.parametrize(("pooling", "post_relu"), [("max", True), ("avg", False)])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_recomputing_step_has_the_same_loss_and_gradient(pooling: str, post_relu: bool, amp: Any) -> None:
    net = _small_vgg(pooling, post_relu)
    problems = _problems(40, 1, pooling=pooling, post_relu=post_relu)
    targets = build_targets(problems, net, 40, 40, 1.0, CPU, amp)
    results = []
    for recompute in (False, True):
        x = net.to_model(initial_images(problems, 40, 40, CPU)).detach().requires_grad_(True)
        with autocast(CPU, amp):
            feats = net.recomputing(x) if recompute else net(x)
        total = total_losses(feats, x, targets, Gatys())["total"]
        total.sum().backward()
        assert x.grad is not None
        results.append((total.detach(), x.grad))
    (loss, grad), (loss_r, grad_r) = results
    assert torch.equal(loss, loss_r) and torch.equal(grad, grad_r)
    assert grad.abs().sum() > 0  # a real gradient, not two zeros


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the input shape of every recomputing forward pass."""
    calls: list[tuple[int, ...]] = []
    recomputing = VGGFeatures.recomputing

    def spy(self: VGGFeatures, x: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(tuple(x.shape))
        return recomputing(self, x)

    monkeypatch.setattr(VGGFeatures, "recomputing", spy)
    return calls


def _assert_same_results(plain: list[Any], recomputed: list[Any]) -> None:
    for a, b in zip(plain, recomputed, strict=True):
        assert a.status == b.status == "succeeded" and a.image is not None and b.image is not None
        assert torch.equal(a.image, b.image)
        assert tensor_to_image(a.image).tobytes() == tensor_to_image(b.image).tobytes()
        assert a.final_losses == b.final_losses and a.history == b.history and a.params == b.params


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_recompute_changes_no_result_with_vgg19(monkeypatch: pytest.MonkeyPatch, amp: Any) -> None:
    params = resolve_params({"preset": "gatys"})
    vgg, _ = load_vgg("vgg19", None, layers=[*params.content_layers, *params.style_layers])
    problems = _problems(32, 4, content_layers=params.content_layers, style_layers=params.style_layers, log_every=1)
    plain = stylize_batch(problems, vgg, fast=FastPath(amp=amp, recompute=False))
    calls = _spy(monkeypatch)
    recomputed = stylize_batch(problems, vgg, fast=FastPath(amp=amp, recompute=True))
    assert len(calls) == 4  # every step recomputed
    _assert_same_results(plain, recomputed)


def test_engine_recomputes_only_the_scales_that_do_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _small_vgg()
    problems = _problems(64, 6, scales=2, log_every=1)
    params = problems[0].params
    coarse, fine = (memory.step_memory(s, s, params, "cpu").total(2) for s in (32, 64))
    monkeypatch.setattr(memory, "gpu_memory_bytes", lambda: None)
    monkeypatch.setenv(memory.WORKER_MEMORY_ENV, str((coarse + fine) // 2))  # the 32 px scale fits, not 64 px
    calls = _spy(monkeypatch)
    auto = stylize_batch(problems, net)
    assert calls and {shape[-1] for shape in calls} == {64}  # the fine scale's steps only
    monkeypatch.setenv(memory.WORKER_MEMORY_ENV, "1TiB")
    calls.clear()
    plain = stylize_batch(problems, net)
    assert not calls
    _assert_same_results(plain, auto)


def test_recompute_is_how_not_what() -> None:
    # Not a parameter: no field, so neither the params digest nor the graph key can see it.
    assert "recompute" not in StyleParams.model_fields
    assert optimize.needs_recompute is memory.needs_recompute  # the engine's choice is the memory model's
