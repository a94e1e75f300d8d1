"""Official checkpoints in our ViT: flavour detection, architecture inference, parity with timm and Hugging Face models
(random weights, nothing downloaded), the DINOv1/DINOv2/DINOv3 hub layouts against a transcription of their forward,
Hugging Face DINOv3ViTModel, timm DINOv3 (Eva), clear errors."""
import argparse
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dino_from_scratch.pretrained import (FLAVOURS, V3_DEFAULTS, as_tokens, dinov3_hub_config, infer_config,
                                          load_official, official_flavour, rename_dinov3, rename_timm_dinov3,
                                          timm_dinov3_config, unwrap_checkpoint)
from dino_from_scratch.rope import rope_periods
from dino_from_scratch.vit import ViTConfig, VisionTransformer, n_params, resize_pos_embed
from dino_from_scratch.vit_v2 import dinov2_vit
from dino_from_scratch.vit_v3 import dinov3_vit, dinov3_vit_config

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.layers import SwiGLUPacked  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402
from transformers import (Dinov2Config, Dinov2ForImageClassification, Dinov2Model,  # noqa: E402
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel, DINOv3ViTConfig, DINOv3ViTModel)

TOL = 1e-5  # float32, features after the final LayerNorm (unit scale)


def vit_small(patch_size=16, depth=12):
    "A DINOv1 ViT-S (ViTConfig's defaults), `depth` blocks."
    return VisionTransformer(ViTConfig(patch_size=patch_size, depth=depth))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    "Redraw every parameter at a scale where each part matters (the default LayerScale 1e-5 would hide the blocks)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "gamma" in n or "lambda" in n or ("norm" in n and n.endswith("weight")): p.copy_(1 + 0.2 * r)
            elif any(s in n for s in ("pos", "cls", "reg", "mask")): p.copy_(r)
            else: p.copy_(r / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1 * r)
    return model.eval()


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def ours_vs(ours, theirs_fn, hw, seed=0) -> float:
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return maxdiff(as_tokens(ours.forward_features(x)), theirs_fn(x))


def official_forward(sd, x, heads, offset=0.1, antialias=False):
    "Transcription of DINOv1 `vision_transformer.py` / DINOv2 `DinoVisionTransformer.forward_features` (all tokens, normed)."
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)
    lin = lambda t, p: F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))
    ls = lambda t, k: t * sd[k] if k in sd else t
    B, _, w, h = x.shape
    p = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], 1)
    pos, N, dim = sd["pos_embed"], sd["pos_embed"].shape[1] - 1, t.shape[-1]
    if not (t.shape[1] - 1 == N and w == h):
        M, w0, h0 = int(math.sqrt(N)), w // p, h // p
        kw = dict(scale_factor=((w0 + offset) / M, (h0 + offset) / M)) if offset else dict(size=(w0, h0))
        pp = F.interpolate(pos[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kw)
        assert (w0, h0) == pp.shape[-2:]
        pos = torch.cat([pos[:, :1], pp.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)
    t = t + pos
    if "register_tokens" in sd: t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], 1)
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        q, k, v = lin(ln(t, b + "norm1"), b + "attn.qkv").reshape(B, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        t = t + ls(lin((a @ v).transpose(1, 2).reshape(B, -1, dim), b + "attn.proj"), b + "ls1.gamma")
        y = ln(t, b + "norm2")
        if b + "mlp.w12.weight" in sd:
            x1, x2 = lin(y, b + "mlp.w12").chunk(2, dim=-1)
            y = lin(F.silu(x1) * x2, b + "mlp.w3")
        else:
            y = lin(F.gelu(lin(y, b + "mlp.fc1")), b + "mlp.fc2")
        t, i = t + ls(y, b + "ls2.gamma"), i + 1
    return ln(t, "norm")


# ----------------------------------------------------------------------------------------------- interpolation option
def test_default_resize_unchanged_and_variants_match_the_official_calls():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16 * 16, 8)
    grid = pos[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    flat = lambda g: torch.cat([pos[:, :1], g.permute(0, 2, 3, 1).reshape(1, -1, 8)], 1)
    assert ViTConfig().interpolate_offset == 0.0 and ViTConfig().interpolate_antialias is False
    plain = flat(F.interpolate(grid, size=(16, 12), mode="bicubic", align_corners=False))
    assert torch.equal(resize_pos_embed(pos, 16, 12), plain)                       # the chapter-1 behaviour
    aa = flat(F.interpolate(grid, size=(16, 12), mode="bicubic", antialias=True))   # timm resample_abs_pos_embed
    assert torch.equal(resize_pos_embed(pos, 16, 12, antialias=True), aa)
    off = flat(F.interpolate(grid, scale_factor=(16.1 / 16, 12.1 / 16), mode="bicubic"))  # DINOv1 interpolate_pos_encoding
    assert torch.equal(resize_pos_embed(pos, 16, 12, offset=0.1), off)
    assert maxdiff(off, plain) > 0.05 and maxdiff(aa, plain) > 0.05                # three genuinely different resizes
    with pytest.raises(ValueError, match="interpolate_offset"):
        ViTConfig(interpolate_offset=1.5)


# ------------------------------------------------------------------------------------------------------------ timm
TIMM_CASES = {
    "vits14": ("vit_small_patch14_dinov2", 224, {}),
    "vits14_reg4": ("vit_small_patch14_reg4_dinov2", 224, {}),
    "small_custom": ("vit_small_patch14_dinov2", 56, dict(embed_dim=128, depth=2, num_heads=2)),
    "small_swiglu": ("vit_giant_patch14_dinov2", 98,
                     dict(embed_dim=128, depth=2, num_heads=2, mlp_ratio=5.375, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)),
}


def _timm(case):
    name, img, kw = TIMM_CASES[case]
    return randomize_(timm.create_model(name, pretrained=False, img_size=img, dynamic_img_size=True, **kw)), img


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_parity(case):
    theirs, img = _timm(case)
    ours = load_official(theirs.state_dict())
    assert ours.official["flavour"] == "timm_dinov2" and not ours.training
    assert ours.cfg.norm_eps == theirs.norm.eps == theirs.blocks[0].norm1.eps == 1e-6
    assert (ours.embed_dim, len(ours.blocks), ours.cfg.num_heads, ours.num_registers, ours.cfg.img_size) == \
        (theirs.embed_dim, len(theirs.blocks), theirs.blocks[0].attn.num_heads, theirs.num_reg_tokens, img)
    assert ours.cfg.ffn == ("swiglu" if case == "small_swiglu" else "mlp") and ours.mask_token is None
    p = 14
    for hw in [(img, img), (img, img * 3 // 4 // p * p)]:                  # training size, then e.g. 224x168 -> 16x12
        assert ours_vs(ours, theirs.forward_features, hw) < TOL, hw


def test_timm_wrong_resize_is_detected():
    "The test can fail: the right weights with DINOv1's resize are far off at a non-square size, exact at the training size."
    theirs, img = _timm("vits14_reg4")
    wrong = load_official(theirs.state_dict(), interpolate_antialias=False, interpolate_offset=0.1)
    assert ours_vs(wrong, theirs.forward_features, (224, 224)) < TOL
    assert ours_vs(wrong, theirs.forward_features, (224, 168)) > 1e-3


def test_timm_swiglu_width_we_cannot_hold():
    theirs = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, img_size=56, embed_dim=128, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="SwiGLU hidden width of 341"):   # timm's 2.66667*2 ratio only fits ViT-g's 1536
        load_official(theirs.state_dict())


# ---------------------------------------------------------------------------------------------------- Hugging Face
def _hf(registers=False, **kw):
    cfg = {**dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14), **kw}
    m = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **cfg)) if registers \
        else Dinov2Model(Dinov2Config(**cfg))
    return randomize_(m)


