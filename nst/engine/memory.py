"""The memory model: bytes of one optimisation step, of a worker process, and of a batch; what fits a stated memory.

Bytes per pair are counted from the loss network's layer shapes: what autograd saves for the backward pass (each
ReLU output, max-pool indices, the fp32 copies the Gram and content losses keep), the largest backward transient,
and the optimiser's state (as each `nst.engine.steppers` optimiser holds it: `Stepper.state_bytes`, kept equal by
tests/test_memory_model.py); also of the step that recomputes activations in the backward pass, and when the
engine takes it (`needs_recompute`). It describes the eager step; torch.compile saves less, so it errs on the safe side.
Torch-free, so that planning (batches, `nst validate`) uses it without loading the engine; checked against measured
peak RSS by `bench/memory_model.py` (docs/performance.md).
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from nst.errors import ParamsError
from nst.layers import LAYER_NAMES, MIN_SIDE, canonical_layer
from nst.params import StyleParams

if TYPE_CHECKING:
    import torch

DeviceType = Literal["cpu", "cuda"]

_BLOCK_CHANNELS = (64, 128, 256, 512, 512)  # VGG16/19 output channels per block
CUDA_MEMORY_FRACTION = 0.85  # of free device memory; the rest absorbs allocator fragmentation
CUDA_RESERVED_BYTES = 1 << 30  # cuDNN/cuBLAS handles, weights' bf16 copies, compiled graphs' pools
CUDNN_WORKSPACE_CAP_MIB = 2048  # nst.engine.fastpath's cap on cuDNN's autotuning workspace (a test keeps the two equal)
# A CPU worker process before any pixel: Python, torch and its libraries, the engine, the decoded images and the
# allocator's slack (measured with bench/memory_model.py: 740 MiB after the imports; +100 MiB centres 256-2048 px).
CPU_PROCESS_BYTES = 840 << 20
# torch.utils.checkpoint loads torch._dynamo (and sympy) on its first call: measured +160 MiB RSS, once per process.
RECOMPUTE_PROCESS_BYTES = 160 << 20
MAX_TENSOR_ELEMENTS = 2**31 - 1  # many convolution kernels index with int32: one activation must stay below this
CPU_MEMORY_FRACTION = 0.5  # of available RAM
CUDA_SATURATION_PIXELS = 8 * 512 * 512  # pixels per step past which a larger batch adds no throughput (to measure)
CPU_MAX_PAIRS = 4  # on CPU larger batches gain nothing measurable (docs/performance.md)
MAX_PAIRS = 64
WORKER_MEMORY_ENV = "NST_WORKER_MEMORY"
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})


@dataclass(frozen=True)
class StepMemory:
    """Estimated bytes of one optimisation step: per pair (activations, optimiser state) and once per batch."""

    saved_per_pair: int  # tensors autograd keeps for the backward pass
    transient_per_pair: int  # gradients alive at once at the widest layer during the backward pass
    state_per_pair: int  # image, gradient, optimiser state, loss targets
    fixed: int  # weights and library workspaces, once per batch (on CPU: the whole process before any pixel)

    @property
    def per_pair(self) -> int:
        return self.saved_per_pair + self.transient_per_pair + self.state_per_pair

    def total(self, pairs: int) -> int:
        """Estimated peak bytes for a batch of `pairs`."""
        return self.fixed + pairs * self.per_pair


def device_type(device: str | torch.device) -> DeviceType:
    """cpu or cuda, from a device or its name ("cuda:1", "auto" counts as cpu: no GPU is assumed)."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def activation_bytes(params: StyleParams, device: DeviceType, *, native_bf16: bool = False) -> int:
    """Bytes per activation: 2 under bf16 autocast (`bf16`; `auto` on CUDA or on a CPU with native bf16), else 4."""
    low = params.precision == "bf16" or (params.precision == "auto" and (device == "cuda" or native_bf16))
    return 2 if low else 4


def optimizer_state_images(params: StyleParams) -> int:
    """Float32 images of optimiser state per pair, besides the iterate and its gradient (`Stepper.state_bytes`)."""
    if params.optimizer == "adam":
        return 3  # best iterate, two moments
    return 2 * params.history_size + 3  # s and y histories; accepted iterate, previous gradient, direction


