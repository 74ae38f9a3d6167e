"""Manifests: a YAML list of content/style pairs (local or S3), validated and resolved into `PairSpec`s.

The parameter keys allowed in `defaults:`, in each pair and in `grid:` are generated from `nst.params.StyleParams`.
Every problem in a manifest is collected and raised as one `ManifestError` naming each location and YAML line.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, create_model, field_validator
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from nst import storage
from nst.errors import Loc, ManifestError, ParamsError, StorageError
from nst.params import PRESETS, StyleParams, format_validation_error, resolve_params

__all__ = [
    "ID_PATTERN",
    "GridEntry",
    "InvalidManifestError",
    "Manifest",
    "ManifestFile",
    "PairEntry",
    "PairSpec",
    "ParamOverrides",
    "format_pairs",
    "load_manifest",
    "manifest_json_schema",
    "manifest_json_schema_text",
    "override_values",
]

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
_GLOB_CHARS = re.compile(r"[*?\[]")
_MAX_LISTED_PROBLEMS = 200
_SCHEMA_URL = "https://json-schema.org/draft/2020-12/schema"

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
_M = TypeVar("_M", bound=BaseModel)


class InvalidManifestError(ManifestError):
    """A manifest with one or more problems; `problems` holds one line per problem."""

    def __init__(self, uri: str, problems: list[str]) -> None:
        self.uri = uri
        self.problems = problems
        shown = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        if len(problems) == 1:
            text = f"{uri}: {problems[0]}"
        else:
            lines = [f"{uri}: {len(problems)} problems:", *(f"  {p}" for p in shown)]
            if more:
                lines.append(f"  ... and {more} more")
            text = "\n".join(lines)
        super().__init__(text)


# ---------------------------------------------------------------------------------------------------------------
# The file model. Parameter fields are generated from StyleParams: never restated here.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _skip_none(func: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """Wrap one of StyleParams' field validators so that an unset (None) override passes untouched."""
    takes_info = len(inspect.signature(func).parameters) == (3 if mode == "wrap" else 2)
    if mode == "wrap":
        if takes_info:

            def wrap_info(cls: Any, value: Any, handler: Any, info: Any) -> Any:
                return handler(value) if value is None else func(value, handler, info)

            return wrap_info

        def wrap(cls: Any, value: Any, handler: Any) -> Any:
            return handler(value) if value is None else func(value, handler)

        return wrap
    if takes_info:

        def check_info(cls: Any, value: Any, info: Any) -> Any:
            return value if value is None else func(value, info)

        return check_info

    def check(cls: Any, value: Any) -> Any:
        return value if value is None else func(value)

    return check


def _with_param_fields(name: str, base: type[_M], doc: str) -> type[_M]:
    """`base` plus every StyleParams field made optional (same types, constraints, field validators, descriptions)."""
    clash = set(base.model_fields) & set(StyleParams.model_fields)
    if clash:
        raise RuntimeError(f"{name}: fields {sorted(clash)} clash with StyleParams parameters")
    fields: dict[str, Any] = {}
    for pname, info in StyleParams.model_fields.items():
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]  # type: ignore[valid-type]
        fields[pname] = (annotation | None, Field(None, description=info.description))
    validators: dict[str, Any] = {}
    for vname, dec in StyleParams.__pydantic_decorators__.field_validators.items():
        validators[vname] = field_validator(*dec.info.fields, mode=dec.info.mode, check_fields=False)(  # type: ignore[call-overload]
            _skip_none(dec.func, dec.info.mode)
        )
    return create_model(name, __base__=base, __doc__=doc, __module__=__name__, __validators__=validators, **fields)