HF_CASES = {"mlp": dict(), "swiglu": dict(use_swiglu_ffn=True, hidden_size=192, num_attention_heads=3, num_hidden_layers=3),
            "registers": dict(registers=True), "registers_swiglu": dict(registers=True, use_swiglu_ffn=True, qkv_bias=False)}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_parity(case):
    theirs = _hf(**HF_CASES[case])
    ours = load_official(theirs.state_dict())
    c = theirs.config
    assert ours.official["flavour"] == ("hf_dinov2_reg" if "registers" in case else "hf_dinov2")
    assert ours.cfg.norm_eps == c.layer_norm_eps == theirs.layernorm.eps == 1e-6
    assert (ours.embed_dim, len(ours.blocks), ours.cfg.num_heads, ours.cfg.qkv_bias, ours.cfg.ffn) == \
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.qkv_bias, "swiglu" if c.use_swiglu_ffn else "mlp")
    assert ours.num_registers == (4 if "registers" in case else 0)
    their = lambda x: theirs(pixel_values=x).last_hidden_state
    for hw in [(112, 112), (112, 84), (70, 98)]:
        assert ours_vs(ours, their, hw) < TOL, hw


def test_hf_registers_wrong_resize_is_detected():
    theirs = _hf(registers=True)
    wrong = load_official(theirs.state_dict(), interpolate_antialias=False)   # Dinov2Model's resize on registers weights
    their = lambda x: theirs(pixel_values=x).last_hidden_state
    assert ours_vs(wrong, their, (112, 112)) < TOL and ours_vs(wrong, their, (112, 84)) > 1e-3


def test_hf_hub_file_names(tmp_path):
    "save_pretrained writes the names of the files on the hub (attention.attention.query, mlp.weights_in ...)."
    theirs = _hf(use_swiglu_ffn=True)
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    names = list(load_file(tmp_path / "model.safetensors"))
    assert any(".attention.attention.query." in k for k in names) and any(".mlp.weights_in." in k for k in names)
    assert not any("q_proj" in k or "gate_proj" in k for k in names)
    their = lambda x: theirs(pixel_values=x).last_hidden_state
    for src in (tmp_path / "model.safetensors", str(tmp_path)):                     # the file, or the folder
        ours = load_official(src)
        assert ours.official["flavour"] == "hf_dinov2" and ours.cfg.ffn == "swiglu"
        assert ours_vs(ours, their, (112, 84)) < TOL


def test_hf_classification_wrapper_and_explicit_heads():
    c = Dinov2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14, num_labels=5)
    theirs = randomize_(Dinov2ForImageClassification(c))
    with pytest.raises(ValueError, match="pass num_heads="):                        # 96 channels: not DINO's 64 per head
        load_official(theirs.state_dict())
    ours = load_official(theirs.state_dict(), num_heads=4)
    assert any("classifier.*" in n for n in ours.official["notes"])
    assert any("'dinov2.'" in n for n in ours.official["notes"])
    assert ours_vs(ours, lambda x: theirs.dinov2(pixel_values=x).last_hidden_state, (56, 70)) < TOL
    bad = load_official(theirs.state_dict(), num_heads=2)                           # a wrong head count is a different model
    assert ours_vs(bad, lambda x: theirs.dinov2(pixel_values=x).last_hidden_state, (56, 56)) > 1e-3


# ------------------------------------------------------------------------------------------------ DINOv1 / DINOv2 hub
def _v1_training_checkpoint(sd):
    "DINOv1 main_dino.py save_dict: DDP student, plain teacher, each with a DINO head."
    head = {"head.mlp.0.weight": torch.ones(8, 4), "head.last_layer.weight_g": torch.ones(16, 1)}
    return {"student": {f"module.backbone.{k}": v + 1 for k, v in sd.items()} | {f"module.{k}": v for k, v in head.items()},
            "teacher": {f"backbone.{k}": v for k, v in sd.items()} | head, "epoch": 100, "dino_loss": {"center": torch.zeros(1, 16)}}


