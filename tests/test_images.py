"""Image loading (bad inputs, colour modes, bit depths, EXIF), conversions, atomic saves and colour preservation."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from nst.engine.color import image_to_tensor, luminance_transfer, match_color, rgb_to_yiq, tensor_to_image
from nst.engine.images import _to_rgb, encode_png, load_image, resize_long_side, sha256_bytes
from nst.errors import ImageError
from nst_testing.paths import SAMPLES

LABEL = "pair astronaut__hubble: content 'content/astronaut.png'"
BIG = 10**9


def _png(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose (valid, CRC-correct) header claims width x height but whose pixel data is for a 1x1 image."""
    data = bytearray(_png(Image.new("L", (1, 1))))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def _one_line_error(source: bytes | str | Path, max_pixels: int = BIG, label: str = LABEL) -> str:
    with pytest.raises(ImageError) as err:
        load_image(source, label=label, max_pixels=max_pixels)
    msg = str(err.value)
    assert msg.startswith(label + ": ") or msg.startswith(label + " ("), msg
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ bad inputs


def test_missing_file_names_label_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    msg = _one_line_error(missing, label="pair p: content")
    assert "file not found" in msg and str(missing) in msg
    assert "is a directory" in _one_line_error(tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("hello, I am not a PNG")
    assert "not an image" in _one_line_error(text)
    assert "not an image" in _one_line_error(b"GIF89a but not really")
    assert "empty" in _one_line_error(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt: str) -> None:
    whole = _encode(Image.fromarray(skdata.astronaut()).resize((96, 96)), fmt)
    assert load_image(whole, label=LABEL, max_pixels=BIG).size == (96, 96)
    assert _one_line_error(whole[: len(whole) // 2]).endswith(": truncated image")


def test_too_many_pixels_is_checked_before_decoding() -> None:
    small = _png(Image.new("RGB", (64, 64)))
    msg = _one_line_error(small, max_pixels=4095)
    assert "64x64 = 4096 pixels" in msg and "max_pixels 4095" in msg
    assert load_image(small, label=LABEL, max_pixels=4096).size == (64, 64)
    # A header claiming 9000 x 9000 pixels, with no pixel data: only a header check can report the size.
    msg = _one_line_error(_png_claiming(9_000, 9_000), max_pixels=80_000_000)
    assert "9000x9000 = 81000000 pixels" in msg and "max_pixels 80000000" in msg


def test_pillow_decompression_bomb_error_becomes_image_error() -> None:
    # Above 2 x Image.MAX_IMAGE_PIXELS Pillow itself refuses while opening, even if max_pixels would allow it.
    pixels = 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1_000_000
    side = int(pixels**0.5) + 1
    msg = _one_line_error(_png_claiming(side, side), max_pixels=10**12)
    assert "decompression-bomb" in msg


# ------------------------------------------------------------------------------------------------ colour modes


def test_rgb_jpeg_sample_loads() -> None:
    img = load_image(SAMPLES / "content" / "astronaut.jpg", label="astronaut", max_pixels=BIG)
    assert img.mode == "RGB" and max(img.size) == 256


def test_grayscale_and_grayscale_alpha() -> None:
    gray = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), mode="L")
    out = _pixels(load_image(_png(gray), label=LABEL, max_pixels=BIG))
    assert out[:, :, 0].tolist() == [[0, 100], [200, 255]] and (out == out[:, :, :1]).all()
    la = Image.merge("LA", [gray, Image.fromarray(np.array([[255, 0], [128, 255]], dtype=np.uint8))])
    out = _pixels(load_image(_png(la), label=LABEL, max_pixels=BIG))
    # alpha composite on white: 0 over white with alpha 0 -> 255; 200 at alpha 128 -> ~200*0.5 + 255*0.5
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    assert abs(int(out[1, 0, 0]) - 228) <= 1 and out[1, 1].tolist() == [255, 255, 255]


def test_rgba_composited_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue stays blue
    out = _pixels(load_image(_png(rgba), label=LABEL, max_pixels=BIG))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 255]


