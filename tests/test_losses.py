"""Losses against hand computation."""

import torch

from nst.engine.losses import RELATIVE_SCALE, Gatys, Mean, Relative, blended_gram, gram_matrix


def _features(seed: int, shape: tuple[int, ...] = (2, 3, 4, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_gram_matrix_is_FFt_over_M() -> None:
    f = _features(0)
    gram = gram_matrix(f)
    b, c, h, w = f.shape
    for i in range(b):
        flat = f[i].reshape(c, h * w)
        expected = torch.zeros(c, c)
        for p in range(c):
            for q in range(c):
                expected[p, q] = sum(flat[p, k] * flat[q, k] for k in range(h * w)) / (h * w)
        torch.testing.assert_close(gram[i], expected, rtol=1e-5, atol=1e-6)


def test_gram_is_fp32_under_bf16_autocast() -> None:
    f = _features(1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram_matrix(f).dtype == torch.float32


def _plain_gram(f: torch.Tensor) -> torch.Tensor:
    b, c, h, w = f.shape
    flat = f.reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (h * w)


def test_gram_backward_and_layouts_match_autograd_of_the_formula() -> None:
    """The one-product backward equals autograd's; NHWC features give the same Grams; bf16 products stay within 1 %."""
    f = _features(4, (2, 6, 5, 7)).requires_grad_(True)
    weight = _features(5, (2, 6, 6))
    (gram_matrix(f) * weight).sum().backward()
    ours = f.grad
    f.grad = None
    (_plain_gram(f) * weight).sum().backward()
    torch.testing.assert_close(ours, f.grad)
    nhwc = f.detach().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gram_matrix(nhwc), _plain_gram(f.detach()))
    low = gram_matrix(f.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last), low_precision=True)
    assert low.dtype == torch.float32
    reference = _plain_gram(f.detach())
    assert float((low - reference).norm() / reference.norm()) < 0.01


def test_content_loss_normalisations() -> None:
    f, p = _features(2), _features(3)
    diff2 = (f - p) ** 2
    torch.testing.assert_close(Gatys().content(f, p), 0.5 * diff2.flatten(1).sum(1))
    torch.testing.assert_close(Mean().content(f, p), diff2.flatten(1).mean(1))


def test_style_loss_gatys_is_paper_formula() -> None:
    f, a = _features(4), _features(5)
    b, n, h, w = f.shape
    m = h * w
    loss = Gatys().style_layer(gram_matrix(f), gram_matrix(a))
    for i in range(b):
        g_raw = f[i].reshape(n, m) @ f[i].reshape(n, m).T  # unnormalised, as in the paper
        a_raw = a[i].reshape(n, m) @ a[i].reshape(n, m).T
        expected = ((g_raw - a_raw) ** 2).sum() / (4 * n**2 * m**2)
        torch.testing.assert_close(loss[i], expected, rtol=1e-5, atol=1e-7)
    mean_loss = Mean().style_layer(gram_matrix(f), gram_matrix(a))
    torch.testing.assert_close(mean_loss, 4 * loss)


def test_tv_loss_by_hand() -> None:
    x = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])
    # horizontal steps: 1,2,0,0 -> squares 1+4 = 5; vertical steps: 2,1,-1 -> 4+1+1 = 6
    torch.testing.assert_close(Gatys().tv(x), torch.tensor([11.0]))
    torch.testing.assert_close(Mean().tv(x), torch.tensor([5 / 4 + 6 / 3]))


def test_blended_gram_gives_the_gradient_of_the_weighted_sum_of_losses() -> None:
    a1, a2 = gram_matrix(_features(6, (1, 3, 4, 4))), gram_matrix(_features(7, (1, 3, 4, 4)))
    f = _features(8, (1, 3, 4, 4)).requires_grad_(True)
    blended = Mean().style_layer(gram_matrix(f), blended_gram([a1, a2], [0.7, 0.3]))
    (g_blend,) = torch.autograd.grad(blended.sum(), f)
    summed = 0.7 * Mean().style_layer(gram_matrix(f), a1) + 0.3 * Mean().style_layer(gram_matrix(f), a2)
    (g_sum,) = torch.autograd.grad(summed.sum(), f)
    torch.testing.assert_close(g_blend, g_sum, rtol=1e-5, atol=1e-6)
    # unnormalised blend weights mean the same as normalised ones
    torch.testing.assert_close(blended_gram([a1, a2], [7, 3]), blended_gram([a1, a2], [0.7, 0.3]))


def test_relative_normalisation_is_the_relative_squared_error() -> None:
    f, p = _features(9), _features(10)
    expected = ((f - p) ** 2).flatten(1).sum(1) / (p**2).flatten(1).sum(1)
    torch.testing.assert_close(Relative().content(f, p), RELATIVE_SCALE * expected)
    g, a = gram_matrix(f), gram_matrix(p)
    style = ((g - a) ** 2).flatten(1).sum(1) / (a**2).flatten(1).sum(1)
    torch.testing.assert_close(Relative().style_layer(g, a), RELATIVE_SCALE * style)
    # Scale-free: the same relative error for a style ten times brighter in feature space.
    torch.testing.assert_close(Relative().style_layer(100 * g, 100 * a), Relative().style_layer(g, a))
