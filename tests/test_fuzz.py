"""Fuzz harness (issue 29): generated manifests, records, indexes, claims, ids files and image headers through
`validate`, `plan` and the readers. 0 uncaught exceptions (only an `NSTError`, one per bad file, or "absent"), and
0 messages quoting file content: every generated file holds MARKER, and no message may contain it.

In the suite each target runs FUZZ_EXAMPLES examples (all targets together well under 60 s); `make fuzz` sets
NST_FUZZ_EXAMPLES so that all targets together run at least 100,000.
"""

import gzip
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nst.engine.images import load_image
from nst.errors import NSTError
from nst.manifest import load_manifest
from nst.run.claims import claim_pair, parse_claim
from nst.run.index import Written, index_uri, read_index
from nst.run.planner import listed_ids, plan
from nst.run.records import Record, read_record
from nst.run_options import RunOptions
from nst_testing.manifests import ONE_PAIR_MANIFEST, copy_samples

FUZZ_EXAMPLES = int(os.environ.get("NST_FUZZ_EXAMPLES", "40"))
MARKER = "Qz9!MARK#9zQ"  # a "secret" planted in every generated file; never a plain word, so keys hiding applies
fuzz = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=FUZZ_EXAMPLES <= 100,  # the suite's examples are the same in every run; `make fuzz` explores
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# Hypothesis warns when the global `random` state changes while a strategy draws. No strategy here uses `random`;
# other threads of a pytest-xdist process that ran flows before may (Prefect's client and botocore jitter their
# retries with the global `random`): the warning came in some runs of make test and not others.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning"
)
# Keys whose values messages may name (paths, the manifest's name): their generated values never hold MARKER.
NAMED_KEYS = ["name", "output", "content", "style", "styles", "contents", "weights"]
NAMED = st.sampled_from(["content/chelsea.jpg", "content/*.jpg", "/etc/passwd", "../x.jpg", "s3://b/k.jpg", "", "out/"])
NAMED = NAMED | st.lists(st.sampled_from(["styles/brick.jpg", "styles/*.jpg", "content/missing.jpg"]), max_size=3)
KEYS = ["version", "defaults", "pairs", "grid", "id", "size", "iterations", "log_every", "seed", "device", "preset"]
KEYS += ["style_weight", "content_layers", "max_failures"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A manifest directory with the sample images and an output folder, shared by every example of the module."""
    root = tmp_path_factory.mktemp("fuzz")
    copy_samples(root)
    (root / "out" / "_runs").mkdir(parents=True)
    (root / "m.yaml").write_text(ONE_PAIR_MANIFEST)
    yield root


def assert_no_marker(*texts: object) -> None:
    for text in texts:
        assert MARKER not in str(text), text


def only_nst_errors(call: Callable[[], Any]) -> Any:
    """`call()`; an NSTError is a refusal (checked for the marker), anything else fails the test."""
    try:
        return call()
    except NSTError as exc:
        assert_no_marker(exc)
        return None


# --- strategies

# Number-like strings that overflow or are not JSON/YAML numbers (by name: Hypothesis' statistics stay readable).
ODD_NUMBERS = {"hex": "0x" + "f" * 4001, "e400": "1e400", "-e400": "-1e400", "9s": "9" * 4200, "inf": ".inf"}
ODD_NUMBERS |= {"nan": ".nan", "bin": "0b101", "sexagesimal": "1:30:00", "null": "~", "NaN": "NaN"}
ODD_NUMBERS |= {"Infinity": "Infinity", "10^5000": "1" + "0" * 5000, "e-400": "1e-400", "-0": "-0", "E308": "1E308"}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**30, max_value=10**60),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.just(MARKER),
    st.sampled_from(sorted(ODD_NUMBERS)).map(ODD_NUMBERS.__getitem__),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner),
    max_leaves=10,
)
NUMBER_TEXT = sorted(ODD_NUMBERS.values(), key=len, reverse=True)  # JSON writes them as strings: spliced in raw


def _json_text(value: Any) -> str:
    """JSON of `value`, with some of its strings replaced by raw number text (1e400, NaN, 5,000 digits ...)."""
    text = json.dumps(value)
    for raw in NUMBER_TEXT:
        text = text.replace(json.dumps(raw), raw)
    return text


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` cut, spliced with deep nesting, MARKER or random bytes, or whole random bytes."""
    how = draw(st.sampled_from(["as-is", "cut", "splice", "deep", "random"]))
    if how == "cut":
        return base[: draw(st.integers(0, len(base)))]
    if how == "splice":
        at = draw(st.integers(0, len(base)))
        piece = draw(st.sampled_from([MARKER.encode(), b"[" * 100_000, b"\xff\xfe", b"1e400", b'"'])) + draw(
            st.binary()
        )
        return base[:at] + piece + base[at:]
    if how == "deep":
        return b'{"x": ' + b"[" * draw(st.integers(50, 300_000)) + MARKER.encode()
    if how == "random":
        return draw(st.binary(max_size=200)) + MARKER.encode()
    return base


def record_like(pair_id: str = "p") -> st.SearchStrategy[bytes]:
    """Records shaped like ours (the sample pair's), with fields replaced by generated values, then mutated."""
    fields = st.fixed_dictionaries(
        {},
        optional={
            "status": st.sampled_from(["succeeded", "failed"]) | json_values,
            "params": json_values,
            "engine_revision": json_values,
            "seconds": json_values,
            "output": json_values,
            "weights": json_values,
            "error": json_values,
            "history": json_values,
            "extra": st.just(MARKER),
        },
    )

    def build(changes: dict[str, Any]) -> str:
        body = {
            "schema": 2,
            "id": pair_id,
            "status": "succeeded",
            "params": {},
            "inputs": {"content": {"uri": MARKER, "sha256": MARKER}, "styles": [{"uri": "s", "sha256": None}]},
            "engine_revision": 1,
            "output": {"image": MARKER, "json": "x"},
        }
        return _json_text({**body, **changes})

    return fields.map(build).flatmap(lambda text: mutated(text.encode()))


def index_like() -> st.SearchStrategy[bytes]:
    """Index bodies (entries shaped like Written, values generated), gzip'ed, or mutated before or after gzip."""
    facts = st.fixed_dictionaries(
        {f: json_values for f in Written.__dataclass_fields__ if f != "inputs"},
        optional={"inputs": st.lists(st.lists(json_values, max_size=4), max_size=3)},
    )
    entry = st.tuples(json_values, facts)
    body = st.fixed_dictionaries(
        {
            "schema": st.sampled_from([1, 2, "1", MARKER]),
            "records": st.dictionaries(st.text(max_size=4), entry, max_size=3) | json_values,
        }
    )
    raw = body.map(lambda b: _json_text(b).encode()).flatmap(mutated)
    return st.one_of(raw.map(gzip.compress), raw.map(gzip.compress).flatmap(mutated), raw)


def claim_like() -> st.SearchStrategy[bytes]:
    body = st.fixed_dictionaries(
        {},
        optional={
            "run_id": st.sampled_from(["other-run", MARKER, "", "x" * 200]) | json_values,
            "expires_at": json_values,
            "claimed_at": st.sampled_from([MARKER, "2026-01-01T00:00:00+00:00"]) | json_values,
        },
    )
    return body.map(lambda b: _json_text(b).encode()).flatmap(mutated)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@st.composite
def image_like(draw: st.DrawFn) -> bytes:
    """A PNG or JPEG header with generated sizes and chunks (MARKER in a text chunk / comment), cut or spliced."""
    width, height = draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1))
    if draw(st.booleans()):
        ihdr = struct.pack(
            ">IIBBBBB", width, height, draw(st.sampled_from([1, 8, 16, 3])), draw(st.integers(0, 6)), 0, 0, 0
        )
        body = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"tEXt", b"k\0" + MARKER.encode())
        body += png_chunk(b"IDAT", zlib.compress(draw(st.binary(max_size=64)))) + png_chunk(b"IEND", b"")
    else:
        sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height % 65536, width % 65536, 1) + b"\x01\x11\x00"
        body = b"\xff\xd8" + b"\xff\xfe" + struct.pack(">H", len(MARKER) + 2) + MARKER.encode() + sof
        body += draw(st.binary(max_size=64)) + b"\xff\xd9"
    return draw(mutated(body))


