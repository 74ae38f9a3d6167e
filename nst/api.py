"""The public Python API: `stylize(content=..., styles=..., size=256)` returns the image, its losses and its record.

Nothing here imports torch until `stylize` runs: `import nst` and `from nst import stylize` stay light.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from PIL import Image

from nst.errors import NSTError, OutputError, ParamsError, StorageError
from nst.layers import Network
from nst.params import (
    ColorMode,
    CompileMode,
    Init,
    Normalization,
    Optimizer,
    Pooling,
    Precision,
    StyleParams,
    canonical_params,
    resolve_params,
)

if TYPE_CHECKING:
    from nst.engine.pairs import PairResult
    from nst.engine.steplog import ProgressCallback
    from nst.engine.stylizer import Stylizer
    from nst.run.inputs import InputFacts

ImageInput = Image.Image | str | os.PathLike[str]
IN_MEMORY = "<PIL image>"  # the record's input URI of an image passed as a PIL image


class StyleOptions(TypedDict, total=False):
    """`StyleParams`' fields as typed keyword arguments of `stylize` (tests/test_api.py keeps the two in step)."""

    preset: str | None
    network: Network
    size: int
    style_size: int | None
    iterations: int
    optimizer: Optimizer
    lr: float
    adam_beta1: float
    adam_eps: float
    init: Init
    content_weight: float
    style_weight: float
    tv_weight: float
    normalization: Normalization
    content_layers: list[str]
    style_layers: list[str]
    style_layer_weights: list[float] | None
    style_blend: list[float] | None
    preserve_colors: ColorMode
    pooling: Pooling
    post_relu: bool
    scales: int
    keep_best: bool
    history_size: int
    seed: int
    precision: Precision
    compile: CompileMode
    weights: str | None
    device: str
    save_every: int
    log_every: int
    max_input_pixels: int