class _PairFields(_Strict):
    id: Annotated[str, Field(pattern=ID_PATTERN)] | None = Field(
        None, description="pair id, used for the output file names; default: <content-stem>__<style-stem>"
    )
    content: NonEmptyStr = Field(description="content image: path relative to the manifest, absolute path or s3:// URI")
    style: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(
        description="style image, or a list of style images blended by style_blend"
    )

    @field_validator("id")
    @classmethod
    def _not_dots(cls, value: str | None) -> str | None:
        if value in (".", ".."):
            raise ValueError(f"{value!r} is not a valid id")
        return value

    @field_validator("style", mode="before")
    @classmethod
    def _style_shape(cls, value: Any) -> Any:
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return value
        raise ValueError("must be an image path/URI or a non-empty list of them")


class _GridFields(_Strict):
    contents: list[NonEmptyStr] = Field(
        min_length=1, description="content images or globs (*, ?, [..], **), relative to the manifest or s3://"
    )
    styles: list[NonEmptyStr] = Field(min_length=1, description="style images or globs; every content x every style")


ParamOverrides: type[_Strict] = _with_param_fields(
    "ParamOverrides", _Strict, "Any engine parameter (see StyleParams); unset keys fall back to the preset/defaults."
)
PairEntry: type[_PairFields] = _with_param_fields(
    "PairEntry", _PairFields, "One content image with one or more style images, plus per-pair parameter overrides."
)
GridEntry: type[_GridFields] = _with_param_fields(
    "GridEntry", _GridFields, "Every content x every style (globs allowed), plus parameter overrides for these pairs."
)
ManifestFile: type[_Strict] = create_model(
    "ManifestFile",
    __base__=_Strict,
    __doc__="An nst manifest (YAML, version 1): content/style pairs, their parameters and where outputs go.",
    __module__=__name__,
    version=(Literal[1], Field(description="manifest format version; must be 1")),
    name=(str | None, Field(None, min_length=1, max_length=200, description="run name; default: the file's stem")),
    output=(
        NonEmptyStr,
        Field(description="output directory: relative to the manifest (no '..') or an s3:// prefix"),
    ),
    defaults=(ParamOverrides, Field(default_factory=ParamOverrides, description="parameters for every pair")),
    pairs=(list[PairEntry], Field(default_factory=list, description="explicit content/style pairs")),  # type: ignore[valid-type]
    grid=(GridEntry | None, Field(None, description="every content x every style")),  # type: ignore[arg-type]
)


def override_values(overrides: BaseModel) -> dict[str, Any]:
    """The parameters a ParamOverrides sets (unset and null fields left out)."""
    return overrides.model_dump(exclude_unset=True, exclude_none=True)


_TOP_KEYS = tuple(ManifestFile.model_fields)
_PAIR_KEYS = tuple(_PairFields.model_fields)
_GRID_KEYS = tuple(_GridFields.model_fields)


# ---------------------------------------------------------------------------------------------------------------
# The resolved manifest.


class PairSpec(BaseModel):
    """One resolved pair: absolute input URIs and fully resolved parameters."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="unique pair id; outputs are <output>/<id>.png and <id>.json")
    content: str = Field(description="content image URI (absolute path or s3://)")
    styles: list[str] = Field(description="style image URIs, at least one")
    params: StyleParams = Field(description="preset + defaults + pair overrides, validated")
    overrides: dict[str, Any] = Field(default_factory=dict, description="parameters the manifest set for this pair")
    origin: str = Field("", description="where the pair comes from, e.g. pairs[3] or grid")


class Manifest(BaseModel):
    """A loaded, validated manifest."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str = Field(description="URI the manifest was read from")
    output: str = Field(description="output directory URI (absolute path or s3://bucket/prefix), no trailing slash")
    pairs: list[PairSpec]
    defaults: dict[str, Any] = Field(default_factory=dict, description="the manifest's `defaults:` as written")


# ---------------------------------------------------------------------------------------------------------------
# Problems and their YAML lines.


