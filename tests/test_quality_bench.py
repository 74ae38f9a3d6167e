"""bench/quality.py: its own Gatys judge agrees with the engine's `gatys` objective, and a tiny run reports sanely."""

import json
from pathlib import Path

import pytest
import torch

from bench import quality
from bench.gallery import THUMB
from nst.engine.color import image_to_tensor
from nst.engine.pairs import PairProblem
from nst.engine.stylizer import Stylizer
from nst.params import canonical_params, resolve_params


def test_the_judge_scores_the_gatys_preset_as_the_engine_does() -> None:
    """Independent code, same objective: the judged total of the saved image is the engine's final total."""
    pair = quality.benchmark_pairs(1)[0]
    values = {"preset": "gatys", "size": 48, "iterations": 3, "log_every": 1, "precision": "fp32"}
    params = canonical_params(resolve_params(values))
    [result] = Stylizer().stylize([PairProblem(pair.content, [pair.style], params, pair.id)])
    assert result.image is not None and result.final_losses is not None
    judge = quality.GatysJudge(torch.device("cpu"))
    content = image_to_tensor(pair.content.resize(result.image.size, quality.Image.Resampling.LANCZOS))
    style = image_to_tensor(quality.resize_long_side(pair.style, max(result.image.size)))
    judged = judge.score(image_to_tensor(result.image), judge.targets(content, style))
    # The judge scores the saved 8-bit image, the engine the float one it came from: 8-bit rounding is the gap (2e-4).
    for term in ("content", "style", "total"):
        assert judged[term] == pytest.approx(result.final_losses[term], rel=2e-3), term


@pytest.mark.slow
def test_a_tiny_run_reports_every_pair_and_no_divergence(tmp_path: Path) -> None:
    out = tmp_path / "q.jsonl"
    sheet = tmp_path / "sheet.jpg"
    argv = ["--pairs", "2", "--size", "32", "--iterations", "4", "--configs", "gatys,defaults", "--out", str(out)]
    argv += ["--sheet", str(sheet)]
    assert quality.main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    runs = [r for r in lines if r["kind"] == "run"]
    assert sorted((r["config"], r["pair"]) for r in runs) == sorted(
        (c, p.id) for c in ("gatys", "defaults") for p in quality.benchmark_pairs(2)
    )
    assert all(r["status"] == "succeeded" and r["judged"]["total"] > 0 for r in runs)
    assert all(r["engine_saved_over_last_logged"] == pytest.approx(1.0, rel=1e-2) for r in runs)
    [summary] = [r for r in lines if r["kind"] == "summary"]
    assert {k: v["diverged"] for k, v in summary["configs"].items()} == {"gatys/own": 0, "defaults/own": 0}
    with quality.Image.open(sheet) as img:  # content, style, then one row per run; one column per pair
        assert img.format == "JPEG" and img.size == (130 + 2 * (THUMB + 4), 18 + 4 * (THUMB + 4))


def test_the_two_axes_are_zero_on_their_own_targets() -> None:
    """content_err of the photo itself and style_err of the painting itself are 0; each is > 0 on the other image."""
    pair = quality.painting_pairs()[0]
    judge = quality.GatysJudge(torch.device("cpu"))
    content = image_to_tensor(pair.content.resize((64, 64), quality.Image.Resampling.LANCZOS))
    style = image_to_tensor(pair.style.resize((64, 64), quality.Image.Resampling.LANCZOS))
    targets = judge.targets(content, style)
    on_content, on_style = judge.measures(content, targets), judge.measures(style, targets)
    assert on_content["content_err"] == 0 and on_style["style_err"] == 0
    assert on_content["style_err"] > 0.1 and on_style["content_err"] > 0.1
    # The Gatys total is the same objective as score() reports.
    assert on_style["gatys"] == judge.score(style, targets)


def test_frontier_interpolates_in_log_space_and_refuses_to_extrapolate() -> None:
    from bench.frontier import interpolate

    frontier = [(0.1, 1.0), (0.4, 0.01)]
    assert interpolate(frontier, 0.2) == pytest.approx(0.1)  # halfway in log content_err: halfway in log style_err
    assert interpolate(frontier, 0.05) is None and interpolate(frontier, 0.5) is None
