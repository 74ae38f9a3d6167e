"""The run path (nst.pipeline.run) end to end on local disk and on a real S3 server: outputs, records, reruns."""

import json
from pathlib import Path
from typing import Any

import pytest

import nst.engine
import nst.pipeline
from nst import storage
from nst.cli import main
from nst.errors import ManifestError
from nst.manifest import load_manifest
from nst.pipeline import RunSummary, run
from nst.run_options import RunOptions
from tests.conftest import SAMPLES

MANIFEST = """\
version: 1
name: roundtrip
output: out/
defaults: {size: 32, iterations: 2, log_every: 1}
pairs:
  - content: content/chelsea.jpg
    style: styles/brick.jpg
  - id: coffee-blend
    content: content/coffee.jpg
    style: [styles/ihc.jpg, styles/brick.jpg]
    style_blend: [0.7, 0.3]
  - content: content/astronaut.jpg
    style: styles/hubble.jpg
    style_weight: 5000
"""


def run_manifest(uri: str, **options: Any) -> RunSummary:
    """The plain run path with these run options (what `nst run --no-prefect` does)."""
    return run(uri, RunOptions(**options))


def _put_inputs(root: str, manifest: str = MANIFEST) -> str:
    for sub in ("content", "styles"):
        for path in (SAMPLES / sub).glob("*.jpg"):
            storage.write_bytes(storage.join(root, f"{sub}/{path.name}"), path.read_bytes())
    uri = storage.join(root, "manifest.yaml")
    storage.write_bytes(uri, manifest.encode())
    return uri


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Pair ids of every batch that reached the engine (a spy around the real Stylizer)."""
    calls: list[list[str]] = []
    real = nst.engine.Stylizer.run

    def spy(self: Any, jobs: Any, **kwargs: Any) -> Any:
        calls.append([j.id for j in jobs])
        return real(self, jobs, **kwargs)

    monkeypatch.setattr(nst.engine.Stylizer, "run", spy)
    return calls


def _ran(calls: list[list[str]]) -> list[str]:
    return sorted(i for batch in calls for i in batch)


IDS = sorted(["chelsea__brick", "coffee-blend", "astronaut__hubble"])


def test_run_writes_outputs_and_reruns_only_what_changed(storage_root: str, engine_calls: list[list[str]]) -> None:
    uri = _put_inputs(storage_root)
    summary = run_manifest(uri)
    assert sorted(r.id for r in summary.records) == IDS
    assert {r.status for r in summary.records} == {"succeeded"}
    assert _ran(engine_calls) == IDS
    out = storage.join(storage_root, "out/")
    for pair_id in IDS:
        record = json.loads(storage.read_bytes(storage.join(out, f"{pair_id}.json")))
        assert record["status"] == "succeeded" and record["id"] == pair_id
        assert record["output"]["image"] == storage.join(out, f"{pair_id}.png")
        assert storage.read_bytes(record["output"]["image"]).startswith(b"\x89PNG")
        assert record["inputs"]["content"]["sha256"] and all(s["sha256"] for s in record["inputs"]["styles"])
        assert record["params"]["size"] == 32
    blend = json.loads(storage.read_bytes(storage.join(out, "coffee-blend.json")))
    assert blend["params"]["style_blend"] == [0.7, 0.3] and len(blend["inputs"]["styles"]) == 2
    run_summary = json.loads(storage.read_bytes(summary.summary_uri or ""))
    assert run_summary["counts"] == {"succeeded": 3}

    engine_calls.clear()
    again = run_manifest(uri)
    assert {r.status for r in again.records} == {"skipped"} and engine_calls == []

    forced = run_manifest(uri, force=True)
    assert {r.status for r in forced.records} == {"succeeded"} and _ran(engine_calls) == IDS

    engine_calls.clear()
    # One input changes (a new photo under the same name): only the pair that uses it runs again.
    storage.write_bytes(
        storage.join(storage_root, "content/coffee.jpg"), (SAMPLES / "content/chelsea.jpg").read_bytes()
    )
    changed = run_manifest(uri)
    assert _ran(engine_calls) == ["coffee-blend"]
    assert {r.id: r.status for r in changed.records}["chelsea__brick"] == "skipped"

    engine_calls.clear()
    # A changed parameter is new work too.
    storage.write_bytes(uri, MANIFEST.replace("style_weight: 5000", "style_weight: 6000").encode())
    run_manifest(uri)
    assert _ran(engine_calls) == ["astronaut__hubble"]


def test_pair_ids_pick_pairs_and_unknown_ids_are_an_error(tmp_path: Path, engine_calls: list[list[str]]) -> None:
    uri = _put_inputs(str(tmp_path))
    summary = run_manifest(uri, pair_ids=["coffee-blend"])
    assert [r.id for r in summary.records] == ["coffee-blend"] and _ran(engine_calls) == ["coffee-blend"]
    picked = nst.pipeline.plan(load_manifest(uri), RunOptions(pair_ids=["astronaut__hubble", "chelsea__brick"]))
    assert [p.id for p in picked.to_run] == ["chelsea__brick", "astronaut__hubble"]  # manifest order
    with pytest.raises(ManifestError, match="pair_ids not in the manifest: nope"):
        run_manifest(uri, pair_ids=["nope"])


def test_a_bad_pair_fails_alone_and_is_recorded(tmp_path: Path, engine_calls: list[list[str]]) -> None:
    uri = _put_inputs(str(tmp_path))
    (tmp_path / "styles" / "brick.jpg").write_bytes(b"not an image")  # used by two pairs
    summary = run_manifest(uri)
    status = {r.id: r.status for r in summary.records}
    assert status == {"chelsea__brick": "failed", "coffee-blend": "failed", "astronaut__hubble": "succeeded"}
    record = json.loads((tmp_path / "out" / "chelsea__brick.json").read_text())
    assert record["status"] == "failed" and "brick.jpg" in record["error"]["message"]
    assert record["error"]["type"] == "ImageError"
    assert not (tmp_path / "out" / "chelsea__brick.png").exists()
    assert summary.ids("failed", "not_run") == ["chelsea__brick", "coffee-blend"]


def test_oom_splits_the_batch_and_retries_the_halves(tmp_path: Path) -> None:
    from nst.errors import OutOfMemory

    same_shape = """\