@dataclass
class _Segment:
    """Bytes of one run of layers ending at a layer the losses read (what `VGGFeatures.recomputing` checkpoints)."""

    inner: int = 0  # what autograd saves inside the run (recomputed in the backward pass when recomputing)
    kept: int = 0  # what is kept for the backward pass either way: the losses' tensors, the next run's input
    widest: int = 0  # elements of the run's widest activation
    out: int = 0  # elements of its output (the layer the losses read)
    gram: bool = False  # whether a style loss reads it
    convs: list[tuple[int, int]] = field(default_factory=list)  # per convolution: `inner` up to its ReLU, elements


def _segments(height: int, width: int, params: StyleParams, act: int) -> tuple[list[_Segment], int, int]:
    """The loss network's runs of layers per pair at height x width; also the loss targets' and weights' bytes."""
    network = params.network
    content = {canonical_layer(n, network) for n in params.content_layers}
    style = {canonical_layer(n, network) for n in params.style_layers}
    order = LAYER_NAMES[network]
    deepest = max(order.index(n) for n in content | style)
    h, w, c_in = height, width, 3
    segments, run = [], _Segment(inner=3 * height * width * act)  # the (cast) input, saved by the first convolution
    targets = weights = 0
    for name in order[: deepest + 1]:
        block = int(name[5])
        if name.endswith("_pool"):
            h, w = h // 2, w // 2
            out = _BLOCK_CHANNELS[block - 1] * h * w
            run.inner += out * (8 if params.pooling == "max" else 0) + out * act  # int64 indices; the pooled output
            continue
        c_out = _BLOCK_CHANNELS[block - 1]
        weights += c_out * c_in * 9 * 4
        c_in = c_out
        elems = c_out * h * w
        run.widest = max(run.widest, elems)
        run.inner += elems * act  # ReLU output (saved by ReLU and by the next convolution: one tensor)
        run.convs.append((run.inner, elems))
        if name not in style and name not in content:
            continue
        run.out, run.gram = elems, name in style
        if name in style:
            run.kept += elems * 4 if act != 4 else 0  # fp32 copy for the Gram product's backward
            run.kept += c_out * c_out * 4  # Gram difference kept by the squared error
            targets += c_out * c_out * 4
        if name in content:
            run.kept += elems * 4  # fp32 difference kept by the squared error
            targets += elems * act
        segments.append(run)
        run = _Segment()
    return segments, targets, weights


def _recompute_peak(segments: list[_Segment], input_bytes: int, act: int) -> tuple[int, int]:
    """Saved bytes per pair, and the backward's peak above them, when each run is recomputed in the backward pass.

    Kept: the input image (fp32, the first run's input), each run's output but the last (the next run's input) and
    the losses' tensors (fp32: the Gram keeps the features themselves). At the backward's start, those and the
    losses' fp32 gradients. While run k's backward reaches a convolution, the runs after k are done (their kept
    tensors freed) and of run k's recomputed tensors those up to that layer are left, with its gradients.
    """
    last = segments[-1]
    outputs = [s.out * act for s in segments[:-1]] + [last.out * 4 if act == 4 and last.gram else 0]
    saved = input_bytes + sum(outputs) + sum(s.kept for s in segments)
    peak, alive = saved + sum(s.out * 4 for s in segments), input_bytes
    for k, segment in enumerate(segments):
        image = input_bytes if k == 0 and act == 4 else 0  # fp32: the first convolution's input is the image itself
        for inner, elems in segment.convs:
            peak = max(peak, alive + inner - image + elems * (2 * act + 4))
        alive += outputs[k] + segment.kept
    return saved, peak - saved


def step_memory(
    height: int,
    width: int,
    params: StyleParams,
    device: str | torch.device = "cuda",
    *,
    native_bf16: bool = False,
    recompute: bool = False,
) -> StepMemory:
    """Memory model of one eager step at height x width for these parameters (VGG layer shapes, dtypes); with
    `recompute`, of the step that recomputes activations in the backward pass (`VGGFeatures.recomputing`)."""
    kind = device_type(device)
    act = activation_bytes(params, kind, native_bf16=native_bf16)
    segments, targets, weights = _segments(height, width, params, act)
    if recompute:
        saved, transient = _recompute_peak(segments, 3 * height * width * 4, act)
    else:
        saved = sum(s.inner + s.kept for s in segments)
        transient = max(s.widest for s in segments) * (2 * act + 4)  # upstream, downstream, fp32 loss gradients
    image = 3 * height * width * 4
    # At the backward's peak: the iterate, its new gradient and the last step's masked gradient, and the optimiser's
    # state (its own working tensors live only in the step, after the activations are freed).
    state = image * (3 + optimizer_state_images(params))
    fixed = weights * 2 + (2 * image if params.optimizer == "lbfgs" else 0)  # L-BFGS: the box's bounds, per batch
    if kind == "cuda":
        fixed += CUDA_RESERVED_BYTES + (CUDNN_WORKSPACE_CAP_MIB << 20)
    else:
        fixed += CPU_PROCESS_BYTES + (RECOMPUTE_PROCESS_BYTES if recompute else 0)
    return StepMemory(saved, transient, state + targets, fixed)


