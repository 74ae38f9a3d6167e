"""Bad inputs, one suite: each is refused with one line naming the pair (or location) and the field, ends in a failed
state, leaves nothing half-written, and never shows a secret from outside the allowed input roots."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from nst import storage
from nst.cli import main
from nst.errors import ManifestError
from nst.manifest import load_manifest
from nst.run import run
from nst.run_options import RunOptions
from nst_testing.paths import SAMPLES

MARKER = "NST-SECRET-MARKER-5f2c9d"
SECRET_BYTES = f"aws_secret_access_key = {MARKER}\n".encode()
SECRET_SHA = hashlib.sha256(SECRET_BYTES).hexdigest()

HEAD = "version: 1\nname: bad\noutput: out\ndefaults: {size: 32, iterations: 1}\npairs:\n"
PAIR = "  - id: p1\n    content: c.jpg\n    style: s.jpg\n"


@dataclass
class Workspace:
    root: Path  # holds secret.txt and, below it, the manifest's directory
    manifest_dir: Path

    @property
    def secret(self) -> Path:
        return self.root / "secret.txt"


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A manifest directory with c.jpg and s.jpg; a secret file beside it, outside the default input root."""
    monkeypatch.delenv("NST_INPUT_ROOTS", raising=False)  # the default: only the manifest's own directory
    manifest_dir = tmp_path / "job"
    manifest_dir.mkdir()
    (manifest_dir / "c.jpg").write_bytes((SAMPLES / "content" / "chelsea.jpg").read_bytes())
    (manifest_dir / "s.jpg").write_bytes((SAMPLES / "styles" / "brick.jpg").read_bytes())
    (tmp_path / "secret.txt").write_bytes(SECRET_BYTES)
    return Workspace(tmp_path, manifest_dir)


def assert_no_secret(ws: Workspace, *texts: str) -> None:
    """Neither the marker, nor the secret's sha256 or size, in these texts or in any file the run wrote."""
    written = [p for p in ws.manifest_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".md", ".txt")]
    for text in (*texts, *(p.read_text(errors="replace") for p in written)):
        assert MARKER not in text and SECRET_SHA not in text
        assert f"{len(SECRET_BYTES)} bytes" not in text


def assert_nothing_written(ws: Workspace) -> None:
    out = ws.manifest_dir / "out"
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [p for p in leftovers if p.suffix == ".png" or ".nst-tmp" in p.name or p.name.startswith(".")]


# --------------------------------------------------------------------------------- refused before any GPU work

