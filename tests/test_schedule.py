"""The coarse-to-fine schedule: from COARSE_TO_FINE_FROM px the default `scales` is coarse-to-fine, `iterations` is
every step across the scales (most at the coarse ones), and the record says which scales ran with how many steps."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import nst.engine.optimize
from nst.api import stylize
from nst.engine.optimize import PairProblem, ProgressEvent, finer_start, resize, stylize_batch
from nst.manifest import load_manifest
from nst.params import StyleParams, resolve_params
from nst.schedule import (
    COARSE_TO_FINE_FROM,
    START_DETAIL,
    START_INIT,
    START_UPSAMPLED,
    Scale,
    default_scales,
    scale_iterations,
    schedule,
)
from tests.fake_engine import FakeEngine
from tests.tiny_extractor import TinyExtractor

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"content_layers": ["block3_conv1"], "style_layers": ["block1_conv1", "block2_conv1"]}


def test_default_scales_follow_the_size_and_an_explicit_value_wins() -> None:
    assert COARSE_TO_FINE_FROM == 1024
    # Below the threshold every size keeps one scale: its results are what they were (same steps, same loop).
    assert {StyleParams(size=s).scales for s in range(16, COARSE_TO_FINE_FROM)} == {1}
    assert [StyleParams(size=s).scales for s in (1024, 1500, 2047, 2048, 4096)] == [3, 3, 3, 4, 5]
    assert [default_scales(s) for s in (1024, 2048)] == [3, 4]
    assert StyleParams(size=2048, scales=1).scales == 1
    assert resolve_params({"size": 1024, "scales": 2}).scales == 2
    assert resolve_params({"size": 1024, "scales": None}).scales == 3  # null: unset
    assert resolve_params({"preset": "gatys", "size": 2048}).scales == 4


def test_a_manifest_pair_gets_the_schedule_of_its_size(tmp_path: Path) -> None:
    for folder, name in (("content", "astronaut.jpg"), ("styles", "brick.jpg")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes((ROOT / "manifests/images" / folder / name).read_bytes())
    (tmp_path / "m.yaml").write_text(
        "version: 1\noutput: out/\ndefaults: {size: 2048}\npairs:\n"
        "  - {id: print, content: content/astronaut.jpg, style: styles/brick.jpg}\n"
        "  - {id: screen, content: content/astronaut.jpg, style: styles/brick.jpg, size: 512}\n"
        "  - {id: pinned, content: content/astronaut.jpg, style: styles/brick.jpg, scales: 1}\n"
    )
    scales = {p.id: p.params.scales for p in load_manifest(str(tmp_path / "m.yaml")).pairs}
    assert scales == {"print": 4, "screen": 1, "pinned": 1}


@pytest.mark.parametrize("scales", range(1, 9))
def test_iterations_are_all_steps_each_finer_scale_about_half(scales: int) -> None:
    for iterations in range(scales, 400):
        counts = scale_iterations(iterations, scales)
        assert sum(counts) == iterations and min(counts) >= 1
        assert counts == sorted(counts, reverse=True)
        if iterations >= 4 * 2**scales:
            for coarse, fine in itertools.pairwise(counts):
                assert abs(coarse - 2 * fine) <= 3
    assert scale_iterations(500, 3) == [285, 143, 72]


def test_schedule_sizes_and_steps() -> None:
    # one scale: every step at the output size, from `init`
    assert schedule(683, 1024, 1, 500, "content") == [Scale(683, 1024, 1.0, 500, START_INIT)]
    assert schedule(1024, 683, 3, 500, "content") == [
        Scale(256, 171, 0.25, 285, START_INIT),
        Scale(512, 342, 0.5, 143, START_DETAIL),
        Scale(1024, 683, 1.0, 72, START_DETAIL),
    ]
    assert [s.height for s in schedule(64, 64, 4, 10, "content")] == [32, 64]  # under MIN_SCALE_SIDE: dropped
    assert schedule(1024, 1024, 3, 2, "content") == [  # fewer steps than scales
        Scale(512, 512, 0.5, 1, START_INIT),
        Scale(1024, 1024, 1.0, 1, START_DETAIL),
    ]
    for init in ("noise", "style"):  # no photo detail is put into a start that was not the photo
        assert [s.start for s in schedule(1024, 1024, 3, 500, init)] == [START_INIT, START_UPSAMPLED, START_UPSAMPLED]


def test_finer_start_puts_back_the_contents_band() -> None:
    coarse, fine = Scale(16, 12, 0.5, 1, START_INIT), Scale(32, 24, 1.0, 1, START_DETAIL)
    contents = _image(3, 32, 24)
    coarse_content = resize(contents, 16, 12)  # a coarse result that is the content itself
    assert torch.allclose(finer_start(coarse_content, contents, coarse, fine), contents, atol=1e-5)
    upsampled = finer_start(coarse_content, contents, coarse, replace(fine, start=START_UPSAMPLED))
    assert torch.equal(upsampled, resize(coarse_content, 32, 24).clamp(0, 1))
    other = _image(4, 16, 12)  # any coarse result: the band is added, the result stays in range
    band = contents - resize(resize(contents, 16, 12), 32, 24)
    assert torch.allclose(
        finer_start(other, contents, coarse, fine), (resize(other, 32, 24) + band).clamp(0, 1), atol=1e-5
    )


def test_the_loop_runs_the_schedule() -> None:
    params = resolve_params({**LAYERS, "scales": 3, "iterations": 7, "log_every": 100})
    problem = PairProblem(content=_image(1, 128, 96), styles=[_image(2, 40, 40)], params=params)
    events: list[ProgressEvent] = []
    (result,) = stylize_batch([problem], TinyExtractor(), callback=events.append)
    assert result.status == "succeeded" and result.iterations == 7
    ran = [(e.scale, e.height, e.width) for e in events]
    planned = schedule(128, 96, 3, 7, "content")
    assert ran == [(k, s.height, s.width) for k, s in enumerate(planned) for _ in range(s.iterations)]
    assert [e.iteration for e in events] == list(range(1, 8)) and {e.total_iterations for e in events} == {7}


@pytest.mark.parametrize("init", ["content", "noise"])
def test_each_finer_scale_starts_as_the_schedule_says(monkeypatch: pytest.MonkeyPatch, init: str) -> None:
    starts: list[tuple[Scale, Scale]] = []

    def spy(x01: torch.Tensor, contents: torch.Tensor, coarse: Scale, fine: Scale) -> torch.Tensor:
        starts.append((coarse, fine))
        assert x01.shape[-2:] == (coarse.height, coarse.width) and contents.shape[-2:] == (128, 96)
        return finer_start(x01, contents, coarse, fine)

    monkeypatch.setattr(nst.engine.optimize, "finer_start", spy)
    params = resolve_params({**LAYERS, "scales": 3, "iterations": 6, "init": init})
    problem = PairProblem(content=_image(1, 128, 96), styles=[_image(2, 40, 40)], params=params)
    (result,) = stylize_batch([problem], TinyExtractor())
    assert result.status == "succeeded"
    planned = schedule(128, 96, 3, 6, init)
    assert starts == list(itertools.pairwise(planned))
    assert {fine.start for _, fine in starts} == {START_DETAIL if init == "content" else START_UPSAMPLED}


def test_the_record_says_what_schedule_ran() -> None:
    content = ROOT / "manifests/images/content/astronaut.jpg"
    style = ROOT / "manifests/images/styles/brick.jpg"
    big = stylize(content=content, styles=style, size=1024, iterations=500, stylizer=FakeEngine())  # type: ignore[arg-type]
    assert big.record["params"]["scales"] == 3
    assert big.record["schedule"] == [
        {"height": 256, "width": 256, "factor": 0.25, "iterations": 285, "start": START_INIT},
        {"height": 512, "width": 512, "factor": 0.5, "iterations": 143, "start": START_DETAIL},
        {"height": 1024, "width": 1024, "factor": 1.0, "iterations": 72, "start": START_DETAIL},
    ]
    small = stylize(content=content, styles=style, size=256, iterations=20, stylizer=FakeEngine())  # type: ignore[arg-type]
    assert small.record["schedule"] == [
        {"height": 256, "width": 256, "factor": 1.0, "iterations": 20, "start": START_INIT}
    ]


def _image(seed: int, h: int, w: int) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_the_scales_flag_says_its_default_follows_the_size() -> None:
    """`--scales` has no fixed default (unset follows the size), so its help says unset, not 1; others keep theirs."""
    import argparse

    from nst.cli import build_parser

    parser = build_parser()
    stylize_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["stylize"]
    helps = {a.dest: a.help or "" for a in stylize_parser._actions}
    assert helps["scales"].endswith("(default: unset)") and f"below size {COARSE_TO_FINE_FROM}" in helps["scales"]
    assert helps["iterations"].endswith("(default: 500)")
