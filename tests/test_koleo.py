"""KoLeo: the duplicate-image failure (infinite loss without eps), its default guard, and a value by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from dino_from_scratch.koleo import koleo_loss, koleo_per_crop


def _batch_with_duplicate(n=8, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[5] = x[2]                                                     # the same image twice in the batch
    return x


def test_duplicate_without_eps_is_infinite():
    loss = koleo_loss(_batch_with_duplicate(), eps=0.0)
    assert loss.item() == math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_duplicate_with_default_eps_is_finite_with_finite_gradient(dtype):
    x = _batch_with_duplicate().to(dtype).requires_grad_(True)
    loss = koleo_loss(x)
    assert torch.isfinite(loss)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_duplicates_in_every_pair_stay_finite():
    x = torch.randn(4, 16).repeat(2, 1).requires_grad_(True)       # every image twice
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("n", [3, 4, 7, 16, 64])
def test_evenly_spaced_circle(n):
    a = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    pts = (3.0 * torch.stack([a.cos(), a.sin()], 1)).float()        # any radius: the loss normalises
    assert koleo_loss(pts).item() == pytest.approx(-math.log(2 * math.sin(math.pi / n)), abs=1e-6)


def test_matches_the_pairwise_distance_definition():
    "Same value as DINOv2's recipe written with torch's own pieces (PairwiseDistance, argmax of dot products)."
    x = torch.randn(10, 12, generator=torch.Generator().manual_seed(1))
    xn = F.normalize(x, eps=1e-8, p=2, dim=-1)
    dots = xn @ xn.t()
    dots.fill_diagonal_(-1)
    d = torch.nn.PairwiseDistance(2, eps=1e-8)(xn, xn[dots.argmax(1)])
    assert koleo_loss(x).item() == pytest.approx(-torch.log(d + 1e-8).mean().item(), abs=1e-6)


def test_per_crop_sums_the_crops():
    cls = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(2))
    assert koleo_per_crop(cls).item() == pytest.approx((koleo_loss(cls[0]) + koleo_loss(cls[1])).item(), abs=1e-6)


def test_needs_two_points():
    with pytest.raises(ValueError, match="n >= 2"):
        koleo_loss(torch.randn(1, 4))