def test_palette_with_and_without_alpha() -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    out = _pixels(load_image(_png(pal), label=LABEL, max_pixels=BIG))
    assert out[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    # palette index 0 declared transparent (tRNS) -> white
    out = _pixels(load_image(_png(pal, transparency=0), label=LABEL, max_pixels=BIG))
    assert out[0].tolist() == [[255, 255, 255], [200, 100, 50]]
    # per-entry palette alpha (tRNS with several levels): entry 0 opaque, entry 1 half transparent
    out = _pixels(load_image(_png(pal, transparency=bytes([255, 128])), label=LABEL, max_pixels=BIG))
    assert out[0, 0].tolist() == [10, 20, 30]
    assert np.abs(out[0, 1].astype(int) - [228, 178, 153]).max() <= 1
    # PA (palette + alpha band) has no file format Pillow writes; it reaches _to_rgb from e.g. plugins' draft modes
    pa = pal.convert("PA")
    pa.putpixel((1, 0), (1, 0))
    assert _pixels(_to_rgb(pa))[0].tolist() == [[10, 20, 30], [255, 255, 255]]


def test_cmyk() -> None:
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putpixel((0, 0), (255, 0, 0, 0))  # cyan
    cmyk.putpixel((1, 0), (0, 0, 0, 255))  # black
    cmyk.putpixel((2, 0), (0, 0, 0, 0))  # white
    out = _pixels(load_image(_encode(cmyk, "TIFF"), label=LABEL, max_pixels=BIG))
    assert out[0].tolist() == [[0, 255, 255], [0, 0, 0], [255, 255, 255]]
    jpeg = _pixels(load_image(_encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG"), label="j", max_pixels=BIG))
    assert np.abs(jpeg.astype(int) - [0, 255, 255]).max() <= 3


def _ramp16() -> np.ndarray:
    return np.array([[0, 257, 32768], [65535, 128 * 257, 1000]], dtype=np.uint16)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I", "TIFF")],
)
def test_16_bit_scaled_to_8_bit(mode: str, fmt: str) -> None:
    ramp = _ramp16()
    if mode == "I":
        img = Image.fromarray(ramp.astype(np.int32), mode="I")
    else:
        img = Image.frombytes(mode, (3, 2), ramp.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    encoded = _encode(img, fmt)
    assert Image.open(io.BytesIO(encoded)).mode == mode  # really that mode on disk
    out = _pixels(load_image(encoded, label=LABEL, max_pixels=BIG))
    expected = np.rint(ramp / 257.0).astype(np.uint8)  # 65535 -> 255, 32768 -> 128, 1000 -> 4
    assert out[:, :, 1].tolist() == expected.tolist()
    assert expected.tolist() == [[0, 1, 128], [255, 128, 4]]


def test_float_images() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    out = _pixels(load_image(_encode(unit, "TIFF"), label=LABEL, max_pixels=BIG))
    assert out[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32), mode="F")
    out = _pixels(load_image(_encode(wide, "TIFF"), label=LABEL, max_pixels=BIG))
    assert out[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize(
    ("orientation", "size", "marker_at"),
    [(1, (4, 2), (0, 0)), (3, (4, 2), (3, 1)), (6, (2, 4), (1, 0)), (8, (2, 4), (0, 3))],
)
def test_exif_orientation(orientation: int, size: tuple[int, int], marker_at: tuple[int, int]) -> None:
    """A 4x2 red image with a blue top-left pixel, tagged with an EXIF orientation, is loaded upright."""
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    img.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = load_image(_png(img, exif=exif), label=LABEL, max_pixels=BIG)
    assert out.size == size
    assert out.getpixel(marker_at) == (0, 0, 255)
    assert sum(out.getpixel((x, y)) == (0, 0, 255) for x in range(size[0]) for y in range(size[1])) == 1


def test_exif_rotated_jpeg_sample(tmp_path: Path) -> None:
    photo = Image.open(SAMPLES / "content" / "coffee.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    photo.save(path, quality=95, exif=exif)
    out = load_image(path, label="coffee", max_pixels=BIG)
    assert out.size == (photo.height, photo.width)
    expected = np.asarray(photo.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(out).astype(int) - expected).mean() < 3


# ------------------------------------------------------------------------------------------------ conversions


def test_resize_long_side() -> None:
    img = Image.new("RGB", (200, 100))
    assert resize_long_side(img, 64).size == (64, 32)
    assert resize_long_side(Image.new("RGB", (100, 300)), 150).size == (50, 150)
    assert resize_long_side(Image.new("RGB", (1000, 3)), 10).size == (10, 1)
    same = resize_long_side(img, 200)
    assert same.size == (200, 100) and same is not img


def test_tensor_round_trip() -> None:
    img = Image.fromarray(skdata.chelsea()).resize((48, 32))
    t = image_to_tensor(img)
    assert t.shape == (1, 3, 32, 48) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert np.array_equal(np.asarray(tensor_to_image(t)), np.asarray(img))
    wild = torch.tensor([[[[-1.0, 0.5, 2.0, float("nan")]]]]).expand(1, 3, 1, 4)
    assert np.asarray(tensor_to_image(wild))[0, :, 0].tolist() == [0, 128, 255, 0]
    assert tensor_to_image(t[0]).size == (48, 32)


def test_encode_png_and_sha256() -> None:
    img = Image.fromarray(skdata.coffee()).resize((40, 30))
    data = encode_png(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(img))
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_bytes(data) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ colour


def _sample(kind: str, name: str, size: int = 64) -> torch.Tensor:
    img = load_image(SAMPLES / kind / f"{name}.jpg", label=name, max_pixels=BIG)
    return image_to_tensor(resize_long_side(img, size))


def test_luminance_transfer_keeps_content_colour_and_stylized_luminance() -> None:
    content = _sample("content", "astronaut")
    stylized = _sample("styles", "hubble")[..., : content.shape[2], : content.shape[3]]
    stylized = torch.nn.functional.interpolate(stylized, size=content.shape[2:], mode="bilinear")
    out = luminance_transfer(stylized, content, clamp=False)
    got, want_c, want_s = rgb_to_yiq(out.double()), rgb_to_yiq(content.double()), rgb_to_yiq(stylized.double())
    torch.testing.assert_close(got[:, 1:], want_c[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[:, :1], want_s[:, :1], rtol=0, atol=1e-5)
    # Clamped (the default): in [0,1], and identical wherever the unclamped result was already in range.
    clamped = luminance_transfer(stylized, content)
    assert clamped.min() >= 0 and clamped.max() <= 1 and clamped.dtype == torch.float32
    inside = ((out >= 0) & (out <= 1)).all(dim=1, keepdim=True).expand_as(out)
    assert inside.float().mean() > 0.5
    assert torch.equal(clamped[inside], out[inside])


def test_luminance_of_grey_is_grey_and_yiq_round_trips() -> None:
    grey = torch.full((1, 3, 2, 2), 0.4)
    yiq = rgb_to_yiq(grey.double())
    torch.testing.assert_close(yiq[:, 0], torch.full((1, 2, 2), 0.4, dtype=torch.float64))
    torch.testing.assert_close(yiq[:, 1:], torch.zeros(1, 2, 2, 2, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="shape mismatch"):
        luminance_transfer(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 5, 4))


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().flatten(2)[0]
    return flat.mean(1), torch.cov(flat, correction=0)


def test_match_color_equals_target_mean_and_covariance() -> None:
    source = _sample("styles", "hubble", 48)  # different size from the target: statistics only
    target = _sample("content", "coffee", 64)
    out = match_color(source, target, clamp=False)
    assert out.shape == source.shape and out.dtype == source.dtype
    mean_o, cov_o = _stats(out)
    mean_t, cov_t = _stats(target)
    # Tolerance 1e-5 absolute: float32 output rounding (~1e-7) plus the 1e-8 eigenvalue ridge.
    torch.testing.assert_close(mean_o, mean_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(cov_o, cov_t, rtol=0, atol=1e-5)
    assert not torch.allclose(_stats(source)[1], cov_t, atol=1e-3)  # it really changed something
    assert torch.equal(match_color(source, target), out.clamp(0, 1))  # default: the same, clamped to [0,1]


def test_match_color_batched_with_broadcast_target_and_flat_source() -> None:
    sources = torch.stack([_sample("content", "astronaut", 32)[0], _sample("styles", "ihc", 32)[0]])
    target = _sample("content", "chelsea", 32)
    out = match_color(sources, target, clamp=False)
    for i in range(2):
        torch.testing.assert_close(_stats(out[i : i + 1])[0], _stats(target)[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(_stats(out[i : i + 1])[1], _stats(target)[1], rtol=0, atol=1e-5)
    flat = torch.full((1, 3, 8, 8), 0.3)  # zero covariance: the ridge keeps it finite; result is target's mean
    got = match_color(flat, target, clamp=False)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, :, 0, 0].double(), _stats(target)[0], rtol=0, atol=1e-5)


def test_too_thin_for_vgg_at_its_size_is_refused() -> None:
    """A 10:1 photo resized to long side 32 would be 3 px high: refused by name, not by VGG's pooling."""
    data = _encode(Image.new("RGB", (400, 40)), "PNG")
    with pytest.raises(ImageError) as info:
        load_image(data, label="pair p: content 'c.png'", max_pixels=BIG, size=32)
    assert str(info.value).startswith("pair p: content 'c.png': 400x40 resized to long side 32 is 32x3: ")
    assert "raise size to 160" in str(info.value)
    assert load_image(data, label="ok", max_pixels=BIG, size=160).size == (400, 40)