@dataclass
class _Problems:
    root: yaml.Node | None = None
    found: dict[str, tuple[float, int]] = field(default_factory=dict)

    def add(self, loc: Loc, message: str, *, line: int | None = None) -> None:
        """Record `loc: message (line N)`; the line is looked up from `loc` unless given."""
        if line is None and loc and self.root is not None:
            line = _line_of(self.root, loc)
        where = _fmt_loc(loc)
        text = f"{where}: {message}" if where else message
        if line is not None:
            text += f" (line {line})"
        self.found.setdefault(text, (line if line is not None else float("inf"), len(self.found)))

    @property
    def items(self) -> list[str]:
        """The problems in document order (those without a line last)."""
        return sorted(self.found, key=self.found.__getitem__)

    def raise_if_any(self, uri: str) -> None:
        if self.found:
            raise InvalidManifestError(uri, self.items)


def _fmt_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _line_of(root: yaml.Node, loc: Loc) -> int | None:
    """1-based line of the node at `loc` (the key's line for a mapping entry), or of its deepest existing parent."""
    node: yaml.Node = root
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            found = None
            for key, value in node.value:  # last match wins, as in the constructed dict
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    found = (key, value)
            if found is None:
                return None if node is root else int(node.start_mark.line) + 1  # a missing top-level key: no line
            key_node, node = found
            if depth == len(loc) - 1:
                return int(key_node.start_mark.line) + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            break
    return int(node.start_mark.line) + 1


def _pydantic_problems(problems: _Problems, exc: ValidationError, prefix: Loc = ()) -> None:
    """One problem per pydantic error, in nst.params.format_validation_error's style, with YAML lines."""
    for err in exc.errors():
        loc: Loc = prefix + tuple(err.get("loc", ()))
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid"))
        for noise in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(noise)
        last = loc[-1] if loc else ""
        if kind == "extra_forbidden":
            msg = _unknown_key_message(loc)
        elif kind == "missing":
            msg = "missing: add `version: 1` at the top" if loc == ("version",) else "missing (required)"
        elif kind == "string_pattern_mismatch" and last == "id":
            msg = f"{err.get('input')!r} is not a valid id: use 1-128 characters from A-Z a-z 0-9 . _ -"
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            msg = f"must be a mapping, got {_yaml_type(err.get('input'))}"
        elif kind == "list_type":
            msg = f"must be a list, got {_yaml_type(err.get('input'))}"
        problems.add(loc, msg)


def _unknown_key_message(loc: Loc) -> str:
    key = str(loc[-1]) if loc else ""
    if len(loc) == 1:
        choices: Sequence[str] = _TOP_KEYS
        label = "unknown key"
    else:
        section = loc[0]
        base = _PAIR_KEYS if section == "pairs" else _GRID_KEYS if section == "grid" else ()
        choices = (*base, *StyleParams.model_fields)
        label = "unknown parameter"
    close = difflib.get_close_matches(key, choices, n=1)
    if close:
        return f"{label} (did you mean {close[0]!r}?)"
    return f"{label} (expected {', '.join(choices)})" if len(loc) == 1 else label


def _yaml_type(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return f"{type(value).__name__} {value!r}"


def _params_problems(problems: _Problems, exc: ParamsError, where: Loc, lookups: Sequence[Loc]) -> None:
    """resolve_params' problems under `where`, each with the line where its field was set (first of `lookups`)."""
    for field_loc, text in exc.problems:
        message = text.removeprefix("Value error, ")
        top = field_loc[0] if field_loc else ""
        named = message.split(" ", 1)[0]
        if not top and named in StyleParams.model_fields:  # a cross-field error naming its field first
            top = named
        line = None
        if problems.root is not None:
            for base in lookups:
                candidate = (*base, top) if top else base
                if top and _has(problems.root, candidate):
                    line = _line_of(problems.root, candidate)
                    break
            if line is None and lookups:
                line = _line_of(problems.root, lookups[0])
        problems.add((*where, *field_loc), message, line=line)


def _has(root: yaml.Node, loc: Loc) -> bool:
    node: yaml.Node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)]
            if not match:
                return False
            node = match[-1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# YAML: safe loading with line numbers, alias-bomb and duplicate-key checks.


class _EventLoader(Composer, SafeConstructor, Resolver):
    """yaml.SafeLoader's composer, resolver and constructor fed by libyaml's (non-recursive) C parser: ~3x faster.

    Composing in Python keeps deep nesting a RecursionError (libyaml's own composer can overflow the C stack).
    """

    def __init__(self, text: str) -> None:
        self._parser = yaml.CSafeLoader(text)
        self._next: yaml.Event | None = None
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)

    def peek_event(self) -> yaml.Event | None:
        if self._next is None:
            self._next = self._parser.get_event()
        return self._next

    def check_event(self, *choices: type[yaml.Event]) -> bool:
        event = self.peek_event()
        return event is not None and (not choices or isinstance(event, choices))

    def get_event(self) -> yaml.Event | None:
        event = self.peek_event()
        self._next = None
        return event

    def dispose(self) -> None:
        self._parser.dispose()