version: 1
name: oom
output: out/
defaults: {size: 32, iterations: 2}
grid: {contents: [content/chelsea.jpg, content/coffee.jpg], styles: [styles/brick.jpg, styles/ihc.jpg]}
"""
    uri = _put_inputs(str(tmp_path), same_shape)
    sizes: list[int] = []

    def fault(jobs: Any) -> None:
        sizes.append(len(jobs))
        if len(jobs) > 1:
            raise OutOfMemory(f"simulated: {len(jobs)} pairs do not fit")

    manifest = load_manifest(uri)
    the_plan = nst.pipeline.plan(manifest, RunOptions())
    batches = nst.pipeline.make_batches(the_plan.to_run, max_pairs=8, output=manifest.output, run_id="test")
    stylizer = nst.engine.Stylizer()
    records = [r for b in batches for r in nst.pipeline.run_batch(b, stylizer=stylizer, fault_hook=fault)]
    assert len(batches) == 1 and len(records) == 4
    assert {r.status for r in records} == {"succeeded"}
    assert sizes == [4, 2, 1, 1, 2, 1, 1]


def test_cli_run_and_validate_without_prefect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = _put_inputs(str(tmp_path))
    assert main(["validate", uri]) == 0
    assert "coffee-blend" in capsys.readouterr().out
    assert main(["run", uri, "--no-prefect", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("run ") == 3
    assert main(["run", uri, "--no-prefect"]) == 0
    out = capsys.readouterr().out
    assert "3 succeeded" in out and str(tmp_path / "out") in out
    assert main(["run", uri, "--no-prefect"]) == 0
    assert "3 skipped" in capsys.readouterr().out


def test_cli_run_takes_overrides_and_run_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = _put_inputs(str(tmp_path))
    assert (
        main(["run", uri, "--no-prefect", "--pair-ids", "coffee-blend", "--size", "24", "--max-batch-pairs", "1"]) == 0
    )
    assert "1 succeeded" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "coffee-blend.json").read_text())
    assert record["params"]["size"] == 24 and record["params"]["iterations"] == 2  # override, manifest default
    assert not (tmp_path / "out" / "chelsea__brick.json").exists()

    assert main(["run", uri, "--no-prefect", "--cpu-slots", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "cpu_slots" in err and "Prefect" in err and "\n" not in err
    assert main(["run", uri, "--no-prefect", "--max-batch-pairs", "0"]) == 1
    assert "max_batch_pairs" in capsys.readouterr().err
    assert main(["run", uri, "--no-prefect", "--size", "-3"]) == 1
    err = capsys.readouterr().err
    assert "overrides.size" in err and "\n" not in err.strip()
