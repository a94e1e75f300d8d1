"""ConvNeXt backbone (chapter 28): official shapes and parameter counts, the backbone contract, masking, the teacher grid,
and official weights in the torch.hub and Hugging Face layouts, parity-tested against the real `transformers` class."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dino_from_scratch.convnext import (CONVNEXT_PARAMS, CONVNEXT_README_M, CONVNEXT_SIZES, ConvNeXt, ConvNeXtConfig,
                                        build_backbone, build_v2_models_any, convnext_config, convnext_flavour,
                                        load_official_convnext, resize_for_teacher)
from dino_from_scratch.pretrained import as_tokens, load_official
from dino_from_scratch.vit import VisionTransformer, ViTConfig

transformers = pytest.importorskip("transformers")
from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel  # noqa: E402

TOL = 1e-5  # float32, features after the final LayerNorm (unit scale)
SIZES = [(64, 64), (96, 160), (160, 96)]  # square and non-square (multiples of the stride 32)
torch.set_num_threads(1)


def randomize_(model, seed=0):
    "Redraw every parameter at a scale where each part matters (LayerScale's 1e-6 init would hide the blocks)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "gamma" in n or ("norm" in n and n.endswith("weight")): p.copy_(1 + 0.2 * r)
            else: p.copy_(r / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1 * r)
    return model.eval()


def hf_model(depths=(1, 2, 2, 1), dims=(32, 48, 64, 96), seed=0):
    return randomize_(DINOv3ConvNextModel(DINOv3ConvNextConfig(depths=list(depths), hidden_sizes=list(dims))), seed)


def hf_to_hub(hf_sd: dict) -> dict:
    "The same tensors under the official module's names (written by hand from dinov3/models/convnext.py), with norms.3 = norm."
    out, names = {}, {"depthwise_conv": "dwconv", "layer_norm": "norm", "pointwise_conv1": "pwconv1", "pointwise_conv2": "pwconv2"}
    for k, v in hf_sd.items():
        k = k[len("model."):] if k.startswith("model.") else k
        if k.startswith("layer_norm."): out["norm." + k.split(".")[-1]] = v; continue
        if (m := re.fullmatch(r"stages\.(\d+)\.downsample_layers\.(\d+)\.(weight|bias)", k)):
            out[f"downsample_layers.{m[1]}.{m[2]}.{m[3]}"] = v; continue
        m = re.fullmatch(r"stages\.(\d+)\.layers\.(\d+)\.(\w+?)(?:\.(weight|bias))?", k)
        assert m, k
        out[f"stages.{m[1]}.{m[2]}.{names.get(m[3], m[3])}" + (f".{m[4]}" if m[4] else "")] = v
    out["norms.3.weight"], out["norms.3.bias"] = out["norm.weight"].clone(), out["norm.bias"].clone()
    return out


def official_forward(sd: dict, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Transcription of the official `ConvNeXt.forward_features` (dinov3/models/convnext.py) on hub names: [pool; map] after
    the final norm. Its channels-first LayerNorm is written out with mean / pow / sqrt, as there."""
    def ln_cf(t, p):
        u = t.mean(1, keepdim=True)
        s = (t - u).pow(2).mean(1, keepdim=True)
        return sd[p + ".weight"][:, None, None] * ((t - u) / torch.sqrt(s + eps)) + sd[p + ".bias"][:, None, None]
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("downsample_layers."))
    for i in range(n):
        if i == 0:
            w = sd["downsample_layers.0.0.weight"]
            x = ln_cf(F.conv2d(x, w, sd["downsample_layers.0.0.bias"], stride=w.shape[-1]), "downsample_layers.0.1")
        else:
            x = F.conv2d(ln_cf(x, f"downsample_layers.{i}.0"), sd[f"downsample_layers.{i}.1.weight"],
                         sd[f"downsample_layers.{i}.1.bias"], stride=2)
        j = 0
        while f"stages.{i}.{j}.dwconv.weight" in sd:
            b = f"stages.{i}.{j}."
            y = F.conv2d(x, sd[b + "dwconv.weight"], sd[b + "dwconv.bias"], padding=3, groups=x.shape[1]).permute(0, 2, 3, 1)
            y = F.layer_norm(y, y.shape[-1:], sd[b + "norm.weight"], sd[b + "norm.bias"], eps)
            y = F.linear(F.gelu(F.linear(y, sd[b + "pwconv1.weight"], sd[b + "pwconv1.bias"])), sd[b + "pwconv2.weight"], sd[b + "pwconv2.bias"])
            x = x + (sd[b + "gamma"] * y).permute(0, 3, 1, 2)
            j += 1
    t = torch.cat([x.mean([-2, -1])[:, None], x.flatten(2).transpose(1, 2)], dim=1)
    return F.layer_norm(t, t.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps)