@st.composite
def manifest_text(draw: st.DrawFn) -> str:
    """YAML text: the sample manifest with generated keys and values (YAML-dumped), or odd YAML spliced into it."""
    doc: dict[str, Any] = yaml.safe_load(ONE_PAIR_MANIFEST)
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.sampled_from(["top", "defaults", "pair"]))
        pairs = doc.get("pairs")
        pair = pairs[0] if isinstance(pairs, list) and pairs else None
        target = doc.get("defaults") if where == "defaults" else pair if where == "pair" else doc
        target = target if isinstance(target, dict) else doc
        key = draw(st.sampled_from([*KEYS, *NAMED_KEYS, MARKER]))
        target[key] = draw(NAMED if key in NAMED_KEYS else json_values)
    text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))
    odd = [
        f"# {MARKER}\n",
        f"{MARKER}: 1\n",
        f"log_every: !!int {MARKER}\n",
        f"size: !!float '{MARKER}'\n",
        f"a: &x [{MARKER}, *x]\n",
        "b: !!bool maybe\n",
        f"c: !{MARKER} 1\n",
        "version: 1\nversion: 2\n",
        "log_every: 0x" + "f" * 4001 + "\n",
        "x: " + "[" * 5000 + "\n",
        "<<: {size: " + MARKER + "}\n",
        f"seed: !!timestamp {MARKER}\n",
    ]
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(0, 3))):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(odd) | st.text(max_size=30)))
    return "".join(lines)


