"""bench/throughput.py covers what users get (issue 31): its default configuration is the fast path nst itself runs
with its default parameters, and its parity verdict reads docs/quality.md's two axes. Unit tier: the tiny extractor,
no weights file."""

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image

import nst.engine.optimize
from bench import throughput
from nst.engine import fastpath
from nst.engine.fastpath import FastPath
from nst.engine.pairs import PairResult
from nst.engine.stylizer import Stylizer, stylize
from nst.params import resolve_params
from tests.tiny_extractor import TinyExtractor

CPU = torch.device("cpu")
TINY_LAYERS = {"content_layers": ["block3_conv1"], "style_layers": ["block1_conv1", "block2_conv1"]}


def what_nst_runs(monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> FastPath:
    """The fast path of one run through the product's Stylizer with the default parameters (layers fit the tiny
    network) and `overrides`."""
    seen: list[FastPath] = []
    real = nst.engine.optimize.backend_flags

    @contextlib.contextmanager
    def spy(fast: FastPath, device: torch.device) -> Iterator[None]:
        seen.append(fast)
        with real(fast, device):
            yield

    monkeypatch.setattr(nst.engine.optimize, "backend_flags", spy)
    stylizer = Stylizer()
    stylizer.network = lambda params, device, input_roots=None: (TinyExtractor(), None)  # type: ignore[method-assign,assignment,return-value]
    params = resolve_params({**TINY_LAYERS, "size": 32, "iterations": 1, "device": "cpu", **overrides})
    content, style = Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (32, 32), (20, 90, 220))
    result = stylize(content, [style], params, stylizer=stylizer)
    assert result.status == "succeeded" and len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("native_bf16", [None, True, False], ids=["this-cpu", "native-bf16", "no-native-bf16"])
def test_the_bench_default_is_what_nst_runs(monkeypatch: pytest.MonkeyPatch, native_bf16: bool | None) -> None:
    if native_bf16 is not None:
        monkeypatch.setattr(fastpath, "cpu_has_native_bf16", lambda: native_bf16)
    nst_fast = what_nst_runs(monkeypatch)
    configs = throughput.make_configs(CPU)
    name = throughput.default_config_name(CPU, configs)
    cfg = configs[name]
    assert cfg.fast == nst_fast and cfg.batched
    # The bench's parameters for that configuration, fed to nst, pick the same fast path.
    args = throughput.parse_args(["--cpu", "--preset", "none"])
    assert FastPath.for_params(throughput.bench_params(args, "lbfgs", cfg.precision, 10), CPU) == nst_fast
    # ...and the default runs: it is in the throughput and sweep lists and is the ttq / history configuration.
    assert throughput.run_lists(args, CPU, configs) == name
    assert name in args.configs and name in args.sweep_configs
    assert args.ttq_config == args.history_config == name


def test_on_a_native_bf16_cpu_the_default_is_added_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where bf16 is native, none of the hand-written bf16 configurations is the default: `default` is added."""
    monkeypatch.setattr(fastpath, "cpu_has_native_bf16", lambda: True)
    configs = throughput.make_configs(CPU)
    default = configs[throughput.default_config_name(CPU, configs)]
    assert default.name == "default" and default.precision == "auto" and "bf16-nst" not in configs
    assert default.fast.amp == torch.bfloat16 and default.fast.channels_last and default.fast.low_precision_gram
    assert default.fast != configs["bf16"].fast and default.fast != configs["bf16-nhwc"].fast


def test_without_native_bf16_the_bf16_default_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without native bf16 the default is fp32-batched, and `bf16-nst` measures the native CPUs' default."""
    monkeypatch.setattr(fastpath, "cpu_has_native_bf16", lambda: False)
    configs = throughput.make_configs(CPU)
    assert throughput.default_config_name(CPU, configs) == "fp32-batched"
    assert configs["bf16-nst"].fast == what_nst_runs(monkeypatch, precision="bf16")
    monkeypatch.setattr(fastpath, "cpu_has_native_bf16", lambda: True)
    assert configs["bf16-nst"].fast == what_nst_runs(monkeypatch)  # the default where bf16 is native
    args = throughput.parse_args(["--cpu"])
    throughput.run_lists(args, CPU, configs)
    assert args.configs == ["reference", "fp32-batched", "bf16-nst", "bf16", "bf16-nhwc"]


def test_the_bench_default_on_cuda_is_the_product_default() -> None:
    cuda = torch.device("cuda")
    configs = throughput.make_configs(cuda)
    name = throughput.default_config_name(cuda, configs)
    assert configs[name].fast == FastPath.for_params(resolve_params({}), cuda)
    assert name in throughput.with_default(throughput.GPU_CONFIGS, name)
    assert [c for c in configs.values() if c.fast == configs[name].fast and c.batched] == [configs[name]]


def test_axis_parity_ratios_and_verdict() -> None:
    ref = {"content_err": [0.5, 0.2], "style_err": [0.010, 0.040]}
    near = {"content_err": [0.51, 0.2], "style_err": [0.0098, 0.041]}
    out = throughput.axis_parity(near, ref, 0.05)
    assert out["content_err_ratio"] == [1.02, 1.0] and out["style_err_ratio"] == [0.98, 1.025]
    assert out["max_abs_axis_change"] == 0.025 and out["parity"] is True and out["parity_tolerance"] == 0.05
    far = {"content_err": [0.5, 0.2], "style_err": [0.010, 0.0376]}  # one pair's style_err 6 % lower
    assert throughput.axis_parity(far, ref, 0.05)["parity"] is False
    assert throughput.axis_parity(far, ref, 0.07)["parity"] is True


def test_a_pair_without_an_output_is_no_parity() -> None:
    ref = {"content_err": [0.5, 0.2], "style_err": [0.01, 0.04]}
    failed = {"content_err": [0.5, float("nan")], "style_err": [0.01, float("nan")]}
    out = throughput.axis_parity(failed, ref, 0.05)
    assert out["parity"] is False and out["max_abs_axis_change"] is None and out["content_err_ratio"][1] is None


class FakeJudge:
    """Records what it was asked to score; content_err is the image's mean, style_err its max."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []

    def measures(self, image: torch.Tensor, targets: dict[str, Any]) -> dict[str, Any]:
        self.images.append(image)
        return {"content_err": image.mean().item(), "style_err": image.max().item() * targets["scale"]}


def _result(image: torch.Tensor | None) -> PairResult[torch.Tensor]:
    status = "succeeded" if image is not None else "failed"
    return PairResult("p", status, resolve_params({}), image, None, [], 1)


def test_outputs_are_judged_as_saved_8bit_images() -> None:
    judge = FakeJudge()
    image = torch.full((1, 3, 2, 2), 0.3001)
    image[0, 0, 0, 0] = 1.2  # an L-BFGS iterate may leave [0, 1]; the saved image does not
    axes = throughput.judge_outputs(judge, [_result(image), _result(None)], [{"scale": 2.0}, {"scale": 1.0}])  # type: ignore[arg-type]
    assert len(judge.images) == 1
    assert torch.equal(judge.images[0] * 255, (judge.images[0] * 255).round()) and judge.images[0].max() == 1.0
    assert axes["style_err"][0] == 2.0 and axes["content_err"][0] == pytest.approx(judge.images[0].mean().item())
    assert [v != v for v in axes["content_err"]] == [False, True]  # the failed pair is NaN
