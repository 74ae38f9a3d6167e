"""Roots and input checks: every input and the output lie under allowed roots; each input exists within its limit.

Inputs may come from the manifest's own directory (or S3 prefix) plus the worker's `NST_INPUT_ROOTS`; nothing outside
them is opened, stat'ed or hashed, so no size or hash of such a file can reach an output. Outputs go under the
manifest's directory plus `NST_OUTPUT_ROOTS`. A confined run (a deployment) reads manifests only under
`NST_MANIFEST_ROOTS` or `NST_INPUT_ROOTS`. Local paths are compared after resolving symlinks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from nst import storage
from nst.errors import Loc, ManifestError, StorageError
from nst.manifest.source import Problems

STAT_THREADS = 16


# The worker's root settings: directories and s3:// prefixes, comma-separated. A parent run passes them on to its
# children (`root_env`), which load the same manifest.
ROOT_SETTINGS = {
    "input_roots": "NST_INPUT_ROOTS",
    "output_roots": "NST_OUTPUT_ROOTS",
    "manifest_roots": "NST_MANIFEST_ROOTS",
}


class InputSettings(BaseModel):
    """What the worker lets a manifest read and write (`NST_INPUT_ROOTS`, `NST_OUTPUT_ROOTS`, byte limits, ...)."""

    input_roots: list[str] = Field(
        default_factory=list, description="directories and s3:// prefixes inputs may come from, besides the manifest's"
    )
    output_roots: list[str] = Field(
        default_factory=list, description="directories and s3:// prefixes outputs may go to, besides the manifest's"
    )
    manifest_roots: list[str] = Field(
        default_factory=list, description="where a confined run (a deployment) reads manifests, besides input_roots"
    )
    max_input_bytes: int = Field(64 * 2**20, gt=0, description="largest content or style file, in bytes")
    max_weights_bytes: int = Field(2 * 2**30, gt=0, description="largest weights file, in bytes")

    @classmethod
    def from_env(cls) -> InputSettings:
        """The settings from `NST_INPUT_ROOTS`, `NST_OUTPUT_ROOTS`, `NST_MANIFEST_ROOTS` (comma-separated) and
        `NST_MAX_INPUT_BYTES`, `NST_MAX_WEIGHTS_BYTES`."""
        raw: dict[str, object] = {}
        for name, env in ROOT_SETTINGS.items():
            if roots := os.environ.get(env, "").strip():
                raw[name] = [r.strip() for r in roots.split(",") if r.strip()]
        for name in ("max_input_bytes", "max_weights_bytes"):
            if value := os.environ.get(f"NST_{name.upper()}", "").strip():
                raw[name] = value
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            bad = ", ".join(f"NST_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors() if e.get("loc"))
            raise ManifestError(f"bad worker setting {bad}") from None


def root_env() -> dict[str, str]:
    """This process's root settings that are set (`NST_INPUT_ROOTS`, ...), for a child run's environment."""
    return {env: value for env in ROOT_SETTINGS.values() if (value := os.environ.get(env, "").strip())}


def same_uri(uri: str) -> str:
    """Comparable form of a URI (local paths normalised, symlinks resolved)."""
    if storage.is_s3(uri):
        return uri
    return os.path.realpath(os.path.abspath(os.path.expanduser(storage.local_path(uri))))


def allowed_roots(manifest_dir: str | None, extra: Sequence[str]) -> list[str]:
    """The manifest's directory (if given) plus `extra`, each in comparable form with a trailing separator."""
    roots = []
    for root in (*([manifest_dir] if manifest_dir is not None else []), *extra):
        if storage.is_s3(root):
            roots.append(root if root.endswith("/") else root + "/")
        else:
            path = same_uri(root)
            roots.append(path if path.endswith(os.sep) else path + os.sep)
    return roots