# --- targets


@fuzz
@given(text=manifest_text())
def test_fuzz_manifests_through_validate_and_plan(ws: Path, text: str) -> None:
    path = ws / "fuzzed.yaml"
    path.write_text(text, errors="surrogateescape")
    manifest = only_nst_errors(lambda: load_manifest(str(path)))
    if manifest is not None:
        assert_no_marker(*manifest.warnings)
        only_nst_errors(lambda: plan(manifest, RunOptions(dry_run=True)))


@fuzz
@given(data=record_like())
def test_fuzz_records_through_the_reader_and_plan(ws: Path, data: bytes) -> None:
    (ws / "out" / "p.json").write_bytes(data)
    (ws / "out" / "p.png").write_bytes(b"png")
    record = read_record(str(ws / "out" / "p.json"))
    assert record is None or isinstance(record, Record)
    if record is not None:
        Written.of(record)
    manifest = load_manifest(str(ws / "m.yaml"))
    done = plan(manifest, RunOptions(dry_run=True))
    assert [s.id for s in done.to_run] == ["p"]  # a generated record never makes the pair done


@fuzz
@given(data=index_like())
def test_fuzz_indexes_through_the_reader_and_plan(ws: Path, data: bytes) -> None:
    (ws / "out" / "p.json").unlink(missing_ok=True)
    Path(index_uri(str(ws / "out"))).write_bytes(data)
    index = read_index(str(ws / "out"))
    assert isinstance(index, dict)
    manifest = load_manifest(str(ws / "m.yaml"))
    assert [s.id for s in plan(manifest, RunOptions(dry_run=True)).to_run] == ["p"]


@fuzz
@given(data=claim_like())
def test_fuzz_claims_through_the_reader_and_claim_pair(ws: Path, data: bytes) -> None:
    claim = ws / "out" / "p.claim"
    claim.write_bytes(data)
    held = parse_claim(data)
    assert held is None or isinstance(held, dict)
    why = claim_pair(str(ws / "out"), "p", "fuzz-run")
    assert why is None or isinstance(why, str)
    assert_no_marker(why)
    claim.unlink(missing_ok=True)


@fuzz
@given(data=st.one_of(st.lists(json_values).map(lambda v: _json_text(v).encode()), claim_like()))
def test_fuzz_ids_files(ws: Path, data: bytes) -> None:
    path = ws / "out" / "_runs" / "ids.json"
    path.write_bytes(data)
    ids = listed_ids(str(path))
    assert isinstance(ids, list) and all(isinstance(i, str) for i in ids)
    try:
        listed_ids(str(path), strict=True)
    except (NSTError, ValueError, TypeError) as exc:  # what `_listed_ids` turns into one ManifestError line
        assert_no_marker(exc)


@fuzz
@given(data=image_like())
def test_fuzz_image_headers_through_load_image_and_plan(ws: Path, data: bytes) -> None:
    only_nst_errors(lambda: load_image(data, label="content 'x.png'", max_pixels=2**20))
    path = ws / "content" / "fuzzed.png"
    path.write_bytes(data)
    doc = ONE_PAIR_MANIFEST.replace("content/chelsea.jpg", "content/fuzzed.png")
    (ws / "m2.yaml").write_text(doc)
    manifest = only_nst_errors(lambda: load_manifest(str(ws / "m2.yaml")))
    if manifest is not None:
        done = plan(manifest, RunOptions(dry_run=True))
        assert_no_marker(*(f.error for f in done.inputs.values()))
