"""The batched optimisation loop: per-pair L-BFGS or Adam, multi-scale, best iterate, NaN isolation, progress events.

The loop knows nothing about images on disk: it takes [0,1] RGB tensors and a feature extractor and returns tensors.
How it runs on a device (bf16 autocast, channels_last, torch.compile, cuDNN autotuning) is a `FastPath`, resolved from
the parameters and the device; docs/performance.md measures what each part buys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from nst.losses import LossTargets, blended_gram, gram_matrix, total_losses
from nst.params import StyleParams
from nst.results import error_info

log = logging.getLogger(__name__)

LOSS_TERMS = ("content", "style", "tv", "total")
MIN_SCALE_SIDE = 32  # the coarsest scale keeps at least this many pixels on its short side
# cuDNN's per-convolution workspace cap (MiB) while autotuning: uncapped, benchmark mode can take tens of GB.
CUDNN_WORKSPACE_CAP_MIB = 2048
# Under bf16 the network sees its input rounded to ~3 significant digits (0.5-1 grey level on the Caffe scale), so
# L-BFGS's tiny first step (torch: 1/|g|_1) moves nothing it can see and its first curvature pair is noise. Under
# autocast the first step instead moves the largest pixel by this fraction of the input range (Caffe: 255/64 = 4).
LOW_PRECISION_FIRST_STEP = 1 / 64
COMPILE_RECOMPILE_LIMIT = 64  # shapes (scales, batch sizes, image sizes) one worker may compile the step for


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
    warnings: list[dict[str, Any]] = field(default_factory=list)  # e.g. a later step went NaN; best iterate kept


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

    Unbounded (no `lower`/`upper`), it mirrors torch.optim.LBFGS(lr, history_size, line_search_fn=None) called once
    per iteration with max_iter=1, vectorised over the batch: the two-loop recursion runs on [B, D] rows, so pairs never
    share curvature or steps. Differences from torch, none of which shows in a healthy fp32 run:
    - a pair whose curvature condition fails stores an inert (zero-weight) history entry instead of none, so it forgets
      its oldest entry one step early;
    - while a pair has no accepted curvature pair yet it keeps taking first-iteration-sized steps (torch would step by
      the raw gradient, which on Gatys' loss scale, gradients ~1e9, throws the image to infinity);
    - `first_step_max` (used under bf16) makes the first step move the largest pixel by that much, so that it is
      visible through reduced-precision rounding.

    Bounded (`lower`/`upper` given; `step` then needs each row's loss), it is projected L-BFGS in the style of
    L-BFGS-B: the two-loop recursion sees only the free variables (a pixel at a bound whose gradient pushes it outward
    is pinned), every trial point is projected into the box, and a backtracking Armijo line search along the projected
    path accepts or rejects each trial. One call evaluates one trial, so a rejected trial costs one iteration, leaves
    an inert history entry and shrinks the step; `accepted_x`/`accepted_loss` hold each row's current iterate, which
    never gets worse.
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
        first_step_max: float | None = None,
        lower: Tensor | None = None,
        upper: Tensor | None = None,
        armijo: float = 1e-4,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.lr = lr
        self.history_size = history_size
        self.tolerance_grad = tolerance_grad
        self.tolerance_change = tolerance_change
        self.first_step_max = first_step_max
        self.n_iter = 0
        self.ptr = 0
        self.count = 0
        self.s_hist = torch.zeros(history_size, batch, dim, device=device, dtype=dtype)
        self.y_hist = torch.zeros(history_size, batch, dim, device=device, dtype=dtype)
        self.rho = torch.zeros(history_size, batch, device=device, dtype=dtype)
        self.h_diag = torch.ones(batch, device=device, dtype=dtype)
        self.has_curvature = torch.zeros(batch, dtype=torch.bool, device=device)
        self.direction = torch.zeros(batch, dim, device=device, dtype=dtype)
        self.step_size = torch.zeros(batch, device=device, dtype=dtype)
        self.prev_grad = torch.zeros(batch, dim, device=device, dtype=dtype)
        self.bounded = lower is not None or upper is not None
        inf = torch.tensor(math.inf, device=device, dtype=dtype)
        self.lower = lower.to(device, dtype) if lower is not None else -inf
        self.upper = upper.to(device, dtype) if upper is not None else inf
        self.armijo = armijo
        if self.bounded:
            self.accepted_x = torch.zeros(batch, dim, device=device, dtype=dtype)
            self.accepted_loss = torch.full((batch,), math.inf, device=device, dtype=dtype)
            self.accepted_now = torch.zeros(batch, dtype=torch.bool, device=device)

    def _first_step_size(self, g: Tensor) -> Tensor:
        """torch's first step min(1, 1/|g|_1)·lr, or at least first_step_max/|g|_inf when that is set [B]."""
        size = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * self.lr
        if self.first_step_max is not None:
            size = torch.maximum(size, self.first_step_max / g.abs().amax(1).clamp_min(1e-30))
        return size

    def step(self, x: Tensor, grad: Tensor, active: Tensor, loss: Tensor | None = None) -> Tensor:
        """Update the rows of `x` [B, D] in place from their gradients [B, D]; returns which rows moved [B].

        Bounded, `x` is the trial just evaluated, `loss` [B] its losses, and `x` becomes the next trial.
        """
        if self.bounded:
            if loss is None:
                raise ValueError("bounded L-BFGS needs each row's loss for its line search")
            return self._bounded_step(x, grad, active, loss)
        g = grad.to(self.s_hist.dtype)
        # torch returns early when the gradient is already tiny; that pair stops for good.
        active = active & (g.abs().amax(1) > self.tolerance_grad)
        self.n_iter += 1
        if self.n_iter == 1:
            d = -g
        else:
            y = g - self.prev_grad
            s = self.direction * self.step_size[:, None]
            ys = torch.linalg.vecdot(y, s)
            ok = ys > 1e-10
            self._remember(s, y, ys, ok)
            d = self._two_loop(-g)
        self.prev_grad = g.clone()
        if self.n_iter == 1:
            self.step_size = self._first_step_size(g)
        else:
            self.step_size = torch.where(self.has_curvature, self.lr, self._first_step_size(g))
        d = torch.where(active[:, None], d, 0.0)
        self.direction = d
        gtd = torch.linalg.vecdot(g, d)
        moving = active & (gtd <= -self.tolerance_change)
        x.addcmul_(d, torch.where(moving, self.step_size, 0.0)[:, None])
        return moving  # type: ignore[no-any-return]  # torch's `&` on tensors is typed Any

    def _remember(self, s: Tensor, y: Tensor, ys: Tensor, ok: Tensor) -> None:
        """Store one curvature pair per row (an inert one, weight 0, where `ok` is false)."""
        self.s_hist[self.ptr] = torch.where(ok[:, None], s, 0.0)
        self.y_hist[self.ptr] = torch.where(ok[:, None], y, 0.0)
        self.rho[self.ptr] = torch.where(ok, 1.0 / torch.where(ok, ys, 1.0), 0.0)
        self.ptr = (self.ptr + 1) % self.history_size
        self.count = min(self.count + 1, self.history_size)
        yy = torch.linalg.vecdot(y, y)
        self.h_diag = torch.where(ok, ys / torch.where(ok, yy, 1.0), self.h_diag)
        self.has_curvature = self.has_curvature | ok

    def _bounded_step(self, x: Tensor, grad: Tensor, active: Tensor, loss: Tensor) -> Tensor:
        """Accept or reject the evaluated trial per row (Armijo), then project the next trial into the box."""
        g = grad.to(self.s_hist.dtype)
        f = loss.to(self.s_hist.dtype)
        self.n_iter += 1
        if self.n_iter == 1:
            accept = torch.ones_like(active)
            s = torch.zeros_like(x)
            decrease = torch.zeros_like(f)
        else:
            s = x - self.accepted_x
            decrease = torch.linalg.vecdot(self.prev_grad, s)  # directional derivative along the projected step
            accept = torch.isfinite(f) & (f <= self.accepted_loss + self.armijo * decrease)
            y = g - self.prev_grad
            ys = torch.linalg.vecdot(y, s)
            self._remember(s, y, ys, accept & (ys > 1e-10))
        self.accepted_now = accept
        col = accept[:, None]
        self.accepted_x = torch.where(col, x, self.accepted_x)
        self.accepted_loss = torch.where(accept, f, self.accepted_loss)
        self.prev_grad = torch.where(col, g, self.prev_grad)
        g = self.prev_grad
        at_bound = ((self.accepted_x <= self.lower) & (g > 0)) | ((self.accepted_x >= self.upper) & (g < 0))
        q = torch.where(at_bound, 0.0, -g)  # minus the projected gradient
        d = self._two_loop(q.clone()) if self.count else q.clone()
        d.masked_fill_(at_bound, 0.0)
        gtd = torch.linalg.vecdot(g, d)
        # The free-set recursion can miss descent near the box's faces: fall back to the projected gradient.
        uphill = gtd > -self.tolerance_change
        d = torch.where(uphill[:, None], q, d)
        gtd = torch.where(uphill, -torch.linalg.vecdot(q, q), gtd)
        new_size = torch.where(self.has_curvature & ~uphill, self.lr, self._first_step_size(q))
        # A rejected trial: backtrack along the same direction to the minimiser of the quadratic through
        # f(0), f'(0) and f(trial), kept within [0.1, 0.5] of the step (Nocedal & Wright, 3.5).
        curvature = 2 * (f - self.accepted_loss - decrease)
        shrink = torch.where(torch.isfinite(curvature) & (curvature > 0), -decrease / curvature, 0.1)
        backtracked = self.step_size * shrink.clamp(0.1, 0.5)
        self.direction = torch.where(col, d, self.direction)
        self.step_size = torch.where(accept, new_size, backtracked)
        # A step that no longer moves anything: forget the curvature pairs and restart from the projected gradient.
        tiny = ~accept & (self.step_size * self.direction.abs().amax(1) < 1e-6)
        self.rho = torch.where(tiny, 0.0, self.rho)
        self.has_curvature = self.has_curvature & ~tiny
        self.direction = torch.where(tiny[:, None], q, self.direction)
        self.step_size = torch.where(tiny, self._first_step_size(q), self.step_size)
        gtd = torch.where(accept, gtd, torch.linalg.vecdot(g, self.direction))
        moving = active & (q.abs().amax(1) > self.tolerance_grad) & (gtd <= -self.tolerance_change)
        trial = self.accepted_x + self.direction * torch.where(moving, self.step_size, 0.0)[:, None]
        x.copy_(torch.maximum(torch.minimum(trial, self.upper), self.lower))
        return moving

    def _two_loop(self, q: Tensor) -> Tensor:
        """H·q by the two-loop recursion over each row's history (newest first, then oldest first).

        Fused dot products and in-place updates: 5 passes over [B, D] per history entry and loop instead of 9.
        """
        order = [(self.ptr - 1 - k) % self.history_size for k in range(self.count)]
        alphas: dict[int, Tensor] = {}
        for idx in order:
            alpha = self.rho[idx] * torch.linalg.vecdot(self.s_hist[idx], q)
            q.addcmul_(self.y_hist[idx], -alpha[:, None])
            alphas[idx] = alpha
        r = q.mul_(self.h_diag[:, None])
        for idx in reversed(order):
            beta = self.rho[idx] * torch.linalg.vecdot(self.y_hist[idx], r)
            r.addcmul_(self.s_hist[idx], (alphas[idx] - beta)[:, None])
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


