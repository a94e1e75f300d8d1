"""The DINOv3 ViT options of our one VisionTransformer: exact official parameter counts (ViT-7B/16 on `meta`), RoPE at
any resolution, the masked key bias, the untied local-crop CLS norm, and clear errors for impossible shapes."""
import pytest
import torch

from dino_from_scratch.vit import LayerScale, ViTConfig, VisionTransformer, n_params
from dino_from_scratch.vit_v3 import DINOV3_ARCHS, dinov3_vit, dinov3_vit_config


def _open(m):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LayerScale): mod.gamma.fill_(1.0)
    return m.requires_grad_(False)


def test_vit7b_on_meta_has_the_official_count_and_no_storage():
    m = dinov3_vit("vit7b16", device="meta")
    assert n_params(m) == 6_716_043_264           # DINOv3 ViT-7B/16 with the local-crop CLS norm
    assert all(p.is_meta for p in m.parameters())
    assert n_params(dinov3_vit("vit7b16", device="meta", untie_local_cls_norm=False)) == 6_716_043_264 - 2 * 4096


def test_unknown_arch_and_bad_rope_shape():
    with pytest.raises(KeyError, match="vit7b16"):
        dinov3_vit_config("vit_huge")
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTConfig(pos_embed="rope", embed_dim=36, num_heads=6)
    with pytest.raises(ValueError, match="model.pos_embed"):
        ViTConfig(pos_embed="sincos")


def test_rope_vit_runs_at_twice_the_resolution_and_is_deterministic_in_eval():
    m = dinov3_vit("vits16", embed_dim=32, depth=2, num_heads=2, img_size=64).eval()
    assert m.pos_embed is None and not any("pos_embed" in k for k in m.state_dict())
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        a, b = m.forward_features(x), m.forward_features(x)
    assert a["patches"].shape == (1, 48, 32) and a["registers"].shape == (1, 4, 32)
    assert torch.equal(a["cls"], b["cls"])


def test_key_bias_mask():
    "With RoPE an unmasked key bias changes the output (it turns into an absolute-position term); masked it cannot."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    def effect(model):
        with torch.no_grad():
            for blk in model.blocks: blk.attn.qkv.bias.normal_(generator=g)
            before = model.forward_features(x)["cls"]
            for blk in model.blocks: blk.attn.qkv.bias[32:64].normal_(generator=g)
            return (model.forward_features(x)["cls"] - before).abs().max().item()
    kw = dict(embed_dim=32, depth=2, num_heads=2, img_size=64)
    assert effect(_open(dinov3_vit("vits16", **kw).eval())) == 0.0
    assert effect(_open(dinov3_vit("vits16", mask_k_bias=False, **kw).eval())) > 1e-3
    assert effect(_open(dinov3_vit("vits16", mask_k_bias=False, pos_embed="learned", **kw).eval())) < 1e-5


def test_local_cls_norm_only_for_local_crops_in_training():
    m = _open(dinov3_vit("vits16", embed_dim=32, depth=1, num_heads=2, img_size=32, untie_local_cls_norm=True))
    with torch.no_grad():
        m.local_cls_norm.weight.fill_(3.0)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    torch.manual_seed(0); loc = m.forward_features(x, local=True)
    torch.manual_seed(0); glo = m.forward_features(x)
    torch.testing.assert_close(loc["cls"], 3 * glo["cls"])
    torch.testing.assert_close(loc["registers"], 3 * glo["registers"])
    torch.testing.assert_close(loc["patches"], glo["patches"])
    m.eval()
    assert torch.equal(m.forward_features(x, local=True)["cls"], m.forward_features(x)["cls"])