def ours_vs(ours, theirs_fn, hw, seed=1):
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (as_tokens(ours.forward_features(x)) - theirs_fn(x)).abs().max().item()


# ------------------------------------------------------------------------------------------------ shapes and counts
@pytest.mark.parametrize("name", list(CONVNEXT_SIZES))
def test_parameter_counts_equal_the_official_ones(name):
    "Ours = the official module's count (27.82M ...) = Hugging Face's; + an IN-1k head rounds to the DINOv3 README's 29/50/89/198M."
    depths, dims = CONVNEXT_SIZES[name]
    with torch.device("meta"):
        ours = ConvNeXt(convnext_config(name))
        theirs = DINOv3ConvNextModel(DINOv3ConvNextConfig(depths=list(depths), hidden_sizes=list(dims)))
    n = sum(p.numel() for p in ours.parameters())
    assert n == CONVNEXT_PARAMS[name] == sum(p.numel() for p in theirs.parameters())
    assert round((n + dims[-1] * 1000 + 1000) / 1e6) == CONVNEXT_README_M[name]
    assert (ours.embed_dim, ours.patch_size, ours.num_registers, ours.cfg.stride) == (dims[-1], 32, 0, 32)
    assert ours.cfg.layer_scale == 1e-6 and ours.cfg.norm_eps == 1e-6 and ours.cfg.drop_path_rate == 0.0


def test_names_are_the_official_hub_names():
    theirs = hf_model()
    ours = ConvNeXt(ConvNeXtConfig(depths=(1, 2, 2, 1), dims=(32, 48, 64, 96)))
    hub = hf_to_hub(theirs.state_dict())
    assert set(ours.state_dict()) == set(hub) - {"norms.3.weight", "norms.3.bias"}
    assert {"downsample_layers.0.0.weight", "downsample_layers.3.1.weight", "stages.1.1.gamma", "stages.3.0.pwconv2.bias"} <= set(ours.state_dict())


def test_drop_path_rates_grow_linearly_over_all_blocks():
    m = ConvNeXt(ConvNeXtConfig(depths=(1, 2, 2), dims=(8, 8, 8), drop_path_rate=0.4))
    rates = [b.drop_path.p for s in m.stages for b in s]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


# ------------------------------------------------------------------------------------------------ the contract
def test_contract_is_pooled_cls_and_flattened_last_map():
    m = randomize_(ConvNeXt(ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(16, 24, 32, 40))))
    x = torch.randn(3, 3, 96, 64)
    with torch.no_grad():
        f = m.forward_features(x)
        h = m.embed(x)
        for i, s in enumerate(m.stages): h = s(h if i == 0 else m.downsample_layers[i](h))
    assert f["cls"].shape == (3, 40) and f["registers"].shape == (3, 0, 40) and f["patches"].shape == (3, 3 * 2, 40)
    assert torch.allclose(f["cls"], m.norm(h.mean((-2, -1))), atol=1e-6)
    assert torch.allclose(f["patches"][:, 1], m.norm(h[:, :, 0, 1]), atol=1e-6)        # row-major: token 1 = (row 0, col 1)
    assert torch.equal(m(x), f["cls"])
    out = m.get_intermediate_layers(x, 2)
    assert [o["patches"].shape[-1] for o in out] == [32, 40] and torch.allclose(out[-1]["cls"], f["cls"])


def test_pseudo_patch_size_resamples_the_map_like_the_official_intermediate_layers():
    m = randomize_(ConvNeXt(ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(16, 24, 32, 40), patch_size=16)))
    native = ConvNeXt(m.cfg, patch_size=None); native.load_state_dict(m.state_dict()); native.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        f, h = m.forward_features(x), native.forward_features(x)
        last = native.get_intermediate_layers(x, 1, norm=False)[0]["patches"].transpose(1, 2).reshape(2, 40, 2, 3)
    assert m.patch_size == 16 and f["patches"].shape == (2, 4 * 6, 40) and h["patches"].shape == (2, 2 * 3, 40)
    want = m.norm(F.interpolate(last, size=(4, 6), mode="bilinear", antialias=True).flatten(2).transpose(1, 2))
    assert torch.allclose(f["patches"], want, atol=1e-5) and torch.allclose(f["cls"], h["cls"])


