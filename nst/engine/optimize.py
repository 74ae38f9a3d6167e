"""The batched optimisation loop: per-pair L-BFGS or Adam, multi-scale, best iterate, NaN isolation, progress events.

The loop knows nothing about images on disk: it takes [0,1] RGB tensors and a feature extractor and returns tensors.
The optimiser is a `Stepper` (nst.engine.steppers), what is logged and reported a `StepLog`
(nst.engine.steplog), and how the step runs on a device a `FastPath` (nst.engine.fastpath).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nst.engine.fastpath import (
    CUDNN_WORKSPACE_CAP_MIB,
    FastPath,
    FeatureExtractor,
    LossStep,
    Recomputable,
    autocast,
    backend_flags,
)
from nst.engine.losses import LossTargets, blended_gram, gram_matrix, loss_normalization, total_losses
from nst.engine.memory import needs_recompute
from nst.engine.pairs import PairProblem, PairResult
from nst.engine.steplog import LOSS_TERMS, ProgressCallback, ProgressEvent, StepLog, read_losses, stack_losses
from nst.engine.steppers import AdamStepper, ProjectedLBFGS, Stepper
from nst.schedule import MIN_SCALE_SIDE, START_DETAIL, Scale, scale_iterations, scale_sizes, schedule

__all__ = [
    "CUDNN_WORKSPACE_CAP_MIB",
    "LOSS_TERMS",
    "MIN_SCALE_SIDE",
    "FastPath",
    "FeatureExtractor",
    "PairProblem",
    "PairResult",
    "ProgressCallback",
    "ProgressEvent",
    "Scale",
    "build_targets",
    "finer_start",
    "initial_images",
    "scale_iterations",
    "scale_sizes",
    "schedule",
    "stylize_batch",
]

log = logging.getLogger(__name__)

# Under bf16 the network sees its input rounded to ~3 significant digits (0.5-1 grey level on the Caffe scale), so
# L-BFGS's tiny first step (torch: 1/|g|_1) moves nothing it can see and its first curvature pair is noise. Under
# autocast the first step instead moves the largest pixel by this fraction of the input range (Caffe: 255/64 = 4).
LOW_PRECISION_FIRST_STEP = 1 / 64


def resize(x: Tensor, height: int, width: int) -> Tensor:
    """Resize [B,C,H,W] with antialiasing (bicubic up, area-correct down)."""
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)


def _batch_key_check(problems: Sequence[PairProblem[Tensor]]) -> None:
    first = problems[0]
    for p in problems[1:]:
        if p.content.shape != first.content.shape or p.params.graph_key() != first.params.graph_key():
            raise ValueError("stylize_batch needs pairs of the same shape and graph parameters")


def build_targets(
    problems: Sequence[PairProblem[Tensor]],
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
    with torch.no_grad(), autocast(device, amp):
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


def finer_start(x01: Tensor, contents: Tensor, coarse: Scale, fine: Scale) -> Tensor:
    """The start of a finer scale in [0,1]: the coarser result upsampled, plus (START_DETAIL) the contents' detail
    between the two scales (the contents at `fine` minus themselves blurred through `coarse`)."""
    start = resize(x01, fine.height, fine.width)
    if fine.start == START_DETAIL:
        sharp = resize(contents, fine.height, fine.width)
        start = start + sharp - resize(resize(sharp, coarse.height, coarse.width), fine.height, fine.width)
    return start.clamp(0, 1)


def initial_images(problems: Sequence[PairProblem[Tensor]], height: int, width: int, device: torch.device) -> Tensor:
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


def stylize_batch(
    problems: Sequence[PairProblem[Tensor]],
    extractor: FeatureExtractor,
    *,
    device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
    fast: FastPath | None = None,
) -> list[PairResult[Tensor]]:
    """Optimise every pair of a same-shape batch at once; each pair's result equals its single-pair run.

    `fast` overrides how the batch runs (default: `FastPath.for_params(params, device)`); benchmarks use it.
    """
    if not problems:
        return []
    _batch_key_check(problems)
    device = torch.device(device)
    fast = fast or FastPath.for_params(problems[0].params, device)
    with backend_flags(fast, device):
        return _BatchLoop(problems, extractor, device, fast, callback).optimize()


class _BatchLoop:
    """One batch's run: every scale, coarse to fine, then the final losses and the outcomes."""

    def __init__(
        self,
        problems: Sequence[PairProblem[Tensor]],
        extractor: FeatureExtractor,
        device: torch.device,
        fast: FastPath,
        callback: ProgressCallback | None,
    ) -> None:
        self.problems, self.extractor, self.device, self.fast = problems, extractor, device, fast
        self.params = params = problems[0].params
        height, width = problems[0].content.shape[-2:]
        self.scales = schedule(height, width, params.scales, params.iterations, params.init)
        self.low, self.high = (t.to(device).view(1, -1, 1, 1) for t in extractor.input_range())
        if isinstance(extractor, torch.nn.Module):  # weights in the activations' layout: converted once, not per step
            extractor.to(memory_format=torch.channels_last if fast.channels_last else torch.contiguous_format)
        self.normalization = loss_normalization(params.normalization)  # the one place the name is looked up
        self.loss_step = LossStep(extractor, fast, self.normalization)
        self.log = StepLog(
            len(problems),
            device,
            scales=len(self.scales),
            iterations=params.iterations,
            log_every=params.log_every,
            save_every=params.save_every,
            callback=callback,
        )

    def optimize(self) -> list[PairResult[Tensor]]:
        """Optimise at each scale from the previous scale's result; judge the final images."""
        first = self.scales[0]
        x01 = initial_images(self.problems, first.height, first.width, self.device)
        rescued = torch.zeros(len(self.problems), dtype=torch.bool, device=self.device)
        for index, scale in enumerate(self.scales):
            targets = build_targets(
                self.problems, self.extractor, scale.height, scale.width, scale.factor, self.device, self.fast.amp
            )
            if index:  # the contents at full size only for this, then freed: the steps' peak memory is unchanged
                contents = torch.cat([p.content for p in self.problems]).to(self.device)
                x01 = finer_start(x01, contents, self.scales[index - 1], scale)
                del contents
            x01, rescued = self._run_scale(index, targets, x01)
        with torch.no_grad(), autocast(self.device, self.fast.amp):
            final = self.extractor.to_model(x01)
            losses = total_losses(self.extractor(final), final, targets, self.normalization)
        return self.log.outcomes(self.problems, x01, read_losses(stack_losses(losses)), rescued)

    def _run_scale(self, scale: int, targets: LossTargets, x01: Tensor) -> tuple[Tensor, Tensor]:
        """The scale's steps; returns the kept images in [0,1] and the pairs rescued from a NaN."""
        h, w, steps = self.scales[scale].height, self.scales[scale].width, self.scales[scale].iterations
        # x stays NCHW-contiguous so L-BFGS treats each image as one flat row; the network sees channels_last if asked.
        # Bicubic resizing overshoots [0, 1] a little: the start, like every iterate, lies inside the valid range.
        x = self.extractor.to_model(resize(x01, h, w).clamp(0, 1)).detach().contiguous().requires_grad_(True)
        stepper = self._stepper(x)
        recompute = self._recompute(h, w)
        log = self.log
        log.begin_scale(scale, h, w, steps)
        # Pairs whose kept iterate (Adam's best, L-BFGS's accepted) had a finite loss at this scale.
        kept_finite = torch.zeros(len(self.problems), dtype=torch.bool, device=self.device)

        def shown() -> Tensor:
            return self.extractor.from_model(stepper.kept()).clamp(0, 1)

        for step in range(steps):
            x.grad = None
            losses = self.loss_step(x, targets, log.alive, recompute)
            alive = log.evaluated(losses["total"])
            assert x.grad is not None
            grad = torch.where(alive.view(-1, 1, 1, 1), x.grad, 0.0)
            kept = stepper.step(x, grad, losses["total"].detach(), alive)
            kept_finite = kept_finite | kept
            log.log_step(step, losses, None if stepper.logs_trials else kept, shown)
        # Every iterate is inside the valid range, so this clamp only removes float rounding at the bounds.
        # A pair whose loss was never finite keeps its start image; it is reported failed.
        return shown(), log.rescued(kept_finite)

    def _recompute(self, height: int, width: int) -> bool:
        """Whether this scale's steps recompute activations in the backward pass: as `fast` says, else (None) when
        the memory model says the plain step would not fit (`needs_recompute`); the values are the same either way."""
        if not isinstance(self.extractor, Recomputable):
            return False
        if self.fast.recompute is not None:
            return self.fast.recompute
        native_bf16 = self.fast.amp is not None  # the activations' bytes the model counts are the fast path's
        pairs = len(self.problems)
        if not needs_recompute(height, width, self.params, self.device, pairs, native_bf16=native_bf16):
            return False
        log.info(
            "recomputing activations in the backward pass at %dx%d px (%d pairs): the memory model",
            height,
            width,
            pairs,
        )
        return True

    def _stepper(self, x: Tensor) -> Stepper:
        """The optimiser these parameters ask for, over the batch `x` [B,3,h,w] (model space)."""
        params, (h, w) = self.params, x.shape[-2:]
        if params.optimizer == "adam":
            keep_best = torch.tensor([p.params.keep_best for p in self.problems], device=self.device)
            return AdamStepper(
                x,
                lr=params.lr,
                beta1=params.adam_beta1,
                eps=params.adam_eps,
                keep_best=keep_best,
                low=self.low,
                high=self.high,
                fused=self.fast.fused_adam,
            )
        first_step_max = None
        if self.fast.amp is not None:
            first_step_max = float((self.high - self.low).max()) * LOW_PRECISION_FIRST_STEP
        return ProjectedLBFGS(
            tuple(x.shape),
            lower=self.low.expand(1, -1, h, w),
            upper=self.high.expand(1, -1, h, w),
            lr=params.lr,
            history_size=params.history_size,
            first_step_max=first_step_max,
            device=self.device,
            dtype=x.dtype,
        )
