"""The loss normalisations as objects: one per `Normalization` name, chosen once, equal to the old formulas."""

from typing import get_args

import pytest
import torch
from torch import Tensor

from nst.engine.losses import NORMALIZATIONS, RELATIVE_SCALE, LossNormalization, gram_matrix, loss_normalization
from nst.engine.optimize import PairProblem, stylize_batch
from nst.errors import ParamsError
from nst.params import Normalization, resolve_params
from tests.tiny_extractor import TinyExtractor


# The formulas as they stood before the objects (a `str` compared in each), kept verbatim as the parity reference.
def _old_content(features: Tensor, target: Tensor, normalization: str) -> Tensor:
    with torch.autocast(device_type=features.device.type, enabled=False):
        sq = (features.float() - target.float()).pow(2).flatten(1)
        if normalization == "relative":
            return RELATIVE_SCALE * sq.sum(1) / target.float().pow(2).flatten(1).sum(1).clamp_min(1e-30)
        return 0.5 * sq.sum(1) if normalization == "gatys" else sq.mean(1)


def _old_style(gram: Tensor, target_gram: Tensor, normalization: str) -> Tensor:
    if normalization == "relative":
        error = (gram - target_gram).pow(2).flatten(1).sum(1) / target_gram.pow(2).flatten(1).sum(1).clamp_min(1e-30)
        return RELATIVE_SCALE * error
    mse = (gram - target_gram).pow(2).flatten(1).mean(1)
    return 0.25 * mse if normalization == "gatys" else mse


def _old_tv(image: Tensor, normalization: str) -> Tensor:
    with torch.autocast(device_type=image.device.type, enabled=False):
        x = image.float()
        dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).flatten(1)
        dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1)
        if normalization == "gatys":
            return dx.sum(1) + dy.sum(1)
        return (RELATIVE_SCALE if normalization == "relative" else 1.0) * (dx.mean(1) + dy.mean(1))


def _terms(features: Tensor, target: Tensor, image: Tensor, norm: LossNormalization | str) -> list[Tensor]:
    """Content, style and TV values of one normalisation, then their gradients with respect to features and image."""
    features, image = features.detach().requires_grad_(True), image.detach().requires_grad_(True)
    gram, target_gram = gram_matrix(features), gram_matrix(target)
    if isinstance(norm, str):
        values = [_old_content(features, target, norm), _old_style(gram, target_gram, norm), _old_tv(image, norm)]
    else:
        values = [norm.content(features, target), norm.style_layer(gram, target_gram), norm.tv(image)]
    weights = torch.tensor([0.3, 1.7, 2.9])
    sum(w * v.sum() for w, v in zip(weights, values, strict=True)).backward()  # type: ignore[union-attr]
    assert features.grad is not None and image.grad is not None
    return [*(v.detach() for v in values), features.grad, image.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", get_args(Normalization))
def test_each_normalization_equals_its_old_formula_bit_for_bit(name: Normalization, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 5, 7, generator=generator).to(dtype) * 30
    target = torch.randn(2, 6, 5, 7, generator=generator).to(dtype) * 30
    image = torch.rand(2, 3, 9, 8, generator=generator).to(dtype) * 255
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = _terms(features, target, image, loss_normalization(name))
        old = _terms(features, target, image, name)
    for a, b in zip(ours, old, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_every_normalization_name_has_one_object() -> None:
    assert set(NORMALIZATIONS) == set(get_args(Normalization))
    for name in get_args(Normalization):
        assert loss_normalization(name).name == name


def test_an_unknown_normalization_is_refused_where_it_is_chosen() -> None:
    with pytest.raises(ParamsError, match=r"^normalization: unknown value 'gatsy'"):
        loss_normalization("gatsy")  # type: ignore[arg-type]


def test_the_loop_refuses_an_unknown_normalization_instead_of_running_mean() -> None:
    # Validation already refuses the name; a copy that skips it (model_copy) used to run silently as `mean`.
    params = resolve_params({"content_layers": ["block3_conv1"], "style_layers": ["block1_conv1"], "iterations": 2})
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    problem = PairProblem(image, [image.flip(-1)], params.model_copy(update={"normalization": "gatsy"}))
    with pytest.raises(ParamsError, match="normalization"):
        stylize_batch([problem], TinyExtractor())