def test_masked_pixels_cannot_reach_the_output():
    m = randomize_(ConvNeXt(ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(16, 24, 32, 40), mask_token=True, patch_size=16)))
    x = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 16, dtype=torch.bool); masks[0, [0, 5, 15]] = True
    y = x.clone()
    for t in (0, 5, 15):
        r, c = divmod(t, 4); y[0, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] = torch.randn(3, 16, 16)
    with torch.no_grad():
        a, b, c = m.forward_features(x, masks), m.forward_features(y, masks), m.forward_features(y)
    assert torch.equal(a["patches"], b["patches"]) and torch.equal(a["cls"], b["cls"]) and torch.equal(a["masks"], masks)
    assert (a["patches"][0] - c["patches"][0]).abs().max() > 1e-3          # without the mask the change is seen
    assert torch.equal(a["patches"][1], c["patches"][1])                      # the unmasked image is untouched


def test_bad_inputs_name_the_problem():
    m = ConvNeXt(ConvNeXtConfig(depths=(1, 1), dims=(8, 16)))      # stride 8
    with pytest.raises(ValueError, match=r"input size 20x16 is not a multiple of the ConvNeXt stride 8 .* e.g. 16x16"):
        m(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        m(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="mask_token=True"):
        m.forward_features(torch.randn(1, 3, 16, 16), torch.zeros(1, 4, dtype=torch.bool))
    mm = ConvNeXt(ConvNeXtConfig(depths=(1, 1), dims=(8, 16), mask_token=True))
    with pytest.raises(ValueError, match=r"masks must be \[B, N\] = \[1, 4\]"):
        mm.forward_features(torch.randn(1, 3, 16, 16), torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="equal length"):
        ConvNeXtConfig(depths=(1, 1, 1), dims=(8, 16))
    with pytest.raises(ValueError, match="divide the total stride 32"):
        ConvNeXtConfig(patch_size=64)


# ------------------------------------------------------------------------------------------------ trainers and teachers
def test_build_backbone_dispatch():
    assert isinstance(build_backbone(ViTConfig(depth=1)), VisionTransformer)
    assert isinstance(build_backbone({"depth": 1, "embed_dim": 64, "num_heads": 1}), VisionTransformer)
    assert build_backbone("convnext_base").embed_dim == 1024
    assert build_backbone({"arch": "convnext", "dims": [8, 16], "depths": [1, 1]}).cfg.stride == 8
    t = build_backbone({"arch": "convnext_tiny", "drop_path_rate": 0.2}, drop_path_rate=0.0)
    assert all(b.drop_path.p == 0.0 for s in t.stages for b in s)
    with pytest.raises(KeyError, match="unknown model.arch 'resnet50'"):
        build_backbone({"arch": "resnet50"})


def test_dinov2_models_with_a_convnext_and_masks():
    from dino_from_scratch.config import get_recipe
    recipe = get_recipe("tiny_v2")
    cfg = ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48), patch_size=16, mask_token=True)
    student, teacher = build_v2_models_any(recipe, cfg)
    assert student.head.mlp[0].in_features == 48 and torch.equal(student.backbone.norm.weight, teacher.backbone.norm.weight)
    assert not any(p.requires_grad for p in teacher.parameters())
    g = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    masks = torch.zeros(8, 16, dtype=torch.bool); masks[:3, :5] = True
    idx = masks.flatten().nonzero().flatten()
    out = student(g, [torch.randn(4, 3, 32, 32)], masks=masks, mask_indices=idx)
    assert out["cls_logits"].shape == (3, 4, recipe.head.out_dim) and out["patch_logits"].shape == (15, recipe.ibot.out_dim)
    assert out["patches"].shape == (8, 16, 48)


def test_resize_for_teacher_puts_the_vit_on_the_convnext_grid():
    student = ConvNeXt(ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8)))        # stride 32
    teacher = VisionTransformer(ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=1))
    crops = torch.randn(2, 3, 128, 192)
    with torch.no_grad():
        n_s = student.forward_features(crops)["patches"].shape[1]
        n_t = teacher.forward_features(resize_for_teacher(crops, teacher.patch_size, student.patch_size))["patches"].shape[1]
    assert n_s == n_t == 4 * 6
    assert resize_for_teacher(crops, 16, 16) is crops
    with pytest.raises(ValueError, match="100x192"):
        resize_for_teacher(torch.randn(1, 3, 100, 192), 16, 32)


