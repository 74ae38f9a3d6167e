"""Image I/O with Pillow: decoding (EXIF, colour modes, 16-bit, pixel limit), sizes, PNG encoding, hashes.

Needs no torch: planning a run reads headers and hashes only. Tensors and colour live in `nst.engine.color`.
"""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nst.errors import ImageError
from nst.layers import MIN_SIDE

# The only decoders Pillow may use on input bytes (JPEG includes the multi-picture MPO files phones write).
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
# VGG pools four times: an image more than 32 times wider than high (or the reverse) has no deep features.
MAX_ASPECT = 32


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


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of an image."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------- colour


__all__ = ["encode_png", "load_image", "resize_long_side", "resized_size", "sha256_bytes", "upright_size"]