@pytest.mark.parametrize("patch", [16, 8])
def test_dinov1_hub_parity(patch, tmp_path):
    src = randomize_(vit_small(patch_size=patch, depth=2))
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}             # our names are the hub names
    assert official_flavour(sd) == "dinov1"
    path = tmp_path / "dino_deitsmall_pretrain.pth"
    torch.save(sd, path)
    for given in (path, _v1_training_checkpoint(sd)):
        ours = load_official(given, map_location="cpu")
        assert ours.official["flavour"] == "dinov1" and ours.cfg.interpolate_offset == 0.1
        assert (ours.cfg.patch_size, ours.cfg.img_size, ours.cfg.num_heads, ours.cfg.layerscale) == (patch, 224, 6, None)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            assert torch.equal(as_tokens(ours.forward_features(x)), as_tokens(src.forward_features(x)))   # identical
        for hw in [(224, 160), (96, 96)]:
            assert ours_vs(ours, lambda x: official_forward(sd, x, 6, 0.1), hw) < TOL, hw
    notes = load_official(_v1_training_checkpoint(sd)).official["notes"]
    assert any("'teacher'" in n for n in notes) and any("head.*" in n for n in notes)


@pytest.mark.parametrize("kind", ["plain", "registers", "swiglu"])
def test_dinov2_hub_parity(kind):
    src = randomize_(dinov2_vit("vits14", depth=2, img_size=224, num_registers=4 if kind == "registers" else 0,
                                **({"ffn": "swiglu"} if kind == "swiglu" else {})))
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    ours = load_official(sd)
    fl = FLAVOURS[ours.official["flavour"]]
    assert fl.name == ("dinov2_reg" if kind == "registers" else "dinov2")
    assert (fl.interpolate_offset, fl.interpolate_antialias) == ((0.0, True) if kind == "registers" else (0.1, False))
    for hw in [(224, 224), (224, 168), (126, 182)]:
        assert ours_vs(ours, lambda x: official_forward(sd, x, 6, fl.interpolate_offset, fl.interpolate_antialias), hw) < TOL
    # a second, independent reference: timm's own converter of hub files (`checkpoint_filter_fn`)
    name = "vit_small_patch14_reg4_dinov2" if kind == "registers" else "vit_small_patch14_dinov2"
    # timm packs SwiGLU in fc1 of width int(D * mlp_ratio): 2 x 1024 here (DINOv2's width for ViT-S), so mlp_ratio = 2048.5 / 384
    kw = dict(mlp_ratio=2048.5 / 384, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU) if kind == "swiglu" else {}
    t = timm.create_model(name, pretrained=False, img_size=224, depth=2, dynamic_img_size=True, **kw).eval()
    t.load_state_dict(checkpoint_filter_fn({k: v.clone() for k, v in sd.items()}, t))
    assert ours_vs(ours, t.forward_features, (224, 224)) < TOL
    if kind == "registers":   # the hub's registers models resize like timm (size=, antialias)
        assert ours_vs(ours, t.forward_features, (224, 168)) < TOL


def test_dinov2_training_checkpoint_with_block_chunks():
    src = randomize_(dinov2_vit("vits14", depth=4, img_size=56, embed_dim=64, num_heads=1))
    sd = src.state_dict()
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // 2}.{m.group(1)}.", k): v for k, v in sd.items()}
    assert "blocks.1.3.norm1.weight" in chunked
    ckpt = {"model": {f"teacher.backbone.{k}": v for k, v in chunked.items()}
                     | {f"student.backbone.{k}": v + 1 for k, v in chunked.items()}
                     | {"teacher.dino_head.mlp.0.weight": torch.ones(3, 64), "teacher.ibot_head.mlp.0.weight": torch.ones(3, 64)},
            "iteration": 10}
    ours = load_official(ckpt)
    assert ours.official["flavour"] == "dinov2" and len(ours.blocks) == 4
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(as_tokens(ours.forward_features(x)), as_tokens(src.forward_features(x)))


# ------------------------------------------------------------------------------------------------- inference, helpers
def test_infer_config_dinov2_giant_shapes():
    with torch.device("meta"):
        g = dinov2_vit("vitg14", num_registers=4)
    cfg = infer_config(g.state_dict())
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size, cfg.ffn, cfg.num_registers) == \
        (1536, 40, 24, 14, 518, "swiglu", 4)
    with torch.device("meta"):
        assert VisionTransformer(cfg).state_dict().keys() == g.state_dict().keys()


def test_map_location_dtype_eval_and_no_shared_storage():
    src = randomize_(dinov2_vit("vits14", depth=1, img_size=56, embed_dim=64, num_heads=1))
    sd = src.state_dict()
    ours = load_official(sd, map_location="cpu", dtype=torch.float64)
    assert not ours.training and all(p.dtype == torch.float64 and p.device.type == "cpu" for p in ours.parameters())
    ours32 = load_official(sd)
    before = ours32.cls_token.clone()
    with torch.no_grad(): sd["cls_token"].add_(1.0)                                  # the caller's tensors stay theirs
    assert torch.equal(ours32.cls_token, before)


@pytest.mark.parametrize("make,flavour", [
    (lambda: vit_small(depth=1).state_dict(), "dinov1"),
    (lambda: dinov2_vit("vits14", depth=1).state_dict(), "dinov2"),
    (lambda: dinov2_vit("vits14", depth=1, num_registers=4).state_dict(), "dinov2_reg"),
    (lambda: timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=1, img_size=56).state_dict(), "timm_dinov2"),
    (lambda: timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=1, img_size=56).state_dict(), "timm_dinov2"),
    (lambda: _hf().state_dict(), "hf_dinov2"),
    (lambda: _hf(registers=True).state_dict(), "hf_dinov2_reg"),
    (lambda: _to_hub(dinov3_vit("vits16", depth=1, embed_dim=64, num_heads=1)), "dinov3"),
    (lambda: _to_hub(dinov3_vit("vit7b16", device="meta")), "dinov3"),
    (lambda: _hf_v3().state_dict(), "hf_dinov3"),
    (lambda: {k.removeprefix("model."): v for k, v in _hf_v3().state_dict().items()}, "hf_dinov3"),   # file names
    (lambda: timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=1).state_dict(), "timm_dinov3"),
    (lambda: timm.create_model("vit_small_plus_patch16_dinov3_qkvb", pretrained=False, depth=1).state_dict(), "timm_dinov3"),
])
def test_official_flavour(make, flavour):
    assert official_flavour(make()) == flavour


