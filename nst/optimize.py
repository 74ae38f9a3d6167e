"""The batched optimisation loop: per-pair L-BFGS or Adam, multi-scale, best iterate, NaN isolation, progress events.

The loop knows nothing about images on disk: it takes [0,1] RGB tensors and a feature extractor and returns tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from nst.losses import LossTargets, blended_gram, gram_matrix, total_losses
from nst.params import StyleParams

LOSS_TERMS = ("content", "style", "tv", "total")
MIN_SCALE_SIDE = 32  # the coarsest scale keeps at least this many pixels on its short side


class FeatureExtractor(Protocol):
    """What the loop needs of a loss network (nst.vgg.VGGFeatures satisfies it)."""

    def __call__(self, x: Tensor) -> dict[str, Tensor]: ...
    def to_model(self, x01: Tensor) -> Tensor: ...
    def from_model(self, y: Tensor) -> Tensor: ...
    def input_range(self) -> tuple[Tensor, Tensor]: ...


@dataclass
class PairProblem:
    """One content/style pair: content [1,3,H,W] at the output size, styles [1,3,h,w] at the style size, in [0,1]."""

    content: Tensor
    styles: list[Tensor]
    params: StyleParams


@dataclass
class PairOutcome:
    """The result of one pair: the image ([1,3,H,W] in [0,1]) or the error that stopped it."""

    status: str  # "succeeded" | "failed"
    image: Tensor | None
    final_losses: dict[str, float] | None
    history: list[dict[str, float]]
    iterations: int
    error: dict[str, Any] | None = None


@dataclass
class ProgressEvent:
    """Sent after every step; `losses` (per pair) only every `log_every` steps, `images` only every `save_every`."""

    scale: int
    scales: int
    height: int
    width: int
    iteration: int  # 1-based, counted across all scales
    total_iterations: int
    seconds: float
    losses: list[dict[str, float]] | None = None
    images: Tensor | None = None  # [B,3,H,W] in [0,1]
    failed: list[bool] = field(default_factory=list)


ProgressCallback = Callable[[ProgressEvent], None]


class BatchedLBFGS:
    """L-BFGS with one independent history, step and stopping state per image of a batch.

    Mirrors torch.optim.LBFGS(lr, history_size, line_search_fn=None) called once per iteration with max_iter=1,
    vectorised over the batch: the two-loop recursion runs on [B, D] rows, so pairs never share curvature or steps.
    One difference: a pair whose curvature condition fails stores an inert (zero-weight) history entry instead of
    none, so it forgets its oldest entry one step early; torch's single-pair path never sees that in our tests.
    """

    def __init__(
        self,
        batch: int,
        dim: int,
        *,
        lr: float = 1.0,
        history_size: int = 20,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.lr = lr
        self.history_size = history_size
        self.tolerance_grad = tolerance_grad
        self.tolerance_change = tolerance_change
        self.n_iter = 0
        self.ptr = 0
        self.count = 0
        self.s_hist = torch.zeros(history_size, batch, dim, device=device, dtype=dtype)
        self.y_hist = torch.zeros(history_size, batch, dim, device=device, dtype=dtype)
        self.rho = torch.zeros(history_size, batch, device=device, dtype=dtype)
        self.h_diag = torch.ones(batch, device=device, dtype=dtype)
        self.direction = torch.zeros(batch, dim, device=device, dtype=dtype)
        self.step_size = torch.zeros(batch, device=device, dtype=dtype)
        self.prev_grad = torch.zeros(batch, dim, device=device, dtype=dtype)

    def step(self, x: Tensor, grad: Tensor, active: Tensor) -> Tensor:
        """Update the rows of `x` [B, D] in place from their gradients [B, D]; returns which rows moved [B]."""
        g = grad.to(self.s_hist.dtype)
        # torch returns early when the gradient is already tiny; that pair stops for good.
        active = active & (g.abs().amax(1) > self.tolerance_grad)
        self.n_iter += 1
        if self.n_iter == 1:
            d = -g
        else:
            y = g - self.prev_grad
            s = self.direction * self.step_size[:, None]
            ys = (y * s).sum(1)
            ok = ys > 1e-10
            self.s_hist[self.ptr] = s
            self.y_hist[self.ptr] = y
            self.rho[self.ptr] = torch.where(ok, 1.0 / torch.where(ok, ys, 1.0), 0.0)
            self.ptr = (self.ptr + 1) % self.history_size
            self.count = min(self.count + 1, self.history_size)
            yy = (y * y).sum(1)
            self.h_diag = torch.where(ok, ys / torch.where(ok, yy, 1.0), self.h_diag)
            d = self._two_loop(-g)
        self.prev_grad = g.clone()
        if self.n_iter == 1:
            self.step_size = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * self.lr
        else:
            self.step_size = torch.full_like(self.step_size, self.lr)
        d = torch.where(active[:, None], d, 0.0)
        self.direction = d
        gtd = (g * d).sum(1)
        moving = active & (gtd <= -self.tolerance_change)
        x.add_(torch.where(moving[:, None], d * self.step_size[:, None], 0.0))
        return moving

    def _two_loop(self, q: Tensor) -> Tensor:
        """H·q by the two-loop recursion over each row's history (newest first, then oldest first)."""
        order = [(self.ptr - 1 - k) % self.history_size for k in range(self.count)]
        alphas: dict[int, Tensor] = {}
        for idx in order:
            alpha = self.rho[idx] * (self.s_hist[idx] * q).sum(1)
            q = q - alpha[:, None] * self.y_hist[idx]
            alphas[idx] = alpha
        r = q * self.h_diag[:, None]
        for idx in reversed(order):
            beta = self.rho[idx] * (self.y_hist[idx] * r).sum(1)
            r = r + self.s_hist[idx] * (alphas[idx] - beta)[:, None]
        return r