def input_roots(source: str, settings: InputSettings | None = None) -> list[str]:
    """The roots a manifest at `source` reads inputs under: its own directory or prefix plus `NST_INPUT_ROOTS`."""
    settings = settings if settings is not None else InputSettings.from_env()
    return allowed_roots(storage.parent(source), settings.input_roots)


def is_allowed(uri: str, roots: Sequence[str]) -> bool:
    """Whether `uri` lies under one of `roots` (no '.' or '..' key parts on S3, symlinks resolved locally)."""
    if storage.is_s3(uri):
        if any(part in (".", "..") for part in uri[len("s3://") :].split("/")):
            return False
        return any(storage.is_s3(r) and (uri.startswith(r) or r == "s3://") for r in roots)
    if "://" in uri and not uri.startswith("file://"):
        return False
    try:
        path = same_uri(uri)
    except StorageError:
        return False
    return any(not storage.is_s3(r) and (path + os.sep).startswith(r) for r in roots)


def resolve_output(raw: str, base_dir: str) -> tuple[str | None, str | None]:
    """(output URI, None) or (None, reason): relative to the manifest, an absolute path or s3://; roots checked apart.

    Reasons never quote `raw` (the field and line name it).
    """
    if "\x00" in raw or "\\" in raw:
        return None, "must not contain backslashes or NUL characters"
    if raw.startswith("file:"):
        return None, "file:// URIs are not accepted; use a path (relative to the manifest, or absolute) or s3://"
    if storage.is_s3(raw):
        rest = raw[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            return None, "an s3:// output names no bucket"
        if any(part in ("..", ".") for part in key.split("/")):
            return None, "'.' and '..' components are not allowed in an s3:// output"
        return raw.rstrip("/") if key.strip("/") else f"s3://{bucket}", None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", raw):
        return None, "unsupported scheme (use a path or s3://)"
    if raw.startswith("~"):
        return None, "'~' is not expanded; use a path relative to the manifest, an absolute path or s3://"
    try:
        joined = storage.join(base_dir, raw)
    except StorageError:
        return None, "goes above the bucket root"
    return (joined.rstrip("/") or joined), None


@dataclass
class InputRef:
    uri: str
    loc: Loc
    pair_id: str | None
    kind: Literal["image", "weights"] = "image"


def storage_reason(exc: StorageError, uri: str) -> str:
    """A StorageError's message without its leading `uri: ` and `cannot <verb>: ` (the caller says both)."""
    return re.sub(r"^cannot \w+: ", "", str(exc).removeprefix(f"{uri}: "))


def check_inputs(
    problems: Problems, refs: Sequence[InputRef], settings: InputSettings, roots: Sequence[str] | None = None
) -> None:
    """Every named input exists and is within its byte limit: one stat (HEAD on S3) per distinct input, no listing;
    with `roots`, a local input is stat'ed beneath them, no symlink followed (one swapped in since is not stat'ed)."""
    uris = sorted({ref.uri for ref in refs})

    def stat(uri: str) -> storage.ObjectInfo | StorageError:
        try:
            return storage.stat(uri, roots=roots)
        except StorageError as exc:
            return exc

    with ThreadPoolExecutor(min(STAT_THREADS, max(1, len(uris)))) as pool:
        found = dict(zip(uris, pool.map(stat, uris), strict=True))
    for ref in refs:
        pair = f" (pair {ref.pair_id})" if ref.pair_id else ""
        info = found[ref.uri]
        if isinstance(info, StorageError):
            reason = storage_reason(info, ref.uri)
            text = f"not found: {ref.uri}" if reason.startswith("not found") else f"cannot read {ref.uri}: {reason}"
            problems.add(ref.loc, text + pair)
            continue
        limit = settings.max_weights_bytes if ref.kind == "weights" else settings.max_input_bytes
        if info.size > limit:
            setting = "NST_MAX_WEIGHTS_BYTES" if ref.kind == "weights" else "NST_MAX_INPUT_BYTES"
            problems.add(ref.loc, f"{ref.uri} is {info.size} bytes, more than {setting}={limit}{pair}")