def available_bytes(device: str | torch.device) -> int:
    """Bytes this process may still use on the device: free CUDA memory (plus the allocator's cached free blocks)
    or available RAM."""
    if device_type(device) == "cuda":
        import torch

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
    device: str | torch.device,
    *,
    free_bytes: int | None = None,
    max_pairs: int = MAX_PAIRS,
) -> int:
    """How many pairs of this size to optimise in one batch on this device (>= 1).

    The fewest of: what fits in `free_bytes` (default: what the device has free now) by the memory model; on CUDA,
    enough pixels per step to fill the GPU (CUDA_SATURATION_PIXELS); on CPU, CPU_MAX_PAIRS; and `max_pairs`.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda" and str(device) == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    model = step_memory(height, width, params, device)
    free = available_bytes(device) if free_bytes is None else free_bytes
    fraction = CUDA_MEMORY_FRACTION if device.type == "cuda" else CPU_MEMORY_FRACTION
    fixed = model.fixed - (CPU_PROCESS_BYTES if device.type == "cpu" else 0)  # this process already holds that
    fits = int((free * fraction - fixed) // max(1, model.per_pair))
    useful = math.ceil(CUDA_SATURATION_PIXELS / max(1, height * width)) if device.type == "cuda" else CPU_MAX_PAIRS
    return max(1, min(fits, useful, max_pairs))


def max_square_side(params: StyleParams, memory_bytes: int, *, device: str = "cuda", pairs: int = 1) -> int:
    """The largest square image side (px) whose step fits `pairs` pairs in `memory_bytes`, by the memory model.

    The step recomputing activations counts where it needs less. Also below the int32 indexing limit of one
    activation tensor (64 channels at full resolution: 5792 px, 1 pair).
    """
    budget = memory_bytes * (CUDA_MEMORY_FRACTION if device_type(device) == "cuda" else 1.0)
    low, high = 0, math.isqrt(MAX_TENSOR_ELEMENTS // (_BLOCK_CHANNELS[0] * pairs))
    while low < high:
        mid = (low + high + 1) // 2
        if least_step(mid, mid, params, device).total(pairs) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


# --- A worker's stated memory, and what fits in it (planning: batches, `nst validate`).


@dataclass(frozen=True)
class WorkerMemory:
    """The memory a worker states for one batch, on which kind of device, and where the figure came from."""

    bytes: int
    device: DeviceType
    source: str  # e.g. "NST_WORKER_MEMORY=8GiB" or "the GPU's 80.0 GiB"

    def device_for(self, params: StyleParams) -> DeviceType:
        """The device a pair runs on here: its own `device` if set, else this worker's."""
        return self.device if params.device == "auto" else device_type(params.device)

    def budget(self, params: StyleParams) -> float:
        """Bytes a batch may use: all of it on CPU (the model is the whole process), 85 % of a GPU's."""
        return self.bytes * (CUDA_MEMORY_FRACTION if self.device_for(params) == "cuda" else 1.0)


