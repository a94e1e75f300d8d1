"""Export (chapter 29): ONNX with dynamic batch/height/width checked by onnxruntime at sizes other than the export size
(learned positions with the three resize rules, RoPE, registers, SwiGLU, any module with `forward_features`), the known
frozen-shape failure, timm / transformers folders loaded by the real classes (random weights, offline), the hub mixin
round trip and its model card, clear errors."""
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from dino_from_scratch.export import (DinoViT, OnnxBackbone, compare_onnx, cubic_weights, default_check_sizes, export_onnx,
                                      flat_metrics, save_hf, save_pretrained, save_run, save_timm, to_hf, to_timm,
                                      traceable_pos_embed, traceable_positions)
from dino_from_scratch.pretrained import as_tokens, load_official
from dino_from_scratch.vit import ViTConfig, VisionTransformer, resize_pos_embed
from dino_from_scratch.vit_v2 import dinov2_vit
from dino_from_scratch.vit_v3 import dinov3_vit

ort.set_default_logger_severity(4)        # the frozen-shape failures below are expected; keep the C++ log quiet
ONNX_TOL = 1e-4                           # onnxruntime vs PyTorch, float32 features after the final LayerNorm
PARITY_TOL = 1e-5                         # timm / transformers vs ours, as in test_pretrained.py
torch.set_num_threads(1)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    "Redraw every parameter at a scale where each part matters (LayerScale 1e-5 would hide the blocks)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "gamma" in n or ("norm" in n and n.endswith("weight")): p.copy_(1 + 0.2 * r)
            elif any(s in n for s in ("pos", "cls", "reg", "mask")): p.copy_(r)
            else: p.copy_(r / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1 * r)
    return model.eval()


def vit(**kw):
    return VisionTransformer(ViTConfig(**{**dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2), **kw}))


MODELS = {   # every kind of backbone this library builds: positions, registers, FFN, key bias
    "learned": lambda: vit(),
    "learned_registers_antialias": lambda: vit(num_registers=2, interpolate_antialias=True, layerscale=1e-5),
    "dinov1_offset": lambda: vit(interpolate_offset=0.1),
    "dinov2_swiglu_registers": lambda: dinov2_vit("vits14", depth=2, img_size=56, embed_dim=64, num_heads=2, ffn="swiglu", num_registers=4),
    "rope": lambda: dinov3_vit("vits16", depth=2, embed_dim=64, num_heads=2),
    "rope_swiglu_no_registers": lambda: dinov3_vit("vits16plus", depth=2, embed_dim=64, num_heads=2, num_registers=0, untie_local_cls_norm=True),
}


def export_size(m):
    return 4 * m.patch_size                # e.g. 64 x 64: the stored grid of the learned-position models


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


# ------------------------------------------------------------------------------------------------ resize as matrices
@pytest.mark.parametrize("offset,antialias", [(0.0, False), (0.0, True), (0.1, False)])
def test_traceable_pos_embed_equals_resize_pos_embed(offset, antialias):
    "Same numbers as chapter 1's resize (float32 rounding of both: each within 2e-5 of float64 on unit-scale values)."
    torch.manual_seed(0)
    for g in (4, 7, 16):
        pos = torch.randn(1, 1 + g * g, 8)
        for h, w in [(g, g), (g + 2, g), (3, 5), (2 * g + 1, g - 1), (1, 1), (g, 3 * g)]:
            ours, theirs = traceable_pos_embed(pos, h, w, offset, antialias), resize_pos_embed(pos, h, w, offset, antialias)
            assert ours.shape == theirs.shape == (1, 1 + h * w, 8)
            assert maxdiff(ours, theirs) < 5e-5, (g, h, w)
            if (h, w) == (g, g): assert torch.equal(ours, theirs)     # the stored size: the table, bit for bit


