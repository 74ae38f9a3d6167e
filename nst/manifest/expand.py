"""Pairs and grid expanded into `PairSpec`s: ids, input paths, parameters resolved once per entry, every problem."""

from __future__ import annotations

import datetime
import difflib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from nst import storage
from nst.errors import Loc, ParamsError, StorageError
from nst.manifest.ids import check_ids, file_stem, make_id, unique_suffix
from nst.manifest.inputs import InputRef, is_allowed, storage_reason
from nst.manifest.model import (
    GRID_KEYS,
    PAIR_KEYS,
    TOP_KEYS,
    GridEntry,
    GridFields,
    ModelT,
    PairEntry,
    PairFields,
    PairSpec,
    ParamOverrides,
)
from nst.manifest.source import Problems, fmt_loc, has_node, line_of
from nst.params import StyleParams, resolve_params
from nst.storage.base import scheme

_GLOB_CHARS = re.compile(r"[*?\[]")
# Image extensions a grid glob matches in any letter case (`*.jpg` matches PHOTO.JPG).
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif"})
_LITERAL_EXTENSION = re.compile(r"\.([A-Za-z]+)$")


def pydantic_problems(problems: Problems, exc: ValidationError, prefix: Loc = ()) -> None:
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
            msg = "not a valid id: use 1-128 characters from A-Z a-z 0-9 . _ -"
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            msg = f"must be a mapping, got {yaml_type(err.get('input'))}"
        elif kind == "list_type":
            msg = f"must be a list, got {yaml_type(err.get('input'))}"
        problems.add(loc, hide_values(msg, err.get("input")))


def _unknown_key_message(loc: Loc) -> str:
    key = str(loc[-1]) if loc else ""
    if len(loc) == 1:
        choices: Sequence[str] = TOP_KEYS
        label = "unknown key"
    else:
        section = loc[0]
        base = PAIR_KEYS if section == "pairs" else GRID_KEYS if section == "grid" else ()
        choices = (*base, *StyleParams.model_fields)
        label = "unknown parameter"
    close = difflib.get_close_matches(key, choices, n=1)
    if close:
        return f"{label} (did you mean {close[0]!r}?)"
    return f"{label} (expected {', '.join(choices)})" if len(loc) == 1 else label


