"""How a batch runs on its device, and one forward + backward step of the loss network and losses.

`FastPath` (bf16 autocast, channels_last, torch.compile, cuDNN autotuning) is resolved from the parameters and the
device; it changes speed and rounding, never the loss being minimised. docs/performance.md measures each part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from nst.engine.losses import LossNormalization, LossTargets, total_losses
from nst.params import StyleParams

log = logging.getLogger(__name__)

# cuDNN's per-convolution workspace cap (MiB) while autotuning: uncapped, benchmark mode can take tens of GB.
CUDNN_WORKSPACE_CAP_MIB = 2048
COMPILE_RECOMPILE_LIMIT = 64  # shapes (scales, batch sizes, image sizes) one worker may compile the step for


class FeatureExtractor(Protocol):
    """What the loop needs of a loss network (nst.engine.vgg.VGGFeatures satisfies it)."""

    def __call__(self, x: Tensor) -> dict[str, Tensor]: ...
    def to_model(self, x01: Tensor) -> Tensor: ...
    def from_model(self, y: Tensor) -> Tensor: ...
    def input_range(self) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class Recomputable(Protocol):
    """A loss network that can recompute its activations in the backward pass (`VGGFeatures.recomputing`)."""

    def recomputing(self, x: Tensor) -> dict[str, Tensor]: ...


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16; AMX CPUs have it too), where bf16 autocast pays off.

    torch exposes the check only as a private probe; without it the answer is no (fp32, the safe default).
    """
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe is not None and probe())


def _autocast_dtype(params: StyleParams, device: torch.device) -> torch.dtype | None:
    """bf16 under autocast for `bf16`, or for `auto` on CUDA and on CPUs with native bf16; None means plain fp32."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    if params.precision == "bf16" or (params.precision == "auto" and native):
        return torch.bfloat16
    return None


def autocast(device: torch.device, amp: torch.dtype | None) -> torch.autocast:
    """Autocast to `amp` on `device`, or a disabled autocast (plain fp32) for None: `FastPath.amp`'s meaning."""
    return torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)


@dataclass(frozen=True)
class FastPath:
    """How a batch runs on its device. It changes speed and rounding, never the loss being minimised.

    `for_params` gives the default: on CUDA bf16 autocast (for precision auto/bf16), channels_last, torch.compile
    (compile auto -> "default"), cuDNN autotuning with a capped workspace, TF32 Gram products (exact: their inputs are
    bf16 features, and bf16 fits in TF32) and fused Adam; on CPU eager, and where the CPU has native bf16 (precision
    auto) bf16 autocast with channels_last and bf16 Gram products, else fp32.
    """

    amp: torch.dtype | None = None  # autocast dtype, None: plain fp32
    channels_last: bool = False  # NHWC activations (tensor-core friendly convolutions)
    compile: str = "off"  # torch.compile mode for features + losses, or "off"
    cudnn_benchmark: bool = False  # autotune convolution algorithms per shape (workspace capped)
    tf32_gram: bool = False  # TF32 matmuls, i.e. the Gram products (exact for bf16 features)
    fused_adam: bool = False  # one fused kernel per Adam step (CUDA)
    low_precision_gram: bool = False  # Gram products in the features' bf16 (CPU: fp32 products cost ~12 % of a step)
    # Recompute activations in the backward pass: None decides per scale by the memory model (`needs_recompute`).
    recompute: bool | None = None

    @classmethod
    def for_params(cls, params: StyleParams, device: torch.device | str) -> FastPath:
        """The fast path these parameters ask for on this device (see the class docstring)."""
        device = torch.device(device)
        amp = _autocast_dtype(params, device)
        cuda = device.type == "cuda"
        mode = params.compile if params.compile != "auto" else ("default" if cuda else "off")
        return cls(
            amp=amp,
            channels_last=cuda or amp is not None,
            compile=mode,
            cudnn_benchmark=cuda,
            tf32_gram=cuda and amp is not None,
            fused_adam=cuda,
            low_precision_gram=not cuda and amp is not None,
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
    normalization: LossNormalization,
    fast: FastPath,
    recompute: bool = False,
) -> dict[str, Tensor]:
    """One forward pass of the loss network and the per-pair losses (the part torch.compile compiles); with
    `recompute` (a `Recomputable` extractor) the activations between the layers the losses read are recomputed."""
    with autocast(x.device, fast.amp):
        x_in = x.contiguous(memory_format=torch.channels_last) if fast.channels_last else x
        feats = extractor.recomputing(x_in) if recompute else extractor(x_in)  # type: ignore[attr-defined]
    return total_losses(feats, x, targets, normalization, fast.low_precision_gram)


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


class LossStep:
    """Forward + backward of one step, compiled when asked; a compile failure falls back to eager with a warning."""

    def __init__(self, extractor: FeatureExtractor, fast: FastPath, normalization: LossNormalization) -> None:
        self.extractor = extractor
        self.fast = fast
        self.normalization = normalization
        self.mode = fast.compile if fast.compile != "off" and fast.compile not in _compile_broken else None
        self.proven: set[tuple[int, ...]] = set()  # input shapes whose compiled step has run once
        self.recompute = False

    def __call__(self, x: Tensor, targets: LossTargets, alive: Tensor, recompute: bool = False) -> dict[str, Tensor]:
        """Losses of the batch [B] each; x.grad holds the gradient of the alive pairs' total loss. `recompute`
        (honoured for a `Recomputable` extractor) trades a second forward pass for the saved activations; such a
        step runs eagerly (the memory model's step; checkpoints under torch.compile are not measured yet)."""
        self.recompute = recompute and isinstance(self.extractor, Recomputable)
        if self.mode is None or self.recompute:
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
        losses = fn(self.extractor, x, targets, self.normalization, self.fast, self.recompute)
        torch.where(alive & torch.isfinite(losses["total"]), losses["total"], 0.0).sum().backward()  # type: ignore[no-untyped-call]
        return losses
