"""Loading a manifest: read, parse, validate, expand, check inputs; and the pair list `nst validate` prints."""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import ValidationError

from nst import storage
from nst.errors import ManifestError, StorageError
from nst.manifest.expand import PairBuilder, file_stem, pydantic_problems, resolve_output
from nst.manifest.inputs import InputSettings, allowed_roots, storage_reason
from nst.manifest.inputs import check_inputs as check_input_refs
from nst.manifest.model import Manifest, ManifestFile, ParamOverrides
from nst.manifest.source import InvalidManifestError, parse_yaml
from nst.params import StyleParams, format_validation_error


def _absolute(uri: str) -> str:
    """A URI as given, or a local path made absolute."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _read(uri: str, max_bytes: int) -> bytes:
    try:
        return storage.read_bytes(uri, max_bytes=max_bytes)
    except StorageError as exc:
        raise InvalidManifestError(uri, [f"cannot read the manifest: {storage_reason(exc, uri)}"]) from None


def load_manifest(
    uri: str,
    *,
    overrides: dict[str, Any] | None = None,
    check_inputs: bool = True,
    max_bytes: int = 1_000_000,
    settings: InputSettings | None = None,
) -> Manifest:
    """Read, validate and resolve a manifest (local path, file:// or s3://); one ManifestError lists every problem.

    `overrides` (any parameters) rank above the manifest's `defaults:` and below its per-pair values. Every input
    must lie under the manifest's directory or a root of `settings` (default: `InputSettings.from_env()`); with
    `check_inputs`, each one is stat'ed once to exist and to be within the byte limits.
    """
    settings = settings if settings is not None else InputSettings.from_env()
    source = _absolute(uri)
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
        problems.add(("version",), f"unsupported version {data['version']!r}; this nst reads version 1")
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
        if reason:
            problems.add(("output",), reason)
        else:
            output = resolved or ""

    roots = allowed_roots(base_dir, settings.input_roots)
    builder = PairBuilder(problems, base_dir, data, overrides or {}, roots)
    builder.build()
    if not data.get("pairs") and "grid" not in data:
        problems.add((), "manifest has no pairs: add `pairs:` entries or a `grid:`", line=None)
    builder.check_ids()
    if check_inputs:
        check_input_refs(problems, builder.inputs, settings)
    problems.raise_if_any(source)
    return Manifest(
        name=name,
        source=source,
        output=output,
        pairs=builder.specs,
        defaults=builder.defaults_raw,
        warnings=builder.warnings,
    )


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
