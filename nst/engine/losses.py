"""Content, Gram style and total-variation losses; one value per image of the batch, always in fp32.

Normalisations (`StyleParams.normalization`, one `LossNormalization` object each, chosen by `loss_normalization`):
- ``gatys``: content ½·Σ(F−P)², style per layer Σ(G−A)²/(4N²M²) with G = FFᵀ (Gatys et al. 2015), TV Σ of squared steps.
- ``mean``: content mean((F−P)²), style per layer mean((G/M − A/M)²), TV mean of squared steps (the TF/Keras tutorial).
- ``relative``: content ‖F−P‖²/‖P‖², style per layer ‖G−A‖²/‖A‖² (G, A per position), TV as ``mean``, each in parts
  per million (×1e6): each term is the relative error, so one style weight means the same strength for every painting
  and every size. The fixed 1e6 keeps the gradients in the range L-BFGS's absolute thresholds expect (raw relative
  errors give per-pixel gradients ~1e-5 at 64 px, below its curvature test, and fp32 runs then barely move).
N = channels, M = height × width of the layer.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from nst.errors import ParamsError
from nst.params import Normalization

RELATIVE_SCALE = 1e6  # `relative` terms are in parts per million (see the module docstring)


def _rows(features: Tensor) -> tuple[Tensor, bool]:
    """Features [B,C,H,W] as a matrix without a copy: [B,C,HW] (NCHW), or [B,HW,C] and True (NHWC, channels_last)."""
    b, c, h, w = features.shape
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        return features.permute(0, 2, 3, 1).reshape(b, h * w, c), True
    return features.reshape(b, c, h * w), False


class _Gram(torch.autograd.Function):
    """G = F Fᵀ / M as fp32, with a one-product backward dF = (dG + dGᵀ) F / M in the features' dtype and layout.

    The gradient keeps the features' memory layout, so autograd adds it to the next layer's gradient in place.
    """

    @staticmethod
    def forward(ctx: Any, features: Tensor) -> Tensor:
        rows, nhwc = _rows(features)
        ctx.save_for_backward(features)
        product = torch.bmm(rows.transpose(1, 2), rows) if nhwc else torch.bmm(rows, rows.transpose(1, 2))
        return product.float() / (features.shape[-2] * features.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (features,) = ctx.saved_tensors
        b, c, h, w = features.shape
        rows, nhwc = _rows(features)
        sym = ((grad + grad.transpose(1, 2)) / (h * w)).to(features.dtype)
        if nhwc:  # [B,HW,C] @ [C,C] is NHWC already: the permuted view is channels_last, no copy
            return torch.bmm(rows, sym).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return torch.bmm(sym, rows).reshape(b, c, h, w)


def gram_matrix(features: Tensor, low_precision: bool = False) -> Tensor:
    """Gram matrices FFᵀ/M of features [B,C,H,W] → [B,C,C] in fp32.

    The product runs in fp32 unless `low_precision`, where it runs in the features' own dtype (bf16 under autocast).
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        gram: Tensor = _Gram.apply(features if low_precision else features.float())
        return gram


class LossNormalization(abc.ABC):
    """How the loss terms are scaled to one value per image: one subclass per `Normalization` (module docstring).

    The shared work (fp32 casts, squared differences) is here; a subclass only reduces the squared errors.
    """

    name: ClassVar[Normalization]

    def content(self, features: Tensor, target: Tensor) -> Tensor:
        """Per-image content loss between features and target [B,C,H,W] → [B]."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self._content((features.float() - target.float()).pow(2).flatten(1), target)

    def style_layer(self, gram: Tensor, target_gram: Tensor) -> Tensor:
        """Per-image style loss of one layer from Gram matrices FFᵀ/M [B,C,C] → [B]."""
        return self._style((gram - target_gram).pow(2).flatten(1), target_gram)

    def tv(self, image: Tensor) -> Tensor:
        """Per-image total variation: squared differences of neighbouring pixels [B,C,H,W] → [B]."""
        with torch.autocast(device_type=image.device.type, enabled=False):
            x = image.float()
            dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).flatten(1)
            dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1)
            return self._tv(dx, dy)

    @abc.abstractmethod
    def _content(self, sq: Tensor, target: Tensor) -> Tensor:
        """Reduce squared feature errors [B,n] (fp32) to [B]; `target` is the content features."""

    @abc.abstractmethod
    def _style(self, sq: Tensor, target_gram: Tensor) -> Tensor:
        """Reduce squared Gram errors [B,C·C] to [B]; `target_gram` is the target's Gram matrices."""

    @abc.abstractmethod
    def _tv(self, dx: Tensor, dy: Tensor) -> Tensor:
        """Reduce squared horizontal and vertical pixel steps [B,n] to [B]."""


