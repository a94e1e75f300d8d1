"""DINOv3 building blocks: 2-D RoPE (loop = vectorised, norm preservation, relative-offset property, box jitter only
in training) and the Gram loss (loop = vectorised, zero for identical / rotated features, Gram-teacher refresh rule)."""
import math

import pytest
import torch

from dino_from_scratch.rope import Rope2D, apply_rope, patch_coords, rope_angles, rope_apply, rope_apply_loop, rope_periods
from dino_from_scratch.gram import GramConfig, gram_loss, gram_loss_loop, gram_refresh_due, resize_patch_features


@pytest.mark.parametrize("H,W,normalize", [(3, 5, "separate"), (4, 2, "min"), (2, 6, "max")])
def test_rope_loop_equals_vectorised_and_preserves_norms(H, W, normalize):
    g = torch.Generator().manual_seed(H * 10 + W)
    x = torch.randn(H * W, 24, generator=g)
    ang = rope_angles(patch_coords(H, W, normalize), rope_periods(24))
    fast = rope_apply(x, ang.sin(), ang.cos())
    torch.testing.assert_close(fast, rope_apply_loop(x, ang), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_rope_periods_and_coords_by_hand():
    p = rope_periods(16, base=100.0)                 # D/4 = 4 periods: 100 ** (2k / 8)
    torch.testing.assert_close(p, torch.tensor([1.0, 100 ** 0.25, 10.0, 100 ** 0.75]))
    c = patch_coords(2, 2)                           # centres of a 2x2 grid in (-1, 1)
    torch.testing.assert_close(c, torch.tensor([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]))


def test_rope_logit_depends_only_on_relative_offset():
    "Same query / key vector at every patch: logits of pairs with equal offsets must be equal (augmentation off)."
    H, W, D = 5, 4, 32
    sin, cos = Rope2D(D).eval()(H, W)
    g = torch.Generator().manual_seed(1)
    q = rope_apply(torch.randn(D, generator=g).expand(H * W, D), sin, cos)
    k = rope_apply(torch.randn(D, generator=g).expand(H * W, D), sin, cos)
    L = (q @ k.T).reshape(H, W, H, W)
    by_offset = {}
    for y in range(H):
        for x in range(W):
            for y2 in range(H):
                for x2 in range(W):
                    by_offset.setdefault((y2 - y, x2 - x), []).append(L[y, x, y2, x2])
    spread = max((torch.stack(v).max() - torch.stack(v).min()).item() for v in by_offset.values())
    assert spread < 1e-4
    # and the logit is not constant over offsets (positions are actually encoded)
    assert torch.stack([v[0] for v in by_offset.values()]).std() > 1e-2


def test_rope_prefix_untouched_and_eval_never_jittered():
    rope = Rope2D(16, rescale=2.0, shift=0.1, jitter=1.5)
    q = torch.randn(2, 2, 1 + 4 + 9, 16); k = torch.randn(2, 2, 1 + 4 + 9, 16)
    rope.eval()
    (s1, c1), (s2, c2) = rope(3, 3), rope(3, 3)
    assert torch.equal(s1, s2) and torch.equal(c1, c2)
    rq, rk = apply_rope(q, k, s1, c1, n_prefix=5)
    assert torch.equal(rq[..., :5, :], q[..., :5, :]) and torch.equal(rk[..., :5, :], k[..., :5, :])
    rope.train()
    assert not torch.equal(rope(3, 3)[0], rope(3, 3)[0])
    with pytest.raises(ValueError, match="cover 4 patches"):
        apply_rope(q, k, *rope(2, 2), n_prefix=5)


def test_gram_loss_loop_equals_vectorised_and_properties():
    g = torch.Generator().manual_seed(0)
    S, T = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)
    for rn in (False, True):
        assert gram_loss(S, T, remove_neg=rn).item() == pytest.approx(gram_loss_loop(S, T, remove_neg=rn), rel=1e-5)
    assert gram_loss(T, T).item() == 0.0
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert gram_loss(T @ Q, T).item() < 1e-10
    # by hand: two patches; student orthogonal (cos 0), teacher parallel (cos 1): Gram entries differ by 1 off the diagonal
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]); t = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    assert gram_loss(s, t).item() == pytest.approx(2 / 4)
    # remove_neg: opposite patches (cos -1) count as 0
    s2 = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert gram_loss(s2, t).item() == pytest.approx(8 / 4) and gram_loss(s2, t, remove_neg=True).item() == pytest.approx(2 / 4)
    assert gram_loss(s2, s, remove_neg=True).item() == 0.0 and gram_loss(s2, s).item() == pytest.approx(2 / 4)


def test_gram_refresh_rule_and_resize():
    cfg = GramConfig(it_first_update=100, update_frequency=50, max_updates=2)
    assert [i for i in range(400) if gram_refresh_due(i, cfg)] == [100, 150]
    x = torch.randn(2, 16, 3)
    assert torch.equal(resize_patch_features(x, (4, 4), (4, 4)), x)
    const = torch.ones(1, 64, 3) * torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(resize_patch_features(const, (8, 8), (4, 4)), torch.ones(1, 16, 3) * torch.tensor([1.0, -2.0, 0.5]))
    with pytest.raises(ValueError, match="exclusive"):
        GramConfig(remove_neg=True, remove_only_teacher_neg=True)


@pytest.mark.parametrize("S,T,diag", [(2, 2, True), (2, 2, False), (6, 2, False), (3, 2, True)])
def test_dinov3_pair_loss_loop_equals_vectorised(S, T, diag):
    from dino_from_scratch.dinov3_loss import dino_pairs_loss, dino_pairs_loss_loop
    g = torch.Generator().manual_seed(S * 7 + T)
    s, t = torch.randn(S, 4, 9, generator=g), torch.randn(T, 4, 9, generator=g).softmax(-1)
    assert dino_pairs_loss(s, t, ignore_diagonal=diag).item() == pytest.approx(dino_pairs_loss_loop(s, t, ignore_diagonal=diag), rel=1e-5)


def test_dinov3_split_equals_mean_over_valid_pairs():
    "With local weight 1, DINOv3's pair-count weighting of global and local terms is DINOv2's mean over valid pairs."
    from dino_from_scratch.dinov3_loss import dino_pairs_loss, dino_pairs_loss_loop, dinov3_loss_scales
    g = torch.Generator().manual_seed(3)
    glob, loc, t = torch.randn(2, 3, 5, generator=g), torch.randn(8, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g).softmax(-1)
    sc = dinov3_loss_scales(2, 8)
    assert sc["dino_global"] == pytest.approx(2 / 18) and sc["koleo"] == 2
    split = sc["dino_global"] * dino_pairs_loss(glob, t, ignore_diagonal=True) + sc["dino_local"] * dino_pairs_loss(loc, t)
    assert split.item() == pytest.approx(dino_pairs_loss_loop(torch.cat([glob, loc]), t, ignore_diagonal=True), rel=1e-5)
