"""Linear depth probe (chapter 13): NYU metrics by hand, the loss, the head, data loading and its errors, `dino-eval depth`."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dino_from_scratch.dense import (DEPTH_MAX, DEPTH_MIN, LinearDepthHead, depth_eval, depth_metrics, extract_dense_features,
                                     load_depth_folder, predict_depth, read_depth_png, sig_loss, train_linear_depth)

torch.set_num_threads(1)


def write_pair(folder, stem, rgb=None, depth_mm=None, size=(8, 6), mode="I;16"):
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(rgb if rgb is not None else np.full((h, w, 3), 128, np.uint8)).save(folder / f"{stem}.jpg")
    if depth_mm is None: depth_mm = np.full((h, w), 2000, np.uint16)
    if mode == "I;16": Image.fromarray(depth_mm.astype(np.uint16)).save(folder / f"{stem}_depth.png")
    elif mode is not None: Image.fromarray(np.clip(depth_mm // 40, 0, 255).astype(np.uint8)).convert(mode).save(folder / f"{stem}_depth.png")


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_by_hand():
    gt = torch.tensor([[[2.0, 4.0]], [[1.0, 0.0]]])
    pred = torch.tensor([[[2.2, 3.0]], [[1.5, 7.0]]])
    m = depth_metrics(pred, gt)
    # image A: |e|/d = 0.1, 0.25; e^2 = 0.04, 1; ratios 1.1, 1.33. Image B: its 0 pixel is invalid; 1 vs 1.5.
    assert m["abs_rel"] == pytest.approx((0.175 + 0.5) / 2)
    assert m["rmse"] == pytest.approx((math.sqrt(0.52) + 0.5) / 2)
    assert m["delta1"] == pytest.approx(0.25) and m["delta2"] == 1.0 and m["n_images"] == 2   # 1.5 < 1.25^2


def test_metrics_caps_and_errors():
    # predictions are clamped into (min, max); ground truth at or above 10 m is not evaluated
    assert depth_metrics(torch.tensor([[[50.0, 0.0]]]), torch.tensor([[[5.0, 5.0]]]))["rmse"] == pytest.approx(math.sqrt((25 + (5 - DEPTH_MIN) ** 2) / 2))   # 50 -> 10, 0 -> 0.001
    assert depth_metrics(torch.tensor([[[3.0, 1.0]]]), torch.tensor([[[3.0, 12.0]]]))["rmse"] == 0.0
    perfect = torch.rand(3, 4, 5) * 9 + 0.5
    m = depth_metrics(perfect, perfect)
    assert m["rmse"] < 1e-6 and m["abs_rel"] < 1e-6 and m["delta1"] == 1.0
    with pytest.raises(ValueError, match="no valid ground-truth pixel"):
        depth_metrics(torch.ones(2, 3, 3), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"differ in shape"):
        depth_metrics(torch.ones(1, 3, 3), torch.ones(1, 3, 4))


def test_sig_loss_properties():
    gt = torch.rand(2, 6, 8) * 5 + 0.5
    assert sig_loss(gt, gt).item() == pytest.approx(0.0, abs=1e-6)
    noisy = gt * (1 + 0.2 * torch.rand(2, 6, 8))
    # scale invariant when lam = 0 (and eps = 0): a global factor changes only mean(g)
    assert sig_loss(3 * noisy, gt, lam=0, eps=0).item() == pytest.approx(sig_loss(noisy, gt, lam=0, eps=0).item(), rel=1e-4)
    # ... but not with DINOv2's lam = 0.15
    assert sig_loss(3 * noisy, gt).item() > sig_loss(noisy, gt).item() + 0.1
    gt0 = gt.clone(); gt0[0, 0, 0] = 0.0; bad = gt.clone(); bad[0, 0, 0] = 1e3
    assert sig_loss(bad, gt0).item() == pytest.approx(0.0, abs=1e-6)            # invalid pixels carry no loss
    low = torch.full((2, 3, 4), 2.0)
    assert torch.isfinite(sig_loss(low, gt))                                     # a low-resolution prediction is upsampled


def test_head_is_a_convex_combination_of_bins():
    for bins in ("linear", "log"):
        h = LinearDepthHead(6, bins=bins, generator=torch.Generator().manual_seed(0)).eval()
        with torch.no_grad(): h.linear.weight.normal_(0, 5)
        d = h(torch.randn(2, 3, 4, 6), torch.randn(2, 6))
        assert d.shape == (2, 12, 16) and d.min() >= DEPTH_MIN - 1e-6 and d.max() <= DEPTH_MAX + 1e-5
    assert torch.allclose(h.bins[1:] / h.bins[:-1], h.bins[1] / h.bins[0], rtol=1e-4)    # log bins: geometric
    with pytest.raises(ValueError, match="concatenates the CLS token"):
        h(torch.randn(1, 2, 2, 6))
    with pytest.raises(ValueError, match="bins must be 'linear'"):
        LinearDepthHead(6, bins="sid")


def test_probe_recovers_depth_that_the_features_encode():
    "Features that carry log-depth along one direction: the probe must beat the best constant by far."
    g = torch.Generator().manual_seed(0)
    N, h, w, D = 48, 3, 4, 16
    depth_patch = torch.exp(torch.rand(N, h, w, generator=g) * 2.0)              # 1 .. 7.4 m, one value per patch
    direction = torch.randn(D, generator=g)
    feats = torch.log(depth_patch)[..., None] * direction + 0.05 * torch.randn(N, h, w, D, generator=g)
    gt = depth_patch.repeat_interleave(8, 1).repeat_interleave(8, 2)              # 24 x 32 pixel maps
    head = train_linear_depth(feats[:40], None, gt[:40], epochs=60, lr=1e-2, use_cls=False, upsample=1)
    assert head.history[-1] < 0.7 * head.history[0]
    m = depth_metrics(predict_depth(head, feats[40:], None, gt.shape[-2:]), gt[40:])
    const = depth_metrics(torch.full_like(gt[40:], gt[:40].median().item()), gt[40:])
    assert m["abs_rel"] < 0.5 * const["abs_rel"] and m["delta1"] > const["delta1"] + 0.3


# ------------------------------------------------------------------------------------------------ data and its errors
def test_read_depth_png_mm_to_m_and_refuses_8_bit(tmp_path):
    Image.fromarray(np.array([[0, 1500], [9976, 65535]], np.uint16)).save(tmp_path / "d.png")
    d = read_depth_png(tmp_path / "d.png")
    assert d.dtype == np.float32 and np.allclose(d, [[0, 1.5], [9.976, 65.535]])
    for mode in ("L", "RGB", "P"):
        Image.new(mode, (4, 3)).save(tmp_path / f"{mode}.png")
        with pytest.raises(ValueError, match=f"{mode}.png: a depth map must be a 16-bit PNG in millimetres .*got mode {mode}"):
            read_depth_png(tmp_path / f"{mode}.png")


def test_depth_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="depth data folder not found"):
        load_depth_folder(tmp_path / "nope", "train")
    write_pair(tmp_path / "train", "0001")
    write_pair(tmp_path / "train", "0002", mode=None)                            # its depth map is missing
    with pytest.raises(FileNotFoundError, match=r"no depth map .*0002_depth.png for image .*0002.jpg"):
        load_depth_folder(tmp_path, "train")
    write_pair(tmp_path / "train", "0002", mode="L")                             # an 8-bit depth PNG
    with pytest.raises(ValueError, match=r"0002_depth.png: a depth map must be a 16-bit PNG .*got mode L \(an 8-bit image"):
        load_depth_folder(tmp_path, "train")
    write_pair(tmp_path / "train", "0002", depth_mm=np.full((5, 8), 1000, np.uint16))   # depth of another size
    with pytest.raises(ValueError, match=r"0002.jpg is \(6, 8\) but its depth map .* is \(5, 8\)"):
        load_depth_folder(tmp_path, "train")
    write_pair(tmp_path / "train", "0002", depth_mm=np.arange(48, dtype=np.uint16).reshape(6, 8) * 100)
    d = load_depth_folder(tmp_path, "train")
    assert len(d) == 2 and d.images.shape == (2, 3, 6, 8) and d.depths[1, 0, 1].item() == pytest.approx(0.1)
    assert load_depth_folder(tmp_path, "train", limit=1).names == ["0001"]


# ------------------------------------------------------------------------------------------------ on the real data
@pytest.fixture(scope="module")
def depth_root(shared_data):
    root = shared_data / "depth-mini"
    if not (root / "train").is_dir(): pytest.skip("depth-mini not found")
    return root


def test_real_folder(depth_root):
    d = load_depth_folder(depth_root, "val", limit=5)
    assert d.images.shape == (5, 3, 120, 160) and d.images.dtype == torch.uint8
    valid = d.depths[d.depths > 0]
    assert 0.7 < valid.min() and valid.max() < 10.0                              # README: 725..9976 mm


def test_depth_eval_runs_on_vit_and_convnext(depth_root):
    from dino_from_scratch.config import get_recipe
    from dino_from_scratch.convnext import ConvNeXt, ConvNeXtConfig
    from dino_from_scratch.eval import random_backbone
    vit = random_backbone(get_recipe("tiny_v1"))
    r = depth_eval(vit, depth_root, size=(64, 96), epochs=1, limit=6)
    assert r["n_train"] == r["n_val"] == 6 and r["size"] == [64, 96] and 0 <= r["delta1"] <= 1 and r["rmse"] > 0
    assert (r["min_depth"], r["max_depth"], r["use_cls"], r["bins"]) == (DEPTH_MIN, DEPTH_MAX, True, "linear")
    cnx = ConvNeXt(ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), patch_size=16)).eval()
    p, c = extract_dense_features(cnx, load_depth_folder(depth_root, "val", limit=2).images, (64, 96))
    assert p.shape == (2, 4, 6, 32) and c.shape == (2, 32)
    assert depth_eval(cnx, depth_root, size=(64, 96), epochs=1, limit=4, use_cls=False)["n_val"] == 4


def test_cli_depth(depth_root, capsys, tmp_path):
    from dino_from_scratch.cli import eval_main as main
    main(["depth", "--recipe", "tiny_v1", "--random-init", "--data", str(depth_root), "--limit", "4", "--epochs", "1",
          "--size", "64x96", "--bins", "log"])
    out = json.loads(capsys.readouterr().out)
    assert out["eval"] == "depth" and out["model"] == "random:tiny_v1" and out["bins"] == "log" and out["n_val"] == 4
    write_pair(tmp_path / "train", "0001", mode="L"); write_pair(tmp_path / "val", "0001")
    with pytest.raises(SystemExit, match=r"dino-eval: error: .*0001_depth.png: a depth map must be a 16-bit PNG"):
        main(["depth", "--recipe", "tiny_v1", "--random-init", "--data", str(tmp_path), "--epochs", "1", "--size", "32x32"])