# ------------------------------------------------------------------------------------------------------------ errors
def test_unknown_state_dict_says_what_is_known_and_what_was_found():
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64), "layer1.0.conv1.weight": torch.zeros(1),
              "fc.weight": torch.zeros(10, 2048)}
    with pytest.raises(ValueError, match="unrecognised state dict") as e:
        load_official(resnet)
    msg = str(e.value)
    assert all(name in msg for name in FLAVOURS) and "conv1" in msg and "layer1" in msg and "4 tensors" in msg
    assert "dinov3:" in msg and "hf_dinov3:" in msg and "rope_embed.periods" in msg and "DINOv3ViTModel" in msg
    assert "timm_dinov3:" in msg and "blocks.N.gamma_1" in msg


def test_damaged_checkpoints_name_the_tensors():
    sd = dinov2_vit("vits14", depth=3, img_size=56).state_dict()
    with pytest.raises(ValueError, match=r"blocks \[1\] are missing"):
        load_official({k: v for k, v in sd.items() if not k.startswith("blocks.1.")})
    with pytest.raises(ValueError, match=r"missing tensors: \['blocks.2.attn.proj.bias'\]"):
        load_official({k: v for k, v in sd.items() if k != "blocks.2.attn.proj.bias"})
    with pytest.raises(ValueError, match=r"left-over tensors \(not used\): \['blocks.0.attn.extra'\]"):
        load_official(sd | {"blocks.0.attn.extra": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"norm.weight: \(380,\) vs \(384,\)"):
        load_official({k: v[..., :380] if k == "norm.weight" else v for k, v in sd.items()})
    hf = {k: v for k, v in _hf().state_dict().items() if "layer.1.attention.k_proj.weight" not in k}
    with pytest.raises(ValueError, match="cannot build blocks.1.attn.qkv.weight"):
        load_official(hf)


def test_a_registered_family_is_detected_after_the_vits_and_loaded_by_its_own_loader():
    "Chapter 14's registry for later chapters' backbones (chapter 28 registers the ConvNeXt): a toy family."
    from dino_from_scratch.pretrained import OFFICIAL_LOADERS, Flavour, register_official_loader
    saved = dict(OFFICIAL_LOADERS)
    seen = []
    def load(obj, flavour=None, map_location=None, dtype=None, verbose=False, **kw):
        seen.append((flavour, sorted(unwrap_checkpoint(obj)), kw))
        m = nn.Linear(2, 2); m.official = {"flavour": flavour}
        return m
    toy = Flavour("toy", "a test family", "toy.weight", lambda ks: "toy.weight" in ks, lambda sd: sd)
    try:
        register_official_loader("toy", {"toy": toy}, load)
        assert official_flavour({"toy.weight": torch.ones(1)}) == "toy"
        assert official_flavour(vit_small(depth=1).state_dict()) in FLAVOURS       # the ViT flavours still come first
        got = load_official({"model": {"toy.weight": torch.ones(1)}}, width=3)     # wrapped: unwrapped by the family's loader
        assert got.official["flavour"] == "toy" and seen == [("toy", ["toy.weight"], {"width": 3})]
        with pytest.raises(ValueError, match="num_heads=2 given for a toy checkpoint"):
            load_official({"toy.weight": torch.ones(1)}, num_heads=2)
        with pytest.raises(ValueError, match=r"flavour names already taken: \{'dinov2': 'the ViT flavours'\}"):
            register_official_loader("other", {"dinov2": toy}, load)
        with pytest.raises(ValueError, match="family 'toy'"):
            register_official_loader("other", {"toy": toy}, load)
        register_official_loader("toy", {"toy": toy}, load)                       # the same family again: replaced
        with pytest.raises(ValueError, match="(?s)Known flavours.*toy: a test family"):
            load_official({"conv1.weight": torch.ones(1)})
    finally:
        OFFICIAL_LOADERS.clear(); OFFICIAL_LOADERS.update(saved)
    with pytest.raises(ValueError, match="unrecognised state dict"):
        official_flavour({"toy.weight": torch.ones(1)})


def test_bad_inputs(tmp_path):
    sd = vit_small(depth=1).state_dict()
    with pytest.raises(KeyError, match="unknown flavour 'dinov4'.*dinov3, hf_dinov3"):
        load_official(sd, flavour="dinov4")
    with pytest.raises(TypeError, match="expected a state dict"):
        load_official([1, 2, 3])
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_official(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="without tensors"):
        unwrap_checkpoint({"epoch": 3})
    path = tmp_path / "full_checkpoint.pth"                                          # DINOv1 full checkpoints keep argparse args
    torch.save({"teacher": sd, "args": argparse.Namespace(arch="vit_small")}, path)
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\) refused"):
        load_official(path)
    ours = load_official(torch.load(path, weights_only=False))                       # the documented way round
    assert ours.official["flavour"] == "dinov1"



# ------------------------------------------------------------------------------------------------------------ DINOv3
V3_SIZES = [(224, 224), (96, 64)]   # the size in the config (no table: nothing is resized), and a non-square one


def _hf_v3(**kw):
    cfg = {**dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512, image_size=224,
                  patch_size=16, num_register_tokens=4), **kw}
    return randomize_(DINOv3ViTModel(DINOv3ViTConfig(**cfg)))


def _official_periods(head_dim, base=100.0):
    "dinov3 RopePositionEmbedding._init_weights in float32 (hub: pos_embed_rope_dtype='fp32')."
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def _key_mask(D):
    return torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])