def _loader(text: str) -> Any:
    return _EventLoader(text) if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader(text)


def _parse_yaml(uri: str, raw: bytes, node_budget: int) -> tuple[_Problems, Any]:
    """Compose (keeping marks), check the expanded size without expanding, then construct like yaml.safe_load."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidManifestError(uri, [f"not UTF-8 text (byte {exc.start})"]) from None
    loader = _loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise InvalidManifestError(uri, [f"invalid YAML: {_yaml_error(exc)}"]) from None
        except yaml.YAMLError as exc:
            raise InvalidManifestError(uri, [f"invalid YAML: {exc}"]) from None
        except RecursionError:
            raise InvalidManifestError(uri, ["invalid YAML: nested too deeply"]) from None
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
            raise InvalidManifestError(uri, ["manifest is empty: expected `version: 1`, `output:` and `pairs:`"])
        if not isinstance(root, yaml.MappingNode):
            kind = "a list" if isinstance(root, yaml.SequenceNode) else f"a scalar {str(root.value)[:40]!r}"
            line = root.start_mark.line + 1
            raise InvalidManifestError(
                uri, [f"top level must be a mapping (version, output, pairs, ...), got {kind} (line {line})"]
            )
        _check_expansion(uri, root, node_budget)
        problems = _Problems(root)
        _duplicate_keys(root, problems)  # before construction, which merges `<<` keys into the nodes
        try:
            data = loader.construct_document(root)
        except yaml.MarkedYAMLError as exc:
            raise InvalidManifestError(uri, [f"invalid YAML: {_yaml_error(exc)}"]) from None
        except RecursionError:
            raise InvalidManifestError(uri, ["invalid YAML: nested too deeply"]) from None
        return problems, data
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    what = ": ".join(str(p) for p in (exc.context, exc.problem) if p)
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(uri: str, root: yaml.Node, budget: int) -> None:
    """Refuse aliases that would expand past `budget` nodes ("billion laughs") or that refer to themselves.

    Counts each distinct node once (memoised), so the check itself is linear in the document's size.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > budget:
                raise InvalidManifestError(
                    uri,
                    [
                        f"YAML aliases expand to more than {budget} nodes (line {node.start_mark.line + 1}); "
                        "refusing a possible alias bomb"
                    ],
                )
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise InvalidManifestError(uri, [f"recursive YAML alias (line {node.start_mark.line + 1}) is not allowed"])
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise InvalidManifestError(
                    uri, [f"recursive YAML alias (line {child.start_mark.line + 1}) is not allowed"]
                )
            if id(child) not in size:
                stack.append((child, False))


def _duplicate_keys(root: yaml.Node, problems: _Problems) -> None:
    """Report keys written twice in one mapping (safe_load would silently keep the last one)."""
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in first:
                        problems.add(
                            (*loc, key.value),
                            f"duplicate key (first at line {first[key.value]})",
                            line=key.start_mark.line + 1,
                        )
                    else:
                        first[key.value] = key.start_mark.line + 1
                    stack.append((value, (*loc, key.value)))
                else:
                    stack.append((value, loc))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*loc, i)) for i, child in enumerate(node.value))