# ------------------------------------------------------------------------------------------------ official weights
@pytest.mark.parametrize("depths,dims", [((1, 2, 2, 1), (32, 48, 64, 96)), ((2, 1, 3, 1), (24, 40, 56, 72))])
def test_hf_parity(depths, dims):
    theirs = hf_model(depths, dims)
    ours = load_official_convnext(theirs.state_dict())
    assert ours.official["flavour"] == "hf_dinov3_convnext" and not ours.training
    assert (ours.cfg.depths, ours.cfg.dims, ours.cfg.stem_stride) == (depths, dims, 4)
    for hw in SIZES:
        assert ours_vs(ours, lambda x: theirs(pixel_values=x).last_hidden_state, hw) < TOL, hw
        x = torch.randn(1, 3, *hw)
        with torch.no_grad(): assert (ours(x) - theirs(pixel_values=x).pooler_output).abs().max() < TOL


def test_hf_saved_folder_loads(tmp_path):
    "save_pretrained writes stages.N.* (conversion_mapping adds `model.` on load): the folder loads, offline."
    theirs = hf_model()
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    names = list(load_file(tmp_path / "model.safetensors"))
    assert any(k.startswith("stages.0.") for k in names) and not any(k.startswith("model.") for k in names)
    assert any(k.startswith("model.stages.") for k in theirs.state_dict())
    ours = load_official_convnext(tmp_path)
    assert ours.official["flavour"] == "hf_dinov3_convnext" and ours.official["source"] == str(tmp_path)
    assert ours_vs(ours, lambda x: theirs(pixel_values=x).last_hidden_state, (96, 64)) < TOL


def test_hub_layout_parity_with_hf_and_the_official_forward():
    theirs = hf_model()
    hub = hf_to_hub(theirs.state_dict())
    assert convnext_flavour(hub) == "dinov3_convnext"
    ours = load_official_convnext(hub)
    assert ours.official["flavour"] == "dinov3_convnext"
    for hw in SIZES:
        assert ours_vs(ours, lambda x: theirs(pixel_values=x).last_hidden_state, hw) < TOL, hw
        assert ours_vs(ours, lambda x: official_forward(hub, x), hw) < TOL, hw
    # a training checkpoint: the teacher's backbone is taken, heads dropped
    ckpt = {"model": {f"teacher.backbone.{k}": v for k, v in hub.items()} | {"teacher.dino_head.mlp.0.weight": torch.ones(2, 96)}}
    assert ours_vs(load_official_convnext(ckpt), lambda x: official_forward(hub, x), (64, 64)) < TOL


def test_load_official_dispatches_convnext_and_vit(tmp_path):
    "Chapter 14's `load_official` reads the ConvNeXt layouts chapter 28 registered with it, from memory and from a file."
    theirs = hf_model()
    hub = hf_to_hub(theirs.state_dict())
    got = load_official(hub)
    assert isinstance(got, ConvNeXt) and got.official["flavour"] == "dinov3_convnext"
    assert ours_vs(got, lambda x: theirs(pixel_values=x).last_hidden_state, (64, 96)) < TOL
    torch.save(theirs.state_dict(), tmp_path / "hf.pth")
    got = load_official(tmp_path / "hf.pth", flavour="hf_dinov3_convnext")
    assert got.official["flavour"] == "hf_dinov3_convnext" and got.official["source"] == str(tmp_path / "hf.pth")
    with pytest.raises(ValueError, match="num_heads=4 given for a convnext checkpoint"):
        load_official(hub, num_heads=4)
    vit = VisionTransformer(ViTConfig(img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=1, layerscale=1e-5, mask_token=True))
    got = load_official(vit.state_dict())
    assert isinstance(got, VisionTransformer) and got.official["flavour"] == "dinov2"


# ------------------------------------------------------------------------------------------------ the registries, from outside
REPO = Path(__file__).resolve().parent.parent