def test_cubic_weights_hand_values():
    "Keys' kernel at the half-way point (t = 0.5): (-a/8 ... ) weights; rows sum to 1; growing 2 -> 4 by hand."
    W = cubic_weights(4, 2, 0.5)                    # src = 0.5 * (i + 0.5) - 0.5 = -0.25, 0.25, 0.75, 1.25
    assert torch.allclose(W.sum(1), torch.ones(4))
    a = -0.75
    k = lambda t: ((a + 2) * abs(t) - (a + 3)) * t * t + 1 if abs(t) <= 1 else ((a * abs(t) - 5 * a) * abs(t) + 8 * a) * abs(t) - 4 * a
    # output pixel 1 sits at 0.25: taps at -1 (clamped to 0), 0, 1, 2 (clamped to 1)
    want = torch.tensor([k(1.25) + k(0.25), k(0.75) + k(1.75)])
    assert torch.allclose(W[1], want, atol=1e-7)
    assert torch.equal(cubic_weights(5, 5, 1.0), torch.eye(5)) and torch.equal(cubic_weights(5, 5, 1.0, True), torch.eye(5))


# ------------------------------------------------------------------------------------------------------------ ONNX
@pytest.mark.parametrize("kind", list(MODELS))
def test_onnx_parity_at_three_sizes(kind, tmp_path):
    m = randomize_(MODELS[kind]())
    m.train()                                       # export must use eval mode and give the mode back
    s, p = export_size(m), m.patch_size
    r = export_onnx(m, tmp_path / "m.onnx", size=s)
    assert m.training and all(b.training for b in m.blocks)
    R = m.num_registers
    assert r["outputs"] == ["cls", "patches"] + (["registers"] if R else [])
    sizes = [(s, s), (s + 2 * p, s), (s - p, s + 3 * p)]                     # export size, two non-square others
    assert list(r["check"]) == [f"{h}x{w}" for h, w in sizes]
    assert max(max(d.values()) for d in r["check"].values()) < ONNX_TOL
    ob = OnnxBackbone(tmp_path / "m.onnx", threads=1)
    m.eval()
    for hw in sizes + [(2 * p, 5 * p)]:
        x = torch.randn(3, 3, *hw)                   # batch 3: exported with batch 1
        with torch.no_grad(): ref = m.forward_features(x)
        got = ob.forward_features(x)
        for k in ("cls", "patches", "registers"):
            assert got[k].shape == ref[k].shape, (k, hw)
            assert maxdiff(got[k], ref[k]) < ONNX_TOL, (k, hw)


@pytest.mark.parametrize("kind", ["learned", "rope"])
def test_exported_at_64_is_right_at_96x64(kind, tmp_path):
    "The known failure of other exporters: a graph exported at 64x64 must be right at 96x64, not frozen."
    m = randomize_(MODELS[kind]())
    export_onnx(m, tmp_path / "m.onnx", size=64, check=False)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad(): ref = m.forward_features(x)
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})
    assert out[1].shape == (2, 24, 64)
    assert np.abs(out[0] - ref["cls"].numpy()).max() < ONNX_TOL and np.abs(out[1] - ref["patches"].numpy()).max() < ONNX_TOL


def test_plain_export_freezes_the_size(tmp_path):
    "The test above can fail: the same model through a plain torch.onnx.export is right at 64x64 and broken at 96x64."
    m = randomize_(vit())

    class Plain(nn.Module):
        def __init__(self): super().__init__(); self.m = m
        def forward(self, x): return self.m.forward_features(x)["patches"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Plain().eval(), (torch.randn(1, 3, 64, 64),), str(tmp_path / "plain.onnx"), dynamo=False,
                          input_names=["pixel_values"], output_names=["patches"],
                          dynamic_axes={"pixel_values": {0: "b", 2: "h", 3: "w"}, "patches": {0: "b", 1: "n"}})
    d = compare_onnx(m, tmp_path / "plain.onnx", default_check_sizes(64, 64, 16))
    assert d["64x64"]["patches"] < ONNX_TOL and d["96x64"]["patches"] == math.inf and d["48x112"]["patches"] == math.inf
    with traceable_positions(m):                     # the fix is what makes the difference
        assert "interpolate_pos_encoding" in vars(m)
    assert "interpolate_pos_encoding" not in vars(m)  # and it is undone


