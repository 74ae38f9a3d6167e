"""The optimisers as strategies: one `Stepper` per optimiser, each stepping every pair of a batch independently.

`ProjectedLBFGS` is per-pair L-BFGS kept inside the valid pixel box; `AdamStepper` is torch's Adam with a clamp and an
optional best-iterate memory. Both act on the batch [B, ...] in the loss network's input space.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor


class Stepper(Protocol):
    """One optimiser over a batch: takes the evaluated point, moves `x` in place to the next point to evaluate."""

    # True: every evaluated point is an iterate (Adam); False: only accepted ones (a rejected line-search trial is not).
    logs_trials: bool

    def step(self, x: Tensor, grad: Tensor, loss: Tensor, alive: Tensor) -> Tensor:
        """Step from `x` [B,...] (its gradient, loss [B]); returns the rows whose evaluated point is now kept [B]."""
        ...

    def kept(self) -> Tensor:
        """Each pair's iterate that would be returned now [B,...] (Adam's best or last, L-BFGS's accepted)."""
        ...

    def state_bytes(self) -> int:
        """Bytes of the tensors this optimiser keeps between steps, for the whole batch (memory.py models it)."""
        ...


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class AdamStepper:
    """torch.optim.Adam on the batch, each iterate clamped into [low, high]; `keep_best` rows remember their best."""

    logs_trials = True

    def __init__(
        self,
        x: Tensor,
        *,
        lr: float,
        beta1: float,
        eps: float,
        keep_best: Tensor,
        low: Tensor,
        high: Tensor,
        fused: bool = False,
    ) -> None:
        self.x = x
        self.adam = torch.optim.Adam([x], lr=lr, betas=(beta1, 0.999), eps=eps, fused=fused)
        self.keep_best = keep_best
        self.low, self.high = low, high
        self.best_x = x.detach().clone()
        self.best_loss = torch.full((x.shape[0],), math.inf, device=x.device)

    def step(self, x: Tensor, grad: Tensor, loss: Tensor, alive: Tensor) -> Tensor:
        """Remember the best evaluated point (keep_best rows), then one clamped Adam step."""
        improved = self.keep_best & alive & (loss < self.best_loss)
        self.best_loss = torch.where(improved, loss, self.best_loss)
        self.best_x = torch.where(improved.view(-1, *[1] * (x.dim() - 1)), x.detach(), self.best_x)
        with torch.no_grad():
            x.grad = grad
            self.adam.step()
            x.copy_(torch.maximum(torch.minimum(x, self.high), self.low))
        return improved

    def kept(self) -> Tensor:
        """The best evaluated point for keep_best rows, the last iterate for the others."""
        return torch.where(self.keep_best.view(-1, *[1] * (self.x.dim() - 1)), self.best_x, self.x.detach())

    def state_bytes(self) -> int:
        """The best iterate and Adam's two moments (3 images per pair; the moments exist after the first step)."""
        moments = [t for t in self.adam.state[self.x].values() if t.dim() > 0]
        return _nbytes([self.best_x, self.best_loss, *moments])