def yaml_type(value: Any) -> str:
    """What a value is, by type only (file content is never quoted)."""
    if value is None:
        return "nothing (null)"
    kinds = [(bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (dict, "a mapping")]
    kinds += [(list, "a list"), (datetime.date, "a date")]
    return next((name for kind, name in kinds if isinstance(value, kind)), "a value")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def hide_values(message: str, *values: Any) -> str:
    """`message` without the quoted form of any string in `values`: a validator's text never quotes the file."""
    for text in sorted(set(_strings(values)), key=len, reverse=True):
        for quoted in {repr(text), f"'{text}'", f'"{text}"'}:
            message = message.replace(quoted, "(value not shown)")
    return message


def _params_problems(
    problems: Problems, exc: ParamsError, where: Loc, lookups: Sequence[Loc], values: dict[str, Any]
) -> None:
    """resolve_params' problems under `where`, each with the line where its field was set (first of `lookups`).

    `values` are the parameters validated: a message quoting one of them (an unknown preset, a layer) hides it.
    """
    for field_loc, text in exc.problems:
        message = hide_values(text.removeprefix("Value error, "), values)
        top = field_loc[0] if field_loc else ""
        named = message.split(" ", 1)[0]
        if not top and named in StyleParams.model_fields:  # a cross-field error naming its field first
            top = named
        line = None
        if problems.root is not None:
            for base in lookups:
                candidate = (*base, top) if top else base
                if top and has_node(problems.root, candidate):
                    line = line_of(problems.root, candidate)
                    break
            if line is None and lookups:
                line = line_of(problems.root, lookups[0])
        problems.add((*where, *field_loc), message, line=line)


def plain_uri(uri: str) -> str:
    """One spelling per file: a `file://` URI as its normalised local path (records compare inputs by URI)."""
    if scheme(uri) == "file":
        return os.path.normpath(storage.local_path(uri))
    return uri


def _is_glob(path: str) -> bool:
    return bool(_GLOB_CHARS.search(path))


def _glob_base(pattern: str) -> str:
    """The literal directory part of a glob pattern, up to the last '/' before the first wildcard."""
    match = _GLOB_CHARS.search(pattern)
    head = pattern[: match.start()] if match else pattern
    return head[: head.rfind("/") + 1]


def case_insensitive_extension(pattern: str) -> str:
    """A glob whose literal image extension matches in any case: `*.jpg` -> `*.[jJ][pP][gG]`."""
    match = _LITERAL_EXTENSION.search(pattern)
    if not match or match.group(1).lower() not in IMAGE_EXTENSIONS or not _is_glob(pattern[: match.start()]):
        return pattern
    either = "".join(f"[{c.lower()}{c.upper()}]" for c in match.group(1))
    return f"{pattern[: match.start()]}.{either}"


def _valid_part(model: type[ModelT], raw: dict[str, Any], *, whole: bool = False) -> ModelT | None:
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


@dataclass(frozen=True)
class Expansion:
    """What a manifest's pairs and grid expand to: the specs, every input to check, the raw defaults, warnings."""

    specs: list[PairSpec]
    inputs: list[InputRef]
    defaults_raw: dict[str, Any]
    warnings: list[str]


def expand(
    problems: Problems,
    base_dir: str,
    data: dict[str, Any],
    overrides: dict[str, Any],
    roots: Sequence[str] = (),
    name: str = "",
) -> Expansion:
    """Expand `defaults:`, `pairs:` and `grid:` into PairSpecs of manifest `name`; every problem (ids included) goes
    to `problems`."""
    state = _Expander(problems, base_dir, data, overrides, roots)
    state.name = name
    state.build()
    check_ids(problems, state.ids)
    return Expansion(specs=state.specs, inputs=state.inputs, defaults_raw=state.defaults_raw, warnings=state.warnings)


class _Expander:
    """expand()'s working state: the resolved defaults, the ids and inputs seen so far, the specs built."""

    def __init__(
        self,
        problems: Problems,
        base_dir: str,
        data: dict[str, Any],
        overrides: dict[str, Any],
        roots: Sequence[str] = (),
    ) -> None:
        self.problems = problems
        self.name = ""  # the manifest's name: its pairs' owner
        self.roots = list(roots)  # allowed input roots (inputs.allowed_roots); empty: no confinement
        self.warnings: list[str] = []
        self.overrides = overrides
        self.base_dir = base_dir
        self.data = data
        self.specs: list[PairSpec] = []
        self.ids: list[tuple[str, Loc, str]] = []  # (id, where to report a duplicate, description)
        self.inputs: list[InputRef] = []
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
                _params_problems(self.problems, exc, ("defaults",), [("defaults",)], self.defaults)
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
            # Confined in _add_spec, with the pair it belongs to.
            values["weights"] = self._resolve(values["weights"], (*loc, "weights"), confine=False) or values["weights"]
        return values

    def _resolve(self, path: str, loc: Loc, *, confine: bool = True) -> str | None:
        """An input path resolved against the manifest's directory/prefix; None (problem recorded) if impossible."""
        try:
            uri = plain_uri(storage.join(self.base_dir, path))
            storage.parent(uri)  # rejects schemes other than file:// and s3://
        except StorageError as exc:
            self.problems.add(loc, str(exc))
            return None
        if confine and not self._allowed(uri, loc):
            return None
        return uri

    def _allowed(self, uri: str, loc: Loc, pair_id: str | None = None) -> bool:
        """Whether `uri` is under an allowed input root; if not, a problem naming the field (the file is not read)."""
        if not self.roots or is_allowed(uri, self.roots):
            return True
        pair = f" (pair {pair_id})" if pair_id else ""
        self.problems.add(
            loc,
            f"{uri} is outside the allowed input roots{pair}: inputs must lie under the manifest's directory "
            "or a root in the worker's NST_INPUT_ROOTS",
        )
        return False

    def _params(self, overrides: dict[str, Any], loc: Loc, n_styles: int) -> StyleParams | None:
        """preset + defaults + overrides, validated; None (problems recorded) if they do not resolve."""
        if not self.defaults_ok and not overrides:
            return None  # the defaults' problem is reported once, under defaults
        context = fmt_loc(loc)
        try:
            params = resolve_params(self.defaults, overrides, context=context)
        except ParamsError as exc:
            _params_problems(self.problems, exc, loc, [loc, ("defaults",)], {**self.defaults, **overrides})
            return None
        if params.style_blend is not None and len(params.style_blend) != n_styles:
            where = loc if "style_blend" in overrides else ("defaults",)
            line = line_of(self.problems.root, (*where, "style_blend")) if self.problems.root else None
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
        core = _valid_part(PairFields, {k: raw[k] for k in PAIR_KEYS if k in raw}, whole=True)
        if core is None:
            return
        style_list = [core.style] if isinstance(core.style, str) else list(core.style)
        style_locs: list[Loc] = [(*loc, "style", i) for i in range(len(style_list))]
        if isinstance(core.style, str):
            style_locs = [(*loc, "style")]
        content = self._resolve(core.content, (*loc, "content"), confine=False)
        styles = [self._resolve(s, where, confine=False) for s, where in zip(style_list, style_locs, strict=True)]
        if content is None or None in styles:
            return
        style_uris = [s for s in styles if s is not None]
        pair_id = core.id or make_id(file_stem(content), [file_stem(s) for s in style_uris])
        where_each = [(content, (*loc, "content")), *zip(style_uris, style_locs, strict=True)]
        if not all([self._allowed(uri, where, pair_id) for uri, where in where_each]):  # every refusal reported
            return
        self.ids.append((pair_id, (*loc, "id") if core.id else loc, fmt_loc(loc)))
        self.inputs.append(InputRef(content, (*loc, "content"), pair_id))
        self.inputs.extend(InputRef(s, where, pair_id) for s, where in zip(style_uris, style_locs, strict=True))
        entry = _valid_part(PairEntry, raw, whole=True)
        if entry is None:
            return
        overrides = self._explicit(entry, PAIR_KEYS, loc)
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
                found.setdefault(target, file_stem(target))
                self.inputs.append(InputRef(target, (*loc, i), None))
                continue
            try:
                matches = storage.glob(case_insensitive_extension(target))
            except StorageError as exc:
                self.problems.add((*loc, i), f"cannot expand {target}: {storage_reason(exc, target)}")
                continue
            if not matches:  # tonight's folder may simply be empty: the rest of the grid still runs
                line = line_of(self.problems.root, (*loc, i)) if self.problems.root else None
                self.warnings.append(
                    f"{fmt_loc((*loc, i))}: {pattern!r} matched no files" + (f" (line {line})" if line else "")
                )
            base = _glob_base(target)
            for match in sorted(matches):
                if self.roots and not is_allowed(match, self.roots):  # a symlink out of the roots
                    self._allowed(match, (*loc, i))
                    continue
                found.setdefault(match, file_stem(match, base))
        return list(found.items())

    def _grid(self, raw: dict[str, Any]) -> None:
        core = _valid_part(GridFields, {k: raw[k] for k in GRID_KEYS if k in raw}, whole=True)
        if core is None:
            return
        contents = self._expand(core.contents, ("grid", "contents"))
        styles = self._expand(core.styles, ("grid", "styles"))
        combos = self._unique_grid_ids(contents, styles)
        self.ids.extend((pair_id, ("grid",), f"grid: {c} x {s}") for pair_id, c, s in combos)
        entry = _valid_part(GridEntry, raw, whole=True)
        if entry is None:
            return
        overrides = self._explicit(entry, GRID_KEYS, ("grid",))
        params = self._params(overrides, ("grid",), 1)
        if params is not None:
            for pair_id, content, style in combos:
                self._add_spec(pair_id, content, [style], params, overrides, ("grid",))

    def _unique_grid_ids(
        self, contents: list[tuple[str, str]], styles: list[tuple[str, str]]
    ) -> list[tuple[str, str, str]]:
        """(id, content, style) per grid combination (ids.make_id: from its own names only).

        An id a `pairs:` entry already holds gets `-<unique_suffix of the input URIs>` (the manifest decides that, never
        the files that happen to exist); any other collision is reported by check_ids.
        """
        taken = {pair_id for pair_id, _, _ in self.ids}
        out = []
        for content, cstem in contents:
            for style, sstem in styles:
                pair_id = make_id(cstem, [sstem])
                if pair_id in taken:
                    pair_id = make_id(cstem, [sstem], unique_suffix(content, style))
                out.append((pair_id, content, style))
        return out

    def _add_spec(
        self, pair_id: str, content: str, styles: list[str], params: StyleParams, overrides: dict[str, Any], loc: Loc
    ) -> None:
        merged = {**self.defaults, **overrides}
        if isinstance(merged.get("weights"), str):
            where: Loc = loc if "weights" in overrides else ("defaults",)
            owner = pair_id if where == loc else None
            if self._allowed(merged["weights"], (*where, "weights"), owner):
                self.inputs.append(InputRef(merged["weights"], (*where, "weights"), owner, kind="weights"))
            else:
                return
        spec = PairSpec(
            id=pair_id,
            content=content,
            styles=styles,
            params=params,
            overrides=merged,
            origin=fmt_loc(loc),
            manifest=self.name,
        )
        self.specs.append(spec)