class TinyConv(nn.Module):
    "A non-ViT backbone with the contract (a ConvNeXt-like stride-8 stem): export_onnx takes any such module."
    patch_size = 8

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 32, 8, 8), nn.LayerNorm(32)

    def forward_features(self, x):
        y = self.norm(self.stem(x).flatten(2).transpose(1, 2))
        return {"cls": y.mean(1), "patches": y, "registers": y[:, :0]}


class FrozenConv(TinyConv):
    "The same, but reshaping with Python ints read from the input: a trace freezes them."
    def forward_features(self, x):
        y = self.stem(x)
        n = int(y.shape[2]) * int(y.shape[3])
        y = self.norm(y.reshape(y.shape[0], 32, n).transpose(1, 2))
        return {"cls": y.mean(1), "patches": y, "registers": y[:, :0]}


def test_any_backbone_and_frozen_shapes_are_caught(tmp_path):
    r = export_onnx(TinyConv(), tmp_path / "conv.onnx", size=32)
    assert r["outputs"] == ["cls", "patches"] and max(max(d.values()) for d in r["check"].values()) < ONNX_TOL
    got = OnnxBackbone(tmp_path / "conv.onnx").forward_features(torch.randn(1, 3, 40, 24))
    assert got["patches"].shape == (1, 15, 32) and got["registers"].shape == (1, 0, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="a size frozen into the graph"):
            export_onnx(FrozenConv(), tmp_path / "frozen.onnx", size=32)



def test_convnext_onnx_parity_at_three_sizes_and_its_bad_size(tmp_path):
    """Chapter 28's ConvNeXt (native grid: patch_size = its total stride 32), official block design, random weights at a
    scale where every part matters: onnxruntime = PyTorch within ONNX_TOL at the export size and two non-square ones,
    and at a size never checked at export; an export size that is not a multiple of the stride is refused."""
    from dino_from_scratch.convnext import ConvNeXt, ConvNeXtConfig
    m = randomize_(ConvNeXt(ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48))))
    assert m.patch_size == 32
    r = export_onnx(m, tmp_path / "cnx.onnx", size=128)
    assert list(r["check"]) == ["128x128", "192x128", "96x224"] and r["outputs"] == ["cls", "patches"]
    assert max(max(d.values()) for d in r["check"].values()) < ONNX_TOL
    ob = OnnxBackbone(tmp_path / "cnx.onnx", threads=1)
    x = torch.randn(2, 3, 64, 160)
    with torch.no_grad(): ref = m.forward_features(x)
    got = ob.forward_features(x)
    assert got["patches"].shape == (2, 2 * 5, 48) and got["registers"].shape == (2, 0, 48)
    assert maxdiff(got["cls"], ref["cls"]) < ONNX_TOL and maxdiff(got["patches"], ref["patches"]) < ONNX_TOL
    with pytest.raises(ValueError, match=r"export size 80x96 is not a multiple of the patch size 32: use e.g. 64x96 or 96x96"):
        export_onnx(m, tmp_path / "bad.onnx", size=(80, 96))
    with pytest.raises(ValueError, match=r"input size 64x100 is not a multiple of the patch size 32"):
        ob.forward_features(torch.randn(1, 3, 64, 100))


