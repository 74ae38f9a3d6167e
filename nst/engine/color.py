"""Images as float32 `[B,3,H,W]` RGB tensors in `[0, 1]`, and colour preservation (Gatys et al. 2016, "Preserving
colour in neural artistic style transfer"): luminance-only transfer (YIQ) and linear colour-histogram matching.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# NTSC RGB -> YIQ (FCC 1987 coefficients); its exact inverse is computed in float64 below.
_RGB_TO_YIQ = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [0.595716, -0.274453, -0.321263],
        [0.211456, -0.522591, 0.311135],
    ],
    dtype=torch.float64,
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def image_to_tensor(img: Image.Image) -> Tensor:
    """8-bit RGB image -> float32 tensor [1,3,H,W] in [0,1]."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8, copy=True)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0).contiguous()


def tensor_to_image(t: Tensor) -> Image.Image:
    """Tensor [1,3,H,W] or [3,H,W] in [0,1] -> 8-bit RGB image (NaN -> 0, clamped, rounded)."""
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"expected a single image [1,3,H,W], got shape {tuple(t.shape)}")
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected [3,H,W] RGB, got shape {tuple(t.shape)}")
    x = torch.nan_to_num(t.detach().to("cpu", torch.float32), nan=0.0).clamp(0.0, 1.0)
    arr = (x * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, mode="RGB")


def _check_images(x: Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected images [B,3,H,W], got shape {tuple(x.shape)}")


def rgb_to_yiq(x: Tensor) -> Tensor:
    """RGB [B,3,H,W] -> YIQ (Y luminance, I/Q chrominance), same dtype."""
    _check_images(x, "rgb")
    m = _RGB_TO_YIQ.to(x.device, torch.float64)
    return torch.einsum("ij,bjhw->bihw", m, x.to(torch.float64)).to(x.dtype)


def yiq_to_rgb(x: Tensor) -> Tensor:
    """YIQ [B,3,H,W] -> RGB (not clamped), same dtype."""
    _check_images(x, "yiq")
    m = _YIQ_TO_RGB.to(x.device, torch.float64)
    return torch.einsum("ij,bjhw->bihw", m, x.to(torch.float64)).to(x.dtype)


def luminance_transfer(stylized: Tensor, content: Tensor, *, clamp: bool = True) -> Tensor:
    """Y (luminance) from `stylized`, I and Q (colour) from `content`; both [B,3,H,W] in [0,1], same shape."""
    _check_images(stylized, "stylized")
    _check_images(content, "content")
    if stylized.shape[1:] != content.shape[1:] or content.shape[0] not in (1, stylized.shape[0]):
        raise ValueError(f"shape mismatch: stylized {tuple(stylized.shape)} vs content {tuple(content.shape)}")
    ys = rgb_to_yiq(stylized.to(torch.float64))
    yc = rgb_to_yiq(content.to(torch.float64)).expand_as(ys)
    out = yiq_to_rgb(torch.cat([ys[:, :1], yc[:, 1:]], dim=1))
    if clamp:
        out = out.clamp(0.0, 1.0)
    return out.to(stylized.dtype)


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image channel mean [B,3] and covariance [B,3,3] (population, fp64) of [B,3,H,W] pixels."""
    flat = x.to(torch.float64).flatten(2)  # B,3,N
    mean = flat.mean(dim=2)
    centred = flat - mean.unsqueeze(2)
    cov = centred @ centred.transpose(1, 2) / flat.shape[2]
    return mean, cov


def _sym_power(cov: Tensor, power: float, ridge: float) -> Tensor:
    """cov^power for symmetric PSD matrices via eigh, with `ridge` added to the eigenvalues."""
    vals, vecs = torch.linalg.eigh(cov)
    vals = vals.clamp_min(0.0) + ridge
    powered: Tensor = vecs @ torch.diag_embed(vals.pow(power)) @ vecs.transpose(-1, -2)
    return powered


def match_color(source: Tensor, target: Tensor, *, clamp: bool = True, ridge: float = 1e-8) -> Tensor:
    """Linear colour transfer: map `source` pixels so their mean and covariance equal `target`'s (x' = A(x-mu_s)+mu_t).

    A = Sigma_t^(1/2) Sigma_s^(-1/2) with symmetric square roots (eigh, float64, `ridge` on the eigenvalues).
    `target` may have another size and batch 1 (broadcast). The result is clamped to [0,1] unless clamp=False.
    """
    _check_images(source, "source")
    _check_images(target, "target")
    if target.shape[0] not in (1, source.shape[0]):
        raise ValueError(f"batch mismatch: source {tuple(source.shape)} vs target {tuple(target.shape)}")
    mu_s, cov_s = _mean_cov(source)
    mu_t, cov_t = _mean_cov(target)
    a = _sym_power(cov_t, 0.5, ridge) @ _sym_power(cov_s, -0.5, ridge)  # B,3,3
    flat = source.to(torch.float64).flatten(2) - mu_s.unsqueeze(2)
    out = (a.expand(source.shape[0], 3, 3) @ flat + mu_t.expand(source.shape[0], 3).unsqueeze(2)).view_as(source)
    if clamp:
        out = out.clamp(0.0, 1.0)
    return out.to(source.dtype)


__all__ = ["image_to_tensor", "luminance_transfer", "match_color", "rgb_to_yiq", "tensor_to_image", "yiq_to_rgb"]
