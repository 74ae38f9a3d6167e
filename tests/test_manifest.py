"""Manifest loading: schema generated from StyleParams, relative resolution (local and S3), grid, ids, every error."""

from __future__ import annotations

import contextlib
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from nst import storage
from nst.errors import ManifestError, NSTError
from nst.manifest import (
    GridEntry,
    InvalidManifestError,
    ManifestFile,
    PairEntry,
    ParamOverrides,
    format_pairs,
    load_manifest,
    manifest_json_schema,
    manifest_json_schema_text,
)
from nst.manifest.ids import unique_suffix
from nst.manifest.inputs import InputSettings, root_env
from nst.params import PRESETS, StyleParams
from nst_testing.paths import REPO, SAMPLES

MANIFESTS = REPO / "manifests"
CONTENT = sorted((SAMPLES / "content").glob("*.jpg"))
STYLES = sorted((SAMPLES / "styles").glob("*.jpg"))


def put(root: str, rel: str, data: bytes) -> str:
    """Write `data` under a storage root (local dir or s3:// prefix) and return its URI."""
    uri = storage.join(root, rel)
    storage.write_bytes(uri, data)
    return uri


def image_bytes(name: str) -> bytes:
    return (SAMPLES / ("content" if (SAMPLES / "content" / name).exists() else "styles") / name).read_bytes()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A manifest directory with the sample images under images/content and images/styles."""
    for src in (*CONTENT, *STYLES):
        dst = tmp_path / "images" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return tmp_path


def write(directory: Path, text: str, name: str = "m.yaml") -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems_of(path: str, **kwargs: Any) -> list[str]:
    with pytest.raises(InvalidManifestError) as info:
        load_manifest(path, **kwargs)
    assert isinstance(info.value, ManifestError) and isinstance(info.value, NSTError)
    assert path in str(info.value)  # the message names the file
    return info.value.problems


def only_problem(path: str, **kwargs: Any) -> str:
    problems = problems_of(path, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


PAIR = """\
version: 1
output: out
pairs:
  - content: images/content/coffee.jpg
    style: images/styles/brick.jpg