def test_onnx_bad_sizes_and_inputs(tmp_path):
    m = vit()
    with pytest.raises(ValueError, match=r"export size 72x64 is not a multiple of the patch size 16: use e.g. 64x64 or 80x64"):
        export_onnx(m, tmp_path / "x.onnx", size=(72, 64))
    with pytest.raises(ValueError, match=r"export size 8x8 is not a multiple of the patch size 16"):
        export_onnx(m, tmp_path / "x.onnx", size=8)
    with pytest.raises(TypeError, match="no integer `patch_size`"):
        export_onnx(nn.Linear(3, 3), tmp_path / "x.onnx")
    export_onnx(m, tmp_path / "m.onnx", size=64, check=False)
    ob = OnnxBackbone(tmp_path / "m.onnx")
    assert ob.meta["export_size"] == "64x64" and json.loads(ob.meta["config"])["embed_dim"] == 64
    with pytest.raises(ValueError, match=r"input size 100x64 is not a multiple of the patch size 16"):
        ob.forward_features(torch.randn(1, 3, 100, 64))
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        ob.forward_features(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected images \[B, C, H, W\]"):
        ob.forward_features(torch.randn(3, 64, 64))
    other = tmp_path / "other.onnx"                   # an ONNX file from elsewhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Linear(3, 3), (torch.randn(1, 3),), str(other), dynamo=False)
    with pytest.raises(ValueError, match="not written by export_onnx"):
        OnnxBackbone(other)


# ------------------------------------------------------------------------------------------------- transformers
def _load_hf(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModel.from_pretrained(folder).eval()


HF_CASES = {   # ours -> the transformers class that must load it
    "learned": (lambda: vit(), "Dinov2Model"),
    "learned_swiglu": (lambda: dinov2_vit("vits14", depth=2, img_size=56, embed_dim=64, num_heads=2, ffn="swiglu", interpolate_offset=0.0), "Dinov2Model"),
    "registers_antialias": (lambda: vit(num_registers=2, interpolate_antialias=True, layerscale=1e-5, qkv_bias=False), "Dinov2WithRegistersModel"),
    "rope": (lambda: dinov3_vit("vits16", depth=2, embed_dim=64, num_heads=2), "DINOv3ViTModel"),
    "rope_gated_no_registers": (lambda: dinov3_vit("vits16plus", depth=2, embed_dim=64, num_heads=2, num_registers=0), "DINOv3ViTModel"),
    "rope_learned_key_bias": (lambda: dinov3_vit("vits16", depth=2, embed_dim=64, num_heads=2, mask_k_bias=False), "DINOv3ViTModel"),
    "rope_no_qkv_bias": (lambda: dinov3_vit("vits16", depth=2, embed_dim=64, num_heads=2, qkv_bias=False, mask_k_bias=False), "DINOv3ViTModel"),
}


def _sizes(m):
    s, p = m.cfg.img_size if m.cfg.pos_embed == "learned" else 64, m.patch_size
    return [(s, s), (s + 2 * p, s), (s - p, s + 3 * p)]


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_folder_loads_in_transformers(case, tmp_path):
    make, cls = HF_CASES[case]
    m = randomize_(make())
    c = save_hf(m, tmp_path)
    hf = _load_hf(tmp_path)
    assert type(hf).__name__ == c.target == cls
    assert not any("position table" in n for n in c.notes)      # these resize like their class: equal everywhere
    for hw in _sizes(m):
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            assert maxdiff(as_tokens(m.forward_features(x)), hf(pixel_values=x).last_hidden_state) < PARITY_TOL, hw
    back = load_official(tmp_path, num_heads=m.cfg.num_heads)   # and chapter 14 reads it back
    x = torch.randn(1, 3, *_sizes(m)[1])
    with torch.no_grad(): assert maxdiff(as_tokens(back.forward_features(x)), as_tokens(m.forward_features(x))) < PARITY_TOL


def test_hf_other_resize_is_stated_and_real(tmp_path):
    "Registers without antialias: Dinov2WithRegistersModel resizes with antialias: equal at the stored size only, as the note says."
    m = randomize_(vit(num_registers=2))
    c = save_hf(m, tmp_path)
    assert any("equal at 64x64 (no resize), not at other sizes" in n for n in c.notes)
    hf = _load_hf(tmp_path)
    d = {}
    for hw in [(64, 64), (96, 64)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad(): d[hw] = maxdiff(as_tokens(m.forward_features(x)), hf(pixel_values=x).last_hidden_state)
    assert d[(64, 64)] < PARITY_TOL and d[(96, 64)] > 1e-3


def test_hf_config_and_names(tmp_path):
    c = to_hf(vit(layerscale=None))
    assert c.config["mlp_ratio"] == 4 and isinstance(c.config["mlp_ratio"], int)       # Dinov2Config types it as int
    assert torch.equal(c.state_dict["encoder.layer.0.layer_scale1.lambda1"], torch.ones(64))
    assert "embeddings.mask_token" in c.state_dict and not c.state_dict["embeddings.mask_token"].any()
    c3 = to_hf(dinov3_vit("vits16", depth=1, embed_dim=64, num_heads=2))
    assert c3.config["key_bias"] is False and "layer.0.attention.k_proj.bias" not in c3.state_dict   # DINOv3's masked key bias
    assert c3.state_dict["embeddings.mask_token"].shape == (1, 1, 64) and "rope.periods" not in c3.state_dict


# ------------------------------------------------------------------------------------------------------------ timm
TIMM_CASES = {
    "learned_antialias": lambda: vit(interpolate_antialias=True),
    "registers_antialias": lambda: vit(num_registers=2, interpolate_antialias=True, layerscale=1e-5),
    "swiglu_antialias": lambda: dinov2_vit("vits14", depth=2, img_size=56, embed_dim=64, num_heads=2, ffn="swiglu", interpolate_antialias=True, interpolate_offset=0.0),
    "rope": lambda: dinov3_vit("vits16", depth=2, embed_dim=64, num_heads=2),
    "rope_swiglu_no_qkv_bias": lambda: dinov3_vit("vits16plus", depth=2, embed_dim=64, num_heads=2, qkv_bias=False, mask_k_bias=False),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_folder_loads_in_timm(case, tmp_path):
    timm = pytest.importorskip("timm")
    m = randomize_(TIMM_CASES[case]())
    c = save_timm(m, tmp_path)
    t = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()       # timm's own loader, strict
    assert type(t).__name__ == ("Eva" if m.cfg.pos_embed == "rope" else "VisionTransformer")
    t2 = timm.create_model(c.target, pretrained=False, **c.config).eval()       # and from the name + kwargs
    t2.load_state_dict(c.state_dict, strict=True)
    assert not any("position table" in n for n in c.notes)
    for hw in _sizes(m):
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            ours = as_tokens(m.forward_features(x))
            assert maxdiff(ours, t.forward_features(x)) < PARITY_TOL, hw
            assert maxdiff(ours, t2.forward_features(x)) < PARITY_TOL, hw


def test_timm_default_resize_differs_and_says_so(tmp_path):
    timm = pytest.importorskip("timm")
    m = randomize_(vit())                            # our default resize: no antialias; timm's: antialias
    c = save_timm(m, tmp_path)
    assert any("position table: timm" in n for n in c.notes)
    t = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        x64, x96 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 96, 64)
        assert maxdiff(as_tokens(m.forward_features(x64)), t.forward_features(x64)) < PARITY_TOL
        assert maxdiff(as_tokens(m.forward_features(x96)), t.forward_features(x96)) > 1e-3


def test_conversions_refuse_what_the_target_cannot_hold():
    with pytest.raises(ValueError, match="cannot mask the key bias"):
        to_timm(vit(mask_k_bias=True))
    with pytest.raises(ValueError, match="cannot mask the key bias"):
        to_hf(vit(mask_k_bias=True))
    with pytest.raises(ValueError, match="learned key bias"):
        to_timm(dinov3_vit("vits16", depth=1, embed_dim=64, num_heads=2, mask_k_bias=False))
    with pytest.raises(ValueError, match="whole-number mlp_ratio; MLP width 160 on D=64 is 2.5"):
        to_hf(vit(mlp_ratio=2.5))
    with pytest.raises(ValueError, match="LayerNorm eps 1e-6; this model uses 1e-05"):
        to_timm(vit(norm_eps=1e-5))
    with pytest.raises(ValueError, match="'separate'"):
        to_hf(dinov3_vit("vits16", depth=1, embed_dim=64, num_heads=2, rope_normalize="min"))
    with pytest.raises(TypeError, match="expected our VisionTransformer"):
        to_hf(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------------- hub mixin
EVAL = {"knn": {"top1": 38.350000977516174, "top5": 80.3, "k": 20}, "knn_random_init": {"top1": 25.9}, "figure": "x.png"}


@pytest.mark.parametrize("make", [lambda: dinov3_vit("vits16", depth=2, embed_dim=64, num_heads=2, untie_local_cls_norm=True),
                                  lambda: vit(num_registers=1, mask_token=True)], ids=["rope", "learned"])
def test_hub_round_trip_is_exact(make, tmp_path):
    m = randomize_(make())
    recipe = {"name": "tiny_test", "data": {"path": "/data/imagenette2-128"}, "optim": {"lr": 5e-4}}
    save_pretrained(m, tmp_path, recipe=recipe, metrics=EVAL, source="run/eval.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["embed_dim"] == 64
    back = DinoViT.from_pretrained(tmp_path)
    assert isinstance(back, VisionTransformer) and not back.training and back.cfg == m.cfg
    assert back.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        f, g = back.forward_features(x), m.forward_features(x)
        assert all(torch.equal(f[k], g[k]) for k in ("cls", "registers", "patches"))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "dino_from_scratch" and card.data.model_name == "tiny_test"
    res = card.data.eval_results
    assert [(r.metric_name, r.metric_value, r.dataset_name) for r in res] == [("knn.top1", 38.35, "imagenette2-128")]
    assert "| knn_random_init.top1 | 25.9 |" in card.text and "lr: 0.0005" in card.text and "run/eval.json" in card.text


def test_hub_without_metrics_and_strict_loading(tmp_path):
    m = randomize_(vit())
    save_pretrained(m, tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "No evaluation numbers were given" in card.text and not card.data.eval_results
    sd = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in sd.items() if k != "norm.bias"}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['norm.bias'\]"):
        DinoViT.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"depth_typo": 3}))
    with pytest.raises(ValueError, match=r"fields ViTConfig does not know: \['depth_typo'\]"):
        DinoViT.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="recipe must be"):
        save_pretrained(m, tmp_path / "other", recipe=3)


def test_flat_metrics():
    assert flat_metrics(EVAL) == {"knn.top1": 38.350000977516174, "knn.top5": 80.3, "knn.k": 20, "knn_random_init.top1": 25.9}
    assert flat_metrics({"a": float("nan"), "b": True, "c": [1]}) == {} and flat_metrics(None) == {}


def test_save_run_from_a_run_directory(tmp_path, repo_root):
    "A real run directory (the shared tiny_v2 run) as a hub folder; skipped where there is none."
    run = Path(os.environ.get("DINO_RUN") or repo_root.parent / "shared_runs" / "tiny_v2")
    if not (run / "checkpoints").is_dir():
        pytest.skip(f"no training run at {run}")
    folder = save_run(run, tmp_path)
    card = ModelCard.load(folder / "README.md")
    assert "recipe `tiny_v2`" in card.text
    if (run / "eval.json").is_file():
        top1 = json.loads((run / "eval.json").read_text())["knn"]["top1"]
        assert card.data.eval_results[0].metric_value == round(top1, 2)
    from dino_from_scratch.eval import load_backbone
    ref, _ = load_backbone(run)
    back = DinoViT.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))
