"""The engine: decoded images and parameters in, stylized images and losses out; same-shape pairs run as one batch."""

from __future__ import annotations

import gc
import platform
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from nst.engine import optimize
from nst.engine.color import image_to_tensor, luminance_transfer, match_color, tensor_to_image
from nst.engine.images import resize_long_side
from nst.engine.optimize import ProgressCallback
from nst.engine.pairs import PairProblem, PairResult
from nst.engine.vgg import VGGFeatures, load_vgg, resolve_device
from nst.engine.weights import ReadBytes, WeightsInfo
from nst.errors import NSTError, OutOfMemory
from nst.params import StyleParams, canonical_params


def device_name(device: torch.device) -> str:
    """A readable device name for results: the GPU model or the CPU architecture."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine()})"


def prepare_problem(job: PairProblem[Image.Image]) -> tuple[PairProblem[Tensor], Tensor]:
    """Resize and convert one pair's images to tensors; returns the problem and the content tensor at output size."""
    p = job.params
    content = image_to_tensor(resize_long_side(job.content, p.size))
    style_size = p.style_size or p.size
    styles = [image_to_tensor(resize_long_side(s, style_size)) for s in job.styles]
    if p.preserve_colors == "histogram":
        # Gatys et al. 2016a, colour histogram matching: the style images take the content's colour statistics.
        styles = [match_color(s, content) for s in styles]
    if p.style_blend is not None and len(p.style_blend) != len(styles):
        raise NSTError(f"style_blend: {len(p.style_blend)} weights for {len(styles)} style images")
    return PairProblem(content, styles, p, job.id), content


class Stylizer:
    """Keeps loss networks loaded between calls (thread-safe) and runs pairs in same-shape batches."""

    def __init__(self, read_bytes: ReadBytes | None = None) -> None:
        self.read_bytes = read_bytes
        self._networks: dict[tuple[Any, ...], tuple[VGGFeatures, WeightsInfo]] = {}
        self._lock = threading.Lock()

    def network(
        self, params: StyleParams, device: torch.device, input_roots: Sequence[str] | None = None
    ) -> tuple[VGGFeatures, WeightsInfo]:
        """The loss network for these parameters, loaded once per Stylizer (a `weights` file beneath `input_roots`)."""
        layers = tuple(dict.fromkeys([*params.content_layers, *params.style_layers]))
        key = (params.network_key(), str(device), tuple(input_roots) if input_roots is not None else None)
        with self._lock:  # batches on several device slots share one Stylizer
            if key not in self._networks:
                self._networks[key] = load_vgg(
                    params.network,
                    params.weights,
                    layers=layers,
                    pooling=params.pooling,
                    post_relu=params.post_relu,
                    device=device,
                    read_bytes=self.read_bytes,
                    roots=input_roots,
                )
            return self._networks[key]

    def stylize(
        self,
        jobs: Sequence[PairProblem[Image.Image]],
        *,
        callback: ProgressCallback | None = None,
        input_roots: Sequence[str] | None = None,
    ) -> list[PairResult[Image.Image]]:
        """Stylize jobs that share shape and graph parameters in one batch (one forward/backward per step).

        Layer names must be canonical (`canonical_params`): the pipeline and `stylize` resolve them once. A local
        `weights` file is read beneath `input_roots` if given (a manifest's run), no symlink followed.
        """
        start = time.perf_counter()
        device = resolve_device(jobs[0].params.device)
        extractor, weights = self.network(jobs[0].params, device, input_roots)
        prepared = [prepare_problem(j) for j in jobs]
        problems = [p for p, _ in prepared]
        intermediates: list[list[tuple[int, Image.Image]]] = [[] for _ in jobs]

        def on_event(event: Any) -> None:
            if event.images is not None:
                for i, img in enumerate(event.images):
                    intermediates[i].append((event.iteration, tensor_to_image(img[None])))
            if callback is not None:
                callback(event)

        oom = None
        try:
            outcomes = optimize.stylize_batch(problems, extractor, device=device, callback=on_event)
        except torch.OutOfMemoryError as exc:
            oom = f"out of memory on {device} with a batch of {len(jobs)}: {exc}"
        if oom is not None:  # raised outside the except block: no __context__ holding the batch's tensors
            del problems, prepared
            free_memory(device)
            raise OutOfMemory(oom)
        seconds = (time.perf_counter() - start) / len(jobs)
        device_label = device_name(device)
        results = []
        for job, (_, content), outcome, inter in zip(jobs, prepared, outcomes, intermediates, strict=True):
            image = None
            if outcome.image is not None:
                out = outcome.image
                if job.params.preserve_colors == "luminance":
                    out = luminance_transfer(out, content)
                image = tensor_to_image(out)
            results.append(
                PairResult(
                    outcome.id,
                    outcome.status,
                    outcome.params,
                    image,
                    outcome.final_losses,
                    outcome.history,
                    outcome.iterations,
                    outcome.error,
                    outcome.warnings,
                    seconds=seconds,
                    device=device_label,
                    weights=weights,
                    intermediates=inter,
                )
            )
        return results


def free_memory(device: torch.device | str | None = None) -> None:
    """Collect unreachable tensors now and return cached CUDA blocks (after an out-of-memory error)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def stylize(
    content: Image.Image,
    styles: Sequence[Image.Image],
    params: StyleParams,
    *,
    callback: ProgressCallback | None = None,
    stylizer: Stylizer | None = None,
) -> PairResult[Image.Image]:
    """Stylize one pair (the library's simplest entry point)."""
    job = PairProblem(content, list(styles), canonical_params(params))
    return (stylizer or Stylizer()).stylize([job], callback=callback)[0]