@dataclass(frozen=True)
class FastPath:
    """How a batch runs on its device. It changes speed and rounding, never the loss being minimised.

    `for_params` gives the default: on CUDA bf16 autocast (for precision auto/bf16), channels_last, torch.compile
    (compile auto -> "default"), cuDNN autotuning with a capped workspace, TF32 Gram products (exact: their inputs are
    bf16 features, and bf16 fits in TF32) and fused Adam; on CPU plain eager (fp32 unless bf16 is asked for).
    """

    amp: torch.dtype | None = None  # autocast dtype, None: plain fp32
    channels_last: bool = False  # NHWC activations (tensor-core friendly convolutions)
    compile: str = "off"  # torch.compile mode for features + losses, or "off"
    cudnn_benchmark: bool = False  # autotune convolution algorithms per shape (workspace capped)
    tf32_gram: bool = False  # TF32 matmuls, i.e. the Gram products (exact for bf16 features)
    fused_adam: bool = False  # one fused kernel per Adam step (CUDA)

    @classmethod
    def for_params(cls, params: StyleParams, device: torch.device | str) -> FastPath:
        """The fast path these parameters ask for on this device (see the class docstring)."""
        device = torch.device(device)
        amp = _autocast_dtype(params, device)
        cuda = device.type == "cuda"
        mode = params.compile if params.compile != "auto" else ("default" if cuda else "off")
        return cls(
            amp=amp,
            channels_last=cuda,
            compile=mode,
            cudnn_benchmark=cuda,
            tf32_gram=cuda and amp is not None,
            fused_adam=cuda,
        )

    def describe(self) -> dict[str, Any]:
        """Plain values for logs and benchmark records."""
        out = dataclasses.asdict(self)
        out["amp"] = str(self.amp).removeprefix("torch.") if self.amp is not None else "fp32"
        return out


