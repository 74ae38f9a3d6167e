"""Loading a manifest: read, parse, validate, expand, check inputs; and the pair list `nst validate` prints."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from typing import Any

from pydantic import ValidationError

from nst import storage
from nst.engine.memory import WorkerMemory, too_big, worker_memory
from nst.errors import ManifestError, StorageError
from nst.manifest.expand import Expansion, expand, plain_uri, pydantic_problems, yaml_type
from nst.manifest.ids import file_stem
from nst.manifest.inputs import (
    InputSettings,
    allowed_roots,
    is_allowed,
    resolve_output,
    same_uri,
    storage_reason,
)
from nst.manifest.inputs import check_inputs as check_input_refs
from nst.manifest.model import Manifest, ManifestFile, PairSpec, ParamOverrides
from nst.manifest.source import InvalidManifestError, Problems, parse_yaml
from nst.params import StyleParams, format_validation_error
from nst.storage.base import MAGIC_RE, split_pattern


def _absolute(uri: str) -> str:
    """A URI as given (a `file://` URI as its path: one spelling per manifest), or a local path made absolute."""
    if uri.startswith("file:"):
        try:
            uri = plain_uri(uri)
        except StorageError as exc:
            raise InvalidManifestError(uri, [str(exc).removeprefix(f"{uri}: ")]) from None
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _read(uri: str, max_bytes: int) -> bytes:
    try:
        return storage.read_bytes(uri, max_bytes=max_bytes)
    except StorageError as exc:
        raise InvalidManifestError(uri, [f"cannot read the manifest: {storage_reason(exc, uri)}"]) from None


def _check_source(source: str, settings: InputSettings, confined: bool) -> None:
    """A manifest is a .yaml/.yml file and, for a confined run, lies under a manifest or input root; nothing is read."""
    if not re.search(r"\.ya?ml$", source.split("?", 1)[0], re.IGNORECASE):
        raise InvalidManifestError(source, ["a manifest must be a .yaml or .yml file"])
    roots = [*settings.manifest_roots, *settings.input_roots]
    if confined and not is_allowed(source, allowed_roots(None, roots)):
        where = (
            "NST_MANIFEST_ROOTS or NST_INPUT_ROOTS"
            if roots
            else "NST_MANIFEST_ROOTS (neither it nor NST_INPUT_ROOTS is set)"
        )
        raise InvalidManifestError(
            source, [f"outside the allowed manifest roots: this worker reads manifests only under {where}"]
        )


def load_manifest(
    uri: str,
    *,
    overrides: dict[str, Any] | None = None,
    check_inputs: bool = True,
    max_bytes: int = 1_000_000,
    settings: InputSettings | None = None,
    confined: bool = False,
) -> Manifest:
    """Read, validate and resolve a manifest (local path, file:// or s3://); one ManifestError lists every problem.

    `overrides` (any parameters) rank above the manifest's `defaults:` and below its per-pair values. Every input
    must lie under the manifest's directory or an input root of `settings` (default: `InputSettings.from_env()`),
    the output under the manifest's directory or an output root; with `check_inputs`, each input is stat'ed once to
    exist and to be within the byte limits. `confined` (a deployment's run): the manifest itself must lie under a
    manifest or input root, or it is not read.
    """
    settings = settings if settings is not None else InputSettings.from_env()
    source = _absolute(uri)
    _check_source(source, settings, confined)
    if overrides:
        try:
            ParamOverrides.model_validate(overrides)
        except ValidationError as exc:
            raise ManifestError(format_validation_error(exc, "overrides")) from None
    problems, data = parse_yaml(source, _read(source, max_bytes), node_budget=max(max_bytes // 2, 10_000))
    assert isinstance(data, dict)

    for key in ("defaults", "pairs", "grid"):
        if key in data and data[key] is None:  # `pairs:` with nothing under it
            del data[key]
    if "version" in data and (data["version"] != 1 or isinstance(data["version"], bool)):
        problems.add(("version",), f"must be 1 (this nst reads version 1), got {yaml_type(data['version'])}")
        problems.raise_if_any(source)
    try:
        ManifestFile.model_validate(data)
    except ValidationError as exc:
        pydantic_problems(problems, exc)

    base_dir = storage.parent(source)
    name = data["name"] if isinstance(data.get("name"), str) and data["name"] else file_stem(source)

    output = ""
    if isinstance(data.get("output"), str) and data["output"]:
        resolved, reason = resolve_output(data["output"], base_dir)
        if resolved and not is_allowed(resolved + "/", allowed_roots(base_dir, settings.output_roots)):
            reason = (
                f"{resolved} is outside the allowed output roots: outputs must lie under the manifest's directory "
                "or a root in the worker's NST_OUTPUT_ROOTS"
            )
        if reason:
            problems.add(("output",), reason)
        else:
            output = resolved or ""

    roots = allowed_roots(base_dir, settings.input_roots)
    expanded = expand(problems, base_dir, data, overrides or {}, roots, name)
    if not data.get("pairs") and "grid" not in data:
        problems.add((), "manifest has no pairs: add `pairs:` entries or a `grid:`", line=None)
    if output:
        check_outputs(problems, output, base_dir, data, expanded)
    if check_inputs:  # what a run needs: inputs that exist, pairs that fit the worker's memory
        check_input_refs(problems, expanded.inputs, settings, roots)
        check_memory(problems, expanded.specs, worker_memory())
    problems.raise_if_any(source)
    return Manifest(
        name=name,
        source=source,
        output=output,
        pairs=expanded.specs,
        defaults=expanded.defaults_raw,
        warnings=expanded.warnings,
    )


def check_memory(problems: Problems, specs: list[PairSpec], memory: WorkerMemory | None) -> None:
    """Refuse each pair too big for the worker's stated memory by the memory model (its square: the image is not
    read here), naming its size and the largest size that fits; nothing without a stated memory."""
    if memory is None:
        return
    for spec in specs:
        if reason := too_big(spec.id, spec.params, memory):
            index = re.fullmatch(r"pairs\[(\d+)\]", spec.origin)
            problems.add(("pairs", int(index.group(1))) if index else ("grid",), reason)


# --- No output is an input: the files a run writes (`<id>.png`, `<id>.iter<N>.png`, `<id>.json`, `<id>.claim`,
# `_runs/...`) never equal an input, and no grid glob can list the output folder (or its `_runs/`).

RUNS_FOLDER = "_runs"
_ITERATION = re.compile(r"\.iter\d{6}$")


def _folder(uri: str) -> str:
    """A folder URI in comparable form (symlinks resolved locally), without a trailing slash."""
    return same_uri(uri).rstrip("/") or "/"


def _output_ids(name: str) -> set[str]:
    """The pair ids whose output file `name` would be."""
    for suffix in (".json", ".claim", ".png"):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return {stem, _ITERATION.sub("", stem)} if suffix == ".png" else {stem}
    return set()


def output_file(output: str, uri: str, ids: set[str], *, folder: bool = False) -> str | None:
    """The output file of this manifest that input `uri` is, resolved (None: it is none); with `folder`, any file
    directly in the output folder counts (a glob's match: the glob reached into the output folder)."""
    try:
        return _output_file(_folder(output), same_uri(uri), ids, folder)
    except StorageError:
        return None


def _output_file(out: str, path: str, ids: set[str], folder: bool) -> str | None:
    """output_file() on comparable forms: `out` the output folder, `path` the input."""
    parent, _, name = path.rpartition("/")
    if parent == f"{out}/{RUNS_FOLDER}" or path.startswith(f"{out}/{RUNS_FOLDER}/"):
        return path
    if parent != out.rstrip("/"):
        return None
    return path if folder or _output_ids(name) & ids else None


def _reaches(pattern: list[str], path: list[str]) -> bool:
    """Whether some file directly in folder `path` (segments) matches `pattern` (`**` = any number of segments)."""
    if not pattern:
        return False
    if pattern[0] == "**":
        return _reaches(pattern[1:], path) or (bool(path) and _reaches(pattern, path[1:])) or pattern == ["**"]
    if not path:
        return len(pattern) == 1
    return fnmatch.fnmatchcase(path[0], pattern[0]) and _reaches(pattern[1:], path[1:])


def glob_reaches_output(output: str, pattern: str) -> bool:
    """Whether glob `pattern` can match a file in the output folder or its `_runs/`, whatever files exist now (the
    first night has no outputs yet). A local pattern's literal head is compared with symlinks resolved."""
    if storage.is_s3(pattern) != storage.is_s3(output):
        return False
    literal, wild = split_pattern(pattern)
    head = "/".join(literal)
    try:
        head = head if storage.is_s3(pattern) else same_uri(head or "/")
        out = _folder(output)
    except StorageError:
        return False
    segments = [*head.rstrip("/").split("/"), *wild]
    return any(_reaches(segments, folder.split("/")) for folder in (out, f"{out}/{RUNS_FOLDER}"))


def check_outputs(problems: Problems, output: str, base_dir: str, data: dict[str, Any], expanded: Expansion) -> None:
    """Refuse (a problem naming the field, the pair and the path) every input that is one of this manifest's outputs,
    and every grid glob that can list the output folder."""
    ids = {spec.id for spec in expanded.specs}
    try:
        out = _folder(output)
    except StorageError:
        return  # an output that cannot be resolved is reported where it is used
    resolved: dict[str, str | None] = {}  # each distinct input resolved once (a grid names each many times)

    def clash_of(uri: str, folder: bool = False) -> str | None:
        if uri not in resolved:
            try:
                resolved[uri] = same_uri(uri)
            except StorageError:
                resolved[uri] = None
        path = resolved[uri]
        return _output_file(out, path, ids, folder) if path is not None else None

    for ref in expanded.inputs:
        if clash := clash_of(ref.uri):
            pair = f" (pair {ref.pair_id})" if ref.pair_id else ""
            problems.add(ref.loc, f"{clash} is an output of this manifest{pair}: no output may be an input")
    grid = data.get("grid")
    if not isinstance(grid, dict):
        return
    for key in ("contents", "styles"):
        entries = grid.get(key)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if not isinstance(entry, str) or not MAGIC_RE.search(entry):
                continue
            try:
                pattern = plain_uri(storage.join(base_dir, entry))
            except StorageError:
                continue  # reported by expand
            if glob_reaches_output(output, pattern):
                problems.add(
                    ("grid", key, i),
                    f"{pattern} can match files in the output folder {output}: outputs would become inputs; "
                    "write outputs to a folder the grid's globs do not reach",
                )
    named = {ref.uri for ref in expanded.inputs}  # checked above; the rest of the grid's inputs are glob matches
    grid_specs = [spec for spec in expanded.specs if spec.origin == "grid"]
    matched = {"contents": {spec.content for spec in grid_specs}, "styles": {u for g in grid_specs for u in g.styles}}
    for key, uris in matched.items():
        for uri in sorted(uris - named):  # a symlinked folder can lead a glob into the output folder
            if clash := clash_of(uri, folder=True):
                problems.add(("grid", key), f"{clash} lies in the output folder {output}: no output may be an input")


def _short(uri: str, base: str) -> str:
    prefix = base if base.endswith("/") else base + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri


def format_pairs(manifest: Manifest, *, verbose: bool = False) -> str:
    """The expanded pair list for `nst validate`; verbose adds each pair's parameters that differ from StyleParams()."""
    base = storage.parent(manifest.source)
    lines = [
        f"manifest {manifest.name!r}: {manifest.source}",
        f"output: {manifest.output}",
        *(f"warning: {w}" for w in manifest.warnings),
        f"{len(manifest.pairs)} pair{'s' if len(manifest.pairs) != 1 else ''}:",
    ]
    width = max((len(p.id) for p in manifest.pairs), default=0)
    content_width = max((len(_short(p.content, base)) for p in manifest.pairs), default=0)
    plain = StyleParams.model_validate({}).model_dump()
    for spec in manifest.pairs:
        styles = ", ".join(_short(s, base) for s in spec.styles)
        lines.append(f"  {spec.id:<{width}}  {_short(spec.content, base):<{content_width}}  <-  {styles}")
        if verbose:
            values = spec.params.model_dump()
            for key, value in values.items():
                if value != plain[key]:
                    lines.append(f"      {key}: {json.dumps(value)}")
    return "\n".join(lines)