class StylizeFailed(NSTError):
    """The optimisation failed (e.g. every step's loss went NaN); `record` is the failed pair's JSON record."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


@dataclass(frozen=True)
class Stylized:
    """What `stylize` returns: the image, its final losses, the loss history and the JSON record of the run."""

    image: Image.Image
    losses: dict[str, float]  # the weighted terms at the end: content, style, tv, total
    history: list[dict[str, float]]  # one row every `log_every` steps: iteration, scale and the terms
    record: dict[str, Any]  # the record `nst stylize` writes; `output` is None unless `output=` was given
    params: StyleParams  # the parameters as resolved (preset, defaults and your values)
    intermediates: list[tuple[int, Image.Image]] = field(default_factory=list)  # (iteration, image), `save_every`


def stylize(
    *,
    content: ImageInput,
    styles: ImageInput | Sequence[ImageInput],
    params: StyleParams | None = None,
    progress: ProgressCallback | None = None,
    output: str | os.PathLike[str] | None = None,
    stylizer: Stylizer | None = None,
    **overrides: Unpack[StyleOptions],
) -> Stylized:
    """Stylize `content` with one or more `styles` (PIL images, paths or s3:// URIs); parameters as in `StyleParams`.

    `params` and keyword parameters merge like CLI flags (explicit values beat a preset; keywords beat `params`).
    `progress` gets each step's `ProgressEvent`; `output` (a .png path or URI) also writes the image at exactly that
    name and its JSON record beside it. `nst stylize` is this function. Networks stay loaded between calls (or in
    `stylizer`). Bad input: an NSTError naming the field; a failed optimisation: `StylizeFailed`.
    """
    from nst.engine.pairs import PairProblem
    from nst.engine.vgg import resolve_device

    resolved = canonical_params(_resolve(params, dict(overrides)))  # layer names checked before any reading
    style_list = _style_list(styles)
    output_uri = _check_output(output)
    resolve_device(resolved.device)  # a device this machine lacks is one line now, before any reading
    content_image, content_fact = _read_input(content, "content", resolved.max_input_pixels)
    read = [_read_input(s, f"styles[{i}]", resolved.max_input_pixels) for i, s in enumerate(style_list)]
    pair_id = Path(output_uri).stem if output_uri else "stylized"
    job = PairProblem(content_image, [image for image, _ in read], resolved, pair_id)
    (result,) = (stylizer or _shared_stylizer()).stylize([job], callback=progress)
    record = _record(result, content_fact, [fact for _, fact in read], output_uri)
    if result.status != "succeeded" or result.image is None or result.final_losses is None:
        error = result.error or {}
        raise StylizeFailed(f"stylize failed: {error.get('message', 'no image')}", record)
    return Stylized(
        result.image, result.final_losses, result.history, record, result.params, list(result.intermediates)
    )


@functools.cache
def _shared_stylizer() -> Stylizer:
    """One Stylizer per process: a notebook's second call reuses the loaded network."""
    from nst import storage
    from nst.engine.stylizer import Stylizer

    return Stylizer(read_bytes=storage.read_bytes)


def _resolve(params: StyleParams | None, overrides: dict[str, Any]) -> StyleParams:
    """`params`' explicitly set values, then the keyword overrides, over their preset (ParamsError naming a field)."""
    if params is not None and not isinstance(params, StyleParams):
        raise ParamsError(f"params: expected a StyleParams, got {type(params).__name__}")
    base = params.model_dump(exclude_unset=True) if params is not None else {}
    return resolve_params(base, overrides, context="parameters")


def _style_list(styles: ImageInput | Sequence[ImageInput]) -> list[object]:
    """One style or several, as a list (each is checked when read); none is a ParamsError."""
    if isinstance(styles, Image.Image | str | os.PathLike) or not isinstance(styles, Sequence):
        return [styles]
    items: list[object] = list(styles)
    if not items:
        raise ParamsError("styles: at least one style image is needed")
    return items


def _read_input(source: object, field_name: str, max_pixels: int) -> tuple[Image.Image, InputFacts]:
    """A decoded RGB image and what the record says of it (URI, sha256 and identity of a file; a PIL image: none)."""
    from nst import storage
    from nst.engine.images import load_image, sha256_bytes
    from nst.run.inputs import InputFacts, identity

    if isinstance(source, Image.Image):
        buf = io.BytesIO()
        source.save(buf, format="TIFF")  # TIFF holds every Pillow mode: load_image converts any of them to RGB
        return load_image(buf.getvalue(), label=f"{field_name} {IN_MEMORY}", max_pixels=max_pixels), InputFacts(
            IN_MEMORY
        )
    if not isinstance(source, str | os.PathLike):
        raise ParamsError(f"{field_name}: expected a PIL image, a path or an s3:// URI, got {type(source).__name__}")
    uri = os.fspath(source)
    try:
        data, info = storage.read_with_info(uri)
    except StorageError as exc:
        raise StorageError(f"{field_name}: {exc}", transient=exc.transient) from None
    image = load_image(data, label=f"{field_name} {uri!r}", max_pixels=max_pixels)
    return image, InputFacts(uri, identity(info), sha256_bytes(data))


def _check_output(output: str | os.PathLike[str] | None) -> str | None:
    """The output URI, refused now (OutputError) if it is not a .png or its local directory cannot be written.

    The one output check of a single pair: `stylize(output=...)` and `nst stylize -o` (which calls `stylize`)."""
    if output is None:
        return None
    from nst import storage

    uri = os.fspath(output)
    if not uri.lower().endswith(".png"):
        raise OutputError(f"output {uri!r}: must end in .png")
    if not storage.is_s3(uri):
        directory = Path(uri).expanduser().resolve().parent
        if not directory.is_dir():
            raise OutputError(f"output {uri!r}: directory {str(directory)!r} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise OutputError(f"output {uri!r}: directory {str(directory)!r} is not writable")
    return uri


def _record(
    result: PairResult[Image.Image], content: InputFacts, styles: list[InputFacts], output: str | None
) -> dict[str, Any]:
    """The pair's JSON record as a plain dict (its stored JSON): written beside `output` and read back, or built in
    memory with `output` None."""
    from nst.manifest import PairSpec
    from nst.run.records import build_record, read_record, write_pair_result

    spec = PairSpec(id=result.id, content=content.uri, styles=[s.uri for s in styles], params=result.params)
    inputs = {fact.uri: fact for fact in (content, *styles)}
    if output is not None:
        # The image at exactly the name asked for (`out.PNG` too), the JSON beside it: the writer of manifest runs.
        stored = write_pair_result(spec, inputs, result, os.path.dirname(output) or ".", None, image_uri=output)
        written = read_record(stored.json_uri)
        if written is None:
            raise OutputError(f"output {output!r}: its JSON record {stored.json_uri!r} could not be read back")
        return written.model_dump(exclude_unset=True)
    record = build_record(
        spec, inputs, ".", None, status=result.status, params=result.params, result=result, error=result.error
    )
    return record.model_copy(update={"output": None}).model_dump(exclude_unset=True)