def scale_sizes(height: int, width: int, scales: int) -> list[tuple[int, int, float]]:
    """(height, width, factor) per scale, coarse to fine; each scale doubles the previous; tiny scales are dropped."""
    sizes = []
    for k in range(scales - 1, -1, -1):
        factor = 0.5**k
        h, w = max(1, round(height * factor)), max(1, round(width * factor))
        if k == 0 or min(h, w) >= MIN_SCALE_SIDE:
            sizes.append((h, w, factor))
    return sizes


def resize(x: Tensor, height: int, width: int) -> Tensor:
    """Resize [B,C,H,W] with antialiasing (bicubic up, area-correct down)."""
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)


def _batch_key_check(problems: Sequence[PairProblem]) -> None:
    first = problems[0]
    for p in problems[1:]:
        if p.content.shape != first.content.shape or p.params.graph_key() != first.params.graph_key():
            raise ValueError("stylize_batch needs pairs of the same shape and graph parameters")


def _autocast_dtype(params: StyleParams, device: torch.device) -> torch.dtype | None:
    """bf16 under autocast for `bf16`, or for `auto` on CUDA; None means plain fp32."""
    if params.precision == "bf16" or (params.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_targets(
    problems: Sequence[PairProblem],
    extractor: FeatureExtractor,
    height: int,
    width: int,
    factor: float,
    device: torch.device,
    amp: torch.dtype | None,
) -> LossTargets:
    """Content features and blended style Grams of every pair at one scale."""
    params = problems[0].params
    contents = torch.cat([resize(p.content.to(device), height, width) for p in problems])
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        content_feats = extractor(extractor.to_model(contents))
        content = {name: content_feats[name].detach() for name in params.content_layers}
        style: dict[str, list[Tensor]] = {name: [] for name in params.style_layers}
        for p in problems:
            grams_per_style: dict[str, list[Tensor]] = {name: [] for name in params.style_layers}
            for s in p.styles:
                sh, sw = s.shape[-2:]
                s_scaled = resize(s.to(device), max(1, round(sh * factor)), max(1, round(sw * factor)))
                feats = extractor(extractor.to_model(s_scaled))
                for name in params.style_layers:
                    grams_per_style[name].append(gram_matrix(feats[name]))
            blend = p.params.style_blend or [1.0] * len(p.styles)
            for name in params.style_layers:
                style[name].append(blended_gram(grams_per_style[name], blend))
    n_layers = len(params.style_layers)
    layer_weights = [p.params.style_layer_weights or [1.0 / n_layers] * n_layers for p in problems]
    return LossTargets(
        content=content,
        style={name: torch.cat(grams) for name, grams in style.items()},
        content_weight=torch.tensor([p.params.content_weight for p in problems], device=device),
        style_weight=torch.tensor([p.params.style_weight for p in problems], device=device),
        tv_weight=torch.tensor([p.params.tv_weight for p in problems], device=device),
        style_layer_weights=torch.tensor(layer_weights, device=device),
        use_tv=params.tv_weight > 0,
    )


def initial_images(problems: Sequence[PairProblem], height: int, width: int, device: torch.device) -> Tensor:
    """The starting images [B,3,H,W] in [0,1]: content, white noise (seeded per pair) or the first style image."""
    images = []
    for p in problems:
        init = p.params.init
        if init == "content":
            images.append(resize(p.content, height, width))
        elif init == "style":
            images.append(resize(p.styles[0], height, width))
        else:
            generator = torch.Generator().manual_seed(p.params.seed)
            images.append(torch.rand(1, 3, height, width, generator=generator))
    return torch.cat([img.to(device) for img in images])


def _read_losses(losses: dict[str, Tensor]) -> list[dict[str, float]]:
    """Copy per-pair losses to the host (one sync)."""
    stacked = torch.stack([losses[k].detach().float() for k in LOSS_TERMS], 1).cpu().tolist()
    return [dict(zip(LOSS_TERMS, row, strict=True)) for row in stacked]


def stylize_batch(
    problems: Sequence[PairProblem],
    extractor: FeatureExtractor,
    *,
    device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
) -> list[PairOutcome]:
    """Optimise every pair of a same-shape batch at once; each pair's result equals its single-pair run."""
    if not problems:
        return []
    _batch_key_check(problems)
    device = torch.device(device)
    params = problems[0].params
    amp = _autocast_dtype(params, device)
    batch = len(problems)
    height, width = problems[0].content.shape[-2:]
    sizes = scale_sizes(height, width, params.scales)
    total_iterations = params.iterations * len(sizes)
    low, high = (t.to(device).view(1, -1, 1, 1) for t in extractor.input_range())

    alive = torch.ones(batch, dtype=torch.bool, device=device)
    failed_at = torch.full((batch,), -1, dtype=torch.long, device=device)
    histories: list[list[dict[str, float]]] = [[] for _ in problems]
    start = time.perf_counter()
    iteration = 0
    x01 = initial_images(problems, *sizes[0][:2], device)
    channels_last = device.type == "cuda"

    for scale_index, (h, w, factor) in enumerate(sizes):
        targets = build_targets(problems, extractor, h, w, factor, device, amp)
        # x stays NCHW-contiguous so L-BFGS can treat each image as one flat row; the network sees channels_last on GPU.
        x = extractor.to_model(resize(x01, h, w)).detach().contiguous().requires_grad_(True)
        best_x = x.detach().clone()
        best_loss = torch.full((batch,), math.inf, device=device)
        lbfgs = BatchedLBFGS(
            batch, x[0].numel(), lr=params.lr, history_size=params.history_size, device=device, dtype=x.dtype
        )
        adam = None
        if params.optimizer == "adam":
            adam = torch.optim.Adam(
                [x],
                lr=params.lr,
                betas=(params.adam_beta1, 0.999),
                eps=params.adam_eps,
                fused=device.type == "cuda",
            )
        active = torch.ones(batch, dtype=torch.bool, device=device)
        for step in range(params.iterations):
            iteration += 1
            x.grad = None
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                feats = extractor(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
            losses = total_losses(feats, x, targets, params.normalization)
            total = losses["total"]
            finite = torch.isfinite(total)
            failed_at = torch.where(alive & ~finite, iteration, failed_at)
            alive = alive & finite
            torch.where(alive, total, 0.0).sum().backward()
            assert x.grad is not None
            grad = torch.where(alive.view(-1, 1, 1, 1), x.grad, 0.0)
            if params.keep_best:
                improved = alive & (total.detach() < best_loss)
                best_loss = torch.where(improved, total.detach(), best_loss)
                best_x = torch.where(improved.view(-1, 1, 1, 1), x.detach(), best_x)
            with torch.no_grad():
                if adam is not None:
                    x.grad = grad
                    adam.step()
                    x.copy_(torch.maximum(torch.minimum(x, high), low))
                else:
                    active = active & alive
                    lbfgs.step(x.view(batch, -1), grad.reshape(batch, -1), active)
            log_now = (step + 1) % params.log_every == 0 or step == 0 or step + 1 == params.iterations
            read = _read_losses(losses) if log_now else None
            if read is not None:
                dead = failed_at.cpu().tolist()
                for i, row in enumerate(read):
                    if dead[i] < 0:
                        histories[i].append({"iteration": iteration, "scale": scale_index, **row})
            if callback is not None:
                save_now = params.save_every > 0 and iteration % params.save_every == 0
                images = extractor.from_model(x.detach()).clamp(0, 1) if save_now else None
                failed = (failed_at >= 0).cpu().tolist() if read is not None else []
                callback(
                    ProgressEvent(
                        scale=scale_index,
                        scales=len(sizes),
                        height=h,
                        width=w,
                        iteration=iteration,
                        total_iterations=total_iterations,
                        seconds=time.perf_counter() - start,
                        losses=read,
                        images=images,
                        failed=failed,
                    )
                )
        final = best_x if params.keep_best else x.detach()
        # A pair whose loss was never finite keeps its start image; it is reported failed below.
        x01 = extractor.from_model(final).clamp(0, 1)

    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        final_model = extractor.to_model(x01)
        final_losses = _read_losses(total_losses(extractor(final_model), final_model, targets, params.normalization))
    failed_list = failed_at.cpu().tolist()
    outcomes = []
    for i in range(batch):
        if failed_list[i] >= 0:
            outcomes.append(
                PairOutcome(
                    status="failed",
                    image=None,
                    final_losses=None,
                    history=histories[i],
                    iterations=failed_list[i],
                    error={
                        "type": "NonFiniteLoss",
                        "message": f"loss became NaN/inf at iteration {failed_list[i]}",
                        "iteration": failed_list[i],
                    },
                )
            )
        else:
            outcomes.append(
                PairOutcome(
                    status="succeeded",
                    image=x01[i : i + 1].detach().cpu(),
                    final_losses=final_losses[i],
                    history=histories[i],
                    iterations=total_iterations,
                )
            )
    return outcomes