class Gatys(LossNormalization):
    """Content ½·Σ(F−P)², style Σ(G−A)²/(4N²M²) per layer, TV Σ of squared steps (Gatys et al. 2015)."""

    name = "gatys"

    def _content(self, sq: Tensor, target: Tensor) -> Tensor:
        return 0.5 * sq.sum(1)

    def _style(self, sq: Tensor, target_gram: Tensor) -> Tensor:
        # Σ(G−A)²/(4N²M²) with unnormalised G equals mean((G/M − A/M)²)/4: the two conventions differ by ¼.
        return 0.25 * sq.mean(1)

    def _tv(self, dx: Tensor, dy: Tensor) -> Tensor:
        return dx.sum(1) + dy.sum(1)


class Mean(LossNormalization):
    """Every term the mean of its squared errors (the TF/Keras tutorial)."""

    name = "mean"

    def _content(self, sq: Tensor, target: Tensor) -> Tensor:
        return sq.mean(1)

    def _style(self, sq: Tensor, target_gram: Tensor) -> Tensor:
        return sq.mean(1)

    def _tv(self, dx: Tensor, dy: Tensor) -> Tensor:
        return dx.mean(1) + dy.mean(1)


class Relative(LossNormalization):
    """Each term its squared error over its target's, in parts per million (TV: `Mean`'s, ×1e6)."""

    name = "relative"

    def _content(self, sq: Tensor, target: Tensor) -> Tensor:
        return RELATIVE_SCALE * sq.sum(1) / target.float().pow(2).flatten(1).sum(1).clamp_min(1e-30)

    def _style(self, sq: Tensor, target_gram: Tensor) -> Tensor:
        return RELATIVE_SCALE * (sq.sum(1) / target_gram.pow(2).flatten(1).sum(1).clamp_min(1e-30))

    def _tv(self, dx: Tensor, dy: Tensor) -> Tensor:
        return RELATIVE_SCALE * (dx.mean(1) + dy.mean(1))


NORMALIZATIONS: dict[str, LossNormalization] = {n.name: n for n in (Gatys(), Mean(), Relative())}


def loss_normalization(name: Normalization) -> LossNormalization:
    """The loss normalisation named by `StyleParams.normalization`; an unknown name is a `ParamsError`."""
    try:
        return NORMALIZATIONS[name]
    except KeyError:
        known = ", ".join(NORMALIZATIONS)
        raise ParamsError(f"normalization: unknown value {name!r} (one of {known})") from None


@dataclass
class LossTargets:
    """What each image of a batch is matched against, and the per-image weights of each term."""

    content: dict[str, Tensor]  # layer -> [B,C,H,W] content features
    style: dict[str, Tensor]  # layer -> [B,C,C] blended style Gram matrices (fp32)
    content_weight: Tensor  # [B]
    style_weight: Tensor  # [B]
    tv_weight: Tensor  # [B]
    style_layer_weights: Tensor  # [B, len(style layers)], in the order of `style`
    use_tv: bool = False  # whether any image has tv_weight > 0 (known up front: no device sync in the loop)


def blended_gram(grams: Sequence[Tensor], blend: Sequence[float]) -> Tensor:
    """Target Gram of several style images: the blend-weighted mean of their Grams.

    Σᵢ wᵢ‖G − Aᵢ‖² = ‖G − Σᵢ wᵢAᵢ‖² + const for Σwᵢ = 1, so this gives the same gradients as a weighted sum of losses.
    """
    total = float(sum(blend))
    out = torch.zeros_like(grams[0])
    for gram, weight in zip(grams, blend, strict=True):
        out = out + gram * (weight / total)
    return out


def total_losses(
    features: dict[str, Tensor],
    image: Tensor,
    targets: LossTargets,
    normalization: LossNormalization,
    low_precision_gram: bool = False,
) -> dict[str, Tensor]:
    """Weighted per-image losses {content, style, tv, total}, each [B] fp32 (`gram_matrix` says what the flag does)."""
    content_terms = [normalization.content(features[name], t) for name, t in targets.content.items()]
    content = torch.stack(content_terms, 0).mean(0)
    style_terms = [
        normalization.style_layer(gram_matrix(features[name], low_precision_gram), t)
        for name, t in targets.style.items()
    ]
    style = (torch.stack(style_terms, 1) * targets.style_layer_weights).sum(1)
    tv = normalization.tv(image) if targets.use_tv else torch.zeros_like(content)
    weighted_content = targets.content_weight * content
    weighted_style = targets.style_weight * style
    weighted_tv = targets.tv_weight * tv
    return {
        "content": weighted_content,
        "style": weighted_style,
        "tv": weighted_tv,
        "total": weighted_content + weighted_style + weighted_tv,
    }
