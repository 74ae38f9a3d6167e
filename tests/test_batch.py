"""The run path (nst.run.run) end to end on local disk and on a real S3 server: outputs, records, reruns."""

import json
import math
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
import torch

import nst.engine.images
import nst.engine.stylizer
import nst.run
import nst.run.batches
from nst import storage
from nst.cli import main
from nst.errors import ManifestError, StorageError
from nst.manifest import load_manifest
from nst.results import error_info
from nst.run import RunSummary, run
from nst.run_options import RunOptions
from nst_testing.faults import FaultyStylizer
from nst_testing.paths import SAMPLES
from tests.tiny_extractor import TinyExtractor

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


def test_each_input_is_read_once_per_run(
    storage_root: str, engine_calls: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """plan() reads each input once (brick serves two pairs); the batches decode the bytes it kept, no re-download."""
    uri = _put_inputs(storage_root)
    reads: Counter[str] = Counter()
    real = storage.read_with_info

    def counting(path: str, **kwargs: Any) -> Any:
        reads[path] += 1
        return real(path, **kwargs)

    monkeypatch.setattr(storage, "read_with_info", counting)  # every read goes through it
    summary = run_manifest(uri)
    assert {r.status for r in summary.records} == {"succeeded"} and _ran(engine_calls) == IDS
    inputs = ["content/chelsea.jpg", "content/coffee.jpg", "content/astronaut.jpg"]
    inputs += ["styles/brick.jpg", "styles/ihc.jpg", "styles/hubble.jpg"]
    assert {u: reads[u] for u in reads if "/content/" in u or "/styles/" in u} == {
        storage.join(storage_root, name): 1 for name in inputs
    }


def test_pair_ids_pick_pairs_and_unknown_ids_are_an_error(tmp_path: Path, engine_calls: list[list[str]]) -> None:
    uri = _put_inputs(str(tmp_path))
    summary = run_manifest(uri, pair_ids=["coffee-blend"])
    assert [r.id for r in summary.records] == ["coffee-blend"] and _ran(engine_calls) == ["coffee-blend"]
    picked = nst.run.plan(load_manifest(uri), RunOptions(pair_ids=["astronaut__hubble", "chelsea__brick"]))
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
    the_plan = nst.run.plan(manifest, RunOptions())
    batches = nst.run.make_batches(the_plan.to_run, the_plan.inputs, max_pairs=8, output=manifest.output, run_id="test")
    stylizer = nst.engine.stylizer.Stylizer()
    records = [r for b in batches for r in nst.run.batches.run_batch(b, stylizer=FaultyStylizer(stylizer, fault))]
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


# ------------------------------------------------------------------------ faults the real parts cannot make on demand

TINY_LAYERS = "content_layers: [block3_conv1], style_layers: [block1_conv1, block2_conv1, block3_conv1]"
SAME_SHAPE = f"""\
version: 1
name: faults
output: out/
defaults: {{size: 32, iterations: 4, optimizer: adam, lr: 5, {TINY_LAYERS}}}
grid: {{contents: [content/chelsea.jpg, content/coffee.jpg], styles: [styles/brick.jpg]}}
"""


def _one_batch(tmp_path: Path, manifest: str = SAME_SHAPE, **params: Any) -> nst.run.Batch:
    text = manifest.replace("defaults: {", "defaults: {" + "".join(f"{k}: {v}, " for k, v in params.items()))
    loaded = load_manifest(_put_inputs(str(tmp_path), text))
    the_plan = nst.run.plan(loaded, RunOptions())
    batches = nst.run.make_batches(the_plan.to_run, the_plan.inputs, max_pairs=8, output=loaded.output, run_id="test")
    assert len(batches) == 1
    return batches[0]


def _stylizer_with(extractor: Any) -> nst.engine.stylizer.Stylizer:
    """A real Stylizer whose loss network is `extractor` (no weights file)."""
    stylizer = nst.engine.stylizer.Stylizer()
    stylizer.network = lambda params, device, input_roots=None: (extractor, None)  # type: ignore[method-assign,assignment,return-value]
    return stylizer


def _strict_json(uri: str) -> dict[str, Any]:
    def no_constants(name: str) -> Any:
        raise AssertionError(f"{uri}: bare {name} in a record")

    return cast(dict[str, Any], json.loads(storage.read_bytes(uri), parse_constant=no_constants))


class Poisoned(TinyExtractor):
    """TinyExtractor whose features turn NaN once `poison` is set."""

    poison = False

    def forward(self, x: Any) -> dict[str, Any]:
        feats = super().forward(x)
        return {k: v * float("nan") for k, v in feats.items()} if self.poison else feats


def test_nan_after_the_last_step_is_never_a_success(tmp_path: Path) -> None:
    """keep_best: false, the last step lands on NaN: failed (no PNG), the JSON is strict JSON."""
    batch = _one_batch(tmp_path, keep_best="false")
    net = Poisoned()

    def on_progress(event: Any) -> None:
        net.poison = event.iteration == event.total_iterations  # only the final image's evaluation sees NaN

    records = nst.run.batches.run_batch(batch, stylizer=_stylizer_with(net), on_progress=on_progress)
    assert [r.status for r in records] == ["failed", "failed"]
    for r in records:
        rec = _strict_json(r.json_uri)
        assert rec["status"] == "failed" and rec["error"]["type"] == "NonFiniteLoss"
        assert not (tmp_path / "out" / f"{r.id}.png").exists()


def test_a_later_nan_keeps_the_finite_best_iterate_and_records_the_step(tmp_path: Path) -> None:
    batch = _one_batch(tmp_path, keep_best="true")
    net = Poisoned()

    def on_progress(event: Any) -> None:
        net.poison = 2 <= event.iteration < event.total_iterations  # steps 3 and 4 go non-finite

    records = nst.run.batches.run_batch(batch, stylizer=_stylizer_with(net), on_progress=on_progress)
    for r in records:
        rec = _strict_json(r.json_uri)
        assert rec["status"] == "succeeded", rec["error"]
        assert all(math.isfinite(v) for v in rec["final_losses"].values())
        assert [w["type"] for w in rec["warnings"]] == ["NonFiniteLoss"] and rec["warnings"][0]["iteration"] == 3
        assert (tmp_path / "out" / f"{r.id}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_write_error_fails_only_its_pair_and_never_reruns_the_optimisation(
    tmp_path: Path, engine_calls: list[list[str]]
) -> None:
    batch = _one_batch(tmp_path)
    first, second = (p.id for p in batch.pairs)
    (tmp_path / "out" / f"{second}.png").mkdir(parents=True)  # a real, permanent write error on one pair
    records = nst.run.batches.run_batch(batch, stylizer=nst.engine.stylizer.Stylizer())
    assert {r.id: r.status for r in records} == {first: "succeeded", second: "failed"}
    assert len(engine_calls) == 1
    assert _strict_json(str(tmp_path / "out" / f"{first}.json"))["status"] == "succeeded"
    failed = _strict_json(str(tmp_path / "out" / f"{second}.json"))
    assert failed["status"] == "failed" and failed["error"]["type"] == "StorageError"


def test_a_failure_after_the_write_never_downgrades_a_written_pair(tmp_path: Path) -> None:
    """What a timeout or crash of the batch task does: record_failure keeps a success this run already wrote."""
    batch = _one_batch(tmp_path)
    written = nst.run.batches.run_batch(batch, stylizer=nst.engine.stylizer.Stylizer())
    assert {r.status for r in written} == {"succeeded"}
    late = [batch.fail(p, error_info("Timeout", "late")) for p in batch.pairs]
    assert {r.status for r in late} == {"succeeded"}
    for p in batch.pairs:
        assert _strict_json(str(tmp_path / "out" / f"{p.id}.json"))["status"] == "succeeded"


class OOMAboveOne(TinyExtractor):
    """Raises torch.OutOfMemoryError for batches of more than one pair, after allocating a tensor (watched)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[weakref.ref[torch.Tensor]] = []

    def forward(self, x: Any) -> dict[str, Any]:
        if x.shape[0] > 1:
            activations = torch.zeros(256, 256)  # what a real batch holds when it runs out of memory
            self.held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return cast(dict[str, Any], super().forward(x))


def test_oom_split_frees_the_failed_batch_before_the_halves(tmp_path: Path) -> None:
    batch = _one_batch(tmp_path)
    net = OOMAboveOne()
    alive_at_halves: list[bool] = []

    def fault(jobs: Any) -> None:
        if len(jobs) == 1:
            alive_at_halves.append(any(ref() is not None for ref in net.held))

    records = nst.run.batches.run_batch(batch, stylizer=FaultyStylizer(_stylizer_with(net), fault))
    assert {r.status for r in records} == {"succeeded"}
    assert len(net.held) == 1 and alive_at_halves == [False, False]


def test_two_runs_at_once_every_json_describes_the_png_beside_it(
    storage_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run B (other parameters) starts while run A is between its PNG and its JSON: B must not interleave."""
    uri = _put_inputs(storage_root)
    other = storage.join(storage_root, "other.yaml")
    storage.write_bytes(other, MANIFEST.replace("iterations: 2", "iterations: 3").encode())
    real_write = storage.write_bytes
    nested: list[RunSummary] = []

    def write_then_race(target: str, data: bytes, **kwargs: Any) -> Any:
        written = real_write(target, data, **kwargs)
        if target.endswith("chelsea__brick.png") and not nested:
            nested.append(run_manifest(other, pair_ids=["chelsea__brick"]))  # run B, inside run A's write phase
        return written

    monkeypatch.setattr(storage, "write_bytes", write_then_race)
    first = run_manifest(uri, pair_ids=["chelsea__brick"])
    monkeypatch.setattr(storage, "write_bytes", real_write)
    assert nested and nested[0].records[0].status == "not_run"  # B found A's claim
    assert "claimed by run" in (nested[0].records[0].error or {}).get("message", "")
    assert first.records[0].status == "succeeded"
    _assert_json_describes_png(storage_root, "chelsea__brick")
    # B again, A finished: B runs and its JSON describes its PNG.
    again = run_manifest(other, pair_ids=["chelsea__brick"])
    assert again.records[0].status == "succeeded"
    assert _assert_json_describes_png(storage_root, "chelsea__brick")["params"]["iterations"] == 3


def _assert_json_describes_png(root: str, pair_id: str) -> dict[str, Any]:
    out = storage.join(root, "out/")
    rec = json.loads(storage.read_bytes(storage.join(out, f"{pair_id}.json")))
    png = storage.read_bytes(storage.join(out, f"{pair_id}.png"))
    assert rec["output"]["image_sha256"] == nst.engine.images.sha256_bytes(png)
    return cast(dict[str, Any], rec)


def test_a_replaced_image_is_not_done(tmp_path: Path, engine_calls: list[list[str]]) -> None:
    uri = _put_inputs(str(tmp_path))
    run_manifest(uri, pair_ids=["chelsea__brick"])
    (tmp_path / "out" / "chelsea__brick.png").write_bytes((SAMPLES / "content" / "coffee.jpg").read_bytes())
    engine_calls.clear()
    assert run_manifest(uri, pair_ids=["chelsea__brick"]).records[0].status == "succeeded"
    assert engine_calls == [["chelsea__brick"]]
    _assert_json_describes_png(str(tmp_path), "chelsea__brick")


def test_a_dead_runs_claim_lapses(tmp_path: Path) -> None:
    uri = _put_inputs(str(tmp_path))
    claim = tmp_path / "out" / "chelsea__brick.claim"
    claim.parent.mkdir()
    claim.write_text(json.dumps({"run_id": "dead", "expires_at": 0}))  # expired lease of a run that died
    assert run_manifest(uri, pair_ids=["chelsea__brick"]).records[0].status == "succeeded"
    assert not claim.exists()


def test_a_pairs_claim_is_released_as_soon_as_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between a batch's pairs must not leave a claim on a pair that is already written."""
    batch = _one_batch(tmp_path)
    first, second = (p.id for p in batch.pairs[:2])
    real_write = storage.write_bytes
    claims_seen: list[bool] = []

    def write(target: str, data: bytes, **kwargs: Any) -> Any:
        if target.endswith(f"{second}.png"):
            claims_seen.append((tmp_path / "out" / f"{first}.claim").exists())
        return real_write(target, data, **kwargs)

    monkeypatch.setattr(storage, "write_bytes", write)
    records = nst.run.batches.run_batch(batch, stylizer=nst.engine.stylizer.Stylizer())
    assert [r.status for r in records[:2]] == ["succeeded", "succeeded"]
    assert claims_seen == [False]
    assert list((tmp_path / "out").glob("*.claim")) == []


def test_a_done_pairs_leftover_claim_is_cleared_unless_its_run_is_live(tmp_path: Path) -> None:
    """A run killed after writing a pair but before releasing it leaves a claim; the next run clears it."""
    uri = _put_inputs(str(tmp_path))
    assert run_manifest(uri, pair_ids=["chelsea__brick"]).records[0].status == "succeeded"
    claim = tmp_path / "out" / "chelsea__brick.claim"
    claim.write_text(json.dumps({"run_id": "dead", "expires_at": 0}))
    assert run_manifest(uri, pair_ids=["chelsea__brick"]).records[0].status == "skipped"
    assert not claim.exists()
    live = json.dumps({"run_id": "live", "expires_at": 4e9})  # e.g. a run re-making it with force: not ours to drop
    claim.write_text(live)
    assert run_manifest(uri, pair_ids=["chelsea__brick"]).records[0].status == "skipped"
    assert claim.read_text() == live
    hooks = nst.run.local_hooks()
    hooks.run_is_live = lambda run_id: run_id != "live"  # what the flow asks Prefect: that run is over now
    summary = run(uri, RunOptions(pair_ids=["chelsea__brick"]), hooks=hooks)
    assert summary.records[0].status == "skipped" and not claim.exists()


def deny_writes(s3: Any, bucket: str) -> None:
    """A bucket policy that denies every PutObject (SeaweedFS applies it at once, to every identity)."""
    statement = {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
    s3.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [statement]}))


def test_no_write_access_fails_at_plan_time_without_retries(
    s3_env: Any, s3_bucket: str, engine_calls: list[list[str]]
) -> None:
    uri = _put_inputs(f"s3://{s3_bucket}/root/")
    deny_writes(s3_env, s3_bucket)
    with pytest.raises(StorageError) as caught:
        run_manifest(uri)
    assert not caught.value.transient and "access denied" in str(caught.value)
    assert engine_calls == []