def parse_memory(text: str) -> int:
    """Bytes from "8GiB", "512MiB", "12G", "12e9" or a plain byte count (ParamsError naming the value otherwise)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    value = float(match.group(1)) if match else 0.0
    if not match or not math.isfinite(value) or value < 1 or value > 2**60:
        raise ParamsError(f"{WORKER_MEMORY_ENV}={text[:40]!r}: not a memory size (e.g. 8GiB, 512MiB, 12G)")
    return int(value * _UNITS[match.group(2) or ""])


@functools.cache
def gpu_memory_bytes() -> int | None:
    """The first GPU's total memory by nvidia-smi (no torch needed; asked once per process), or None without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(out.split()[0]) << 20  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def worker_memory(environ: dict[str, str] | None = None) -> WorkerMemory | None:
    """The worker's stated memory: `NST_WORKER_MEMORY` (on the GPU if there is one, else RAM), else the GPU's own
    memory; None when neither is known (nothing is refused, batches are not split by memory)."""
    env = os.environ if environ is None else environ
    stated = env.get(WORKER_MEMORY_ENV, "").strip()
    gpu = gpu_memory_bytes()
    if stated:
        return WorkerMemory(parse_memory(stated), "cuda" if gpu else "cpu", f"{WORKER_MEMORY_ENV}={stated}")
    if gpu:
        return WorkerMemory(gpu, "cuda", f"the GPU's {gpu / 2**30:.1f} GiB")
    return None


def pairs_that_fit(height: int, width: int, params: StyleParams, memory: WorkerMemory) -> int:
    """How many pairs of this shape one batch may hold in `memory` by the model (0: not even one); the step that
    recomputes activations counts only where not even one pair fits without it (the engine then recomputes)."""
    for recompute in (False, True):
        model = step_memory(height, width, params, memory.device_for(params), recompute=recompute)
        fits = max(0, int((memory.budget(params) - model.fixed) // max(1, model.per_pair)))
        if fits:
            return fits
    return 0


def least_step(
    height: int, width: int, params: StyleParams, device: str | torch.device, *, native_bf16: bool = False
) -> StepMemory:
    """The step that needs less memory at this shape: the plain one or the one recomputing activations."""
    models = (step_memory(height, width, params, device, native_bf16=native_bf16, recompute=r) for r in (False, True))
    return min(models, key=lambda m: m.total(1))


def needs_recompute(
    height: int,
    width: int,
    params: StyleParams,
    device: str | torch.device,
    pairs: int = 1,
    *,
    native_bf16: bool = False,
    memory: WorkerMemory | None = None,
    free_bytes: int | None = None,
) -> bool:
    """Whether a batch of `pairs` at height x width recomputes activations in the backward pass: only when its plain
    step would not fit, by the model, the worker's stated memory (`memory`, default `worker_memory()`), or with none
    stated for this device, the share of its free memory a batch may take (`free_bytes`, default what is free now).

    Recomputing costs one more forward pass of the network per step and changes no value, so it is kept for where
    memory is short: then it is what lets the batch run (docs/performance.md measures both).
    """
    kind = device_type(device)
    need = step_memory(height, width, params, kind, native_bf16=native_bf16).total(pairs)
    stated = worker_memory() if memory is None else memory
    if stated is not None and stated.device_for(params) == kind:
        return need > stated.budget(params)
    free = available_bytes(device) if free_bytes is None else free_bytes
    if kind == "cuda":
        return need > free * CUDA_MEMORY_FRACTION
    return need - CPU_PROCESS_BYTES > free * CPU_MEMORY_FRACTION  # this process already holds its own share


def largest_size(params: StyleParams, memory: WorkerMemory) -> int:
    """The largest `size` (long side, px) whose square image fits one pair in `memory` (0: none)."""
    return max_square_side(params, memory.bytes, device=memory.device_for(params))


def too_big(pair_id: str, params: StyleParams, memory: WorkerMemory) -> str | None:
    """Why this pair cannot fit `memory` at its size (its square, the largest image of that long side), or None."""
    size = params.size
    if pairs_that_fit(size, size, params, memory) >= 1:
        return None
    need = least_step(size, size, params, memory.device_for(params)).total(1)
    fits = largest_size(params, memory)
    fitting = f"the largest size that fits is {fits}" if fits >= MIN_SIDE else "no size fits"
    return (
        f"pair {pair_id}: size {size} needs about {need / 2**30:.1f} GiB by the memory model ({size}x{size} px, "
        f"{params.optimizer}, {params.precision}), more than {memory.source} allows; {fitting}"
    )


__all__ = [
    "CPU_PROCESS_BYTES",
    "StepMemory",
    "WorkerMemory",
    "auto_batch_pairs",
    "available_bytes",
    "least_step",
    "max_square_side",
    "needs_recompute",
    "pairs_that_fit",
    "parse_memory",
    "step_memory",
    "too_big",
    "worker_memory",
]