# ---------------------------------------------------------------------------------------------------------------
# Paths, ids, output.


def _is_glob(path: str) -> bool:
    return bool(_GLOB_CHARS.search(path))


def _glob_base(pattern: str) -> str:
    """The literal directory part of a glob pattern, up to the last '/' before the first wildcard."""
    match = _GLOB_CHARS.search(pattern)
    head = pattern[: match.start()] if match else pattern
    return head[: head.rfind("/") + 1]


def _stem(uri: str, base: str = "") -> str:
    """File name without its last extension; below a glob's base directory, sub-directories are kept, joined by '.'."""
    rel = uri[len(base) :] if base and uri.startswith(base) else posixpath.basename(uri.rstrip("/"))
    rel = rel.strip("/")
    head, _, name = rel.rpartition("/")
    name = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head.replace('/', '.')}.{name}" if head else name


def _make_id(content_stem: str, style_stems: Sequence[str]) -> str:
    """`<content-stem>__<style-stem>` (several styles joined by '-'), made safe for file names and at most 128 long."""
    raw = f"{content_stem}__{'-'.join(style_stems)}"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", raw)
    if len(safe) > 128:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        safe = f"{safe[:119]}-{digest}"
    return safe


def _absolute(uri: str) -> str:
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _same_uri(uri: str) -> str:
    """Comparable form of a URI (local paths normalised)."""
    if storage.is_s3(uri):
        return uri
    return os.path.normpath(os.path.abspath(storage.local_path(uri)))