"""


# ----------------------------------------------------------------------------------------------- the model


def test_param_overrides_are_generated_from_style_params() -> None:
    assert set(ParamOverrides.model_fields) == set(StyleParams.model_fields)
    for name, info in StyleParams.model_fields.items():
        assert ParamOverrides.model_fields[name].description == info.description
        assert name in PairEntry.model_fields and name in GridEntry.model_fields
    assert ParamOverrides.model_validate({}).model_dump(exclude_unset=True) == {}
    # Constraints and StyleParams' own field validators come along.
    bads: list[dict[str, Any]] = [
        {"size": 0},
        {"lr": float("inf")},
        {"optimizer": "sgd"},
        {"preset": "x"},
        {"style_blend": []},
    ]
    for bad in bads:
        with pytest.raises(ValueError):
            ParamOverrides.model_validate(bad)
    with pytest.raises(ValidationError) as unknown:
        ParamOverrides.model_validate({"not_a_param": 1})
    # pydantic's error type and location (documented identifiers), not its English wording
    assert [(e["type"], e["loc"]) for e in unknown.value.errors()] == [("extra_forbidden", ("not_a_param",))]
    assert ParamOverrides.model_validate({"preserve_colors": True}).model_dump()["preserve_colors"] == "luminance"


def test_schema_file_is_current() -> None:
    committed = (MANIFESTS / "schema.json").read_text()
    assert committed == manifest_json_schema_text(), (
        "manifests/schema.json is stale; regenerate with `make schema` "
        "(or: .venv/bin/python -c \"from nst.manifest import manifest_json_schema_text as t; print(t(), end='')\" "
        "> manifests/schema.json)"
    )


def test_schema_describes_every_parameter() -> None:
    schema = manifest_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["properties"]) == {"version", "name", "output", "defaults", "pairs", "grid"}
    pair = schema["$defs"]["PairEntry"]
    assert pair["additionalProperties"] is False
    assert set(StyleParams.model_fields) <= set(pair["properties"])
    # A parameter is its plain type (no null, no default): leaving the key out is what leaves it unset. That way the
    # flow's Custom run form (the same model) shows plain inputs; a switch (bool) keeps null as "not given".
    size = pair["properties"]["size"]
    assert {k: size[k] for k in ("minimum", "maximum", "type")} == {
        "minimum": 16,
        "maximum": 16384,
        "type": "integer",
    }
    assert "default" not in size and "anyOf" not in size
    assert pair["properties"]["keep_best"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
    assert pair["properties"]["preset"]["anyOf"][0]["enum"] == list(PRESETS)


def test_null_leaves_a_parameter_unset(tree: Path) -> None:
    path = write(
        tree,
        """
        version: 1
        output: out/
        defaults: {size: 48, iterations: null}
        pairs:
          - {id: a, content: images/content/chelsea.jpg, style: images/styles/brick.jpg, size: null}
        """,
    )
    (pair,) = load_manifest(path).pairs
    assert (pair.params.size, pair.params.iterations) == (48, StyleParams().iterations)


@pytest.mark.parametrize("name", ["demo", "grid", "s3-example", "nightly"])
def test_example_manifests_match_the_schema(name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    data = yaml.safe_load((MANIFESTS / f"{name}.yaml").read_text())
    jsonschema.validate(data, manifest_json_schema())
    ManifestFile.model_validate(data)


# ----------------------------------------------------------------------------------------------- valid manifests


def test_demo_manifest_loads() -> None:
    m = load_manifest(str(MANIFESTS / "demo.yaml"), check_inputs=True)
    assert m.name == "demo"
    assert m.output == str(MANIFESTS / "out" / "demo")
    assert [p.id for p in m.pairs] == ["astronaut__hubble", "chelsea-brick", "coffee__ihc-brick"]
    for pair in m.pairs:
        assert Path(pair.content).is_file() and all(Path(s).is_file() for s in pair.styles)
        assert pair.params.size <= 192 and 100 <= pair.params.iterations <= 200
    assert m.pairs[1].params.style_weight == 10 and m.pairs[1].overrides["style_weight"] == 10
    assert m.pairs[0].params.style_weight == StyleParams.model_fields["style_weight"].default
    assert len(m.pairs[2].styles) == 2 and m.pairs[2].params.style_blend == [0.7, 0.3]


def test_file_uri_manifest() -> None:
    uri = (MANIFESTS / "demo.yaml").as_uri()
    m = load_manifest(uri, check_inputs=True)
    # One spelling per file (issue 29): a file:// manifest resolves to plain paths, as the same manifest named by path.
    assert m.source == str(MANIFESTS / "demo.yaml") and m.output == str(MANIFESTS / "out" / "demo")
    assert m.pairs[0].content == str(MANIFESTS / "images" / "content" / "astronaut.jpg")


def test_grid_manifest_loads() -> None:
    m = load_manifest(str(MANIFESTS / "grid.yaml"), check_inputs=True)
    assert len(m.pairs) == len(CONTENT) * 2
    assert {p.id for p in m.pairs} == {f"{c.stem}__{s}" for c in CONTENT for s in ("hubble", "brick")}
    assert all(p.params.tv_weight == 0.001 and p.params.size == 128 for p in m.pairs)


def test_pairs_resolve_relative_to_the_manifest(storage_root: str) -> None:
    for name in ("coffee.jpg", "brick.jpg", "hubble.jpg"):
        put(storage_root, f"set/{'content' if name == 'coffee.jpg' else 'styles'}/{name}", image_bytes(name))
    absolute = put(storage_root, "elsewhere/astronaut.jpg", image_bytes("astronaut.jpg"))
    text = f"""\
        version: 1
        name: rel
        output: results/run1/
        pairs:
          - content: content/coffee.jpg
            style: styles/brick.jpg
          - content: {absolute}
            style: [styles/brick.jpg, ../set/styles/hubble.jpg]
    """
    uri = put(storage_root, "set/m.yaml", textwrap.dedent(text).encode())
    m = load_manifest(uri, settings=InputSettings(input_roots=[storage_root]))  # `elsewhere/` is outside set/
    assert m.source == uri
    assert m.output == storage.join(storage_root, "set/results/run1")
    first, second = m.pairs
    assert first.id == "coffee__brick"
    assert first.content == storage.join(storage_root, "set/content/coffee.jpg")
    assert first.styles == [storage.join(storage_root, "set/styles/brick.jpg")]
    assert second.id == "astronaut__brick-hubble"
    assert second.content == absolute
    assert second.styles[1] == storage.join(storage_root, "set/styles/hubble.jpg")


def test_grid_globs_on_both_backends(storage_root: str) -> None:
    for rel in ("in/a.jpg", "in/2024-06-01/IMG_1.jpg", "in/2024-06-02/IMG_1.jpg", "in/2024-06-02/deep/b.jpg"):
        put(storage_root, rel, image_bytes("coffee.jpg"))
    put(storage_root, "in/notes.txt", b"not an image")
    put(storage_root, "st/brick.jpg", image_bytes("brick.jpg"))
    put(storage_root, "st/hubble.jpg", image_bytes("hubble.jpg"))
    text = """\
        version: 1
        output: out
        grid:
          contents: ["in/**/*.jpg"]
          styles: ["st/[bh]*.jpg"]
          iterations: 7
    """
    m = load_manifest(put(storage_root, "m.yaml", textwrap.dedent(text).encode()))
    ids = sorted(p.id for p in m.pairs)
    stems = ["2024-06-01.IMG_1", "2024-06-02.IMG_1", "2024-06-02.deep.b", "a"]
    assert ids == sorted(f"{c}__{s}" for c in stems for s in ("brick", "hubble"))
    assert all(p.params.iterations == 7 and p.overrides == {"iterations": 7} for p in m.pairs)
    assert all(p.content.startswith(storage.join(storage_root, "in/")) for p in m.pairs)


def test_overrides_beat_defaults_beat_preset(tree: Path) -> None:
    path = write(
        tree,
        """\
        version: 1
        output: out
        defaults: {preset: gatys, iterations: 50, style_weight: 20}
        pairs:
          - content: images/content/coffee.jpg
            style: images/styles/brick.jpg
            style_weight: 5
          - content: images/content/chelsea.jpg
            style: images/styles/brick.jpg
            preset: tf-keras
        """,
    )
    a, b = load_manifest(path).pairs
    gatys, keras = PRESETS["gatys"], PRESETS["tf-keras"]
    assert a.params.iterations == 50 != gatys["iterations"]  # defaults beat the preset
    assert a.params.style_weight == 5  # the pair beats defaults
    assert a.params.init == gatys["init"] and a.params.content_layers == gatys["content_layers"]  # preset fills in
    assert a.overrides == {"preset": "gatys", "iterations": 50, "style_weight": 5}
    assert b.params.preset == "tf-keras" and b.params.optimizer == keras["optimizer"]  # a pair can switch preset
    assert b.params.iterations == 50 and b.params.style_weight == 20  # ... explicit defaults still beat it


def test_ids_are_derived_and_made_safe(tree: Path) -> None:
    long_name = "x" * 150 + ".jpg"
    for name in ("my photo (1).jpg", long_name, "archive.tar.jpg"):
        (tree / name).write_bytes(b"jpg")
    path = write(
        tree,
        f"""\
        version: 1
        output: out
        pairs:
          - content: "my photo (1).jpg"
            style: images/styles/brick.jpg
          - content: {long_name}
            style: images/styles/brick.jpg
          - content: archive.tar.jpg
            style: [images/styles/brick.jpg, images/styles/hubble.jpg]
        """,
    )
    ids = [p.id for p in load_manifest(path).pairs]
    assert ids[0] == f"my_photo_1_-{unique_suffix('my photo (1)')}__brick"  # a cleaned stem: -<digest of its own name>
    assert len(ids[1]) == 128 and ids[1].startswith("x" * 100)
    assert ids[2] == "archive.tar__brick-hubble"


def test_demo_pairs_resolve_their_parameters(tree: Path) -> None:
    # Selecting pairs by id moved to the run path (nst.run.plan, tested in test_batch.py).
    pairs = {p.id: p for p in load_manifest(str(MANIFESTS / "demo.yaml")).pairs}
    assert {"astronaut__hubble", "coffee__ihc-brick"} <= set(pairs)
    assert pairs["chelsea-brick"].params.preserve_colors == "luminance"


def test_overrides_rank_above_defaults_below_pairs(tree: Path) -> None:
    path = write(
        tree,
        """
        version: 1
        output: out/
        defaults: {size: 64, style_weight: 5}
        pairs:
          - {id: plain, content: images/content/chelsea.jpg, style: images/styles/brick.jpg}
          - {id: own, content: images/content/chelsea.jpg, style: images/styles/brick.jpg, size: 48}
        """,
    )
    pairs = {p.id: p.params for p in load_manifest(path, overrides={"size": 32, "iterations": 7}).pairs}
    assert (pairs["plain"].size, pairs["plain"].iterations, pairs["plain"].style_weight) == (32, 7, 5)
    assert (pairs["own"].size, pairs["own"].iterations) == (48, 7)
    with pytest.raises(ManifestError, match=r"overrides\.size"):
        load_manifest(path, overrides={"size": -1})


def test_yaml_anchors_and_merge_keys_work(tree: Path) -> None:
    path = write(
        tree,
        """\
        version: 1
        output: out
        defaults: &base {size: 64, iterations: 10}
        pairs:
          - content: images/content/coffee.jpg
            style: images/styles/brick.jpg
            <<: *base
            size: 32
        """,
    )
    (pair,) = load_manifest(path).pairs
    assert (pair.params.size, pair.params.iterations) == (32, 10)


def test_format_pairs(tree: Path) -> None:
    m = load_manifest(str(MANIFESTS / "demo.yaml"))
    short = format_pairs(m, verbose=False)
    assert "3 pairs" in short and "coffee__ihc-brick" in short
    assert "images/styles/ihc.jpg, images/styles/brick.jpg" in short
    assert "style_weight" not in short
    verbose = format_pairs(m, verbose=True)
    assert "style_weight: 10.0" in verbose and 'preserve_colors: "luminance"' in verbose
    assert "network:" not in verbose  # only what differs from the defaults


# ----------------------------------------------------------------------------------------------- bad YAML / documents


def test_invalid_yaml_names_the_line(tree: Path) -> None:
    msg = only_problem(write(tree, "version: 1\noutput: out\npairs:\n  - content: a.jpg\n    style: [b.jpg\n"))
    assert "invalid YAML" in msg and "(line 6, column 1)" in msg


def test_several_documents_are_refused(tree: Path) -> None:
    assert "invalid YAML" in only_problem(write(tree, PAIR + "---\n" + PAIR))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "~\n"])
def test_empty_manifest(tree: Path, text: str) -> None:
    assert "manifest is empty" in only_problem(write(tree, text))


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "got a list"), ("hello\n", "got a string"), ("42\n", "got an integer")]
)
def test_top_level_must_be_a_mapping(tree: Path, text: str, kind: str) -> None:
    assert kind in only_problem(write(tree, text))


def test_unsupported_version(tree: Path) -> None:
    msg = only_problem(write(tree, PAIR.replace("version: 1", "version: 2") + "junk: 1\n"))
    assert msg.endswith("version: must be 1 (this nst reads version 1), got an integer (line 1)")


def test_missing_version(tree: Path) -> None:
    assert "version: missing: add `version: 1`" in only_problem(write(tree, PAIR.replace("version: 1\n", "")))


def test_alias_bomb_is_refused_quickly(tree: Path) -> None:
    lines = ["version: 1", "output: out", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]  # 10**10 nodes expanded
    start = time.monotonic()
    msg = only_problem(write(tree, "\n".join(lines) + "\n"))
    assert time.monotonic() - start < 2
    assert "alias bomb" in msg and "(line " in msg


def test_deep_nesting_is_an_error_not_a_crash(tree: Path) -> None:
    depth = 200_000  # libyaml's own composer overflows the C stack here; ours must not
    msg = only_problem(write(tree, "version: 1\noutput: out\nx: " + "[" * depth + "]" * depth + "\n"))
    # Our prefix and one line; the rest is the YAML library's (PyYAML >= 6.0.4 has its own depth limit, with a line).
    assert msg.startswith("invalid YAML: ") and "\n" not in msg


def test_recursive_alias_is_refused(tree: Path) -> None:
    msg = only_problem(write(tree, "version: 1\noutput: out\npairs: &p\n  - content: a.jpg\n    style: *p\n"))
    assert "recursive YAML alias" in msg


def test_manifest_over_the_size_limit(tree: Path) -> None:
    path = write(tree, PAIR + "# " + "x" * 2000 + "\n")
    assert "larger than the limit of 1000 bytes" in only_problem(path, max_bytes=1000)
    load_manifest(path, max_bytes=10_000)


def test_python_tags_are_refused(tree: Path) -> None:
    msg = only_problem(write(tree, PAIR + "x: !!python/object/apply:os.system ['echo hi']\n"))
    # The tag is the file's own text: named by position, never quoted.
    assert msg == "invalid YAML: could not determine a constructor for the tag (not shown) (line 6, column 4)"


def test_non_utf8_manifest(tree: Path) -> None:
    path = tree / "m.yaml"
    path.write_bytes(PAIR.encode() + b"\xff\xfe: 1\n")
    assert "not UTF-8" in only_problem(str(path))


def test_missing_manifest_file(tmp_path: Path) -> None:
    msg = only_problem(str(tmp_path / "nope.yaml"))
    assert "cannot read the manifest: not found" in msg


def test_duplicate_yaml_keys(tree: Path) -> None:
    msg = only_problem(write(tree, PAIR + "    size: 64\n    size: 32\n"))
    assert msg == "pairs[0].size: duplicate key (first at line 6) (line 7)"


# ----------------------------------------------------------------------------------------------- bad values


def test_bad_value_names_pair_field_and_line(tree: Path) -> None:
    msg = only_problem(write(tree, PAIR + "    style_weight: -3\n"))
    # Ours: the location, the line and one line of text; the reason in between is pydantic's wording.
    assert msg.startswith("pairs[0].style_weight: ") and msg.endswith(" (line 6)") and "\n" not in msg


PAIR2 = "  - content: images/content/chelsea.jpg\n    style: images/styles/brick.jpg\n"


@pytest.mark.parametrize(
    ("default", "expected"),
    [
        ("optimizer: sgd", "defaults.optimizer: * (line 4)"),  # * = pydantic's reason, not ours to assert
        ("style_layer_weights: [1, 2]", "defaults: style_layer_weights has 2 values for 5 style_layers (line 4)"),
    ],
)
def test_bad_default_is_reported_once(tree: Path, default: str, expected: str) -> None:
    text = PAIR.replace("output: out\n", f"output: out\ndefaults:\n  {default}\n") + PAIR2
    msg = only_problem(write(tree, text))
    head, star, tail = expected.partition("*")
    assert (msg.startswith(head) and msg.endswith(tail) and "\n" not in msg) if star else msg == expected


def test_unknown_parameter_suggests_the_name(tree: Path) -> None:
    msg = only_problem(write(tree, PAIR + "    style_wieght: 5\n"))
    assert msg == "pairs[0].style_wieght: unknown parameter (did you mean 'style_weight'?) (line 6)"


def test_unknown_top_level_key(tree: Path) -> None:
    msg = only_problem(write(tree, PAIR + "outputs: x\n"))
    assert msg.startswith("outputs: unknown key") and msg.endswith("(line 6)")


def test_missing_required_fields(tree: Path) -> None:
    text = "version: 1\npairs:\n  - style: images/styles/brick.jpg\n"
    assert problems_of(write(tree, text)) == [
        "pairs[0].content: missing (required) (line 3)",
        "output: missing (required)",
    ]


def test_style_must_be_a_path_or_list(tree: Path) -> None:
    msg = only_problem(write(tree, PAIR.replace("style: images/styles/brick.jpg", "style: []")))
    assert msg == "pairs[0].style: must be an image path/URI or a non-empty list of them (line 5)"


def test_pair_must_be_a_mapping(tree: Path) -> None:
    assert only_problem(write(tree, PAIR + "  - 42\n")) == "pairs[1]: must be a mapping, got an integer (line 6)"


@pytest.mark.parametrize("bad", ["bad id", "a/b", ".", "..", "x" * 129])
def test_bad_ids(tree: Path, bad: str) -> None:
    msg = only_problem(write(tree, PAIR.replace("  - content:", f"  - id: '{bad}'\n    content:")))
    assert msg.startswith("pairs[0].id: ") and "valid id" in msg and msg.endswith("(line 4)")


def test_duplicate_ids(tree: Path) -> None:
    text = PAIR + PAIR.split("pairs:\n")[1] + "  - id: coffee__brick\n    content: a.jpg\n    style: b.jpg\n"
    problems = problems_of(write(tree, text), check_inputs=False)
    assert problems == [
        "pairs[1]: duplicate id 'coffee__brick' (also pairs[0]), derived from the file names; "
        "set `id:` to tell them apart (line 6)",
        "pairs[2].id: duplicate id 'coffee__brick' (also pairs[0]) (line 8)",
    ]


def test_grid_id_taken_by_a_pair_gets_a_suffix(tree: Path) -> None:
    text = PAIR + "grid:\n  contents: [images/content/coffee.jpg]\n  styles: [images/styles/*.jpg]\n"
    ids = [p.id for p in load_manifest(write(tree, text)).pairs]
    assert ids[0] == "coffee__brick" and len(set(ids)) == len(ids)
    tag = unique_suffix(f"{tree}/images/content/coffee.jpg", f"{tree}/images/styles/brick.jpg")
    assert [i for i in ids[1:] if i.startswith("coffee__brick")] == [f"coffee__brick-{tag}"]


def test_style_blend_must_match_the_styles(tree: Path) -> None:
    text = PAIR.replace("style: images/styles/brick.jpg", "style: [images/styles/brick.jpg, images/styles/ihc.jpg]")
    msg = only_problem(write(tree, text + "    style_blend: [1, 2, 3]\n"))
    assert msg == "pairs[0].style_blend: has 3 values for 2 styles (line 6)"
    from_defaults = text.replace("output: out\n", "output: out\ndefaults:\n  style_blend: [1]\n")
    msg = only_problem(write(tree, from_defaults))
    assert msg == "pairs[0].style_blend: has 1 values for 2 styles (set in defaults) (line 4)"


def test_cross_field_error_points_at_the_field(tree: Path) -> None:
    msg = only_problem(write(tree, PAIR + "    size: 64\n    style_layer_weights: [1, 2]\n"))
    assert msg == "pairs[0]: style_layer_weights has 2 values for 5 style_layers (line 7)"


def test_non_finite_numbers_are_refused(tree: Path) -> None:
    msg = only_problem(write(tree, PAIR + "    lr: .inf\n"))  # passes `> 0`; StyleParams' validator refuses it
    assert msg == "pairs[0].lr: must be a finite number (line 6)"


@pytest.mark.parametrize("text", ["version: 1\noutput: out\npairs: []\n", "version: 1\noutput: out\npairs:\n"])
def test_no_pairs(tree: Path, text: str) -> None:
    assert "manifest has no pairs" in only_problem(write(tree, text))


def test_grid_glob_matching_nothing_is_a_warning(tree: Path) -> None:
    text = "version: 1\noutput: out\ngrid:\n  contents: [images/content/*.png]\n  styles: [images/styles/brick.jpg]\n"
    m = load_manifest(write(tree, text))
    assert m.pairs == [] and m.warnings == ["grid.contents[0]: 'images/content/*.png' matched no files (line 4)"]


def test_input_above_the_bucket_root(s3_env: Any, s3_bucket: str) -> None:
    text = PAIR.replace("images/content/coffee.jpg", "../../coffee.jpg")
    uri = put(f"s3://{s3_bucket}/", "m.yaml", text.encode())
    assert "goes above the bucket root" in only_problem(uri, check_inputs=False)


# ----------------------------------------------------------------------------------------------- output


OUTSIDE = (
    "is outside the allowed output roots: outputs must lie under the manifest's directory or a root in the worker's "
    "NST_OUTPUT_ROOTS"
)


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("../out/demo/", "{parent}/out/demo " + OUTSIDE),
        ("a/../../b", "{parent}/b " + OUTSIDE),
        ("/tmp/out", "/tmp/out " + OUTSIDE),
        ("s3://bucket/p", "s3://bucket/p " + OUTSIDE),
        ("~/out", "'~' is not expanded; use a path relative to the manifest, an absolute path or s3://"),
        (
            "file:///tmp/out",
            "file:// URIs are not accepted; use a path (relative to the manifest, or absolute) or s3://",
        ),
        ("s3://bucket/a/../b", "'.' and '..' components are not allowed in an s3:// output"),
        ("s3:///x", "an s3:// output names no bucket"),
        ("http://host/x", "unsupported scheme (use a path or s3://)"),
        ("out\\..\\..\\x", "must not contain backslashes or NUL characters"),
    ],
)
def test_output_cannot_escape(tree: Path, output: str, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NST_OUTPUT_ROOTS", raising=False)  # the default: only under the manifest's own directory
    msg = only_problem(write(tree, PAIR.replace("output: out", f"output: '{output}'")))
    assert msg == f"output: {reason.format(parent=tree.parent)} (line 2)"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("out/demo/", "{tree}/out/demo"),
        (".", "{tree}"),
        ("{tree}/abs/", "{tree}/abs"),
        ("s3://bucket/p/q/", "s3://bucket/p/q"),
        ("s3://b", "s3://b"),
        ("/srv/results/night", "/srv/results/night"),
    ],
)
def test_output_resolution(tree: Path, output: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NST_OUTPUT_ROOTS", "s3://bucket/p/,s3://b,/srv/results")
    m = load_manifest(write(tree, PAIR.replace("output: out", f"output: '{output.format(tree=tree)}'")))
    assert m.output == expected.format(tree=tree)


def test_a_symlinked_output_folder_is_judged_by_where_it_points(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 18.2: `out -> /elsewhere` inside the manifest's directory is outside, unless a root allows /elsewhere."""
    monkeypatch.delenv("NST_OUTPUT_ROOTS", raising=False)
    elsewhere = tree.parent / "elsewhere"
    elsewhere.mkdir()
    (tree / "out").symlink_to(elsewhere)
    (tree / "deep").mkdir()
    (tree / "deep" / "link").symlink_to(elsewhere)
    for output in ("out", "out/night", "deep/link/x"):
        msg = only_problem(write(tree, PAIR.replace("output: out", f"output: {output}")))
        assert msg == f"output: {tree}/{output} {OUTSIDE} (line 2)"
    (tree / "inside").mkdir()
    (tree / "ok").symlink_to(tree / "inside")  # a link that stays inside is fine
    assert load_manifest(write(tree, PAIR.replace("output: out", "output: ok"))).output == f"{tree}/ok"
    monkeypatch.setenv("NST_OUTPUT_ROOTS", str(elsewhere))
    assert load_manifest(write(tree, PAIR)).output == f"{tree}/out"


