"""Image I/O with Pillow (EXIF, colour modes, 16-bit, pixel limit), tensor conversion and colour preservation.

Tensors are float32 `[B,3,H,W]` RGB in `[0, 1]`. Colour preservation follows Gatys et al. 2016, "Preserving colour in
neural artistic style transfer": luminance-only transfer (YIQ) and linear colour-histogram matching.
"""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from nst.errors import ImageError

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

# The only decoders Pillow may use on input bytes (JPEG includes the multi-picture MPO files phones write).
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
# VGG pools four times: an image more than 32 times wider than high (or the reverse) has no deep features.
MAX_ASPECT = 32
MIN_SIDE = 16  # VGG pools four times before block5: a shorter side leaves no deep features


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after `resize_long_side(img, size)`."""
    long_side = max(width, height)
    if long_side == size:
        return width, height
    if width >= height:
        return size, max(1, round(height * size / long_side))
    return max(1, round(width * size / long_side)), size


def check_resized(width: int, height: int, size: int) -> str | None:
    """Why an image of this size cannot be resized to long side `size` for VGG, or None if it can."""
    new_w, new_h = resized_size(width, height, size)
    if min(new_w, new_h) < MIN_SIDE:
        return (
            f"{width}x{height} resized to long side {size} is {new_w}x{new_h}: VGG needs at least {MIN_SIDE} px "
            f"on the short side (raise size to {-(-MIN_SIDE * max(width, height) // min(width, height))} or crop)"
        )
    return None


# ---------------------------------------------------------------------------------------------------- loading


def load_image(source: bytes | str | Path, *, label: str, max_pixels: int, size: int | None = None) -> Image.Image:
    """Decode an image (bytes or local path) to 8-bit RGB, EXIF orientation applied; problems -> one-line ImageError.

    With `size` (the long side it will be resized to), an image too thin for VGG at that size is refused too.
    """
    name = None if isinstance(source, bytes | bytearray) else str(source)

    def fail(problem: str) -> ImageError:
        where = f" ({name})" if name is not None and name not in label else ""
        return ImageError(f"{label}{where}: {problem}")

    if isinstance(source, bytes | bytearray):
        if not source:
            raise fail("empty file, not an image")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source).expanduser()
        if not stream.exists():
            raise fail("file not found")
        if stream.is_dir():
            raise fail("is a directory, not an image")
    try:
        # Image.open reads only the header: the size is checked before any pixel is decoded.
        with Image.open(stream, formats=ALLOWED_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise fail(f"{width}x{height} = {width * height} pixels is more than max_pixels {max_pixels}")
            if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
                raise fail(f"{width}x{height} has an aspect ratio over {MAX_ASPECT}:1 (too thin for VGG's pooling)")
            img.load()
            upright = _to_rgb(_exif_upright(img))
        if size is not None and (why := check_resized(*upright.size, size)):
            raise fail(why)
        return upright
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise fail(f"too many pixels (Pillow's decompression-bomb guard): {exc}") from None
    except UnidentifiedImageError:
        raise fail(f"not an image, or not one of the accepted formats ({', '.join(ALLOWED_FORMATS)})") from None
    except EOFError:
        raise fail("truncated image") from None
    except PermissionError as exc:
        raise fail(f"cannot read file: {exc.strerror}") from None
    except (OSError, ValueError, SyntaxError, struct.error, MemoryError) as exc:
        msg = str(exc).strip()
        if "truncated" in msg.lower():
            raise fail("truncated image") from None
        raise fail(f"cannot decode image: {msg.splitlines()[0] if msg else type(exc).__name__}") from None


def upright_size(data: bytes, *, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) as decoded (EXIF rotation applied), from the header; None if `load_image` would refuse it.

    The pixel limit and the accepted formats are checked before anything else is read (a PNG's EXIF may sit after
    its pixels, so reading it decodes at most `max_pixels`).
    """
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                return None
            rotated = img.getexif().get(0x0112) in (5, 6, 7, 8)  # rotations by 90°: the decoded image is transposed
    except Exception:  # not an accepted image: load_image fails it later with a precise ImageError
        return None
    return (height, width) if rotated else (width, height)


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block is ignored rather than failing the image."""
    try:
        rotated = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: keep the pixels as stored
        return img
    return rotated if rotated is not None else img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha composited on white, 16-bit and float scaled to 0..255."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data (I;16*, and "I" as Pillow opens 16-bit PNG/TIFF): 0..65535 -> 0..255.
        gray = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        # Float images in [0,1] are scaled by 255; anything else is taken as 0..255 and clipped.
        scale = 255.0 if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if mode == "L" and "transparency" in img.info:
        has_alpha = True
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:  # caught by load_image and reported with the label
        raise ValueError(f"unsupported colour mode {mode}: {exc}") from None


# ---------------------------------------------------------------------------------------------------- conversion


def resize_long_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is `size` px (aspect kept, LANCZOS); a same-size image is returned as a copy."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = img.size
    long_side = max(width, height)
    if long_side == size:
        return img.copy()
    new_w = max(1, round(width * size / long_side))
    new_h = max(1, round(height * size / long_side))
    if width >= height:
        new_w = size
    else:
        new_h = size
    return img.resize((new_w, new_h), Image.Resampling.LANCZOS)


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


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of an image."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------- colour


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


__all__ = [
    "encode_png",
    "image_to_tensor",
    "load_image",
    "luminance_transfer",
    "match_color",
    "resize_long_side",
    "rgb_to_yiq",
    "sha256_bytes",
    "tensor_to_image",
    "yiq_to_rgb",
]
