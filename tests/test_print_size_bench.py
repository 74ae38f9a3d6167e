"""bench/print_size.py (issue 30's 1024 px comparison): its two goals computed from runs, and a tiny run end to end."""

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import print_size
from bench.print_size import NSPT, SCHEDULE, SINGLE, at_time, pair_summary
from nst.schedule import scale_iterations


def run(series: str, weight: float, c: float, s: float, seconds: float, curve: list[Any]) -> dict[str, Any]:
    return {
        "pair": "p",
        "series": series,
        "weight": weight,
        "content_err": c,
        "style_err": s,
        "seconds": seconds,
        "curve": curve,
    }


def test_the_point_at_a_time_is_the_last_checkpoint_by_then() -> None:
    curve = [(10, 1.0, 0.5, 0.9), (20, math.nan, 0.4, 0.8), (30, 3.0, 0.3, 0.7), (40, 4.0, 0.2, 0.6)]
    assert at_time(curve, 3.5) == (30, 3.0, 0.3, 0.7)
    assert at_time(curve, 3.0) == (30, 3.0, 0.3, 0.7)
    assert at_time(curve, 2.0) == (10, 1.0, 0.5, 0.9)  # the checkpoint without a time is never chosen
    assert at_time(curve, 0.5) is None


def test_the_goals_of_one_pair() -> None:
    rows = [
        run(SCHEDULE, 1.0, 0.2, 0.4, 10.0, []),
        run(SCHEDULE, 3.0, 0.4, 0.2, 10.0, []),
        run(SCHEDULE, 10.0, 0.8, 0.1, 10.0, []),
        run(SINGLE, 1.0, 0.1, 0.4, 40.0, [(100, 9.0, 0.6, 0.5), (500, 40.0, 0.1, 0.4)]),
        run(SINGLE, 3.0, 0.2, 0.4, 40.0, [(100, 9.0, 0.4, 0.5), (200, 11.0, 0.3, 0.3), (500, 40.0, 0.2, 0.4)]),
        run(SINGLE, 10.0, 0.6, 0.1, 40.0, [(100, 9.0, 0.9, 0.25), (500, 40.0, 0.6, 0.1)]),
        run(NSPT, 500.0, 0.3, 0.3, 30.0, [(50, 12.0, 0.5, 0.2), (1700, 30.0, 0.3, 0.3)]),
    ]
    summary = pair_summary(rows, "p", 3.0)
    vs = summary["schedule_vs_single"]
    # The single-scale frontier at content 0.4 lies between (0.2, 0.4) and (0.6, 0.1), log-log.
    at = math.exp(math.log(0.4) + math.log(0.4 / 0.2) / math.log(0.6 / 0.2) * math.log(0.1 / 0.4))
    assert vs["frontier_ratio"] == pytest.approx(0.2 / at)
    assert vs["time_fraction"] == pytest.approx(10.0 / 40.0)
    by_run = {(e["series"], e["weight"]): e for e in summary["equal_time"]}
    assert by_run[(SINGLE, 3.0)]["iteration"] == 100  # the image at 9 s; the one at 11 s comes after the schedule
    # Our schedule frontier at content 0.4 is its own point, 0.2; the single scale had 0.5 there by then.
    assert by_run[(SINGLE, 3.0)]["ratio"] == pytest.approx(0.2 / 0.5)
    # Content 0.9 is past our frontier: bounded by our lowest style_err, 0.1.
    assert by_run[(SINGLE, 10.0)]["ratio"] == pytest.approx(0.1 / 0.25)
    # neural-style-pt had no image by 10 s: no ratio, and none is claimed.
    assert by_run[(NSPT, 500.0)] == {"series": NSPT, "weight": 500.0, "ratio": None}
    assert summary["worst_equal_time"] == {SINGLE: pytest.approx(0.4), NSPT: None}