def test_s3_outputs_are_confined(s3_env: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 18.2: an S3-hosted manifest writes under its own prefix or a prefix of NST_OUTPUT_ROOTS, nowhere else."""
    monkeypatch.delenv("NST_OUTPUT_ROOTS", raising=False)
    monkeypatch.setenv("NST_INPUT_ROOTS", str(SAMPLES))
    base = f"s3://{s3_bucket}/jobs/"
    body = PAIR.replace("images/content/coffee.jpg", str(SAMPLES / "content" / "coffee.jpg"))
    body = body.replace("images/styles/brick.jpg", str(SAMPLES / "styles" / "brick.jpg"))
    uri = put(base, "m.yaml", body.encode())
    assert load_manifest(uri).output == f"{base}out"
    refused = {
        f"s3://{s3_bucket}/other": f"s3://{s3_bucket}/other",
        f"s3://{s3_bucket}/jobsx/": f"s3://{s3_bucket}/jobsx",  # a sibling prefix that merely starts alike
        "s3://another-bucket/jobs/": "s3://another-bucket/jobs",
        "../other": f"s3://{s3_bucket}/other",
        "/tmp/out": "/tmp/out",  # a worker's local disk
    }
    for output, resolved in refused.items():
        uri = put(base, "m.yaml", body.replace("output: out", f"output: '{output}'").encode())
        assert only_problem(uri, check_inputs=False) == f"output: {resolved} {OUTSIDE} (line 2)"
    monkeypatch.setenv("NST_OUTPUT_ROOTS", f"s3://{s3_bucket}/other/,s3://another-bucket/")
    for output in (f"s3://{s3_bucket}/other", "s3://another-bucket/jobs/"):
        uri = put(base, "m.yaml", body.replace("output: out", f"output: '{output}'").encode())
        assert load_manifest(uri, check_inputs=False).output == output.rstrip("/")


def test_a_refused_output_is_never_written(s3_env: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run path stops at the manifest: no `_runs/` record, no claim, no PNG under the refused prefix."""
    from nst.run import run
    from nst.run_options import RunOptions

    monkeypatch.delenv("NST_OUTPUT_ROOTS", raising=False)
    monkeypatch.setenv("NST_INPUT_ROOTS", str(SAMPLES))
    body = PAIR.replace("images/content/coffee.jpg", str(SAMPLES / "content" / "coffee.jpg"))
    body = body.replace("images/styles/brick.jpg", str(SAMPLES / "styles" / "brick.jpg"))
    body = body.replace("output: out", f"output: s3://{s3_bucket}/victim/\ndefaults: {{size: 32, iterations: 1}}")
    uri = put(f"s3://{s3_bucket}/jobs/", "m.yaml", body.encode())
    storage.write_bytes(f"s3://{s3_bucket}/victim/coffee__brick.json", b"{}")
    with pytest.raises(ManifestError, match="outside the allowed output roots"):
        run(uri, RunOptions())
    assert [i.uri for i in storage.list_prefix(f"s3://{s3_bucket}/victim/")] == [
        f"s3://{s3_bucket}/victim/coffee__brick.json"
    ]


# ----------------------------------------------------------------------------------------------- confined manifests


def test_a_confined_run_reads_manifests_only_under_its_roots(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 18.1: on a deployment (`confined=True`) the manifest lies under NST_MANIFEST_ROOTS or NST_INPUT_ROOTS."""
    for name in ("NST_MANIFEST_ROOTS", "NST_INPUT_ROOTS"):
        monkeypatch.delenv(name, raising=False)
    path = write(tree, PAIR)
    assert load_manifest(path).pairs  # `nst validate` / `nst run` on one's own machine: not confined
    read: list[str] = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, **kw: read.append(uri) or real(uri, **kw))
    assert only_problem(path, confined=True) == (
        "outside the allowed manifest roots: this worker reads manifests only under NST_MANIFEST_ROOTS "
        "(neither it nor NST_INPUT_ROOTS is set)"
    )
    monkeypatch.setenv("NST_MANIFEST_ROOTS", str(tree / "jobs"))
    assert only_problem(path, confined=True) == (
        "outside the allowed manifest roots: this worker reads manifests only under NST_MANIFEST_ROOTS or "
        "NST_INPUT_ROOTS"
    )
    (tree / "jobs").mkdir()
    (tree / "jobs" / "link.yaml").symlink_to(path)  # a link inside the root to a manifest outside it
    assert "outside the allowed manifest roots" in only_problem(str(tree / "jobs" / "link.yaml"), confined=True)
    assert read == []  # refused manifests are never read
    monkeypatch.setenv("NST_MANIFEST_ROOTS", f"{tree / 'jobs'},{tree}")
    assert load_manifest(path, confined=True).pairs
    monkeypatch.delenv("NST_MANIFEST_ROOTS")
    monkeypatch.setenv("NST_INPUT_ROOTS", str(tree))
    assert load_manifest(path, confined=True).pairs


def test_a_confined_run_on_s3(s3_env: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NST_MANIFEST_ROOTS", f"s3://{s3_bucket}/jobs/")
    inside = put(f"s3://{s3_bucket}/jobs/", "m.yaml", PAIR.encode())
    outside = put(f"s3://{s3_bucket}/private/", "m.yaml", PAIR.encode())
    assert "outside the allowed manifest roots" in only_problem(outside, confined=True)
    assert "outside the allowed manifest roots" in only_problem(
        f"s3://{s3_bucket}/jobs/../private/m.yaml", confined=True
    )
    assert all("not found" in p for p in problems_of(inside, confined=True))  # read, and checked as usual


def test_root_settings_pass_on_to_child_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NST_INPUT_ROOTS", "s3://a/")
    monkeypatch.setenv("NST_OUTPUT_ROOTS", "s3://b/ , /srv/out")
    monkeypatch.delenv("NST_MANIFEST_ROOTS", raising=False)
    assert root_env() == {"NST_INPUT_ROOTS": "s3://a/", "NST_OUTPUT_ROOTS": "s3://b/ , /srv/out"}
    settings = InputSettings.from_env()
    assert (settings.input_roots, settings.output_roots, settings.manifest_roots) == (
        ["s3://a/"],
        ["s3://b/", "/srv/out"],
        [],
    )


# ----------------------------------------------------------------------------------------------- every problem at once


def test_every_problem_is_listed(tree: Path) -> None:
    text = """\
        version: 1
        output: ../escape
        defaults:
          iterationz: 5
        pairs:
          - content: images/content/astronaut.jpg
            style: images/styles/hubble.jpg
            style_weight: -3
          - content: images/content/missing.jpg
            style: [images/styles/hubble.jpg, images/styles/nope.jpg]
          - content: images/content/astronaut.jpg
            style: images/styles/hubble.jpg
        grid:
          contents: [images/content/*.png]
          styles: [images/styles/brick.jpg]
        topkey: 3
    """
    with pytest.raises(InvalidManifestError) as info:
        load_manifest(write(tree, text))
    problems = info.value.problems
    # pairs[0]'s reason is pydantic's wording: assert our location and line only.
    assert problems[2].startswith("pairs[0].style_weight: ") and problems[2].endswith(" (line 8)")
    problems[2] = "pairs[0].style_weight: (pydantic's reason) (line 8)"
    assert problems == [
        f"output: {tree.parent}/escape {OUTSIDE} (line 2)",
        "defaults.iterationz: unknown parameter (did you mean 'iterations'?) (line 4)",
        "pairs[0].style_weight: (pydantic's reason) (line 8)",
        f"pairs[1].content: not found: {tree}/images/content/missing.jpg (pair missing__hubble-nope) (line 9)",
        f"pairs[1].style[1]: not found: {tree}/images/styles/nope.jpg (pair missing__hubble-nope) (line 10)",
        "pairs[2]: duplicate id 'astronaut__hubble' (also pairs[0]), derived from the file names; "
        "set `id:` to tell them apart (line 11)",
        "topkey: unknown key (expected version, name, output, defaults, pairs, grid) (line 16)",
    ]
    assert str(info.value).startswith(f"{tree}/m.yaml: 7 problems:\n  output: ")


# ----------------------------------------------------------------------------------------------- input checks


def test_missing_inputs_one_stat_each_no_listing(storage_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        put(storage_root, f"c/{i}.jpg", image_bytes("coffee.jpg"))
    put(storage_root, "s/brick.jpg", image_bytes("brick.jpg"))
    pairs = "".join(f"  - content: c/{i}.jpg\n    style: s/brick.jpg\n" for i in range(5))
    text = f"version: 1\noutput: out\ndefaults:\n  weights: w/vgg.pth\npairs:\n{pairs}"
    uri = put(storage_root, "m.yaml", text.encode())
    calls: list[str] = []
    real = storage.stat

    def spy(target: str, **kwargs: Any) -> storage.ObjectInfo:
        calls.append(target)
        return real(target, **kwargs)

    def no_listing(prefix: str) -> list[storage.ObjectInfo]:
        raise AssertionError(f"listed {prefix}")

    monkeypatch.setattr(storage, "stat", spy)
    monkeypatch.setattr(storage, "list_prefix", no_listing)
    problems = problems_of(uri)
    named = {f"c/{i}.jpg" for i in range(5)} | {"s/brick.jpg", "w/vgg.pth"}
    assert sorted(calls) == sorted(storage.join(storage_root, rel) for rel in named)
    assert problems == [
        f"defaults.weights: not found: {storage.join(storage_root, 'w/vgg.pth')} (line 4)",
        f"pairs[3].content: not found: {storage.join(storage_root, 'c/3.jpg')} (pair 3__brick) (line 12)",
        f"pairs[4].content: not found: {storage.join(storage_root, 'c/4.jpg')} (pair 4__brick) (line 14)",
    ]
    calls.clear()
    assert len(load_manifest(uri, check_inputs=False).pairs) == 5
    assert calls == []


def test_missing_bucket_is_one_clear_line(s3_env: Any, s3_bucket: str) -> None:
    text = PAIR.replace("images/content/coffee.jpg", "s3://nst-no-such-bucket-7f3a/c/coffee.jpg")
    uri = put(f"s3://{s3_bucket}/", "m.yaml", text.encode())
    problems = problems_of(uri, settings=InputSettings(input_roots=["s3://nst-no-such-bucket-7f3a/"]))
    assert problems == [
        "pairs[0].content: not found: s3://nst-no-such-bucket-7f3a/c/coffee.jpg (pair coffee__brick) (line 4)",
        f"pairs[0].style: not found: s3://{s3_bucket}/images/styles/brick.jpg (pair coffee__brick) (line 5)",
    ]


def test_bad_credentials_are_one_clear_line(s3_env: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = put(f"s3://{s3_bucket}/", "m.yaml", PAIR.encode())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    storage.reset_clients()
    msg = only_problem(uri)
    assert msg.startswith("cannot read the manifest: the S3 endpoint rejected the credentials")
    assert "wrong-secret" not in msg


def test_nightly_manifest_on_s3(s3_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client = s3_env.client()
    for bucket in ("nst-photos", "nst-house-styles"):
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
    for key in ("incoming/2024-06-01/IMG_0001.jpg", "incoming/2024-06-02/IMG_0001.jpg", "incoming/chelsea.jpg"):
        client.put_object(Bucket="nst-photos", Key=key, Body=image_bytes("chelsea.jpg"))
    client.put_object(Bucket="nst-photos", Key="incoming/2024-06-02/IMG_0001.json", Body=b"{}")
    for style in ("hubble", "brick", "ihc"):
        client.put_object(Bucket="nst-house-styles", Key=f"{style}.jpg", Body=image_bytes(f"{style}.jpg"))
    # The nightly worker's setting (README): photos and house styles are read from their own buckets.
    monkeypatch.setenv("NST_INPUT_ROOTS", "s3://nst-photos/incoming/,s3://nst-house-styles/")
    monkeypatch.setenv("NST_OUTPUT_ROOTS", "s3://nst-results/nightly/")
    m = load_manifest(str(MANIFESTS / "nightly.yaml"))
    assert m.output == "s3://nst-results/nightly"
    assert len(m.pairs) == 9
    assert {p.id for p in m.pairs if p.styles == ["s3://nst-house-styles/brick.jpg"]} == {
        "2024-06-01.IMG_0001__brick",
        "2024-06-02.IMG_0001__brick",
        "chelsea__brick",
    }
    client.delete_object(Bucket="nst-house-styles", Key="ihc.jpg")
    assert only_problem(str(MANIFESTS / "nightly.yaml")).startswith(
        "grid.styles[2]: not found: s3://nst-house-styles/ihc.jpg (line"
    )


def test_manifest_json_is_serialisable() -> None:
    m = load_manifest(str(MANIFESTS / "demo.yaml"))
    again = json.loads(m.model_dump_json())
    assert again["pairs"][2]["params"]["style_blend"] == [0.7, 0.3]