def _resolve_output(raw: str, base_dir: str) -> tuple[str | None, str | None]:
    """(output URI, None) or (None, reason). Relative output stays under the manifest's directory; s3:// is allowed."""
    if "\x00" in raw or "\\" in raw:
        return None, "must not contain backslashes or NUL characters"
    if raw.startswith("file:"):
        return None, "file:// URIs are not accepted; use a path relative to the manifest or an s3:// prefix"
    if storage.is_s3(raw):
        rest = raw[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            return None, f"{raw!r} names no bucket"
        if any(part in ("..", ".") for part in key.split("/")):
            return None, f"{raw!r}: '.' and '..' components are not allowed"
        return raw.rstrip("/") if key.strip("/") else f"s3://{bucket}", None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", raw):
        return None, f"{raw!r}: unsupported scheme (use a relative path or s3://)"
    if raw.startswith(("/", "~")) or os.path.isabs(raw):
        return None, f"{raw!r}: absolute local paths are not allowed; use a path relative to the manifest or s3://"
    if ".." in raw.split("/"):
        return None, f"{raw!r}: '..' is not allowed (outputs must stay under the manifest's directory)"
    joined = storage.join(base_dir, raw)
    return (joined.rstrip("/") or joined), None


# ---------------------------------------------------------------------------------------------------------------
# Loading.


@dataclass
class _InputRef:
    uri: str
    loc: Loc
    pair_id: str | None


def _reason(exc: StorageError, uri: str) -> str:
    """A StorageError's message without its leading `uri: ` and `cannot <verb>: ` (the caller says both)."""
    return re.sub(r"^cannot \w+: ", "", str(exc).removeprefix(f"{uri}: "))


def _read(uri: str, max_bytes: int) -> bytes:
    try:
        return storage.read_bytes(uri, max_bytes=max_bytes)
    except StorageError as exc:
        raise InvalidManifestError(uri, [f"cannot read the manifest: {_reason(exc, uri)}"]) from None


def load_manifest(
    uri: str, *, overrides: dict[str, Any] | None = None, check_inputs: bool = True, max_bytes: int = 1_000_000
) -> Manifest:
    """Read, validate and resolve a manifest (local path, file:// or s3://); one ManifestError lists every problem.

    `overrides` (any parameters) rank above the manifest's `defaults:` and below its per-pair values. With
    `check_inputs`, every explicitly named input is checked to exist, with one listing per parent prefix.
    """
    source = _absolute(uri)
    if overrides:
        try:
            ParamOverrides.model_validate(overrides)
        except ValidationError as exc:
            raise ManifestError(format_validation_error(exc, "overrides")) from None
    problems, data = _parse_yaml(source, _read(source, max_bytes), node_budget=max(max_bytes // 2, 10_000))
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
        _pydantic_problems(problems, exc)

    base_dir = storage.parent(source)
    name = data["name"] if isinstance(data.get("name"), str) and data["name"] else _stem(source)

    output = ""
    if isinstance(data.get("output"), str) and data["output"]:
        resolved, reason = _resolve_output(data["output"], base_dir)
        if reason:
            problems.add(("output",), reason)
        else:
            output = resolved or ""

    builder = _PairBuilder(problems, base_dir, data, overrides or {})
    builder.build()
    if not data.get("pairs") and "grid" not in data:
        problems.add((), "manifest has no pairs: add `pairs:` entries or a `grid:`", line=None)
    builder.check_ids()
    if check_inputs:
        builder.check_inputs()
    problems.raise_if_any(source)
    return Manifest(name=name, source=source, output=output, pairs=builder.specs, defaults=builder.defaults_raw)


def _valid_part(model: type[_M], raw: dict[str, Any], *, whole: bool = False) -> _M | None:
    """`raw` validated; unless `whole`, keys with errors are dropped (already reported) and the rest kept."""
    data = dict(raw)
    for _ in range(3):
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            if whole:
                return None
            bad = {err["loc"][0] for err in exc.errors() if err.get("loc")}
            if not bad & data.keys():
                return None
            data = {k: v for k, v in data.items() if k not in bad}
    return None


class _PairBuilder:
    """Expands pairs and grid into PairSpecs, collecting problems."""

    def __init__(self, problems: _Problems, base_dir: str, data: dict[str, Any], overrides: dict[str, Any]) -> None:
        self.problems = problems
        self.overrides = overrides
        self.base_dir = base_dir
        self.data = data
        self.specs: list[PairSpec] = []
        self.ids: list[tuple[str, Loc, str]] = []  # (id, where to report a duplicate, description)
        self.inputs: list[_InputRef] = []
        self.defaults_raw: dict[str, Any] = data["defaults"] if isinstance(data.get("defaults"), dict) else {}
        self.defaults: dict[str, Any] = {}
        self.defaults_ok = False

    def build(self) -> None:
        """Resolve `defaults:`, then every pair and the grid; invalid parts are skipped (already reported)."""
        model = _valid_part(ParamOverrides, self.defaults_raw)
        if model is not None:
            self.defaults = {**self._explicit(model, (), ("defaults",)), **self.overrides}
            try:
                resolve_params(self.defaults, context="defaults")
                self.defaults_ok = True
            except ParamsError as exc:
                _params_problems(self.problems, exc, ("defaults",), [("defaults",)])
        pairs = self.data.get("pairs")
        if isinstance(pairs, list):
            for index, raw in enumerate(pairs):
                if isinstance(raw, dict):
                    self._pair(index, raw)
        if isinstance(self.data.get("grid"), dict):
            self._grid(self.data["grid"])

    def _explicit(self, model: BaseModel, own: Iterable[str], loc: Loc) -> dict[str, Any]:
        """Parameters the manifest set in this model, with a relative `weights` path resolved like other paths."""
        values = model.model_dump(exclude_unset=True, exclude=set(own))
        if isinstance(values.get("weights"), str) and values["weights"]:
            values["weights"] = self._resolve(values["weights"], (*loc, "weights")) or values["weights"]
        return values

    def _resolve(self, path: str, loc: Loc) -> str | None:
        """An input path resolved against the manifest's directory/prefix; None (problem recorded) if impossible."""
        try:
            uri = storage.join(self.base_dir, path)
            storage.parent(uri)  # rejects schemes other than file:// and s3://
        except StorageError as exc:
            self.problems.add(loc, str(exc))
            return None
        return uri

    def _params(self, overrides: dict[str, Any], loc: Loc, n_styles: int) -> StyleParams | None:
        """preset + defaults + overrides, validated; None (problems recorded) if they do not resolve."""
        if not self.defaults_ok and not overrides:
            return None  # the defaults' problem is reported once, under defaults
        context = _fmt_loc(loc)
        try:
            params = resolve_params(self.defaults, overrides, context=context)
        except ParamsError as exc:
            _params_problems(self.problems, exc, loc, [loc, ("defaults",)])
            return None
        if params.style_blend is not None and len(params.style_blend) != n_styles:
            where = loc if "style_blend" in overrides else ("defaults",)
            line = _line_of(self.problems.root, (*where, "style_blend")) if self.problems.root else None
            plural = "style" if n_styles == 1 else "styles"
            self.problems.add(
                (*loc, "style_blend"),
                f"has {len(params.style_blend)} values for {n_styles} {plural}"
                + ("" if where == loc else " (set in defaults)"),
                line=line,
            )
            return None
        return params

    def _pair(self, index: int, raw: dict[str, Any]) -> None:
        loc: Loc = ("pairs", index)
        core = _valid_part(_PairFields, {k: raw[k] for k in _PAIR_KEYS if k in raw}, whole=True)
        if core is None:
            return
        style_list = [core.style] if isinstance(core.style, str) else list(core.style)
        style_locs: list[Loc] = [(*loc, "style", i) for i in range(len(style_list))]
        if isinstance(core.style, str):
            style_locs = [(*loc, "style")]
        content = self._resolve(core.content, (*loc, "content"))
        styles = [self._resolve(s, where) for s, where in zip(style_list, style_locs, strict=True)]
        if content is None or None in styles:
            return
        style_uris = [s for s in styles if s is not None]
        pair_id = core.id or _make_id(_stem(content), [_stem(s) for s in style_uris])
        self.ids.append((pair_id, (*loc, "id") if core.id else loc, _fmt_loc(loc)))
        self.inputs.append(_InputRef(content, (*loc, "content"), pair_id))
        self.inputs.extend(_InputRef(s, where, pair_id) for s, where in zip(style_uris, style_locs, strict=True))
        entry = _valid_part(PairEntry, raw, whole=True)
        if entry is None:
            return
        overrides = self._explicit(entry, _PAIR_KEYS, loc)
        params = self._params(overrides, loc, len(style_uris))
        if params is not None:
            self._add_spec(pair_id, content, style_uris, params, overrides, loc)

    def _expand(self, patterns: list[str], loc: Loc) -> list[tuple[str, str]]:
        """(URI, stem) for each entry; globs are listed (a glob matching nothing is a problem)."""
        found: dict[str, str] = {}
        for i, pattern in enumerate(patterns):
            target = self._resolve(pattern, (*loc, i))
            if target is None:
                continue
            if not _is_glob(pattern):
                found.setdefault(target, _stem(target))
                self.inputs.append(_InputRef(target, (*loc, i), None))
                continue
            try:
                matches = storage.glob(target)
            except StorageError as exc:
                self.problems.add((*loc, i), f"cannot expand {pattern!r}: {_reason(exc, target)}")
                continue
            if not matches:
                self.problems.add((*loc, i), f"{pattern!r} matched no files")
            base = _glob_base(target)
            for match in sorted(matches):
                found.setdefault(match, _stem(match, base))
        return list(found.items())

    def _grid(self, raw: dict[str, Any]) -> None:
        core = _valid_part(_GridFields, {k: raw[k] for k in _GRID_KEYS if k in raw}, whole=True)
        if core is None:
            return
        contents = self._expand(core.contents, ("grid", "contents"))
        styles = self._expand(core.styles, ("grid", "styles"))
        combos = [(_make_id(cstem, [sstem]), c, s) for c, cstem in contents for s, sstem in styles]
        self.ids.extend((pair_id, ("grid",), f"grid: {c} x {s}") for pair_id, c, s in combos)
        entry = _valid_part(GridEntry, raw, whole=True)
        if entry is None:
            return
        overrides = self._explicit(entry, _GRID_KEYS, ("grid",))
        params = self._params(overrides, ("grid",), 1)
        if params is not None:
            for pair_id, content, style in combos:
                self._add_spec(pair_id, content, [style], params, overrides, ("grid",))

    def _add_spec(
        self, pair_id: str, content: str, styles: list[str], params: StyleParams, overrides: dict[str, Any], loc: Loc
    ) -> None:
        merged = {**self.defaults, **overrides}
        if isinstance(merged.get("weights"), str):
            where: Loc = loc if "weights" in overrides else ("defaults",)
            self.inputs.append(_InputRef(merged["weights"], (*where, "weights"), pair_id if where == loc else None))
        spec = PairSpec(
            id=pair_id, content=content, styles=styles, params=params, overrides=merged, origin=_fmt_loc(loc)
        )
        self.specs.append(spec)

    def check_ids(self) -> None:
        """Every pair id (given or derived) is unique."""
        first: dict[str, str] = {}
        for pair_id, where, described in self.ids:
            if pair_id in first:
                message = f"duplicate id {pair_id!r}"
                if where == ("grid",):
                    message += (
                        f" for {described.removeprefix('grid: ')} (also {first[pair_id]}); file stems must differ"
                    )
                elif where[-1] != "id":
                    message += f" (also {first[pair_id]}), derived from the file names; set `id:` to tell them apart"
                else:
                    message += f" (also {first[pair_id]})"
                self.problems.add(where, message)
            else:
                first[pair_id] = described

    def check_inputs(self) -> None:
        """Every explicitly named input (and weights file) exists: one listing per parent prefix, not one per file."""
        by_parent: dict[str, list[_InputRef]] = {}
        for ref in self.inputs:
            by_parent.setdefault(storage.parent(ref.uri), []).append(ref)  # checked by _resolve
        reported: set[tuple[str, Loc]] = set()
        for parent, group in by_parent.items():
            try:
                listed = {_same_uri(info.uri) for info in storage.list_prefix(parent)}
            except StorageError as exc:
                self.problems.add((), f"cannot list the inputs under {parent}: {_reason(exc, parent)}")
                continue
            for ref in group:
                if _same_uri(ref.uri) not in listed and (ref.uri, ref.loc) not in reported:
                    reported.add((ref.uri, ref.loc))
                    pair = f" (pair {ref.pair_id})" if ref.pair_id else ""
                    self.problems.add(ref.loc, f"not found: {ref.uri}{pair}")


# ---------------------------------------------------------------------------------------------------------------
# Schema and printing.


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of a manifest file (ManifestFile), as exported to manifests/schema.json."""
    schema = ManifestFile.model_json_schema()
    for definition in schema.get("$defs", {}).values():
        props = definition.get("properties", {})
        # What validators accept beyond the field types: preset names, and `preserve_colors: true/false`.
        if "preset" in props:
            props["preset"]["anyOf"] = [{"enum": list(PRESETS), "type": "string"}, {"type": "null"}]
        if "preserve_colors" in props:
            props["preserve_colors"]["anyOf"].insert(-1, {"type": "boolean"})
    return {"$schema": _SCHEMA_URL, "title": "nst manifest", **{k: v for k, v in schema.items() if k != "title"}}


def manifest_json_schema_text() -> str:
    """manifest_json_schema() serialised exactly as manifests/schema.json holds it."""
    return json.dumps(manifest_json_schema(), indent=2) + "\n"


def _short(uri: str, base: str) -> str:
    prefix = base if base.endswith("/") else base + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri


def format_pairs(manifest: Manifest, *, verbose: bool = False) -> str:
    """The expanded pair list for `nst validate`; verbose adds each pair's parameters that differ from StyleParams()."""
    base = storage.parent(manifest.source)
    lines = [
        f"manifest {manifest.name!r}: {manifest.source}",
        f"output: {manifest.output}",
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