def _to_hub(model):
    "Our DINOv3 ViT -> the facebookresearch/dinov3 hub names, written out by hand."
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if k == "register_tokens": out["storage_tokens"] = v
        elif k == "rope.periods": out["rope_embed.periods"] = _official_periods(4 * v.numel())
        elif ".mlp.w12." in k: out[k.replace("w12", "w1")], out[k.replace("w12", "w2")] = v.chunk(2, dim=0)
        else: out[k] = v
        if k.endswith("attn.qkv.bias") and model.cfg.mask_k_bias: out[k + "_mask"] = _key_mask(v.numel() // 3)
    return out


def _hf_to_hub(hf):
    "HF DINOv3ViTModel weights -> hub names, an independent mapping (the converse of transformers' conversion script)."
    sd, c = hf.state_dict(), hf.config
    D = c.hidden_size
    out = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"][0],
           "storage_tokens": sd["embeddings.register_tokens"], "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
           "rope_embed.periods": _official_periods(D // c.num_attention_heads)}
    mlp = ([("gate_proj", "w1"), ("up_proj", "w2"), ("down_proj", "w3")] if c.use_gated_mlp
           else [("up_proj", "fc1"), ("down_proj", "fc2")])
    for i in range(c.num_hidden_layers):
        a, b = f"model.layer.{i}.", f"blocks.{i}."
        out[b + "attn.qkv.weight"] = torch.cat([sd[a + f"attention.{n}_proj.weight"] for n in "qkv"])
        out[b + "attn.qkv.bias"] = torch.cat([sd[a + "attention.q_proj.bias"], torch.zeros(D), sd[a + "attention.v_proj.bias"]])
        out[b + "attn.qkv.bias_mask"] = _key_mask(D)
        for theirs, ours in [("attention.o_proj", "attn.proj"), ("norm1", "norm1"), ("norm2", "norm2")] + \
                            [("mlp." + t, "mlp." + o) for t, o in mlp]:
            out[b + ours + ".weight"], out[b + ours + ".bias"] = sd[a + theirs + ".weight"], sd[a + theirs + ".bias"]
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = sd[a + "layer_scale1.lambda1"], sd[a + "layer_scale2.lambda1"]
    return {k: v.detach().clone() for k, v in out.items()}


def official_v3_forward(sd, x, eps=1e-5):
    "Transcription of DINOv3 DinoVisionTransformer.forward_features in eval mode (all tokens after the final norm)."
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=eps)
    lin = lambda t, p: F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))
    ls = lambda t, k: t * sd[k] if k in sd else t
    periods, D = sd["rope_embed.periods"], sd["cls_token"].shape[-1]
    hd = 4 * periods.numel()
    heads = D // hd
    p = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    B, _, H, W = t.shape
    t = t.flatten(2).transpose(1, 2)
    storage = sd.get("storage_tokens", t.new_zeros(1, 0, D))
    t = torch.cat([(sd["cls_token"] + 0 * sd["mask_token"]).expand(B, -1, -1), storage.expand(B, -1, -1), t], 1)
    ch, cw = torch.arange(0.5, H, dtype=torch.float32) / H, torch.arange(0.5, W, dtype=torch.float32) / W
    c = 2.0 * torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).flatten(0, 1) - 1.0
    ang = (2 * math.pi * c[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    sin, cos = torch.sin(ang), torch.cos(ang)
    half = lambda u: torch.cat([-u[..., hd // 2:], u[..., :hd // 2]], -1)
    rope = lambda u: torch.cat([u[:, :, :-H * W], u[:, :, -H * W:] * cos + half(u[:, :, -H * W:]) * sin], 2)
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        bias = sd.get(b + "attn.qkv.bias")
        if b + "attn.qkv.bias_mask" in sd: bias = bias * sd[b + "attn.qkv.bias_mask"]
        q, k, v = F.linear(ln(t, b + "norm1"), sd[b + "attn.qkv.weight"], bias).reshape(B, -1, 3, heads, hd).unbind(2)
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))
        a = F.scaled_dot_product_attention(rope(q), rope(k), v).transpose(1, 2).reshape(B, -1, D)
        t = t + ls(lin(a, b + "attn.proj"), b + "ls1.gamma")
        y = ln(t, b + "norm2")
        if b + "mlp.w1.weight" in sd: y = lin(F.silu(lin(y, b + "mlp.w1")) * lin(y, b + "mlp.w2"), b + "mlp.w3")
        else: y = lin(F.gelu(lin(y, b + "mlp.fc1")), b + "mlp.fc2")
        t, i = t + ls(y, b + "ls2.gamma"), i + 1
    return ln(t, "norm")


HF_V3_CASES = {
    "mlp": dict(),
    "gated": dict(use_gated_mlp=True, hidden_act="silu", hidden_size=192, num_attention_heads=3, num_hidden_layers=3),
    "no_registers": dict(num_register_tokens=0),
    "key_bias": dict(key_bias=True),          # a real (unmasked) key bias: loaded as it is, mask_k_bias off
}


@pytest.mark.parametrize("case", list(HF_V3_CASES))
def test_hf_dinov3_parity(case):
    theirs = _hf_v3(**HF_V3_CASES[case])
    c = theirs.config
    ours = load_official(theirs.state_dict())
    assert ours.official["flavour"] == "hf_dinov3" and not ours.training
    assert ours.cfg.norm_eps == c.layer_norm_eps == theirs.norm.eps == 1e-5
    assert (ours.cfg.pos_embed, ours.cfg.rope_base, ours.pos_embed) == ("rope", c.rope_theta, None)
    assert (ours.embed_dim, len(ours.blocks), ours.cfg.num_heads, ours.num_registers, ours.cfg.ffn) == \
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_register_tokens, "swiglu" if c.use_gated_mlp else "mlp")
    assert ours.cfg.mask_k_bias == (not c.key_bias)
    if c.use_gated_mlp: assert ours.blocks[0].mlp.w3.in_features == c.intermediate_size
    k_bias = ours.blocks[1].attn.qkv.bias[c.hidden_size:2 * c.hidden_size]
    assert torch.equal(k_bias, theirs.model.layer[1].attention.k_proj.bias) if c.key_bias else not k_bias.any()
    their = lambda x: theirs(pixel_values=x).last_hidden_state
    for hw in V3_SIZES:
        assert ours_vs(ours, their, hw) < TOL, hw


def test_hf_dinov3_rope_differs_only_by_rounding():
    "HF multiplies by inverse periods where we divide by periods: the tables differ in the last bits, nothing else."
    theirs = _hf_v3()
    ours = load_official(theirs.state_dict())
    with torch.no_grad():
        for h, w in [(14, 14), (6, 4), (3, 7)]:
            cos_hf, sin_hf = theirs.rope_embeddings(torch.zeros(1, 3, 16 * h, 16 * w))
            sin, cos = ours.rope(h, w)
            assert sin.shape == sin_hf.shape == (h * w, 64)
            assert maxdiff(sin, sin_hf) < 1e-6 and maxdiff(cos, cos_hf) < 1e-6, (h, w)   # y/x order, normalisation agree
        x = torch.randn(2, 3, 96, 64)
        their = theirs(pixel_values=x).last_hidden_state
        assert maxdiff(as_tokens(ours.forward_features(x)), their) > 0           # not bit-identical with our tables ...
        ours.rope.forward = lambda H, W: theirs.rope_embeddings(torch.zeros(1, 3, 16 * H, 16 * W))[::-1]
        assert torch.equal(as_tokens(ours.forward_features(x)), their)          # ... and bit-identical with theirs


def test_hf_dinov3_saved_file_names(tmp_path):
    "save_pretrained writes layer.N.* (conversion_mapping.py adds `model.` when loading): both spellings load."
    theirs = _hf_v3(**HF_V3_CASES["gated"])
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    names = list(load_file(tmp_path / "model.safetensors"))
    assert any(k.startswith("layer.0.attention.q_proj") for k in names) and not any(k.startswith("model.") for k in names)
    assert any(k.startswith("model.layer.") for k in theirs.state_dict())
    ours = load_official(tmp_path)
    assert ours.official["flavour"] == "hf_dinov3" and ours.cfg.ffn == "swiglu"
    assert any("computed the RoPE periods" in n for n in ours.official["notes"])
    assert ours_vs(ours, lambda x: theirs(pixel_values=x).last_hidden_state, (96, 64)) < TOL


V3_HUB_MODELS = {
    "vits16": lambda: dinov3_vit("vits16", depth=3),
    "vits16plus_local_norm": lambda: dinov3_vit("vits16plus", depth=2, untie_local_cls_norm=True),
    "head_dim_24": lambda: dinov3_vit("vits16", embed_dim=96, num_heads=4, depth=2),   # heads only the periods can tell
}


@pytest.mark.parametrize("kind", list(V3_HUB_MODELS))
def test_dinov3_hub_round_trip(kind):
    src = randomize_(V3_HUB_MODELS[kind]())
    hub = _to_hub(src)
    assert "storage_tokens" in hub and "rope_embed.periods" in hub and "blocks.0.attn.qkv.bias_mask" in hub
    ours = load_official(hub)
    assert ours.official["flavour"] == "dinov3"
    assert ours.cfg == src.cfg                                           # every field, heads and SwiGLU ratio included
    assert torch.equal(ours.rope.periods, hub["rope_embed.periods"])     # the file's periods are kept
    assert not any(t.is_meta for t in ours.buffers())                    # the non-persistent key mask was made
    same_periods = torch.equal(hub["rope_embed.periods"], src.rope.periods)
    assert same_periods == (kind != "head_dim_24")                      # fp32 formula: 1 ulp off for a head dim of 24
    for hw in V3_SIZES:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            got = as_tokens(ours.forward_features(x))
            assert maxdiff(got, official_v3_forward(hub, x)) < TOL, hw
            d_src = maxdiff(got, as_tokens(src.forward_features(x)))
        assert d_src == 0.0 if same_periods else 0.0 < d_src < TOL


@pytest.mark.parametrize("case", ["mlp", "gated"])
def test_dinov3_hub_from_hf_weights(case):
    "The same weights in the hub's names (mapped by hand) and in Hugging Face's: both flavours give HF's features."
    theirs = _hf_v3(**HF_V3_CASES[case])
    hub = _hf_to_hub(theirs)
    ours = load_official(hub)
    assert ours.official["flavour"] == "dinov3" and ours.cfg == load_official(theirs.state_dict()).cfg
    for hw in V3_SIZES:
        assert ours_vs(ours, lambda x: theirs(pixel_values=x).last_hidden_state, hw) < TOL, hw
        assert ours_vs(ours, lambda x: official_v3_forward(hub, x), hw) < TOL, hw


def test_dinov3_training_checkpoint_keeps_the_teacher():
    src = randomize_(dinov3_vit("vits16", depth=2, embed_dim=64, num_heads=1))
    hub = _to_hub(src)
    ckpt = {"model": {f"teacher.backbone.{k}": v for k, v in hub.items()} | {f"student.backbone.{k}": v + 1 for k, v in hub.items()}
                     | {"teacher.dino_head.mlp.0.weight": torch.ones(3, 64)}, "iteration": 7}
    ours = load_official(ckpt)
    assert ours.official["flavour"] == "dinov3" and ours.cfg.num_heads == 1
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(as_tokens(ours.forward_features(x)), as_tokens(src.forward_features(x)))


def test_infer_vit7b_from_hub_shapes():
    with torch.device("meta"):
        big = dinov3_vit("vit7b16")
    hub = _to_hub(big)
    assert not any(k.endswith("bias_mask") for k in hub)                 # no qkv bias, so no mask
    cfg = infer_config(rename_dinov3(hub), **{**V3_DEFAULTS, **dinov3_hub_config(hub)})
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.swiglu_align, cfg.qkv_bias) == (4096, 40, 32, 3.0, 64, False)
    assert (cfg.untie_local_cls_norm, cfg.num_registers, cfg.norm_eps, cfg.pos_embed) == (True, 4, 1e-5, "rope")
    with torch.device("meta"):
        m = VisionTransformer(cfg)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in big.state_dict().items()}
    assert n_params(m) == 6_716_043_264


