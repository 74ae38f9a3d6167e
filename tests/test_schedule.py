"""The coarse-to-fine schedule: from COARSE_TO_FINE_FROM px the default `scales` is coarse-to-fine, `iterations` is
every step across the scales (most at the coarse ones), and the record says which scales ran with how many steps."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from nst.api import stylize
from nst.engine.optimize import PairProblem, ProgressEvent, stylize_batch
from nst.manifest import load_manifest
from nst.params import StyleParams, resolve_params
from nst.schedule import COARSE_TO_FINE_FROM, Scale, default_scales, scale_iterations, schedule
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
    assert schedule(683, 1024, 1, 500) == [Scale(683, 1024, 1.0, 500)]  # one scale: every step at the output size
    assert schedule(1024, 683, 3, 500) == [
        Scale(256, 171, 0.25, 285),
        Scale(512, 342, 0.5, 143),
        Scale(1024, 683, 1.0, 72),
    ]
    assert [s.height for s in schedule(64, 64, 4, 10)] == [32, 64]  # under MIN_SCALE_SIDE: dropped
    assert schedule(1024, 1024, 3, 2) == [Scale(512, 512, 0.5, 1), Scale(1024, 1024, 1.0, 1)]  # fewer steps


def test_the_loop_runs_the_schedule() -> None:
    params = resolve_params({**LAYERS, "scales": 3, "iterations": 7, "log_every": 100})
    problem = PairProblem(content=_image(1, 128, 96), styles=[_image(2, 40, 40)], params=params)
    events: list[ProgressEvent] = []
    (result,) = stylize_batch([problem], TinyExtractor(), callback=events.append)
    assert result.status == "succeeded" and result.iterations == 7
    ran = [(e.scale, e.height, e.width) for e in events]
    planned = schedule(128, 96, 3, 7)
    assert ran == [(k, s.height, s.width) for k, s in enumerate(planned) for _ in range(s.iterations)]
    assert [e.iteration for e in events] == list(range(1, 8)) and {e.total_iterations for e in events} == {7}


def test_the_record_says_what_schedule_ran() -> None:
    content = ROOT / "manifests/images/content/astronaut.jpg"
    style = ROOT / "manifests/images/styles/brick.jpg"
    big = stylize(content=content, styles=style, size=1024, iterations=500, stylizer=FakeEngine())  # type: ignore[arg-type]
    assert big.record["params"]["scales"] == 3
    assert big.record["schedule"] == [
        {"height": 256, "width": 256, "factor": 0.25, "iterations": 285},
        {"height": 512, "width": 512, "factor": 0.5, "iterations": 143},
        {"height": 1024, "width": 1024, "factor": 1.0, "iterations": 72},
    ]
    small = stylize(content=content, styles=style, size=256, iterations=20, stylizer=FakeEngine())  # type: ignore[arg-type]
    assert small.record["schedule"] == [{"height": 256, "width": 256, "factor": 1.0, "iterations": 20}]


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