def test_goal_two_judged_smaller_compares_the_images_taken_down() -> None:
    rows = [
        run(SCHEDULE, 3.0, 0.4, 0.2, 10.0, []) | {"judged_smaller": {"8": [0.2, 0.4], "4": [0.3, 0.3]}},
        run(SCHEDULE, 10.0, 0.8, 0.1, 10.0, []) | {"judged_smaller": {"8": [0.6, 0.1], "4": [0.5, 0.2]}},
        run(SINGLE, 3.0, 0.2, 0.4, 40.0, [(100, 9.0, 0.4, 0.5)])
        | {"judged_smaller": {"8": [0.1, 0.1]}, "judged_smaller_at_schedule_time": {"8": [0.2, 0.5], "4": [0.9, 0.4]}},
        run(SINGLE, 10.0, 0.6, 0.1, 40.0, [(100, 9.0, 0.9, 0.25)])
        | {"judged_smaller_at_schedule_time": {"8": [0.1, 0.9]}},  # judged only at side 8
        run(NSPT, 500.0, 0.3, 0.3, 30.0, [(50, 12.0, 0.5, 0.2)]),  # no image by then: nothing judged smaller
    ]
    summary = pair_summary(rows, "p", 3.0)
    at_8 = {(e["series"], e["weight"]): e for e in summary["equal_time_smaller"]["8"]}
    # At side 8 our frontier is (0.2, 0.4)-(0.6, 0.1): the single scale at weight 3 had 0.5 at our 0.2, so 0.4 / 0.5.
    assert at_8[(SINGLE, 3.0)] == {"series": SINGLE, "weight": 3.0, "content_err": 0.2, "style_err": 0.5, "ratio": 0.8}
    assert at_8[(SINGLE, 10.0)]["ratio"] is None  # content 0.1 is below our frontier at side 8: no claim
    assert (NSPT, 500.0) not in at_8
    # At side 4 content 0.9 is past our frontier: bounded by its lowest style_err, 0.2, against the single's 0.4.
    assert [e["ratio"] for e in summary["equal_time_smaller"]["4"]] == [pytest.approx(0.5)]
    assert summary["worst_equal_time_smaller"] == {
        "8": {SINGLE: 0.8, NSPT: None},
        "4": {SINGLE: pytest.approx(0.5), NSPT: None},
    }
    # At the output size the same runs say otherwise: the verdicts are separate.
    assert summary["worst_equal_time"][SINGLE] == pytest.approx(0.4)


def test_without_the_schedule_at_the_default_weight_nothing_is_claimed() -> None:
    rows = [run(SINGLE, 3.0, 0.2, 0.4, 40.0, [(500, 40.0, 0.2, 0.4)])]
    summary = pair_summary(rows, "p", 3.0)
    assert "schedule_vs_single" not in summary and summary["equal_time"] == []


def test_the_pairs_are_the_paintings_at_full_resolution() -> None:
    pairs = {p.id: p for p in print_size.full_pairs()}
    assert sorted(pairs) == ["amber__candy", "amber__mosaic", "amber__rain-princess", "amber__udnie"]
    assert pairs["amber__candy"].content.size == (1080, 1080) and pairs["amber__candy"].style.size == (1024, 1024)


def test_neural_style_pt_needs_its_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        print_size.main(["--series", "nspt"])
    assert exit_.value.code == 2 and "--neural-style-pt" in capsys.readouterr().err


@pytest.mark.vgg
def test_a_tiny_comparison_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, sheets = tmp_path / "runs.jsonl", tmp_path / "sheets"
    argv = ["--size", "64", "--iterations", "8", "--weights", "1,3", "--scales", "2", "--only", "amber__candy"]
    argv += ["--workdir", str(tmp_path), "--out", str(out), "--sheets", str(sheets), "--markdown"]
    assert print_size.main(argv) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| amber / candy |")]
    assert " | 32: " in row and "; 16: " in row  # goal 2 judged smaller, per side
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    runs = [r for r in lines if r["kind"] == "print_size_run"]
    assert sorted((r["series"], r["weight"]) for r in runs) == [
        (SCHEDULE, 1.0),
        (SCHEDULE, 3.0),
        (SINGLE, 1.0),
        (SINGLE, 3.0),
    ]
    for r in runs:
        steps = [s["iterations"] for s in r["schedule"]]
        assert steps == (scale_iterations(8, 2) if r["series"] == SCHEDULE else [8]) and r["size"] == 64
        assert r["content_err"] > 0 and r["style_err"] > 0 and (tmp_path / r["image"]).exists()
        assert r["series"] == SCHEDULE or (tmp_path / r["image_at_schedule_time"]).exists()
        smaller = [r["judged_smaller"], *([] if r["series"] == SCHEDULE else [r["judged_smaller_at_schedule_time"]])]
        for judged in smaller:  # the final image (and the one at the schedule's time) at 32 and 16 px too
            assert sorted(judged) == ["16", "32"] and all(c > 0 and s > 0 for c, s in judged.values())
        assert r["judged_smaller"]["32"] != [r["content_err"], r["style_err"]]  # another size, another verdict
    [summary] = [r for r in lines if r["kind"] == "print_size_pair"]
    assert summary["schedule_vs_single"]["time_fraction"] > 0
    assert {e["series"] for e in summary["equal_time"]} == {SINGLE}
    for side in ("32", "16"):  # goal 2 judged smaller too: both single-scale runs, at the schedule's time
        assert [(e["series"], e["weight"]) for e in summary["equal_time_smaller"][side]] == [
            (SINGLE, 1.0),
            (SINGLE, 3.0),
        ]
    [total] = [r for r in lines if r["kind"] == "summary"]
    assert sorted(total["worst_equal_time_smaller"]) == ["16", "32"]
    assert (sheets / "amber__candy.jpg").exists()
