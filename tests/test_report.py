"""The markdown report: pictures embedded as small data: URIs (local and S3 alike), no paths or links, text escaped."""

from __future__ import annotations

import base64
import io
import re

from PIL import Image

from flows import report
from nst import storage
from nst.run import PairRecord
from nst_testing.paths import SAMPLES

DATA_URI = re.compile(r"!\[[^\]]*\]\((data:image/(?:jpeg|png);base64,[A-Za-z0-9+/=]+)\)")


def _records(root: str) -> list[PairRecord]:
    """A succeeded pair and a failed one whose error text carries markdown and HTML."""
    uris = {}
    for rel, src in {
        "in/c.jpg": SAMPLES / "content" / "chelsea.jpg",
        "in/s.jpg": SAMPLES / "styles" / "brick.jpg",
        "out/ok.png": SAMPLES / "content" / "coffee.jpg",
    }.items():
        uris[rel] = storage.join(root, rel)
        storage.write_bytes(uris[rel], src.read_bytes())
    history = [{"iteration": i, "content": 10.0 / i, "style": 5.0 / i, "tv": 0.0, "total": 15.0 / i} for i in (1, 2, 3)]
    ok = PairRecord(
        id="ok",
        status="succeeded",
        content_uri=uris["in/c.jpg"],
        style_uris=[uris["in/s.jpg"]],
        image_uri=uris["out/ok.png"],
        json_uri=storage.join(root, "out/ok.json"),
        final_losses={"content": 1.0, "style": 2.0, "tv": 0.0, "total": 3.0},
        history=history,
    )
    bad = PairRecord(
        id="bad",
        status="failed",
        content_uri=uris["in/c.jpg"],
        style_uris=[uris["in/s.jpg"]],
        image_uri=None,
        json_uri=storage.join(root, "out/bad.json"),
        error={
            "type": "ImageError",
            "message": "pair bad: <img src=x onerror=alert(1)> [click](http://evil.example) *boom* | `x`\n# heading",
            "iteration": None,
        },
    )
    return [ok, bad]


def test_report_embeds_thumbnails_and_the_plot_as_data_uris(storage_root: str) -> None:
    records = _records(storage_root)
    png = report.loss_curves_png(records)
    assert png is not None
    curves_uri = storage.join(storage_root, "out/_runs/r-losses.png")
    storage.write_bytes(curves_uri, png)
    summary = storage.join(storage_root, "out/_runs/r.json")
    markdown = report.markdown_report(
        name="night", run_id="r", records=records, summary_uri=summary, curves_url=report.display_url(curves_uri)
    )
    assert "Run summary: \\_runs/r\\.json under the output" in markdown
    images = DATA_URI.findall(markdown)
    # ok: content, style, result; bad: content, style; and the loss curves.
    assert len(images) == 6 and markdown.count("](") == 6
    for uri in images[:5]:
        data = base64.b64decode(uri.split(",", 1)[1])
        with Image.open(io.BytesIO(data)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= report.THUMB_PX
        assert len(data) < 16_000
    assert images[5].startswith("data:image/png;base64,")
    bucket_or_dir = storage_root.removeprefix("s3://").split("/")[0] if storage.is_s3(storage_root) else storage_root
    assert bucket_or_dir not in markdown  # no worker path, no bucket, no presigned link
    assert "http" not in markdown.replace("http://evil", "")
    assert "X-Amz" not in markdown and "file://" not in markdown


def test_error_text_is_fully_escaped(tmp_path: str) -> None:
    markdown = report.markdown_report(
        name="n", run_id="r", records=_records(str(tmp_path)), summary_uri=None, curves_url=None
    )
    (line,) = [x for x in markdown.splitlines() if x.startswith("- **bad**")]
    assert "<img" not in markdown and "&lt;img src=x onerror=alert\\(1\\)&gt;" in line
    assert "[click](" not in markdown and "\\[click\\]\\(http://evil\\.example\\)" in line
    assert "\\*boom\\*" in line and "\\|" in line and "\\`x\\`" in line and "\\# heading" in line


def test_an_unreadable_picture_leaves_its_cell_empty(tmp_path: str) -> None:
    records = _records(str(tmp_path))
    storage.write_bytes(records[0].image_uri or "", b"not an image")
    markdown = report.markdown_report(name="n", run_id="r", records=records, summary_uri=None, curves_url=None)
    assert len(DATA_URI.findall(markdown)) == 4 and str(tmp_path) not in markdown