def _run(code: str, *args) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def test_top_level_load_official_reads_a_convnext_in_a_fresh_process(tmp_path):
    """`from dino_from_scratch import load_official` alone (chapter 28 never imported by the caller) reads a ConvNeXt
    file: the top level imports the modules that fill chapter 14's and chapter 25's registries. Same features as here."""
    hub = hf_to_hub(hf_model().state_dict())
    torch.save(hub, tmp_path / "cnx.pth")
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; assert 'dino_from_scratch.convnext' not in sys.modules\n"
            "from dino_from_scratch import load_official, build_backbone\n"
            "m = load_official(sys.argv[1])\n"
            "with torch.no_grad(): f = m.forward_features(torch.load(sys.argv[2]))['patches']\n"
            "torch.save(f, sys.argv[3])\n"
            "b = build_backbone({'arch': 'convnext', 'dims': [8, 16], 'depths': [1, 1]})\n"
            "print(type(m).__module__, m.official['flavour'], type(b).__name__)")
    assert _run(code, tmp_path / "cnx.pth", tmp_path / "x.pt", tmp_path / "f.pt") == "dino_from_scratch.convnext dinov3_convnext ConvNeXt"
    with torch.no_grad(): want = load_official_convnext(hub).forward_features(x)["patches"]
    assert (torch.load(tmp_path / "f.pt") - want).abs().max() < TOL


def test_modules_imported_alone_say_what_to_import(tmp_path):
    "Chapters 14 and 25 imported directly, without chapter 28: a ConvNeXt file or name is refused with the module to import."
    torch.save(hf_to_hub(hf_model().state_dict()), tmp_path / "cnx.pth")
    code = ("import sys\n"
            "import dino_from_scratch.pretrained as p, dino_from_scratch.distill as d\n"
            "assert 'dino_from_scratch.convnext' not in sys.modules\n"
            "msgs = []\n"
            "for f in (lambda: p.load_official(sys.argv[1]), lambda: d.build_backbone('convnext_tiny')):\n"
            "    try: f(); msgs.append('loaded')\n"
            "    except (ValueError, KeyError) as e: msgs.append(str(e))\n"
            "print(all('import dino_from_scratch.convnext' in m for m in msgs), sorted(p.OFFICIAL_LOADERS), sorted(d.BACKBONES))")
    assert _run(code, tmp_path / "cnx.pth") == "True [] ['vit']"


# ------------------------------------------------------------------------------------------------ bad checkpoints
def test_missing_stage_names_the_missing_keys():
    with torch.device("meta"): sd = ConvNeXt(convnext_config("convnext_tiny")).state_dict()
    cut = {k: v for k, v in sd.items() if not k.startswith(("stages.2.", "downsample_layers.2."))}
    with pytest.raises(ValueError) as e:
        load_official_convnext(cut)
    msg = str(e.value)
    assert msg.startswith("dinov3_convnext checkpoint: 1 of 4 stages missing: stage 2 has no tensors downsample_layers.2.*")
    assert "'downsample_layers.2.0.weight'" in msg and "'stages.2.0.dwconv.weight'" in msg and "9 or 27 blocks" in msg


def test_missing_last_stage_in_hf_names_is_not_a_three_stage_model():
    theirs = hf_model()
    cut = {k: v for k, v in theirs.state_dict().items() if not k.startswith("model.stages.3.")}
    with pytest.raises(ValueError, match=r"hf_dinov3_convnext checkpoint: 1 of 4 stages missing: stage 3 .*downsample_layers\.3\.1\.weight"):
        load_official_convnext(cut)
    with pytest.raises(ValueError, match=r"wrong shape .*norm.weight: \(96,\) vs \(64,\)"):   # 3 stages asked for: the final norm tells
        load_official_convnext(cut, n_stages=3)


def test_missing_block_tensor_and_norm_copy_errors():
    hub = hf_to_hub(hf_model().state_dict())
    with pytest.raises(ValueError, match=r"stage 1: blocks \[0\] are missing"):
        load_official_convnext({k: v for k, v in hub.items() if not k.startswith("stages.1.0.")})
    with pytest.raises(ValueError, match=r"missing tensors: \['stages.0.0.gamma'\]"):
        load_official_convnext({k: v for k, v in hub.items() if k != "stages.0.0.gamma"})
    with pytest.raises(ValueError, match="norms.3.weight is not a copy of norm.weight"):
        load_official_convnext({**hub, "norms.3.weight": hub["norm.weight"] + 1})
    with pytest.raises(ValueError, match="not a DINOv3 ConvNeXt state dict"):
        load_official_convnext({"cls_token": torch.zeros(1, 1, 8)})
    with pytest.raises(KeyError, match="unknown ConvNeXt flavour"):
        load_official_convnext(hub, flavour="timm")
