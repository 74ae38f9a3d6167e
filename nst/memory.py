"""Memory model of one optimisation step, and the batch size it allows (`auto_batch_pairs`).

Bytes per pair are counted from the loss network's layer shapes: what autograd saves for the backward pass (each
ReLU output, max-pool indices, the fp32 copies the Gram and content losses keep), the largest backward transient,
and the optimiser's state. It describes the eager step; torch.compile saves less, so it errs on the safe side.
`bench/throughput.py` prints the measured peak next to this estimate (`memory_model_bytes`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from nst.layers import LAYER_NAMES, canonical_layer
from nst.optimize import CUDNN_WORKSPACE_CAP_MIB
from nst.params import StyleParams

_BLOCK_CHANNELS = (64, 128, 256, 512, 512)  # VGG16/19 output channels per block
CUDA_MEMORY_FRACTION = 0.85  # of free device memory; the rest absorbs allocator fragmentation
CUDA_RESERVED_BYTES = 1 << 30  # cuDNN/cuBLAS handles, weights' bf16 copies, compiled graphs' pools
MAX_TENSOR_ELEMENTS = 2**31 - 1  # many convolution kernels index with int32: one activation must stay below this
CPU_MEMORY_FRACTION = 0.5  # of available RAM
CUDA_SATURATION_PIXELS = 8 * 512 * 512  # pixels per step past which a larger batch adds no throughput (to measure)
CPU_MAX_PAIRS = 4  # on CPU larger batches gain nothing measurable (docs/performance.md)
MAX_PAIRS = 64


@dataclass(frozen=True)
class StepMemory:
    """Estimated bytes of one optimisation step: per pair (activations, optimiser state) and once per batch."""

    saved_per_pair: int  # tensors autograd keeps for the backward pass
    transient_per_pair: int  # gradients alive at once at the widest layer during the backward pass
    state_per_pair: int  # image, gradient, best image, optimiser state, loss targets
    fixed: int  # weights and library workspaces, once per batch

    @property
    def per_pair(self) -> int:
        return self.saved_per_pair + self.transient_per_pair + self.state_per_pair

    def total(self, pairs: int) -> int:
        """Estimated peak bytes for a batch of `pairs`."""
        return self.fixed + pairs * self.per_pair


def _act_bytes(params: StyleParams, device: torch.device) -> int:
    cuda = device.type == "cuda"
    low = params.precision == "bf16" or (params.precision == "auto" and cuda)
    return 2 if low else 4


def step_memory(height: int, width: int, params: StyleParams, device: torch.device | str = "cuda") -> StepMemory:
    """Memory model of one eager step at height x width for these parameters (VGG layer shapes, dtypes)."""
    device = torch.device(device)
    act = _act_bytes(params, device)
    network = params.network
    content = {canonical_layer(n, network) for n in params.content_layers}
    style = {canonical_layer(n, network) for n in params.style_layers}
    order = LAYER_NAMES[network]
    deepest = max(order.index(n) for n in content | style)
    h, w = height, width
    pixels = height * width
    saved = 3 * pixels * act  # the network's (cast) input, saved by the first convolution
    widest = 0
    targets = 0
    weights = 0
    c_in = 3
    for name in order[: deepest + 1]:
        block = int(name[5])
        if name.endswith("_pool"):
            h, w = h // 2, w // 2
            out = _BLOCK_CHANNELS[block - 1] * h * w
            if params.pooling == "max":
                saved += out * 8  # int64 indices
            saved += out * act  # pooled output = the next convolution's saved input
            continue
        c_out = _BLOCK_CHANNELS[block - 1]
        weights += c_out * c_in * 9 * 4
        c_in = c_out
        elems = c_out * h * w
        widest = max(widest, elems)
        saved += elems * act  # ReLU output (saved by ReLU and by the next convolution: one tensor)
        if name in style:
            saved += elems * 4 if act != 4 else 0  # fp32 copy for the Gram product's backward
            saved += c_out * c_out * 4  # Gram difference kept by the squared error
            targets += c_out * c_out * 4
        if name in content:
            saved += elems * 4  # fp32 difference kept by the squared error
            targets += elems * act
    transient = widest * (2 * act + 4)  # upstream and downstream gradients + one fp32 loss gradient
    image = 3 * pixels * 4
    # Adam: x, grad, masked grad, best x, two moments. L-BFGS: s and y histories + x, grad, best, direction, prev, q.
    state = image * (6 if params.optimizer == "adam" else 2 * params.history_size + 7)
    fixed = weights * 2
    if device.type == "cuda":
        fixed += CUDA_RESERVED_BYTES + (CUDNN_WORKSPACE_CAP_MIB << 20)
    return StepMemory(saved, transient, state + targets, fixed)


def available_bytes(device: torch.device | str) -> int:
    """Bytes this process may still use on the device: free CUDA memory (plus the allocator's cached free blocks)
    or available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def auto_batch_pairs(
    height: int,
    width: int,
    params: StyleParams,
    device: torch.device | str,
    *,
    free_bytes: int | None = None,
    max_pairs: int = MAX_PAIRS,
) -> int:
    """How many pairs of this size to optimise in one batch on this device (>= 1).

    The fewest of: what fits in `free_bytes` (default: what the device has free now) by the memory model; on CUDA,
    enough pixels per step to fill the GPU (CUDA_SATURATION_PIXELS); on CPU, CPU_MAX_PAIRS; and `max_pairs`.
    """
    device = torch.device(device)
    if device.type == "cuda" and str(device) == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    model = step_memory(height, width, params, device)
    free = available_bytes(device) if free_bytes is None else free_bytes
    fraction = CUDA_MEMORY_FRACTION if device.type == "cuda" else CPU_MEMORY_FRACTION
    fits = int((free * fraction - model.fixed) // max(1, model.per_pair))
    useful = math.ceil(CUDA_SATURATION_PIXELS / max(1, height * width)) if device.type == "cuda" else CPU_MAX_PAIRS
    return max(1, min(fits, useful, max_pairs))


def max_square_side(params: StyleParams, memory_bytes: int, *, device: str = "cuda", pairs: int = 1) -> int:
    """The largest square image side (px) whose step fits `pairs` pairs in `memory_bytes`, by the memory model.

    Also below the int32 indexing limit of one activation tensor (64 channels at full resolution: 5792 px, 1 pair).
    """
    fraction = CUDA_MEMORY_FRACTION if torch.device(device).type == "cuda" else CPU_MEMORY_FRACTION
    budget = memory_bytes * fraction
    low, high = 32, math.isqrt(MAX_TENSOR_ELEMENTS // (_BLOCK_CHANNELS[0] * pairs))
    while low < high:
        mid = (low + high + 1) // 2
        if step_memory(mid, mid, params, device).total(pairs) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


__all__ = ["StepMemory", "auto_batch_pairs", "available_bytes", "max_square_side", "step_memory"]