# (case id, manifest text with {secret}, text the one-line message holds (location and field), YAML line or None)
VALIDATE_CASES: list[tuple[str, str, str, int | None]] = [
    ("unknown-content-layer", PAIR + "    content_layers: [block9_conv9]\n", "pairs[0]: content_layers", 9),
    ("unknown-style-alias", PAIR + "    style_layers: [conv9_1]\n", "pairs[0]: style_layers", 9),
    (
        "layer-not-in-vgg16",
        PAIR + "    network: vgg16\n    weights: c.jpg\n    content_layers: [block5_conv4]\n",
        "pairs[0]: content_layers",
        11,
    ),
    ("seed-too-large", PAIR + "    seed: 18446744073709551616\n", "pairs[0].seed", 9),
    ("seed-negative", PAIR + "    seed: -1\n", "pairs[0].seed", 9),
    ("integer-5000-digits", PAIR + "    iterations: " + "9" * 5000 + "\n", "pairs[0].iterations", 9),
    ("size-under-16", PAIR + "    size: 8\n", "pairs[0].size", 9),
    ("style-size-under-16", PAIR + "    style_size: 4\n", "pairs[0].style_size", 9),
    ("save-every-too-often", PAIR + "    iterations: 1000\n    save_every: 1\n", "pairs[0]: save_every", 10),
    ("iterations-zero", PAIR + "    iterations: 0\n", "pairs[0].iterations", 9),
    ("lr-infinite", PAIR + "    lr: .inf\n", "pairs[0].lr", 9),
    ("style-weight-negative", PAIR + "    style_weight: -1\n", "pairs[0].style_weight", 9),
    ("unknown-parameter", PAIR + "    colour: red\n", "pairs[0].colour", 9),
    ("unknown-preset", PAIR + "    preset: picasso\n", "pairs[0].preset", 9),
    ("bad-pooling", PAIR + "    pooling: median\n", "pairs[0].pooling", 9),
    ("bad-precision", PAIR + "    precision: fp8\n", "pairs[0].precision", 9),
    (
        "style-blend-count",
        "  - id: p1\n    content: c.jpg\n    style: [s.jpg, s.jpg]\n    style_blend: [1, 2, 3]\n",
        "pairs[0].style_blend",
        9,
    ),
    ("layer-weights-count", PAIR + "    style_layer_weights: [1, 2]\n", "pairs[0]: style_layer_weights", 9),
    ("content-outside-roots", "  - id: p1\n    content: {secret}\n    style: s.jpg\n", "pairs[0].content", 7),
    ("style-outside-roots", "  - id: p1\n    content: c.jpg\n    style: ../secret.txt\n", "pairs[0].style", 8),
    ("weights-outside-roots", PAIR + "    weights: ../secret.txt\n", "pairs[0].weights", 9),
    (
        "grid-glob-outside-roots",
        "  - {{id: p1, content: c.jpg, style: s.jpg}}\ngrid:\n  contents: ['../*.txt']\n  styles: [s.jpg]\n",
        "grid.contents[0]",
        8,
    ),
    ("content-missing", "  - id: p1\n    content: nope.jpg\n    style: s.jpg\n", "pairs[0].content", 7),
    ("content-is-a-directory", "  - id: p1\n    content: sub\n    style: s.jpg\n", "pairs[0].content", 7),
    ("weights-missing", PAIR + "    weights: vgg.pth\n", "pairs[0].weights", 9),
    ("content-over-byte-limit", PAIR.replace("c.jpg", "big.jpg"), "pairs[0].content", 7),
    ("weights-over-byte-limit", PAIR + "    weights: big.jpg\n", "pairs[0].weights", 9),
    ("unsafe-id", PAIR.replace("id: p1", "id: ../p1"), "pairs[0].id", 6),
    ("duplicate-key", PAIR + "    style: s.jpg\n", "pairs[0].style", 9),
    ("bad-scheme", "  - id: p1\n    content: http://example.com/c.jpg\n    style: s.jpg\n", "pairs[0].content", 7),
    ("output-escapes", PAIR, "output", 3),
]


def _case_text(ws: Workspace, case: str, body: str) -> str:
    head = HEAD.replace("output: out", "output: ../out") if case == "output-escapes" else HEAD
    return head + body.replace("{secret}", str(ws.secret)).replace("{{", "{").replace("}}", "}")


@pytest.mark.parametrize(("case", "body", "where", "line"), VALIDATE_CASES, ids=[c[0] for c in VALIDATE_CASES])
def test_refused_by_validate_and_by_the_run_path(
    ws: Workspace,
    case: str,
    body: str,
    where: str,
    line: int | None,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    engine_calls: list[list[str]],
) -> None:
    (ws.manifest_dir / "sub").mkdir()
    (ws.manifest_dir / "big.jpg").write_bytes(b"\xff" * 40_000)
    monkeypatch.setenv("NST_MAX_INPUT_BYTES", "30000" if case == "content-over-byte-limit" else str(64 * 2**20))
    monkeypatch.setenv("NST_MAX_WEIGHTS_BYTES", "2048" if case == "weights-over-byte-limit" else str(2**30))
    manifest = ws.manifest_dir / "m.yaml"
    manifest.write_text(_case_text(ws, case, body))
    caplog.set_level(logging.DEBUG)

    code = main(["validate", str(manifest)])
    out, err = capsys.readouterr()
    assert code != 0, out
    message = err.strip().removeprefix("nst: error: ")
    assert "\n" not in message and "Traceback" not in err, err  # one line: one problem, no traceback
    assert message.startswith(f"{manifest}: {where}"), message
    if line is not None:
        assert message.endswith(f"(line {line})"), message

    with pytest.raises(ManifestError) as info:  # the run path (nst run --no-prefect) fails before any work
        run(str(manifest), RunOptions())
    assert str(info.value) == message
    assert engine_calls == []
    assert not (ws.manifest_dir / "out").exists() and not (ws.root / "out").exists()
    assert_no_secret(ws, out, err, caplog.text, str(info.value))


