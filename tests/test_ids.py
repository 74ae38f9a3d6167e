"""Pair ids: derived from a file's own name only (stable whatever else arrives), never sharing a file with another
pair's outputs (intermediates, letter case), and `nst migrate-ids` for outputs made under the earlier rule."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from nst import storage
from nst.cli import main
from nst.manifest import InvalidManifestError, load_manifest
from nst_testing.paths import SAMPLES

JPEG = (SAMPLES / "content" / "chelsea.jpg").read_bytes()
STYLE = (SAMPLES / "styles" / "brick.jpg").read_bytes()
TINY = "defaults: {size: 32, iterations: 1}\n"


def tag(name: str) -> str:
    """The README's rule: 8 hex digits of the sha256 of the original (uncleaned) stem."""
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def night_dir(tmp_path: Path, photos: list[str]) -> Path:
    """A manifest directory with s.jpg, incoming/<photos> and a grid of every photo x s.jpg."""
    (tmp_path / "incoming").mkdir(exist_ok=True)
    (tmp_path / "s.jpg").write_bytes(STYLE)
    for name in photos:
        (tmp_path / "incoming" / name).write_bytes(JPEG)
    (tmp_path / "m.yaml").write_text(
        f"version: 1\noutput: out\n{TINY}grid:\n  contents: ['incoming/*.jpg']\n  styles: [s.jpg]\n"
    )
    return tmp_path


def ids_of(path: Path | str, **kwargs: Any) -> dict[str, str]:
    """{id: content file name} of a manifest's pairs."""
    return {p.id: Path(p.content).name for p in load_manifest(str(path), **kwargs).pairs}