class LBFGSHistory:
    """Each row's L-BFGS memory: the last `size` curvature pairs (s, y), their weights ρ and the initial scaling."""

    def __init__(self, pairs: int, dim: int, size: int, device: torch.device | str, dtype: torch.dtype) -> None:
        self.size = size
        self.ptr = 0
        self.count = 0
        self.s = torch.zeros(size, pairs, dim, device=device, dtype=dtype)
        self.y = torch.zeros(size, pairs, dim, device=device, dtype=dtype)
        self.rho = torch.zeros(size, pairs, device=device, dtype=dtype)
        self.h_diag = torch.ones(pairs, device=device, dtype=dtype)
        self.has_curvature = torch.zeros(pairs, dtype=torch.bool, device=device)

    def remember(self, s: Tensor, y: Tensor, ys: Tensor, ok: Tensor) -> None:
        """Store one curvature pair per row (an inert one, weight 0, where `ok` is false)."""
        self.s[self.ptr] = torch.where(ok[:, None], s, 0.0)
        self.y[self.ptr] = torch.where(ok[:, None], y, 0.0)
        self.rho[self.ptr] = torch.where(ok, 1.0 / torch.where(ok, ys, 1.0), 0.0)
        self.ptr = (self.ptr + 1) % self.size
        self.count = min(self.count + 1, self.size)
        yy = torch.linalg.vecdot(y, y)
        self.h_diag = torch.where(ok, ys / torch.where(ok, yy, 1.0), self.h_diag)
        self.has_curvature = self.has_curvature | ok

    def forget(self, rows: Tensor) -> None:
        """Drop every curvature pair of these rows [B] (they restart from the gradient)."""
        self.rho = torch.where(rows, 0.0, self.rho)
        self.has_curvature = self.has_curvature & ~rows

    def two_loop(self, q: Tensor) -> Tensor:
        """H·q by the two-loop recursion over each row's history (newest first, then oldest first); q is overwritten.

        Fused dot products and in-place updates: 5 passes over [B, D] per history entry and loop instead of 9.
        """
        order = [(self.ptr - 1 - k) % self.size for k in range(self.count)]
        alphas: dict[int, Tensor] = {}
        for idx in order:
            alpha = self.rho[idx] * torch.linalg.vecdot(self.s[idx], q)
            q.addcmul_(self.y[idx], -alpha[:, None])
            alphas[idx] = alpha
        r = q.mul_(self.h_diag[:, None])
        for idx in reversed(order):
            beta = self.rho[idx] * torch.linalg.vecdot(self.y[idx], r)
            r.addcmul_(self.s[idx], (alphas[idx] - beta)[:, None])
        return r


def first_step_size(g: Tensor, lr: float, first_step_max: float | None) -> Tensor:
    """torch's first L-BFGS step min(1, 1/|g|_1)·lr, or at least first_step_max/|g|_inf when that is set [B]."""
    size = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * lr
    if first_step_max is not None:
        size = torch.maximum(size, first_step_max / g.abs().amax(1).clamp_min(1e-30))
    return size