def test_s3_manifest_cannot_read_a_local_file(
    s3_env: Any, s3_bucket: str, ws: Workspace, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 2: an S3-hosted manifest naming a worker's local file is refused, the file never opened."""
    uri = f"s3://{s3_bucket}/jobs/m.yaml"
    storage.write_bytes(f"s3://{s3_bucket}/jobs/s.jpg", (SAMPLES / "styles" / "brick.jpg").read_bytes())
    storage.write_bytes(uri, (HEAD + f"  - id: p1\n    content: {ws.secret}\n    style: s.jpg\n").encode())
    opened: list[str] = []
    real_stat = storage.stat

    def spy(target: str, **kwargs: Any) -> storage.ObjectInfo:
        opened.append(target)
        return real_stat(target, **kwargs)

    monkeypatch.setattr(storage, "stat", spy)
    with pytest.raises(ManifestError) as info:
        run(uri, RunOptions())
    message = str(info.value)
    assert message == (
        f"{uri}: pairs[0].content: {ws.secret} is outside the allowed input roots (pair p1): inputs must lie under "
        "the manifest's directory or a root in the worker's NST_INPUT_ROOTS (line 7)"
    )
    assert str(ws.secret) not in opened
    assert_no_secret(ws, message, caplog.text)
    monkeypatch.setenv("NST_INPUT_ROOTS", str(ws.root))  # a worker that allows that directory reads it
    assert load_manifest(uri).pairs[0].content == str(ws.secret)


def test_an_absolute_input_is_one_stat_not_a_walk(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 2: `content: /a.jpg` (root allowed) stats that one file; nothing lists or walks its parent."""
    monkeypatch.setenv("NST_INPUT_ROOTS", "/")

    def no_walk(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("walked the filesystem")

    monkeypatch.setattr(os, "walk", no_walk)
    monkeypatch.setattr(os, "scandir", no_walk)
    monkeypatch.setattr(storage, "list_prefix", no_walk)
    manifest = ws.manifest_dir / "m.yaml"
    manifest.write_text(HEAD + "  - id: p1\n    content: /a-file-that-is-not-there.jpg\n    style: s.jpg\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(str(manifest))
    assert str(info.value).endswith("pairs[0].content: not found: /a-file-that-is-not-there.jpg (pair p1) (line 7)")


def test_symlink_out_of_the_roots_is_refused(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    """A link inside the manifest's directory to a file outside it is judged by where it points."""
    (ws.manifest_dir / "link.jpg").symlink_to(ws.secret)
    manifest = ws.manifest_dir / "m.yaml"
    manifest.write_text(HEAD + PAIR.replace("c.jpg", "link.jpg"))
    with pytest.raises(ManifestError) as info:
        run(str(manifest), RunOptions())
    assert str(info.value).startswith(f"{manifest}: pairs[0].content: {ws.manifest_dir / 'link.jpg'} is outside")
    assert str(info.value).endswith("(line 7)") and "\n" not in str(info.value)
    assert_no_secret(ws, str(info.value), caplog.text)


def test_weights_override_outside_the_roots_is_refused(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    """`--weights` (or the flow form's overrides) is an input too: confined like the manifest's own."""
    manifest = ws.manifest_dir / "m.yaml"
    manifest.write_text(HEAD + PAIR)
    with pytest.raises(ManifestError) as info:
        run(str(manifest), RunOptions(), overrides={"weights": str(ws.secret)})
    assert f"defaults.weights: {ws.secret} is outside the allowed input roots" in str(info.value)
    code = main(["run", "--no-prefect", str(manifest), "--weights", str(ws.secret)])
    out, err = capsys.readouterr()
    assert code != 0 and "is outside the allowed input roots" in err and "Traceback" not in err
    assert not (ws.manifest_dir / "out").exists()
    assert_no_secret(ws, str(info.value), out, err)


# --------------------------------------------------------------------------------- refused per pair, at run time


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _ppm() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, format="PPM")
    return buf.getvalue()


JPEG = (SAMPLES / "content" / "chelsea.jpg").read_bytes()

# (case id, which input is bad, its bytes, what the pair's error message holds)
RUN_CASES: list[Any] = [
    ("content-not-an-image", "content", b"half an upload", "not an image"),
    ("content-truncated", "content", JPEG[: len(JPEG) // 3], "truncated"),
    ("content-empty", "content", b"", "empty"),
    ("content-format-not-allowed", "content", _ppm(), "accepted formats"),
    ("content-aspect-40-to-1", "content", _png((1200, 30)), "aspect ratio"),
    ("style-not-an-image", "style", b"<html>not found</html>", "not an image"),
    ("style-aspect-1-to-40", "style", _png((30, 1200)), "aspect ratio"),
    # 10:1 at size 32 is 32x3 px: VGG's pooling would raise from deep inside torch
    ("content-too-thin-at-size", "content", _png((400, 40)), "VGG needs at least 16 px"),
]


@pytest.mark.parametrize(
    ("case", "role", "data", "reason"), RUN_CASES, ids=[(c.values if hasattr(c, "values") else c)[0] for c in RUN_CASES]
)
def test_bad_image_fails_its_pair_with_a_record(
    ws: Workspace,
    case: str,
    role: str,
    data: bytes,
    reason: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = "c.jpg" if role == "content" else "s.jpg"
    (ws.manifest_dir / name).write_bytes(data)
    manifest = ws.manifest_dir / "m.yaml"
    manifest.write_text(HEAD + PAIR)
    caplog.set_level(logging.DEBUG)
    code = main(["run", "--no-prefect", str(manifest)])
    out, err = capsys.readouterr()
    assert code != 0
    record = json.loads((ws.manifest_dir / "out" / "p1.json").read_text())
    assert record["status"] == "failed"
    message = record["error"]["message"]
    assert "\n" not in message and message.startswith(f"pair p1: {role} "), message
    assert str(ws.manifest_dir / name) in message and reason in message
    assert "Traceback" not in err and "Traceback" not in out
    assert_nothing_written(ws)
    assert_no_secret(ws, out, err, caplog.text)


def test_too_many_pixels_fails_its_pair(ws: Workspace) -> None:
    manifest = ws.manifest_dir / "m.yaml"
    manifest.write_text(HEAD + PAIR + "    max_input_pixels: 100\n")
    summary = run(str(manifest), RunOptions())
    (record,) = summary.records
    assert record.status == "failed" and record.error is not None
    assert record.error["message"].startswith("pair p1: content ") and "max_pixels 100" in record.error["message"]
    assert_nothing_written(ws)


# --------------------------------------------------------------------------- grids: one photo never breaks a night


def _grid(ws: Workspace, contents: str) -> Path:
    manifest = ws.manifest_dir / "m.yaml"
    manifest.write_text(
        "version: 1\noutput: out\ndefaults: {size: 32, iterations: 1}\n"
        f"grid:\n  contents: [{contents}]\n  styles: [s.jpg]\n"
    )
    return manifest


def test_grid_ids_colliding_after_cleaning_are_made_unique(ws: Workspace) -> None:
    photos = ws.manifest_dir / "incoming"
    photos.mkdir()
    for name in ("IMG 1.jpg", "IMG_1.jpg", "IMG-1.jpg"):
        (photos / name).write_bytes(JPEG)
    manifest = _grid(ws, "'incoming/*.jpg'")
    first = [p.id for p in load_manifest(str(manifest)).pairs]
    assert len(set(first)) == 3 and "IMG_1__s" in first and "IMG-1__s" in first
    (cleaned,) = [i for i in first if i not in ("IMG_1__s", "IMG-1__s")]
    assert cleaned.startswith("IMG_1-") and cleaned.endswith("__s") and len(cleaned) == len("IMG_1-__s") + 8
    (photos / "IMG 2.jpg").write_bytes(JPEG)  # a new photo the next night changes no existing id
    assert set(first) < {p.id for p in load_manifest(str(manifest)).pairs}


def test_grid_glob_matching_nothing_is_a_warning(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _grid(ws, "'empty/*.jpg', c.jpg")
    loaded = load_manifest(str(manifest))
    assert [p.id for p in loaded.pairs] == ["c__s"]
    assert loaded.warnings == ["grid.contents[0]: 'empty/*.jpg' matched no files (line 5)"]
    assert main(["validate", str(manifest)]) == 0
    assert "warning: grid.contents[0]: 'empty/*.jpg' matched no files (line 5)" in capsys.readouterr().out
    assert main(["run", "--no-prefect", "--dry-run", str(manifest)]) == 0  # the run goes on, and says it
    assert "warning: grid.contents[0]: 'empty/*.jpg' matched no files (line 5)" in capsys.readouterr().err


def test_grid_image_extensions_match_in_any_case(ws: Workspace) -> None:
    photos = ws.manifest_dir / "incoming"
    photos.mkdir()
    for name in ("PHOTO.JPG", "small.jpg", "Mixed.Jpg", "notes.TXT"):
        (photos / name).write_bytes(JPEG)
    ids = sorted(p.id for p in load_manifest(str(_grid(ws, "'incoming/*.jpg'"))).pairs)
    assert ids == ["Mixed__s", "PHOTO__s", "small__s"]


# --------------------------------------------------------------------------- file contents never reach a message

KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the shape of an AWS secret key: exactly 40 characters
WORD = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"  # the same, where YAML wants a name (tag, anchor, key, id)
BODY = "version: 1\noutput: out\npairs:\n  - {id: p1, content: c.jpg, style: s.jpg}\n"

# (case id, file text): each parses far enough to reach a check, and the secret is a value, tag, anchor or key.
LEAK_CASES: list[tuple[str, str]] = [
    ("whole-file-scalar", f"{KEY}\n"),
    ("env-file", f"AWS_SECRET_ACCESS_KEY={KEY}\nAWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE\n"),
    ("top-level-list", f"- {KEY}\n"),
    ("version", BODY.replace("version: 1", f"version: {KEY}")),
    ("version-number", BODY.replace("version: 1", f"version: {WORD[:9]}7")),
    ("name-not-a-string", BODY + f"name: [{KEY}]\n"),
    ("pairs-scalar", f"version: 1\noutput: out\npairs: {KEY}\n"),
    ("pair-scalar", f"version: 1\noutput: out\npairs:\n  - {KEY}\n"),
    ("defaults-scalar", BODY + f"defaults: {KEY}\n"),
    ("bad-id", BODY.replace("id: p1", f"id: '{KEY}'")),
    ("preset", BODY.replace("style: s.jpg", f"style: s.jpg, preset: '{KEY}'")),
    ("layer", BODY.replace("style: s.jpg", f"style: s.jpg, content_layers: ['{KEY}']")),
    ("optimizer", BODY.replace("style: s.jpg", f"style: s.jpg, optimizer: '{KEY}'")),
    ("size", BODY.replace("style: s.jpg", f"style: s.jpg, size: '{KEY}'")),
    ("output-scheme", BODY.replace("output: out", f"output: 'http://{KEY}'")),
    ("output-no-bucket", BODY.replace("output: out", f"output: 's3:///{KEY}'")),
    ("unknown-key", BODY + f"{WORD}: 1\n"),
    ("unknown-key-slash", BODY + f"'{KEY}': 1\n"),
    ("tag", BODY + f"x: !{WORD} 1\n"),
    ("undefined-alias", BODY + f"x: *{WORD}\n"),
    ("duplicate-key", BODY + f"'{KEY}': 1\n'{KEY}': 2\n"),
]


@pytest.mark.parametrize(("case", "text"), LEAK_CASES, ids=[c[0] for c in LEAK_CASES])
def test_file_contents_never_reach_a_message(
    ws: Workspace, case: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 18.1: a file that is not a manifest (or a manifest with a secret in it) is refused by type and line."""
    manifest = ws.manifest_dir / "m.yaml"
    manifest.write_text(text)
    code = main(["validate", str(manifest)])
    out, err = capsys.readouterr()
    assert code == 1 and err.startswith(f"nst: error: {manifest}: ") and "Traceback" not in err, err
    with pytest.raises(ManifestError) as info:  # the run path (and so the flow's Failed state) says the same
        run(str(manifest), RunOptions())
    assert f"nst: error: {info.value}\n" == err
    for piece in (KEY, WORD, KEY[:12], WORD[:12], "AKIAIOSFODNN7EXAMPLE"):
        assert piece not in out + err, err


def test_a_scalar_file_names_its_type_and_line(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = ws.manifest_dir / "k.yaml"
    manifest.write_text(f"{KEY}\n")
    assert main(["validate", str(manifest)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"nst: error: {manifest}: top level must be a mapping (version, output, pairs, ...), got a string (line 1)\n"
    )


@pytest.mark.parametrize("name", ["k", "k.txt", "k.json", "k.yaml.bak"])
def test_a_manifest_must_be_yaml_by_name(ws: Workspace, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`printf '<key>' > k; nst validate k`: refused by its name, before it is read."""
    path = ws.manifest_dir / name
    path.write_text(f"{KEY}\n")
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"nst: error: {path}: a manifest must be a .yaml or .yml file\n"
    for ok in ("m.yml", "M.YAML"):
        (ws.manifest_dir / ok).write_text(HEAD + PAIR)
        assert len(load_manifest(str(ws.manifest_dir / ok)).pairs) == 1