_flags_lock = threading.Lock()
_flags_users = 0
_flags_saved: tuple[bool, bool] | None = None


def configure_cuda_env() -> None:
    """Cap cuDNN's autotuning workspace (env CUDNN_CONV_WSCAP_DBG, MiB) unless already set; call before any conv."""
    os.environ.setdefault("CUDNN_CONV_WSCAP_DBG", str(CUDNN_WORKSPACE_CAP_MIB))


@contextlib.contextmanager
def backend_flags(fast: FastPath, device: torch.device) -> Iterator[None]:
    """Set cuDNN autotuning and TF32 matmuls for the fast path while any batch runs; restore them after the last."""
    global _flags_users, _flags_saved
    if device.type != "cuda":
        yield
        return
    configure_cuda_env()
    with _flags_lock:
        if _flags_users == 0:
            _flags_saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
        _flags_users += 1
        torch.backends.cudnn.benchmark = fast.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = fast.tf32_gram
    try:
        yield
    finally:
        with _flags_lock:
            _flags_users -= 1
            if _flags_users == 0 and _flags_saved is not None:
                torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = _flags_saved


def _features_and_losses(
    extractor: FeatureExtractor,
    x: Tensor,
    targets: LossTargets,
    normalization: str,
    amp: torch.dtype | None,
    channels_last: bool,
) -> dict[str, Tensor]:
    """One forward pass of the loss network and the per-pair losses (the part torch.compile compiles)."""
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        feats = extractor(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return total_losses(feats, x, targets, normalization)


_compiled: dict[str, Callable[..., dict[str, Tensor]]] = {}
_compile_broken: set[str] = set()


def compile_fn(mode: str) -> Callable[..., dict[str, Tensor]]:
    """The compiled `_features_and_losses` for a torch.compile mode, one per process (its caches are per shape)."""
    if mode not in _compiled:
        import torch._dynamo

        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < COMPILE_RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = COMPILE_RECOMPILE_LIMIT
        _compiled[mode] = torch.compile(_features_and_losses, mode=mode, dynamic=False)
    return _compiled[mode]


class _LossStep:
    """Forward + backward of one step, compiled when asked; a compile failure falls back to eager with a warning."""

    def __init__(self, extractor: FeatureExtractor, fast: FastPath, normalization: str) -> None:
        self.extractor = extractor
        self.fast = fast
        self.normalization = normalization
        self.mode = fast.compile if fast.compile != "off" and fast.compile not in _compile_broken else None
        self.proven: set[tuple[int, ...]] = set()  # input shapes whose compiled step has run once

    def __call__(self, x: Tensor, targets: LossTargets, alive: Tensor) -> dict[str, Tensor]:
        """Losses of the batch [B] each; x.grad holds the gradient of the alive pairs' total loss."""
        if self.mode is None:
            return self._run(_features_and_losses, x, targets, alive)
        shape = tuple(x.shape)
        if shape in self.proven:
            return self._run(compile_fn(self.mode), x, targets, alive)
        try:
            losses = self._run(compile_fn(self.mode), x, targets, alive)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a compiler problem must not cost the batch: run eagerly from here on
            log.warning("torch.compile(mode=%r) failed, running eagerly: %s: %s", self.mode, type(exc).__name__, exc)
            _compile_broken.add(self.mode)
            self.mode = None
            x.grad = None
            return self._run(_features_and_losses, x, targets, alive)
        self.proven.add(shape)
        return losses

    def _run(
        self, fn: Callable[..., dict[str, Tensor]], x: Tensor, targets: LossTargets, alive: Tensor
    ) -> dict[str, Tensor]:
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        losses = fn(self.extractor, x, targets, self.normalization, self.fast.amp, self.fast.channels_last)
        torch.where(alive & torch.isfinite(losses["total"]), losses["total"], 0.0).sum().backward()  # type: ignore[no-untyped-call]
        return losses


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


def _stack_losses(losses: dict[str, Tensor]) -> Tensor:
    """Per-pair losses as one [B, len(LOSS_TERMS)] fp32 tensor."""
    return torch.stack([losses[k].detach().float() for k in LOSS_TERMS], 1)


def _read_losses(stacked: Tensor) -> list[dict[str, float]]:
    """Copy per-pair losses [B, len(LOSS_TERMS)] to the host (one sync)."""
    return [dict(zip(LOSS_TERMS, row, strict=True)) for row in stacked.cpu().tolist()]


def stylize_batch(
    problems: Sequence[PairProblem],
    extractor: FeatureExtractor,
    *,
    device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
    fast: FastPath | None = None,
) -> list[PairOutcome]:
    """Optimise every pair of a same-shape batch at once; each pair's result equals its single-pair run.

    `fast` overrides how the batch runs (default: `FastPath.for_params(params, device)`); benchmarks use it.
    """
    if not problems:
        return []
    _batch_key_check(problems)
    device = torch.device(device)
    fast = fast or FastPath.for_params(problems[0].params, device)
    with backend_flags(fast, device):
        return _stylize_batch(problems, extractor, device, callback, fast)


def _stylize_batch(
    problems: Sequence[PairProblem],
    extractor: FeatureExtractor,
    device: torch.device,
    callback: ProgressCallback | None,
    fast: FastPath,
) -> list[PairOutcome]:
    params = problems[0].params
    amp = fast.amp
    batch = len(problems)
    height, width = problems[0].content.shape[-2:]
    sizes = scale_sizes(height, width, params.scales)
    total_iterations = params.iterations * len(sizes)
    low, high = (t.to(device).view(1, -1, 1, 1) for t in extractor.input_range())
    if isinstance(extractor, torch.nn.Module):  # weights in the activations' layout: converted once, not per step
        layout = torch.channels_last if fast.channels_last else torch.contiguous_format
        extractor.to(memory_format=layout)
    loss_step = _LossStep(extractor, fast, params.normalization)
    first_step_max = None
    if amp is not None:
        first_step_max = float((high - low).max()) * LOW_PRECISION_FIRST_STEP

    alive = torch.ones(batch, dtype=torch.bool, device=device)
    failed_at = torch.full((batch,), -1, dtype=torch.long, device=device)
    histories: list[list[dict[str, float]]] = [[] for _ in problems]
    start = time.perf_counter()
    iteration = 0
    x01 = initial_images(problems, *sizes[0][:2], device)

    for scale_index, (h, w, factor) in enumerate(sizes):
        targets = build_targets(problems, extractor, h, w, factor, device, amp)
        # x stays NCHW-contiguous so L-BFGS can treat each image as one flat row; the network sees channels_last on GPU.
        # Bicubic resizing overshoots [0, 1] a little: the start, like every iterate, lies inside the valid range.
        x = extractor.to_model(resize(x01, h, w).clamp(0, 1)).detach().contiguous().requires_grad_(True)
        best_x = x.detach().clone()
        best_loss = torch.full((batch,), math.inf, device=device)
        lbfgs = adam = None
        if params.optimizer == "adam":
            adam = torch.optim.Adam(
                [x], lr=params.lr, betas=(params.adam_beta1, 0.999), eps=params.adam_eps, fused=fast.fused_adam
            )
        else:
            lbfgs = BatchedLBFGS(
                batch,
                x[0].numel(),
                lr=params.lr,
                history_size=params.history_size,
                first_step_max=first_step_max,
                lower=low.expand(1, -1, h, w).reshape(-1),
                upper=high.expand(1, -1, h, w).reshape(-1),
                device=device,
                dtype=x.dtype,
            )
        current = torch.zeros(batch, len(LOSS_TERMS), device=device)  # the losses of each pair's current iterate
        active = torch.ones(batch, dtype=torch.bool, device=device)
        # Pairs whose kept iterate (Adam's best, L-BFGS's accepted) had a finite loss at this scale.
        kept_finite = torch.zeros(batch, dtype=torch.bool, device=device)
        scale_start = iteration
        for step in range(params.iterations):
            iteration += 1
            x.grad = None
            losses = loss_step(x, targets, alive)
            total = losses["total"]
            finite = torch.isfinite(total)
            failed_at = torch.where(alive & ~finite, iteration, failed_at)
            alive = alive & finite
            assert x.grad is not None
            grad = torch.where(alive.view(-1, 1, 1, 1), x.grad, 0.0)
            if params.keep_best and adam is not None:  # bounded L-BFGS's iterate never gets worse: it is the best
                improved = alive & (total.detach() < best_loss)
                best_loss = torch.where(improved, total.detach(), best_loss)
                best_x = torch.where(improved.view(-1, 1, 1, 1), x.detach(), best_x)
                kept_finite = kept_finite | improved
            with torch.no_grad():
                if adam is not None:
                    x.grad = grad
                    adam.step()
                    x.copy_(torch.maximum(torch.minimum(x, high), low))
                elif lbfgs is not None:
                    active = active & alive
                    lbfgs.step(x.view(batch, -1), grad.reshape(batch, -1), active, loss=total.detach())
                    kept_finite = kept_finite | lbfgs.accepted_now
            # L-BFGS logs its accepted iterate (a rejected line-search trial is not an iterate); Adam its last one.
            stacked = _stack_losses(losses)
            current = stacked if lbfgs is None else torch.where(lbfgs.accepted_now[:, None], stacked, current)
            log_now = (step + 1) % params.log_every == 0 or step == 0 or step + 1 == params.iterations
            read = _read_losses(current) if log_now else None
            if read is not None:
                dead = failed_at.cpu().tolist()
                for i, row in enumerate(read):
                    if dead[i] < 0:
                        histories[i].append({"iteration": iteration, "scale": scale_index, **row})
            if callback is not None:
                save_now = params.save_every > 0 and iteration % params.save_every == 0
                shown = x.detach() if lbfgs is None else lbfgs.accepted_x.view_as(x)
                images = extractor.from_model(shown).clamp(0, 1) if save_now else None
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
        if lbfgs is not None:
            final = lbfgs.accepted_x.view_as(x)
        # Every iterate is inside the valid range, so this clamp only removes float rounding at the bounds.
        # A pair whose loss was never finite keeps its start image; it is reported failed below.
        x01 = extractor.from_model(final).clamp(0, 1)
        # A pair that went non-finite at this (last so far) scale but whose kept iterate is finite is not lost.
        if params.keep_best or lbfgs is not None:
            rescued = kept_finite & (failed_at > scale_start)
        else:
            rescued = torch.zeros(batch, dtype=torch.bool, device=device)

    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        final_model = extractor.to_model(x01)
        final_losses = _read_losses(
            _stack_losses(total_losses(extractor(final_model), final_model, targets, params.normalization))
        )
    failed_list = failed_at.cpu().tolist()
    rescued_list = rescued.cpu().tolist()
    outcomes = []
    for i in range(batch):
        rescue = failed_list[i] >= 0 and rescued_list[i] and all(math.isfinite(v) for v in final_losses[i].values())
        if failed_list[i] >= 0 and not rescue:
            outcomes.append(
                PairOutcome(
                    status="failed",
                    image=None,
                    final_losses=None,
                    history=histories[i],
                    iterations=failed_list[i],
                    error=error_info(
                        "NonFiniteLoss", f"loss became NaN/inf at iteration {failed_list[i]}", failed_list[i]
                    ),
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
                    warnings=[
                        error_info(
                            "NonFiniteLoss",
                            f"loss became NaN/inf at iteration {failed_list[i]}; kept the best iterate",
                            failed_list[i],
                        )
                    ]
                    if rescue
                    else [],
                )
            )
    return outcomes