def problems(path: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(InvalidManifestError) as info:
        load_manifest(str(path), **kwargs)
    return info.value.problems


# ------------------------------------------------------------------------------------------------ stable ids (16.2)


def test_a_name_that_needs_cleaning_always_gets_a_suffix_of_its_own_name(tmp_path: Path) -> None:
    d = night_dir(tmp_path, ["IMG 1.jpg"])
    assert ids_of(d / "m.yaml") == {f"IMG_1-{tag('IMG 1')}__s": "IMG 1.jpg"}
    for name in ("IMG_1.jpg", "IMG-1.jpg", "IMG  1.jpg"):  # whatever arrives later, IMG 1.jpg keeps its id
        (d / "incoming" / name).write_bytes(JPEG)
    assert ids_of(d / "m.yaml") == {
        f"IMG_1-{tag('IMG 1')}__s": "IMG 1.jpg",
        "IMG_1__s": "IMG_1.jpg",
        "IMG-1__s": "IMG-1.jpg",
        f"IMG_1-{tag('IMG  1')}__s": "IMG  1.jpg",
    }


def test_the_rule_is_the_same_for_pairs_styles_and_sub_folders(tmp_path: Path) -> None:
    for name in ("my photo (1).jpg", "my style.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(JPEG)
    (tmp_path / "in" / "day 1").mkdir(parents=True)
    (tmp_path / "in" / "day 1" / "a.jpg").write_bytes(JPEG)
    (tmp_path / "m.yaml").write_text(
        "version: 1\noutput: out\npairs:\n"
        "  - {content: 'my photo (1).jpg', style: c.jpg}\n"
        "  - {content: c.jpg, style: ['my style.jpg', c.jpg]}\n"
        "grid:\n  contents: ['in/**/*.jpg']\n  styles: [c.jpg]\n"
    )
    assert sorted(ids_of(tmp_path / "m.yaml")) == sorted(
        [
            f"my_photo_1_-{tag('my photo (1)')}__c",
            f"c__my_style-{tag('my style')}-c",
            f"day_1.a-{tag('day 1.a')}__c",
        ]
    )


def test_a_long_id_is_cut_with_a_digest_of_its_own_names(tmp_path: Path) -> None:
    long_name = "x" * 150
    (tmp_path / f"{long_name}.jpg").write_bytes(JPEG)
    (tmp_path / "s.jpg").write_bytes(STYLE)
    (tmp_path / "m.yaml").write_text(
        f"version: 1\noutput: out\npairs:\n  - {{content: {long_name}.jpg, style: s.jpg}}\n"
    )
    (pair_id,) = ids_of(tmp_path / "m.yaml")
    assert len(pair_id) == 128 and pair_id == f"{'x' * 119}-{tag(long_name + '__s')}"


def test_night_two_neither_changes_nor_takes_night_ones_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16, seen 2: `IMG 1.jpg` on night 1; `IMG_1.jpg` arrives on night 2 and gets an id of its own."""
    d = night_dir(tmp_path, ["IMG 1.jpg"])
    first = f"IMG_1-{tag('IMG 1')}__s"
    assert main(["run", "--no-prefect", str(d / "m.yaml")]) == 0
    png = d / "out" / f"{first}.png"
    made = png.read_bytes(), png.stat().st_mtime_ns
    (d / "incoming" / "IMG_1.jpg").write_bytes((SAMPLES / "content" / "coffee.jpg").read_bytes())
    capsys.readouterr()
    assert main(["run", "--no-prefect", "--dry-run", str(d / "m.yaml")]) == 0
    assert capsys.readouterr().out.splitlines() == ["run   IMG_1__s", f"skip  {first} (up to date)"]
    assert main(["run", "--no-prefect", str(d / "m.yaml")]) == 0
    assert (png.read_bytes(), png.stat().st_mtime_ns) == made  # night 1's result untouched
    records = {p.stem: json.loads(p.read_text()) for p in (d / "out").glob("*.json")}
    assert {k: Path(r["inputs"]["content"]["uri"]).name for k, r in records.items()} == {
        first: "IMG 1.jpg",
        "IMG_1__s": "IMG_1.jpg",
    }


# --------------------------------------------------------------------------------- ids that share files (18.9)


def _pairs(tmp_path: Path, entries: str) -> Path:
    for name in ("c.jpg", "s.jpg", "s.iter3.jpg", "Photo.jpg", "photo.jpg"):
        (tmp_path / name).write_bytes(JPEG)
    (tmp_path / "m.yaml").write_text(f"version: 1\noutput: out\npairs:\n{entries}")
    return tmp_path / "m.yaml"


def test_an_id_named_like_an_intermediate_image_is_refused(tmp_path: Path) -> None:
    """Pair `x` saves `x.iter000010.png` (save_every): pair `x.iter000010` would write the same file."""
    path = _pairs(
        tmp_path,
        "  - {id: x, content: c.jpg, style: s.jpg}\n"
        "  - {id: x.iter000010, content: c.jpg, style: s.jpg}\n"
        "  - {content: c.jpg, style: s.iter3.jpg}\n",
    )
    assert problems(path) == [
        "pairs[1].id: id 'x.iter000010' ends like an intermediate image (<id>.iter<N>.png) of another pair; "
        "choose an id that does not end in .iter<digits> (line 5)",
        "pairs[2]: id 'c__s.iter3' ends like an intermediate image (<id>.iter<N>.png) of another pair; "
        "set `id:` to one that does not end in .iter<digits> (line 6)",
    ]
    assert ids_of(_pairs(tmp_path, "  - {id: x.iter, content: c.jpg, style: s.jpg}\n")) == {"x.iter": "c.jpg"}


def test_ids_that_differ_only_in_letter_case_are_refused(tmp_path: Path) -> None:
    path = _pairs(
        tmp_path, "  - {id: Night, content: c.jpg, style: s.jpg}\n  - {id: night, content: c.jpg, style: s.jpg}\n"
    )
    assert problems(path) == [
        "pairs[1].id: id 'night' differs from 'Night' (pairs[0]) only in letter case; on a case-insensitive volume "
        "they would share files (line 5)"
    ]
    grid = tmp_path / "m.yaml"
    grid.write_text("version: 1\noutput: out\ngrid:\n  contents: ['*hoto.jpg']\n  styles: [s.jpg]\n")
    assert problems(grid) == [
        f"grid: id 'photo__s' (grid: {tmp_path}/photo.jpg x {tmp_path}/s.jpg) differs from 'Photo__s' "
        f"(grid: {tmp_path}/Photo.jpg x {tmp_path}/s.jpg) only in letter case; on a case-insensitive volume they "
        "would share files (line 3)"
    ]


# ------------------------------------------------------------------------------------------------ nst migrate-ids


def _record(root: str, pair_id: str, content: str, style: str) -> dict[str, Any]:
    png, js = storage.join(root, f"out/{pair_id}.png"), storage.join(root, f"out/{pair_id}.json")
    return {
        "schema": 1,
        "id": pair_id,
        "status": "succeeded",
        "inputs": {"content": {"uri": content, "sha256": "0" * 64}, "styles": [{"uri": style, "sha256": "1" * 64}]},
        "output": {"image": png, "json": js, "image_sha256": hashlib.sha256(pair_id.encode()).hexdigest()},
        "run_id": "night-2",
    }


def _put(uri: str, data: bytes) -> None:
    storage.write_bytes(uri, data)


def test_migrate_ids_moves_old_outputs_to_the_new_ids(storage_root: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Night 2 under the old rule: `IMG_1__s` (now IMG_1.jpg's) and `IMG_1__s-6b55adaa` (IMG 1.jpg's)."""
    root = storage_root
    for name in ("incoming/IMG 1.jpg", "incoming/IMG_1.jpg", "incoming/b c.jpg"):
        _put(storage.join(root, name), JPEG)
    _put(storage.join(root, "s.jpg"), STYLE)
    manifest = storage.join(root, "m.yaml")
    _put(manifest, b"version: 1\noutput: out\ngrid:\n  contents: ['incoming/*.jpg']\n  styles: [s.jpg]\n")
    style = storage.join(root, "s.jpg")
    old = {  # old id -> content file name
        "IMG_1__s": "IMG_1.jpg",
        "IMG_1__s-6b55adaa": "IMG 1.jpg",
        "b_c__s": "b c.jpg",
        "gone__s": "gone.jpg",  # a photo no longer there: left alone
    }
    for pair_id, name in old.items():
        record = _record(root, pair_id, storage.join(root, f"incoming/{name}"), style)
        _put(storage.join(root, f"out/{pair_id}.png"), pair_id.encode())
        _put(storage.join(root, f"out/{pair_id}.json"), json.dumps(record).encode())
    _put(storage.join(root, "out/IMG_1__s-6b55adaa.iter000010.png"), b"intermediate")
    _put(storage.join(root, "out/_runs/night-2.json"), b"{}")
    before = {i.uri: storage.read_bytes(i.uri) for i in storage.list_prefix(storage.join(root, "out/"))}
    new_img, new_bc = f"IMG_1-{tag('IMG 1')}__s", f"b_c-{tag('b c')}__s"

    assert main(["migrate-ids", manifest]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"IMG_1__s-6b55adaa -> {new_img}",
        f"b_c__s -> {new_bc}",
        "2 ids to move (dry run: nothing changed; --apply moves them)",
    ]
    assert {i.uri: storage.read_bytes(i.uri) for i in storage.list_prefix(storage.join(root, "out/"))} == before

    assert main(["migrate-ids", manifest, "--apply"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"moved IMG_1__s-6b55adaa -> {new_img}",
        f"moved b_c__s -> {new_bc}",
        "2 ids moved",
    ]
    out = storage.join(root, "out/")
    names = sorted(i.uri[len(out) :] for i in storage.list_prefix(out))
    assert names == sorted(
        [
            "IMG_1__s.json",
            "IMG_1__s.png",
            f"{new_img}.json",
            f"{new_img}.png",
            f"{new_img}.iter000010.png",
            f"{new_bc}.json",
            f"{new_bc}.png",
            "gone__s.json",
            "gone__s.png",
            "_runs/night-2.json",
        ]
    )
    moved = json.loads(storage.read_bytes(storage.join(out, f"{new_img}.json")))
    assert moved == {
        **_record(root, new_img, storage.join(root, "incoming/IMG 1.jpg"), style),
        "output": {**_record(root, new_img, "", "")["output"], "image_sha256": moved["output"]["image_sha256"]},
    }
    assert moved["output"]["image_sha256"] == hashlib.sha256(b"IMG_1__s-6b55adaa").hexdigest()  # the same image
    assert storage.read_bytes(storage.join(out, f"{new_img}.png")) == b"IMG_1__s-6b55adaa"
    assert storage.read_bytes(storage.join(out, f"{new_img}.iter000010.png")) == b"intermediate"
    assert ids_of(manifest, check_inputs=False).keys() == {new_img, "IMG_1__s", new_bc}

    assert main(["migrate-ids", manifest]) == 0  # nothing is left to move
    assert capsys.readouterr().out.splitlines() == ["0 ids to move (dry run: nothing changed; --apply moves them)"]


def test_migrate_ids_leaves_a_taken_or_claimed_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path)
    for name in ("IMG 1.jpg", "b c.jpg"):
        _put(storage.join(root, f"incoming/{name}"), JPEG)
    _put(storage.join(root, "s.jpg"), STYLE)
    manifest = storage.join(root, "m.yaml")
    _put(manifest, b"version: 1\noutput: out\ngrid:\n  contents: ['incoming/*.jpg']\n  styles: [s.jpg]\n")
    style = storage.join(root, "s.jpg")
    new_img = f"IMG_1-{tag('IMG 1')}__s"
    for pair_id, name in (("IMG_1__s", "IMG 1.jpg"), (new_img, "IMG 1.jpg"), ("b_c__s", "b c.jpg")):
        _put(
            storage.join(root, f"out/{pair_id}.json"),
            json.dumps(_record(root, pair_id, f"{root}/incoming/{name}", style)).encode(),
        )
    _put(storage.join(root, "out/b_c__s.claim"), b"")
    assert main(["migrate-ids", manifest, "--apply"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"left IMG_1__s: {new_img} already has a record",
        "left b_c__s: claimed by a run (b_c__s.claim); try again when it is over",
        "0 ids moved",
    ]


def test_a_migrated_pair_is_still_done(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real run's outputs, renamed to the id the old rule gave (`IMG_1__s`), move back and are skipped as done."""
    d = night_dir(tmp_path, ["IMG 1.jpg"])
    new = f"IMG_1-{tag('IMG 1')}__s"
    assert main(["run", "--no-prefect", str(d / "m.yaml")]) == 0
    out = d / "out"
    record = json.loads((out / f"{new}.json").read_text())
    (out / f"{new}.png").rename(out / "IMG_1__s.png")  # as the old rule named it (same file, same mtime)
    record["id"], record["output"]["image"] = "IMG_1__s", str(out / "IMG_1__s.png")
    record["output"]["json"] = str(out / "IMG_1__s.json")
    (out / "IMG_1__s.json").write_text(json.dumps(record))
    (out / f"{new}.json").unlink()
    capsys.readouterr()
    assert main(["migrate-ids", str(d / "m.yaml"), "--apply"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"moved IMG_1__s -> {new}", "1 id moved"]
    assert main(["run", "--no-prefect", "--dry-run", str(d / "m.yaml")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"skip  {new} (up to date)"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["_runs", f"{new}.json", f"{new}.png"])
