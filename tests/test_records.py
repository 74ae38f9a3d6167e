"""The pair's JSON record is one pydantic model (issue 31): built by `build_record`, written by `store_record`, read by
`read_record`. Records written before the model (tests/golden/records/, captured from the dict-building code at
32 px) read and write back byte for byte; anything that is not a record is absent (None), never an exception.
"""

import functools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import nst
from nst.engine.pairs import PairResult
from nst.engine.weights import WeightsInfo
from nst.manifest import PairSpec
from nst.params import StyleParams
from nst.run.index import Written
from nst.run.inputs import InputFacts
from nst.run.records import (
    FIRST_REVISION,
    PairRecord,
    Record,
    parse_record,
    read_record,
    record_failure,
    record_json,
    write_pair_result,
)
from nst.run.shards import Child, child_pair
from nst.schedule import START_INIT

GOLDEN = Path(__file__).parent / "golden" / "records"
# What differs between two writes of the same pair: where and when it was written, and by what.
VOLATILE = {"host", "worker", "versions", "finished_at", "output"}


@functools.cache
def _golden_bytes(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def golden(name: str) -> dict[str, Any]:
    """A fresh copy of a stored record's JSON."""
    data: dict[str, Any] = json.loads(_golden_bytes(name))
    return data


def legacy() -> dict[str, Any]:
    """A schema 1 record (tests/test_ids.py's shape): no params, engine revision, identities, manifest or losses."""
    return {
        "schema": 1,
        "id": "IMG_1__s",
        "status": "succeeded",
        "inputs": {
            "content": {"uri": "in/IMG_1.jpg", "sha256": "0" * 64},
            "styles": [{"uri": "s.jpg", "sha256": None}],
        },
        "output": {"image": "out/IMG_1__s.png", "json": "out/IMG_1__s.json", "image_sha256": "1" * 64},
        "run_id": "night-2",
    }


@pytest.mark.parametrize("name", ["succeeded.json", "failed.json"])
def test_a_record_written_before_the_model_round_trips_byte_for_byte(name: str) -> None:
    stored = (GOLDEN / name).read_bytes()
    record = read_record(str(GOLDEN / name))
    assert isinstance(record, Record)
    assert record_json(record) == stored
    assert record.model_dump() == json.loads(stored)


def test_a_schema_1_record_reads_with_defaults_and_writes_back_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1__s.json"
    path.write_text(json.dumps(legacy(), indent=2))
    record = read_record(str(path))
    assert record is not None and record.schema_ == 1 and record.params == {} and record.manifest is None
    assert record_json(record) == path.read_bytes()  # no default is added to what it holds
    written = Written.of(record)
    assert written is not None
    assert (written.engine_revision, written.manifest, written.image_identity) == (FIRST_REVISION, None, None)
    assert written.inputs == [("in/IMG_1.jpg", "0" * 64, None), ("s.jpg", None, None)]


def _capture_pair() -> tuple[PairSpec, dict[str, InputFacts], PairResult[Image.Image]]:
    """The pair, inputs and result tests/golden/records/succeeded.json was written from."""
    params = StyleParams(size=32, iterations=2)
    spec = PairSpec(
        id="chelsea__brick", content="content/chelsea.jpg", styles=["styles/brick.jpg"], params=params, manifest="night"
    )
    inputs = {
        "content/chelsea.jpg": InputFacts(
            "content/chelsea.jpg", {"size": 1234, "mtime_ns": 1733500000000000000}, "a" * 64
        ),
        "styles/brick.jpg": InputFacts("styles/brick.jpg", {"size": 99, "etag": '"0123abcd"'}, "b" * 64),
    }
    result = PairResult(
        "chelsea__brick",
        "succeeded",
        params,
        Image.new("RGB", (32, 21), (10, 20, 30)),
        {"content": 1.5, "style": 0.25, "tv": 0.0, "total": 1.75},
        [{"iteration": 1, "total": 3.0, "content": 2.0}, {"iteration": 2, "total": 1.75, "content": 1.5}],
        2,
        warnings=[{"type": "NonFinite", "message": "a later step went NaN", "iteration": 2}],
        seconds=0.4567,
        device="cpu",
        weights=WeightsInfo("bundled:vgg19", "c" * 64, "vgg19", "caffe"),
    )
    return spec, inputs, result


def _same_as_before(written: dict[str, Any], before: dict[str, Any]) -> None:
    """Key for key (in order) and value for value, but where, when and by which versions each was written."""
    assert list(written) == list(before)
    assert list(written["output"]) == list(before["output"])
    stable = {k: v for k, v in before.items() if k not in VOLATILE}
    assert {k: v for k, v in written.items() if k not in VOLATILE} == {**stable, "engine_revision": nst.ENGINE_REVISION}


def test_the_model_writes_the_keys_and_values_the_dict_did(tmp_path: Path) -> None:
    spec, inputs, result = _capture_pair()
    stored = write_pair_result(spec, inputs, result, str(tmp_path), "run-1")
    written = json.loads((tmp_path / "chelsea__brick.json").read_bytes())
    before = golden("succeeded.json")
    for scale in before["schedule"]:  # since captured, each scale lists how its image started (issue 30)
        scale["start"] = START_INIT
    _same_as_before(written, before)
    assert written["output"]["image"] == stored.image_uri == str(tmp_path / "chelsea__brick.png")
    assert written["output"]["image_identity"] == stored.image_identity is not None
    failed = PairSpec(
        id="coffee__hubble",
        content="content/coffee.jpg",
        styles=["styles/hubble.jpg", "styles/ihc.jpg"],
        params=StyleParams(size=32, iterations=2, style_weight=7.0),
    )
    error = {"type": "OutOfMemory", "message": "CUDA out of memory", "iteration": 3}
    record_failure(failed, {}, str(tmp_path), None, error)
    _same_as_before(json.loads((tmp_path / "coffee__hubble.json").read_bytes()), golden("failed.json"))


def test_a_pair_record_comes_from_the_model() -> None:
    record = parse_record(golden("succeeded.json"))
    assert record is not None
    spec = PairSpec(id="chelsea__brick", content="c.jpg", styles=["s.jpg"], params=StyleParams(size=32))
    pair = PairRecord.of(spec, record)
    assert (pair.status, pair.json_uri) == ("succeeded", "/tmp/capture-out/chelsea__brick.json")
    assert pair.image_uri == "/tmp/capture-out/chelsea__brick.png"
    assert pair.image_identity == golden("succeeded.json")["output"]["image_identity"]
    assert pair.final_losses == {"content": 1.5, "style": 0.25, "tv": 0.0, "total": 1.75} and pair.seconds == 0.457
    assert pair.history[0] == {"iteration": 1, "total": 3.0, "content": 2.0}
    skipped = PairRecord.of(spec, record, "skipped", history=False)
    assert skipped.seconds == 0.0 and skipped.history == []


def test_keys_a_newer_nst_adds_are_kept() -> None:
    body = {**golden("succeeded.json"), "gpu_seconds": 1.5, "future": {"a": [1, None]}}
    record = parse_record(body)
    assert record is not None
    assert json.loads(record_json(record)) == body


DELETE = "<delete this key>"
# One change each to a stored record: none of them is a record of ours, so each is absent (the pair runs again).
NOT_RECORDS: dict[str, Any] = {
    "status-number": {"status": 1},
    "status-unknown": {"status": "done"},
    "id-number": {"id": 5},
    "id-huge": {"id": "p" * 5000},
    "revision-bool": {"engine_revision": True},
    "revision-text": {"engine_revision": "4"},
    "revision-past-int64": {"engine_revision": 2**70},
    "seconds-text": {"seconds": "fast"},
    "seconds-bool": {"seconds": False},
    "output-text": {"output": "out/p.png"},
    "output-json-number": {"output": {"json": 7}},
    "identity-list": {"output": {"image": "p.png", "image_identity": [1, 2]}},
    "identity-float": {"output": {"image": "p.png", "image_identity": {"size": 1.5}}},
    "no-styles": {"inputs": {"content": {"uri": "c"}, "styles": []}},
    "style-uri-null": {"inputs": {"content": {"uri": "c"}, "styles": [{"uri": None}]}},
    "losses-text": {"final_losses": {"total": "1"}},
    "history-row-list": {"history": [[1, 2]]},
    "manifest-number": {"manifest": 3},
    "schema-zero": {"schema": 0},
    "schema-text": {"schema": "2"},
    "id-missing": {"id": DELETE},
    "status-missing": {"status": DELETE},
    "inputs-missing": {"inputs": DELETE},
}


@pytest.mark.parametrize("case", sorted(NOT_RECORDS))
def test_a_record_that_does_not_parse_is_absent_to_every_reader(tmp_path: Path, case: str) -> None:
    body = {k: v for k, v in {**golden("succeeded.json"), **NOT_RECORDS[case]}.items() if v != DELETE}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(body))
    assert read_record(str(path)) is None
    assert Written.of(body) is None
    spec = PairSpec(id="p", content="c.jpg", styles=["s.jpg"], params=StyleParams(size=32))
    child = Child(id="run-1", name="t-shard-1of1", pair_ids=["p"], state="Crashed")
    entry = {"id": "p", "status": "succeeded"}
    pair = child_pair(str(tmp_path), child, spec, entry, history=True)  # the record is absent: the pair did not finish
    assert pair.status == "failed" and pair.error is not None and pair.error["type"] == "Crashed"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
FIELDS = st.sampled_from(list(golden("succeeded.json")))


@settings(
    max_examples=100, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(changes=st.dictionaries(FIELDS, JSON, max_size=4), whole=JSON)
def test_parsing_is_total(changes: dict[str, Any], whole: Any) -> None:
    for data in ({**golden("succeeded.json"), **changes}, whole):
        record = parse_record(data)
        assert record is None or isinstance(record, Record)
        assert Written.of(data) is None or record is not None
        if record is not None:
            assert json.loads(record_json(record)) == data


def test_a_non_utf8_file_name_in_a_record_reads_and_writes_back(tmp_path: Path) -> None:
    body = legacy()
    body["inputs"]["content"]["uri"] = "in/caf\udce9.jpg"  # as json.dumps writes a non-UTF-8 name: an escape
    body["error"] = {"type": "ImageError", "message": "in/caf\udce9.jpg: not an image"}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(body, indent=2))
    record = read_record(str(path))
    assert record is not None and record.inputs.content.uri == "in/caf\udce9.jpg"
    assert json.loads(record_json(record)) == body  # keys in the model's order: `error` before `run_id`