# ------------------------------------------------------------------------------------------------- DINOv3 errors
def _small_hub():
    return _to_hub(randomize_(dinov3_vit("vits16", depth=1, embed_dim=64, num_heads=1)))


def test_dinov3_periods_of_another_base():
    hub = _small_hub()
    other = {**hub, "rope_embed.periods": _official_periods(64, base=1000.0)}
    with pytest.raises(ValueError, match=r"dinov3 checkpoint: the RoPE periods .* do not match base 100 .* those of base 1000"):
        load_official(other)
    assert load_official(other, rope_base=1000.0).cfg.rope_base == 1000.0      # accepted when asked for
    minmax = {**hub, "rope_embed.periods": torch.linspace(0.5, 4.0, 16)}      # the min/max-period form
    with pytest.raises(ValueError, match="not base \\*\\* \\(4k / head_dim\\) for any base"):
        load_official(minmax)
    with pytest.raises(ValueError, match="a wrong num_heads"):                # 64 channels as 2 heads: 8 periods needed
        load_official(hub, num_heads=2)


def test_dinov3_bad_mask_and_unsupported_norm():
    hub = _small_hub()
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.bias_mask is not DINOv3's key-bias mask"):
        load_official({**hub, "blocks.0.attn.qkv.bias_mask": torch.ones(192)})
    with pytest.raises(ValueError, match="NaN"):
        load_official({**hub, "blocks.0.attn.qkv.bias_mask": torch.full((192,), float("nan"))})
    with pytest.raises(ValueError, match="cls_norm.*untie_cls_and_patch_norms"):
        load_official({**hub, "cls_norm.weight": torch.ones(64), "cls_norm.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"missing tensors: \['blocks.0.mlp.fc2.bias'\]"):
        load_official({k: v for k, v in hub.items() if k != "blocks.0.mlp.fc2.bias"})
    with pytest.raises(ValueError, match="cannot build blocks.0.mlp.w12.weight"):   # half a SwiGLU
        sw = _to_hub(dinov3_vit("vits16plus", depth=1, embed_dim=64, num_heads=1))
        load_official({k: v for k, v in sw.items() if k != "blocks.0.mlp.w2.weight"})


# ------------------------------------------------------------------------------------------------------- timm DINOv3
TIMM_V3_CASES = {   # timm name, create_model overrides (2 blocks for speed), our ffn
    "small": ("vit_small_patch16_dinov3", {}, "mlp"),
    "small_qkvb": ("vit_small_patch16_dinov3_qkvb", {}, "mlp"),
    "small_plus": ("vit_small_plus_patch16_dinov3", {}, "swiglu"),
    "small_plus_qkvb_192": ("vit_small_plus_patch16_dinov3_qkvb", dict(embed_dim=192, num_heads=3), "swiglu"),
    "small_plus_packed": ("vit_small_plus_patch16_dinov3", dict(swiglu_align_to=0), "swiglu"),   # GluMlp: fc1 = [W1; W2]
}


def _timm_v3(case):
    name, kw, _ = TIMM_V3_CASES[case]
    return randomize_(timm.create_model(name, pretrained=False, **{"depth": 2, **kw}))


@pytest.mark.parametrize("case", list(TIMM_V3_CASES))
def test_timm_dinov3_parity(case):
    theirs = _timm_v3(case)
    ours = load_official(theirs.state_dict())
    a = theirs.blocks[0].attn
    assert ours.official["flavour"] == "timm_dinov3" and not ours.training
    assert ours.cfg.norm_eps == theirs.norm.eps == theirs.blocks[0].norm1.eps == 1e-5
    assert (ours.embed_dim, len(ours.blocks), ours.cfg.num_heads, ours.num_registers, ours.cfg.ffn) == \
        (theirs.embed_dim, len(theirs.blocks), a.num_heads, theirs.num_prefix_tokens - 1, TIMM_V3_CASES[case][2])
    assert (ours.cfg.pos_embed, ours.pos_embed, ours.mask_token) == ("rope", None, None)
    assert torch.equal(ours.rope.periods, theirs.rope.periods)                 # timm's RoPE periods are the official formula
    assert ours.cfg.qkv_bias == ours.cfg.mask_k_bias == (a.q_bias is not None)
    if a.q_bias is not None:                                                   # [q_bias; 0 (their k_bias buffer); v_bias]
        assert torch.equal(ours.blocks[1].attn.qkv.bias, torch.cat([theirs.blocks[1].attn.q_bias, theirs.blocks[1].attn.k_bias,
                                                                    theirs.blocks[1].attn.v_bias]))
        assert not theirs.blocks[1].attn.k_bias.any()
    if ours.cfg.ffn == "swiglu":
        assert ours.blocks[0].mlp.w3.in_features == theirs.blocks[0].mlp.fc2.in_features
    for hw in V3_SIZES:                                                        # dynamic_img_size=True in timm's definitions
        assert ours_vs(ours, theirs.forward_features, hw) < TOL, hw


def test_timm_dinov3_rope_tables_equal_ours():
    "timm's RotaryEmbeddingDinoV3 (half-split layout, ij, separate, division by periods) gives our sin/cos tables exactly."
    theirs = _timm_v3("small")
    ours = load_official(theirs.state_dict())
    with torch.no_grad():
        for h, w in [(14, 14), (6, 4), (3, 7)]:
            sin_t, cos_t = theirs.rope.get_embed(shape=[h, w]).chunk(2, -1)
            sin, cos = ours.rope(h, w)
            assert sin.shape == sin_t.shape == (h * w, 64)
            assert torch.equal(sin, sin_t) and torch.equal(cos, cos_t), (h, w)


def test_timm_dinov3_stored_key_bias_is_loaded_unmasked():
    "A state dict that does store a k_bias (timm's is a non-persistent zero buffer) keeps it, with mask_k_bias off."
    theirs = _timm_v3("small_qkvb")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in theirs.blocks: b.attn.k_bias.copy_(0.5 * torch.randn(b.attn.k_bias.shape, generator=g))
    sd = theirs.state_dict() | {f"blocks.{i}.attn.k_bias": b.attn.k_bias for i, b in enumerate(theirs.blocks)}
    ours = load_official(sd)
    assert ours.cfg.qkv_bias and not ours.cfg.mask_k_bias
    assert torch.equal(ours.blocks[0].attn.qkv.bias[384:768], theirs.blocks[0].attn.k_bias)
    assert ours_vs(ours, theirs.forward_features, (96, 64)) < TOL
    masked = load_official(sd, mask_k_bias=True)                               # the test can fail: masking it is far off
    assert ours_vs(masked, theirs.forward_features, (96, 64)) > 1e-3


def test_timm_dinov3_wrong_heads_is_detected():
    theirs = _timm_v3("small_plus")
    assert ours_vs(load_official(theirs.state_dict(), num_heads=3), theirs.forward_features, (96, 64)) > 1e-3


def test_timm_dinov3_without_registers_needs_the_flavour_named():
    "Detection asks for reg_token (every DINOv3 has 4); a register-free Eva loads when the flavour is named."
    theirs = randomize_(timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=1, num_reg_tokens=0))
    with pytest.raises(ValueError, match="unrecognised state dict"):
        official_flavour(theirs.state_dict())
    ours = load_official(theirs.state_dict(), flavour="timm_dinov3")
    assert ours.num_registers == 0 and ours_vs(ours, theirs.forward_features, (96, 64)) < TOL


def test_timm_dinov3_7b_config_from_shapes():
    "vit_7b_patch16_dinov3 on the meta device: timm's mlp_ratio=2 aligned to 64 is our ratio 3 with swiglu64, 32 heads."
    sd = timm.create_model("vit_7b_patch16_dinov3", pretrained=False, device="meta").state_dict()
    assert official_flavour(sd) == "timm_dinov3"
    cfg = infer_config(rename_timm_dinov3(sd), **{**V3_DEFAULTS, **timm_dinov3_config(sd)},
                       drop_path_mode=FLAVOURS["timm_dinov3"].drop_path_mode)                     # as load_official does
    want = dinov3_vit_config("vit7b16", untie_local_cls_norm=False, mask_token=False, mask_k_bias=False)
    assert cfg == want, (cfg, want)


# ------------------------------------------------------------------ DINOv3 ConvNeXt through load_official (chapter 28)
# the random-weight transformers model and its torch.hub renaming are tests/test_convnext.py's
from test_convnext import hf_model as _hf_convnext, hf_to_hub as _hf_convnext_to_hub  # noqa: E402


@pytest.mark.parametrize("layout", ["hf", "hf_folder", "hub"])
def test_load_official_reads_dinov3_convnext(layout, tmp_path):
    """load_official dispatches ConvNeXt key names to chapter 28's loader: the pooled feature (HF pooler_output) and the
    last stage's map (HF last_hidden_state after its pooled token) equal the real transformers class within 1e-5."""
    from dino_from_scratch.convnext import ConvNeXt
    theirs = _hf_convnext()
    src = {"hf": theirs.state_dict(), "hub": _hf_convnext_to_hub(theirs.state_dict())}.get(layout)
    if layout == "hf_folder":
        theirs.save_pretrained(tmp_path); src = tmp_path
    ours = load_official(src)
    assert isinstance(ours, ConvNeXt) and not ours.training
    assert ours.official["flavour"] == ("dinov3_convnext" if layout == "hub" else "hf_dinov3_convnext")
    assert (ours.cfg.depths, ours.cfg.dims) == ((1, 2, 2, 1), (32, 48, 64, 96))
    assert official_flavour(src if layout != "hf_folder" else theirs.state_dict()) == ours.official["flavour"]
    for hw in [(64, 64), (96, 160), (160, 96)]:
        x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            f, t = ours.forward_features(x), theirs(pixel_values=x)
        assert f["patches"].shape == (2, hw[0] // 32 * hw[1] // 32, 96)
        assert maxdiff(f["cls"], t.pooler_output) < TOL, hw
        assert maxdiff(f["patches"], t.last_hidden_state[:, 1:]) < TOL, hw
        assert maxdiff(f["cls"], t.last_hidden_state[:, 0]) < TOL, hw


def test_load_official_convnext_missing_stage_and_bad_options():
    theirs = _hf_convnext()
    hub = _hf_convnext_to_hub(theirs.state_dict())
    cut = {k: v for k, v in hub.items() if not k.startswith(("stages.1.", "downsample_layers.1."))}
    with pytest.raises(ValueError) as e:
        load_official(cut)
    msg = str(e.value)
    assert "1 of 4 stages missing: stage 1 has no tensors downsample_layers.1.*" in msg
    assert "'downsample_layers.1.0.weight'" in msg and "'stages.1.0.dwconv.weight'" in msg
    hf_cut = {k: v for k, v in theirs.state_dict().items() if not k.startswith("model.stages.3.")}
    with pytest.raises(ValueError, match=r"hf_dinov3_convnext checkpoint: 1 of 4 stages missing: stage 3"):
        load_official(hf_cut)
    with pytest.raises(ValueError, match="num_heads=4 given for a convnext checkpoint .it has no attention heads"):
        load_official(hub, num_heads=4)
    with pytest.raises(KeyError, match="dinov3_convnext"):   # the known flavours name the ConvNeXt ones
        load_official(hub, flavour="convnext")
    assert isinstance(load_official(hub, flavour="dinov3_convnext"), torch.nn.Module)
