"""The ViT against hand-computed parameter counts and the backbone contract."""
import math

import pytest
import torch

from dino_from_scratch import vit
from dino_from_scratch.vit import VisionTransformer, ViTConfig, n_params

ARCHS = {"vit_tiny": (192, 12), "vit_small": (384, 12), "vit_base": (768, 12), "vit_large": (1024, 24)}


def hand_count(D: int, depth: int, patch: int, img_size: int = 224, in_chans: int = 3, mlp_ratio: float = 4.0) -> int:
    "Parameters of a DINOv1 ViT, counted layer by layer."
    H = int(D * mlp_ratio)
    patch_embed = D * in_chans * patch * patch + D        # Conv2d weight + bias
    cls = D
    pos = (1 + (img_size // patch) ** 2) * D
    block = (2 * D                                        # norm1
             + D * 3 * D + 3 * D                          # qkv (with bias)
             + D * D + D                                  # proj
             + 2 * D                                      # norm2
             + D * H + H                                  # fc1
             + H * D + D)                                 # fc2
    final_norm = 2 * D
    return patch_embed + cls + pos + depth * block + final_norm


def test_hand_formula_matches_official_counts():
    assert hand_count(384, 12, 16) == 21_665_664           # DINOv1 ViT-S/16
    assert hand_count(768, 12, 16) == 85_798_656           # DINOv1 ViT-B/16


@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("name", list(ARCHS))
def test_preset_param_counts(name, patch):
    with torch.device("meta"):
        m = getattr(vit, name)(patch_size=patch)
    assert m.pos_embed.is_meta
    D, depth = ARCHS[name]
    assert (m.embed_dim, len(m.blocks), m.patch_size) == (D, depth, patch)
    assert n_params(m) == hand_count(D, depth, patch)
    if (name, patch) == ("vit_small", 16): assert n_params(m) == 21_665_664
    if (name, patch) == ("vit_base", 16): assert n_params(m) == 85_798_656


def _tiny(**kw):
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, drop_path_rate=0.0, **kw)).eval()


def test_pos_embed_interpolation():
    m = _tiny()
    assert m.grid == 4
    assert m.interpolate_pos_encoding(4, 4) is m.pos_embed                 # the training grid: the table itself
    assert torch.equal(m.interpolate_pos_encoding(4, 4), m.pos_embed)
    other = m.interpolate_pos_encoding(2, 6)
    assert other.shape == (1, 1 + 12, 24)
    assert torch.equal(other[:, 0], m.pos_embed[:, 0])                     # the CLS position is never resized
    assert not torch.equal(other[:, 1:5], m.pos_embed[:, 1:5])


def test_forward_features_contract_non_square():
    m = _tiny()
    x = torch.randn(2, 3, 16, 40)                                          # 2 x 5 patches
    with torch.no_grad():
        f = m.forward_features(x)
        cls = m(x)
    assert set(f) == {"cls", "registers", "patches"}
    assert f["cls"].shape == (2, 24)
    assert f["registers"].shape == (2, 0, 24)
    assert f["patches"].shape == (2, (16 // 8) * (40 // 8), 24)
    assert torch.equal(f["cls"], cls)
    # the outputs are the last block's tokens through the final LayerNorm (weight 1, bias 0 at init),
    # written out by hand: (t - mean) / sqrt(var + eps), CLS first, then the patches in row-major order
    with torch.no_grad():
        t = m.prepare_tokens(x)
        for blk in m.blocks: t = blk(t)
    hand = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)
    tokens = torch.cat([f["cls"][:, None], f["patches"]], 1)
    assert torch.allclose(tokens, hand, atol=1e-4)
    assert torch.allclose(tokens[:, 1:].var(-1, unbiased=False), torch.ones(2, 10), atol=1e-3)
    # a patch token depends on its own image only
    with torch.no_grad():
        f1 = m.forward_features(x[:1])
    assert torch.allclose(f1["patches"][0], f["patches"][0], atol=1e-5)


def test_last_self_attention_rows_sum_to_one():
    m = _tiny()
    x = torch.randn(2, 3, 24, 16)                                          # 3 x 2 patches
    with torch.no_grad():
        a = m.get_last_self_attention(x)
    T = 1 + 6
    assert a.shape == (2, 3, T, T)
    assert (a >= 0).all()
    assert torch.allclose(a.sum(-1), torch.ones(2, 3, T), atol=1e-5)
    maps = vit.cls_attention_maps(m, x)
    assert maps.shape == (2, 3, 3, 2)
    assert torch.allclose(maps.flatten(2), a[:, :, 0, 1:])


def test_meta_build_then_materialise():
    with torch.device("meta"):
        m = vit.vit_small(patch_size=16)
    m = m.to_empty(device="cpu")
    m.init_weights()
    for name, p in m.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
    w = m.blocks[0].attn.qkv.weight                                        # 1152 x 384 trunc-normal(0.02) draws
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(w.mean().item()) < 1e-3
    assert m.blocks[3].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert m.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(m.blocks[0].attn.qkv.bias, torch.zeros(3 * 384))
    assert torch.equal(m.norm.weight, torch.ones(384)) and torch.equal(m.norm.bias, torch.zeros(384))
    # the patch-embedding conv gets PyTorch's default init: U(-b, b) with b = 1/sqrt(fan_in)
    b = 1 / math.sqrt(3 * 16 * 16)
    assert m.patch_embed.proj.weight.abs().max().item() <= b + 1e-7
    assert m.patch_embed.proj.weight.std().item() == pytest.approx(b / math.sqrt(3), rel=0.05)
    with torch.no_grad():
        y = m(torch.randn(1, 3, 32, 48))
    assert y.shape == (1, 384) and torch.isfinite(y).all()


def test_cpu_bf16_paths_match_fp32_forward_and_gradients():
    """Under CPU bf16 autocast the patch embedding runs as a matmul on flattened patches and attention runs in fp32
    (chapter 01: two slow PyTorch CPU kernels avoided). Same weights, so forward and gradients must match the fp32
    model within bf16 rounding; a wrong patch order or a dropped attention would be off by O(1)."""
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2))
    x = torch.randn(3, 3, 32, 32)
    f = lambda d: torch.cat([d["cls"][:, None], d["patches"]], 1)
    ref = f(m.forward_features(x))
    g_ref = torch.autograd.grad(ref.square().sum(), m.patch_embed.proj.weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(m.forward_features(x))
    assert out.shape == ref.shape                        # (the final LayerNorm returns fp32 under autocast)
    err = (out.float() - ref).abs().max().item()
    assert err < 0.1, err                                # LayerNorm outputs ~N(0, 1): bf16 rounding through 2 blocks
    g = torch.autograd.grad(out.float().square().sum(), m.patch_embed.proj.weight)[0]
    cos = torch.nn.functional.cosine_similarity(g.flatten(), g_ref.flatten(), dim=0).item()
    assert cos > 0.99, cos
    # the patch order: swapping two patches of the input swaps the two tokens (a transposed unfold would not)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = m.patch_embed(x)
        xs = x.clone(); xs[..., 0:8, 8:16], xs[..., 8:16, 0:8] = x[..., 8:16, 0:8], x[..., 0:8, 8:16]
        ts = m.patch_embed(xs)
        t_wide = m.patch_embed(torch.cat([x, torch.randn(3, 3, 32, 5)], -1))   # a partial last column is dropped, like the conv
    assert t.dtype == torch.bfloat16                     # the bf16 matmul path ran
    torch.testing.assert_close(ts[:, 1], t[:, 4]); torch.testing.assert_close(ts[:, 4], t[:, 1])
    torch.testing.assert_close(t_wide, t)