class ProjectedLBFGS:
    """Projected L-BFGS in the style of L-BFGS-B with one independent history, step and line search per row.

    The two-loop recursion sees only the free variables (a pixel at a bound whose gradient pushes it outward is
    pinned), every trial point is projected into the box [lower, upper], and a backtracking Armijo line search along
    the projected path accepts or rejects each trial. One call evaluates one trial, so a rejected trial costs one
    iteration, leaves an inert history entry and shrinks the step; `accepted_x`/`accepted_loss` hold each row's
    current iterate, which never gets worse, so it is also the best one.

    While a row has no accepted curvature pair it takes first-iteration-sized steps (the raw gradient, on Gatys' loss
    scale ~1e9, would throw the image to infinity); `first_step_max` (used under bf16) makes that step move the
    largest pixel by that much, so that it is visible through reduced-precision rounding.
    """

    logs_trials = False

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        lower: Tensor,
        upper: Tensor,
        lr: float = 1.0,
        history_size: int = 20,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        first_step_max: float | None = None,
        armijo: float = 1e-4,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shape = shape
        pairs, dim = shape[0], math.prod(shape[1:])
        self.lr = lr
        self.tolerance_grad = tolerance_grad
        self.tolerance_change = tolerance_change
        self.first_step_max = first_step_max
        self.armijo = armijo
        self.history = LBFGSHistory(pairs, dim, history_size, device, dtype)
        self.n_iter = 0
        self.lower = lower.to(device, dtype).reshape(-1)
        self.upper = upper.to(device, dtype).reshape(-1)
        self.direction = torch.zeros(pairs, dim, device=device, dtype=dtype)
        self.step_size = torch.zeros(pairs, device=device, dtype=dtype)
        self.prev_grad = torch.zeros(pairs, dim, device=device, dtype=dtype)
        self.accepted_x = torch.zeros(pairs, dim, device=device, dtype=dtype)
        self.accepted_loss = torch.full((pairs,), math.inf, device=device, dtype=dtype)

    def kept(self) -> Tensor:
        """Each row's accepted iterate, in the batch's shape."""
        return self.accepted_x.view(self.shape)

    def state_bytes(self) -> int:
        """The s and y histories, the accepted iterate, the previous gradient and the direction (2m + 3 images per
        pair), and the box's bounds (2 images per batch)."""
        h = self.history
        kept = [h.s, h.y, h.rho, h.h_diag, h.has_curvature, self.accepted_x, self.prev_grad, self.direction]
        return _nbytes([*kept, self.step_size, self.accepted_loss, self.lower, self.upper])

    def step(self, x: Tensor, grad: Tensor, loss: Tensor, alive: Tensor) -> Tensor:
        """Accept or reject the evaluated trial `x` per row (Armijo); `x` becomes the next trial, inside the box."""
        pairs = self.shape[0]
        with torch.no_grad():
            f = loss.to(self.accepted_x.dtype)
            accept, decrease = self._judge_trial(x.view(pairs, -1), grad.reshape(pairs, -1), f)
            self._next_trial(x.view(pairs, -1), alive, accept, f, decrease)
        return accept

    def _judge_trial(self, x: Tensor, grad: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        """Accept rows whose trial decreased the loss enough (Armijo); update their iterate, gradient and history."""
        g = grad.to(self.accepted_x.dtype)
        self.n_iter += 1
        if self.n_iter == 1:
            accept = torch.ones(f.shape, dtype=torch.bool, device=f.device)
            decrease = torch.zeros_like(f)
        else:
            s = x - self.accepted_x
            decrease = torch.linalg.vecdot(self.prev_grad, s)  # directional derivative along the projected step
            accept = torch.isfinite(f) & (f <= self.accepted_loss + self.armijo * decrease)
            y = g - self.prev_grad
            ys = torch.linalg.vecdot(y, s)
            self.history.remember(s, y, ys, accept & (ys > 1e-10))
        col = accept[:, None]
        self.accepted_x = torch.where(col, x, self.accepted_x)
        self.accepted_loss = torch.where(accept, f, self.accepted_loss)
        self.prev_grad = torch.where(col, g, self.prev_grad)
        return accept, decrease

    def _next_trial(self, x: Tensor, alive: Tensor, accept: Tensor, f: Tensor, decrease: Tensor) -> None:
        """A new direction for accepted rows, a shorter step along the old one for rejected rows; `x` := the trial."""
        g = self.prev_grad
        at_bound = ((self.accepted_x <= self.lower) & (g > 0)) | ((self.accepted_x >= self.upper) & (g < 0))
        q = torch.where(at_bound, 0.0, -g)  # minus the projected gradient
        d = self.history.two_loop(q.clone()) if self.history.count else q.clone()
        d.masked_fill_(at_bound, 0.0)
        gtd = torch.linalg.vecdot(g, d)
        # The free-set recursion can miss descent near the box's faces: fall back to the projected gradient.
        uphill = gtd > -self.tolerance_change
        d = torch.where(uphill[:, None], q, d)
        gtd = torch.where(uphill, -torch.linalg.vecdot(q, q), gtd)
        new_size = torch.where(self.history.has_curvature & ~uphill, self.lr, self._first_step(q))
        # A rejected trial: backtrack along the same direction to the minimiser of the quadratic through
        # f(0), f'(0) and f(trial), kept within [0.1, 0.5] of the step (Nocedal & Wright, 3.5).
        curvature = 2 * (f - self.accepted_loss - decrease)
        shrink = torch.where(torch.isfinite(curvature) & (curvature > 0), -decrease / curvature, 0.1)
        backtracked = self.step_size * shrink.clamp(0.1, 0.5)
        self.direction = torch.where(accept[:, None], d, self.direction)
        self.step_size = torch.where(accept, new_size, backtracked)
        # A step that no longer moves anything: forget the curvature pairs and restart from the projected gradient.
        tiny = ~accept & (self.step_size * self.direction.abs().amax(1) < 1e-6)
        self.history.forget(tiny)
        self.direction = torch.where(tiny[:, None], q, self.direction)
        self.step_size = torch.where(tiny, self._first_step(q), self.step_size)
        gtd = torch.where(accept, gtd, torch.linalg.vecdot(g, self.direction))
        moving = alive & (q.abs().amax(1) > self.tolerance_grad) & (gtd <= -self.tolerance_change)
        trial = self.accepted_x + self.direction * torch.where(moving, self.step_size, 0.0)[:, None]
        x.copy_(torch.maximum(torch.minimum(trial, self.upper), self.lower))

    def _first_step(self, g: Tensor) -> Tensor:
        return first_step_size(g, self.lr, self.first_step_max)
