"""The manifest file model, generated from `nst.params.StyleParams` (never restated), and the resolved manifest.

`ParamOverrides` is every parameter made optional: a manifest's `defaults:` and the flow's `overrides`.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, field_validator, model_validator

from nst.params import PRESETS, StyleParams

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"


_SCHEMA_URL = "https://json-schema.org/draft/2020-12/schema"


NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]


ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
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


_NOT_NULLABLE = frozenset(
    name for name, info in StyleParams.model_fields.items() if type(None) not in typing.get_args(info.annotation)
)


def _null_is_unset(cls: Any, data: Any) -> Any:
    """`size: null` leaves `size` unset (a parameter whose own type has no null)."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if not (v is None and k in _NOT_NULLABLE)}
    return data


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _with_param_fields(name: str, base: type[ModelT], doc: str) -> type[ModelT]:
    """`base` plus every StyleParams field made optional (same types, constraints, field validators, descriptions)."""
    clash = set(base.model_fields) & set(StyleParams.model_fields)
    if clash:
        raise RuntimeError(f"{name}: fields {sorted(clash)} clash with StyleParams parameters")
    fields: dict[str, Any] = {}
    for pname, info in StyleParams.model_fields.items():
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        if info.annotation is bool:  # a form's switch is always on or off: null is its third state, "not given"
            fields[pname] = (annotation | None, Field(None, description=info.description))
            continue
        # Unset is "not given", not null: the schema (and the flow's form) shows the plain type, no null default.
        fields[pname] = (annotation, Field(None, description=info.description, json_schema_extra=_no_default))
    validators: dict[str, Any] = {"_null_is_unset": model_validator(mode="before")(_null_is_unset)}
    for vname, dec in StyleParams.__pydantic_decorators__.field_validators.items():
        validators[vname] = field_validator(*dec.info.fields, mode=dec.info.mode, check_fields=False)(
            _skip_none(dec.func, dec.info.mode)
        )
    return create_model(name, __base__=base, __doc__=doc, __module__=__name__, __validators__=validators, **fields)


class PairFields(StrictModel):
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
            raise ValueError("not a valid id: '.' and '..' name directories")
        return value

    @field_validator("style", mode="before")
    @classmethod
    def _style_shape(cls, value: Any) -> Any:
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return value
        raise ValueError("must be an image path/URI or a non-empty list of them")


class GridFields(StrictModel):
    contents: list[NonEmptyStr] = Field(
        min_length=1, description="content images or globs (*, ?, [..], **), relative to the manifest or s3://"
    )
    styles: list[NonEmptyStr] = Field(min_length=1, description="style images or globs; every content x every style")


ParamOverrides: type[StrictModel] = _with_param_fields(
    "ParamOverrides",
    StrictModel,
    "Any engine parameter (see StyleParams); unset keys fall back to the preset/defaults.",
)


PairEntry: type[PairFields] = _with_param_fields(
    "PairEntry", PairFields, "One content image with one or more style images, plus per-pair parameter overrides."
)


GridEntry: type[GridFields] = _with_param_fields(
    "GridEntry", GridFields, "Every content x every style (globs allowed), plus parameter overrides for these pairs."
)


ManifestFile: type[StrictModel] = create_model(
    "ManifestFile",
    __base__=StrictModel,
    __doc__="An nst manifest (YAML, version 1): content/style pairs, their parameters and where outputs go.",
    __module__=__name__,
    version=(Literal[1], Field(description="manifest format version; must be 1")),
    name=(
        str | None,
        Field(
            None,
            min_length=1,
            max_length=200,
            description="the manifest's name, which owns its outputs (records name it); default: the file's stem",
        ),
    ),
    output=(
        NonEmptyStr,
        Field(description="output directory: relative to the manifest (no '..') or an s3:// prefix"),
    ),
    defaults=(ParamOverrides, Field(default_factory=ParamOverrides, description="parameters for every pair")),
    pairs=(list[PairEntry], Field(default_factory=list, description="explicit content/style pairs")),  # type: ignore[valid-type]
    grid=(GridEntry | None, Field(None, description="every content x every style")),  # type: ignore[arg-type]
)


def override_values(overrides: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """The parameters a ParamOverrides (or its dict, e.g. a flow's default `{}`) sets; unset and null left out."""
    model = overrides if isinstance(overrides, BaseModel) else ParamOverrides.model_validate(overrides)
    return model.model_dump(exclude_unset=True, exclude_none=True)


TOP_KEYS = tuple(ManifestFile.model_fields)


PAIR_KEYS = tuple(PairFields.model_fields)


GRID_KEYS = tuple(GridFields.model_fields)


class PairSpec(BaseModel):
    """One resolved pair: absolute input URIs and fully resolved parameters."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="unique pair id; outputs are <output>/<id>.png and <id>.json")
    content: str = Field(description="content image URI (absolute path or s3://)")
    styles: list[str] = Field(description="style image URIs, at least one")
    params: StyleParams = Field(description="preset + defaults + pair overrides, validated")
    overrides: dict[str, Any] = Field(default_factory=dict, description="parameters the manifest set for this pair")
    origin: str = Field("", description="where the pair comes from, e.g. pairs[3] or grid")
    manifest: str = Field("", description="name of the manifest the pair belongs to: its records' owner")


class Manifest(BaseModel):
    """A loaded, validated manifest."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str = Field(description="URI the manifest was read from")
    output: str = Field(description="output directory URI (absolute path or s3://bucket/prefix), no trailing slash")
    pairs: list[PairSpec]
    defaults: dict[str, Any] = Field(default_factory=dict, description="the manifest's `defaults:` as written")
    warnings: list[str] = Field(default_factory=list, description="what did not stop the run (an empty grid glob)")


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of a manifest file (ManifestFile), as exported to manifests/schema.json."""
    schema = ManifestFile.model_json_schema()
    for definition in schema.get("$defs", {}).values():
        props = definition.get("properties", {})
        # What validators accept beyond the field types: preset names, and `preserve_colors: true/false`.
        if "preset" in props:
            props["preset"]["anyOf"] = [{"enum": list(PRESETS), "type": "string"}, {"type": "null"}]
        if "preserve_colors" in props:
            colors = props["preserve_colors"]
            choices = {k: colors.pop(k) for k in ("enum", "type") if k in colors}
            colors["anyOf"] = [choices, {"type": "boolean"}]
    return {"$schema": _SCHEMA_URL, "title": "nst manifest", **{k: v for k, v in schema.items() if k != "title"}}


def manifest_json_schema_text() -> str:
    """manifest_json_schema() serialised exactly as manifests/schema.json holds it."""
    return json.dumps(manifest_json_schema(), indent=2) + "\n"
