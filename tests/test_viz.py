"""Feature exploration (dino_from_scratch.viz), kernel side: similarity maps, PCA, attention maps, the feature cache,
and PatchSimilarityWidget driven through its callbacks (what a click in the browser runs). No browser needed."""
import datetime, gc, io, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import small_recipe, make_small_folder, one_thread  # noqa: E402,F401

from dino_from_scratch.vit import VisionTransformer, ViTConfig  # noqa: E402
from dino_from_scratch.viz import (FeatureCache, PatchSimilarityWidget, attention_mass_mask, cls_attention_maps,  # noqa: E402
                                   foreground_mask, load_image, patch_features, patch_similarity, pca_rgb, prepare_image,
                                   resolve_backbone, image_tensor, colorize, _lut)


NOW = datetime.datetime.now(datetime.timezone.utc)  # FileUpload values carry a datetime


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Every test here runs with one intra-op thread (see dino_test_utils.one_thread)."


class CountingViT(VisionTransformer):
    "A ViT that counts its forward passes (all feature paths go through prepare_tokens)."
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw); self.calls = 0
    def prepare_tokens(self, x, masks=None):
        self.calls += 1
        return super().prepare_tokens(x, masks)


def small_vit(patch=8, registers=0, seed=0, counting=True) -> VisionTransformer:
    torch.manual_seed(seed)
    cls = CountingViT if counting else VisionTransformer
    return cls(ViTConfig(img_size=32, patch_size=patch, embed_dim=32, depth=2, num_heads=2, num_registers=registers)).eval()


def noise_image(h, w, seed=0) -> np.ndarray:
    "Random-noise RGB uint8 image: every patch has different content, so features differ clearly between patches."
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO(); Image.fromarray(a).save(buf, format="PNG"); return buf.getvalue()


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)


# ------------------------------------------------------------------ similarity
def test_similarity_of_a_patch_with_itself_is_one_and_the_maximum():
    m = small_vit(counting=False)
    f = patch_features(m, torch.randn(1, 3, 40, 56))                 # a 5x7 grid of real ViT features
    assert f.shape == (5, 7, 32)
    for r, c in [(0, 0), (2, 3), (4, 6)]:
        s = patch_similarity(f, (r, c))
        assert s.shape == (5, 7)
        assert abs(float(s[r, c]) - 1.0) < 1e-5
        assert divmod(int(s.argmax()), 7) == (r, c)
        assert float(s.max()) <= 1.0 + 1e-6 and float(s.min()) >= -1.0 - 1e-6
    # symmetric: sim(a -> b) at b == sim(b -> a) at a
    assert abs(float(patch_similarity(f, (1, 2))[3, 5]) - float(patch_similarity(f, (3, 5))[1, 2])) < 1e-6
    # against another image: the other grid's shape; the same image given as "other" gives the same map
    g = patch_features(m, torch.randn(1, 3, 24, 32))
    assert patch_similarity(f, (2, 3), g).shape == (3, 4)
    torch.testing.assert_close(patch_similarity(f, (2, 3), f.clone()), patch_similarity(f, (2, 3)))


def test_similarity_bad_inputs():
    f = torch.randn(3, 4, 8)
    with pytest.raises(IndexError, match="outside the 3x4 grid"): patch_similarity(f, (3, 0))
    with pytest.raises(IndexError, match="outside 0..11"): patch_similarity(f, 12)
    with pytest.raises(ValueError, match="feature sizes differ"): patch_similarity(f, (0, 0), torch.randn(2, 2, 9))
    with pytest.raises(ValueError, match=r"\(row, col\) index needs a feature grid"): patch_similarity(f.reshape(12, 8), (0, 1))


def test_last_layer_through_intermediate_layers_equals_forward_features():
    m = small_vit(counting=False)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(patch_features(m, x, layer=1), patch_features(m, x))
    torch.testing.assert_close(patch_features(m, x, layer=-1), patch_features(m, x))
    assert not torch.allclose(patch_features(m, x, layer=0), patch_features(m, x))
    with pytest.raises(IndexError, match="outside the 2 blocks"): patch_features(m, x, layer=2)


# ------------------------------------------------------------------ PCA
def _latent_structure(n=196, d=48, stds=(6.0, 3.0, 1.5), seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    z = torch.linalg.qr(z - z.mean(0))[0] * n ** 0.5 * torch.tensor(stds)   # exactly uncorrelated latent coordinates
    q = torch.linalg.qr(torch.randn(d, 3, generator=g))[0].T                # orthonormal directions [3, d]
    x = z @ q + torch.randn(d, generator=g) + 0.01 * torch.randn(n, d, generator=g)
    return x, z


def test_pca_recovers_a_known_3d_structure_up_to_sign():
    x, z = _latent_structure()
    rgb = pca_rgb(x, (14, 14))
    assert rgb.shape == (14, 14, 3) and rgb.min() >= 0 and rgb.max() <= 1
    corr = np.array([[np.corrcoef(rgb[..., c].ravel(), z[:, k].numpy())[0, 1] for k in range(3)] for c in range(3)])
    assert np.all(np.abs(np.diag(corr)) > 0.9999), corr                   # channel c <-> latent c, in variance order
    assert np.all(np.abs(corr[~np.eye(3, dtype=bool)]) < 0.01), corr
    # flipping the sign of every feature gives each channel back up to its sign: c -> 1 - c or c
    rgb_neg = pca_rgb(-x, (14, 14))
    for c in range(3):
        assert min(np.abs(rgb_neg[..., c] - rgb[..., c]).max(), np.abs(rgb_neg[..., c] - (1 - rgb[..., c])).max()) < 1e-4
    # a batch: one PCA over all images, the same colours as fitting on the concatenation
    both = pca_rgb(torch.stack([x[:98], x[98:]]), (7, 14))
    assert both.shape == (2, 7, 14, 3)
    np.testing.assert_allclose(both.reshape(196, 3), rgb.reshape(196, 3), atol=1e-5)


def test_pca_foreground_mask_finds_a_known_foreground():
    g = torch.Generator().manual_seed(1)
    fg = torch.zeros(10, 12, dtype=torch.bool); fg[2:7, 3:10] = True
    obj, bg = 2 * torch.randn(40, generator=g), 2 * torch.randn(40, generator=g)
    x = torch.where(fg.flatten()[:, None], obj, bg) + 0.5 * torch.randn(120, 40, generator=g)
    for feats in (x, -x, x + 100):                                  # sign and offset do not matter
        np.testing.assert_array_equal(foreground_mask(feats, (10, 12)), fg.numpy())
    rgb = pca_rgb(x, (10, 12), fg_threshold=0.0)
    assert (rgb[~fg.numpy()] == 0).all() and (rgb[fg.numpy()].max(-1) > 0).any()
    with pytest.raises(ValueError, match="N = 10\\*12"): pca_rgb(x[:100], (10, 12))


# ------------------------------------------------------------------ attention
def test_cls_attention_maps_match_the_last_block_attention():
    m = small_vit(registers=2, counting=False)
    x = torch.randn(1, 3, 32, 48)
    a = cls_attention_maps(m, x)
    full = m.get_last_self_attention(x)                               # [1, heads, 1 + 2 + 24, same]
    assert a.shape == (2, 4, 6)
    torch.testing.assert_close(a.flatten(1), full[0, :, 0, 3:])      # CLS row, patch columns (registers skipped)
    # any source: a uint8 array is prepared (cropped to the patch grid) and normalised like training images
    a2 = cls_attention_maps(m, noise_image(35, 50))
    assert a2.shape == (2, 4, 6)
    with pytest.raises(TypeError, match="get_last_self_attention"): cls_attention_maps(torch.nn.Linear(2, 2), x)


def test_attention_mass_mask_keeps_the_top_mass():
    a = torch.tensor([[0.05, 0.4], [0.35, 0.2]])
    assert attention_mass_mask(a, 0.6).tolist() == [[False, True], [True, False]]    # 0.4 < 0.6 <= 0.75
    assert attention_mass_mask(a, 1.0).all()
    with pytest.raises(ValueError): attention_mass_mask(a, 0.0)


# ------------------------------------------------------------------ cache
def test_cache_hits_do_not_recompute():
    m, m2 = small_vit(), small_vit(seed=1)
    x, y = image_tensor(prepare_image(noise_image(32, 40), 8)), image_tensor(prepare_image(noise_image(32, 40, 1), 8))
    c = FeatureCache()
    f = c.features(m, x)
    for _ in range(3): assert c.features(m, x) is f
    assert (m.calls, c.hits, c.misses) == (1, 3, 1)
    assert c.features(m, x.clone()) is f and m.calls == 1                # same content, same entry
    c.features(m, y); c.features(m, x, layer=0); c.attention(m, x)
    assert m.calls == 4 and m2.calls == 0                                 # new image, new layer, attention: one each
    c.features(m2, x); assert m2.calls == 1 and len(c) == 5
    c.attention(m, x); c.features(m, x, layer=0); assert m.calls == 4    # all cached now
    del m2; gc.collect()
    assert len(c) == 4                                                    # a dead model's entries are dropped


def test_cache_is_bounded_lru():
    m = small_vit()
    c = FeatureCache(max_items=2)
    xs = [torch.randn(1, 3, 16, 16) for _ in range(3)]
    c.features(m, xs[0]); c.features(m, xs[1]); c.features(m, xs[0])   # xs[0] most recently used
    c.features(m, xs[2])                                                # evicts xs[1]
    assert len(c) == 2 and m.calls == 3
    c.features(m, xs[0]); assert m.calls == 3
    c.features(m, xs[1]); assert m.calls == 4


# ------------------------------------------------------------------ images
def test_images_any_size_and_mode(tmp_path):
    assert prepare_image(noise_image(50, 70), 16).size == (64, 48)
    assert prepare_image(noise_image(300, 200), 16, size=224).size == (224, 336)   # short side 224, long 336 = 21 patches
    assert prepare_image(noise_image(16, 16), 16).size == (16, 16)
    for mode, ext in (("L", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("P", "png"), ("I;16", "png"), ("1", "png")):
        f = tmp_path / f"im_{mode.replace(';', '')}.{ext}"
        Image.new(mode, (33, 20)).save(f)
        im = prepare_image(f, 8)
        assert im.mode == "RGB" and im.size == (32, 16)
    # CMYK pure cyan comes back cyan-ish (the conversion is a real one, not a channel drop)
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    r, g, b = np.asarray(load_image(tmp_path / "cyan.jpg"))[8, 8].astype(int)
    assert r < 40 and g > 200 and b > 200
    # arrays: HxW, HxWx1, HxWx4 (alpha composited on white), CxHxW tensors, floats in [0, 1]
    assert load_image(np.zeros((5, 6), np.uint8)).size == (6, 5)
    assert load_image(np.zeros((5, 6, 1), np.uint8)).mode == "RGB"
    assert np.asarray(load_image(np.zeros((5, 6, 4), np.uint8)))[0, 0].tolist() == [255, 255, 255]
    assert load_image(torch.rand(3, 5, 6)).size == (6, 5)
    assert np.asarray(load_image(np.ones((4, 4, 3))))[0, 0].tolist() == [255, 255, 255]


def test_bad_images(tmp_path):
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"): prepare_image(noise_image(15, 100), 16)
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"): prepare_image(noise_image(40, 7), 8, size=224)
    (tmp_path / "notes.jpg").write_text("hello, I am not a JPEG")
    with pytest.raises(ValueError, match="not a readable image"): load_image(tmp_path / "notes.jpg")
    with pytest.raises(ValueError, match="not a readable image"): load_image(b"\x00\x01garbage")
    with pytest.raises(FileNotFoundError): load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="HxW, HxWx1/3/4"): load_image(np.zeros((5, 5, 2)))
    with pytest.raises(ValueError, match="NaN"): load_image(np.full((4, 4), np.nan))
    with pytest.raises(TypeError, match="cannot read an image"): load_image(12)


# ------------------------------------------------------------------ the widget
@pytest.fixture
def widget():
    "A widget on two noise images (4x5 and 3x4 patches of 8 px), opacity 1: the map is shown without the photo."
    imgs = {"a": noise_image(32, 40), "b": noise_image(24, 32, 1)}
    return PatchSimilarityWidget({"vit8": small_vit()}, imgs, second="b", size=None, alpha=1.0)


def test_widget_click_updates_the_map_and_its_argmax_is_the_clicked_patch(widget):
    w = widget
    assert w.grid == (4, 5) and len(w.cells) == 4 and len(w.cells[0]) == 5
    before = w.out_a.value
    w.cells[1][3].click()                                   # what a click on the photo triggers
    assert w.last_error is None and (w.row.value, w.col.value) == (1, 3)
    assert w.out_a.value != before
    assert divmod(int(w.sim_a.argmax()), 5) == (1, 3) and abs(float(w.sim_a[1, 3]) - 1) < 1e-5
    assert w.sim_b.shape == (3, 4)
    # the displayed PNG: its brightest pixels are exactly the clicked patch, drawn with the top colour of the map
    a = decode(w.out_a.value)
    assert a.shape == (32, 40, 3)
    lum = a @ [0.299, 0.587, 0.114]
    ys, xs = np.nonzero(lum == lum.max())
    assert set(ys // 8) == {1} and set(xs // 8) == {3} and len(ys) == 64
    assert a[8:16, 24:32].reshape(-1, 3).tolist() == [_lut("inferno")[255].tolist()] * 64
    # a click given in pixel coordinates of image A
    w.click_xy(x=39, y=0)
    assert (w.row.value, w.col.value) == (0, 4) and divmod(int(w.sim_a.argmax()), 5) == (0, 4)
    # the sliders drive the same update
    w.row.value = 3
    assert divmod(int(w.sim_a.argmax()), 5) == (3, 4)
    w.col.value = 0
    assert divmod(int(w.sim_a.argmax()), 5) == (3, 0)
    assert "patch (3, 0)" in w.status.value
    with pytest.raises(IndexError, match="outside the 4x5 grid"): w.click(4, 0)


def test_widget_clicks_reuse_cached_features(widget):
    w, m = widget, widget.model
    n0 = m.calls
    assert n0 == 2                                           # the first draw: one forward per image
    for r, c in [(0, 0), (3, 4), (2, 2)]: w.click(r, c)
    assert m.calls == n0
    w.layer_dd.value = 0                                     # another layer: one forward per image, once
    w.click(1, 1); w.click(0, 1)
    assert m.calls == n0 + 2
    w.view_tb.value = "PCA"; w.fg_cb.value = True; w.view_tb.value = "attention"; w.head_dd.value = 1
    assert w.last_error is None and m.calls == n0 + 4        # attention: once per image
    w.view_tb.value = "similarity"; w.layer_dd.value = "last"; w.click(2, 2)
    assert m.calls == n0 + 4


def test_widget_views_model_switch_uploads(widget, tmp_path):
    w = widget
    w.add_model("vit16", small_vit(patch=16, seed=3))         # another patch size: another grid, new buttons
    assert w.model_dd.value == "vit16" and w.grid == (2, 2) and len(w.cells) == 2
    assert (w.row.max, w.col.max) == (1, 1) and w.row.value <= 1 and w.col.value <= 1
    w.click(1, 1)
    assert divmod(int(w.sim_a.argmax()), 2) == (1, 1)
    w.model_dd.value = "vit8"
    assert w.grid == (4, 5) and w.last_error is None
    # an upload (as the FileUpload widget reports it) becomes image A
    png = png_bytes(noise_image(48, 48, 5))
    w.upload.value = ({"name": "mine.png", "type": "image/png", "size": len(png), "content": memoryview(png), "last_modified": NOW},)
    assert w.last_error is None and w.image_dd.value == "upload: mine.png" and w.grid == (6, 6) and w.upload.value == ()
    # a bad upload: a clear error on the status line, nothing else changes
    w.upload2.value = ({"name": "notes.png", "type": "image/png", "size": 5, "content": memoryview(b"hello"), "last_modified": NOW},)
    assert isinstance(w.last_error, ValueError) and "not a readable image" in w.status.value
    assert w.image2_dd.value == "b" and "upload: notes.png" not in w.image_dd.options
    # an array as image B; a too-small one is refused
    name = w.set_image(noise_image(16, 24, 7), "b")
    assert w.image2_dd.value == name and w.sim_b.shape == (2, 3)
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"): w.set_image(np.zeros((4, 4, 3), np.uint8))
    # PCA and attention views draw images of A's size
    for view in ("PCA", "attention"):
        w.view_tb.value = view
        assert w.last_error is None and decode(w.out_a.value).shape == (48, 48, 3)
    w.image2_dd.value = w.NONE
    assert w.panel_b.layout.display == "none" and w.last_error is None


def test_widget_bad_models_and_images(tmp_path):
    imgs = {"a": noise_image(32, 32)}
    with pytest.raises(TypeError, match="not a backbone"): PatchSimilarityWidget({"lin": torch.nn.Linear(3, 3)}, imgs)
    with pytest.raises(ValueError, match="not an existing run directory"): PatchSimilarityWidget({"x": "no/such/run"}, imgs)
    with pytest.raises(KeyError, match="unknown recipe"): PatchSimilarityWidget({"x": "random:no_such_recipe"}, imgs)
    with pytest.raises(ValueError, match="smaller than one"): PatchSimilarityWidget({"m": small_vit()}, {"tiny": noise_image(4, 4)})
    with pytest.raises(ValueError, match="not among the images"): PatchSimilarityWidget({"m": small_vit()}, imgs, second="zzz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"): PatchSimilarityWidget({"m": small_vit()}, tmp_path / "empty")


def test_widget_models_from_a_run_dir_and_random_init(shared_data, tmp_path):
    "A `dino-train` run directory (teacher via eval.load_backbone) and 'random:<recipe>' in one switcher."
    from dino_from_scratch import data, train
    folder = make_small_folder(shared_data, tmp_path / "data", n_classes=2, n_train=8, n_val=2)
    r = small_recipe("data.num_workers=0", "run.ckpt_every=1")
    train.Trainer(r, out=tmp_path / "run", dataset=data.ImageDataset.from_folder(folder / "train"), verbose=False).fit(max_steps=1, progress=False)
    viz = shared_data / "imagenette2-224-viz"
    w = PatchSimilarityWidget({"run": tmp_path / "run", "random": "random:tiny_v1"}, viz, size=64)
    teacher = w.model
    assert teacher.embed_dim == 32 and len(teacher.blocks) == 1 and not teacher.training
    from dino_from_scratch.eval import load_backbone
    torch.testing.assert_close(teacher.pos_embed, load_backbone(tmp_path / "run")[0].pos_embed)
    assert w.grid == (4, 4) and len(w.image_dd.options) == 200
    w.model_dd.value = "random"
    assert w.model.embed_dim == 128 and w.last_error is None
    assert [o[1] for o in w.layer_dd.options] == ["last", 0, 1, 2, 3] and w.layer_dd.value == "last"
    w.click(2, 1)
    assert divmod(int(w.sim_a.argmax()), 4) == (2, 1)
    assert resolve_backbone(small_vit()) is not None


# ------------------------------------------------------------------ papercuts: what the widget shows in each view
def test_widget_marker_hint_and_sliders_only_where_a_click_does_something(widget):
    w = widget
    w.click(1, 3)
    q_sim = decode(w.query_img.value)
    assert "click a patch" in w.title_q.value and w.row.layout.display is None and w.col.layout.display is None
    assert q_sim[8, 24:32].tolist() == [[0, 255, 255]] * 8                 # the marker's top edge on patch (1, 3)
    for view in ("PCA", "attention"):
        w.view_tb.value = view
        assert w.last_error is None
        assert "click" not in w.title_q.value and w.row.layout.display == "none" and w.col.layout.display == "none"
        q = decode(w.query_img.value)
        np.testing.assert_array_equal(q, np.asarray(prepare_image(noise_image(32, 40), 8), dtype=np.float64))  # the photo, unmarked
    w.view_tb.value = "similarity"
    assert decode(w.query_img.value).tolist() == q_sim.tolist()


def test_widget_titles_are_per_panel_and_wrap_in_the_panel_width(widget):
    w = widget
    for view in w.VIEWS:
        w.view_tb.value = view
        ta, tb = w.title_a.value, w.title_b.value
        assert ta.startswith("<b>A") and tb.startswith("<b>B") and ta != tb, (view, ta, tb)
        assert w.title_a.layout.width == w.out_a.layout.width == w.title_b.layout.width


def test_widget_colour_bar_and_pca_legend(widget):
    w = widget
    w.click(2, 2)
    cmap, lo, hi, label = w.scale
    assert (cmap, hi) == ("inferno", 1.0) and "cosine similarity" in label
    assert abs(lo - min(float(w.sim_a.min()), float(w.sim_b.min()))) < 1e-6  # one scale for A and B
    assert f"{lo:.2f}" in w.legend.value and "1.00" in w.legend.value and "linear-gradient" in w.legend.value
    top = "rgb({},{},{})".format(*_lut("inferno")[255])
    assert top in w.legend.value
    w.view_tb.value = "attention"
    cmap, lo, hi, label = w.scale
    a = [w.cache.attention(w.model, w.prepared(n)[1]).mean(0) for n in ("a", "b")]
    assert cmap == "viridis" and lo == 0.0 and abs(hi - max(float(x.max()) for x in a)) < 1e-6
    assert "CLS" in label and f"{hi:.2f}" in w.legend.value
    w.view_tb.value = "PCA"
    assert w.scale is None and "principal components" in w.legend.value and "background" not in w.legend.value
    w.fg_cb.value = True
    assert "black: background" in w.legend.value
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = w.snapshot()
    assert len(fig.legends) == 1 and [t.get_text() for t in fig.legends[0].get_texts()] == ["PC 1", "PC 2", "PC 3", "background"]
    plt.close(fig)
    w.view_tb.value = "similarity"
    fig = w.snapshot()
    assert len(fig.axes) == 4                                               # A, map on A, map on B, colour bar
    plt.close(fig)


def test_images_are_listed_by_short_names(tmp_path):
    from dino_from_scratch.viz import short_names, image_sources
    for rel in ("val/dog/x.png", "val/cat/x.png", "train/dog/y.png", "val/dog/y.png", "top.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise_image(16, 16)).save(tmp_path / rel)
    src = image_sources(tmp_path)
    assert sorted(src) == ["cat/x", "dog/x", "top", "train/dog/y.png", "val/dog/y.png"]   # collisions keep their path
    assert all(p.is_file() for p in src.values()) and src["dog/x"] == tmp_path / "val/dog/x.png"
    assert short_names([], tmp_path) == {}


def test_default_run_is_what_dino_train_writes(tmp_path, monkeypatch):
    from dino_from_scratch.viz import default_run, default_models
    monkeypatch.delenv("DINO_TRAINED_RUN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_run("no_such_recipe_here") is None
    assert default_models("no_such_recipe_here") == {"random init no_such_recipe_here": "random:no_such_recipe_here"}
    (tmp_path / "runs/tiny/checkpoints").mkdir(parents=True)
    assert default_run() != Path("runs/tiny")                            # an empty run directory does not count
    (tmp_path / "runs/tiny/checkpoints/step_0000001.safetensors").write_bytes(b"")
    assert default_run().resolve() == (tmp_path / "runs/tiny").resolve()
    assert list(default_models().items()) == [("trained (runs/tiny)", default_run()), ("random init tiny", "random:tiny")]
    monkeypatch.setenv("DINO_TRAINED_RUN", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="DINO_TRAINED_RUN=.*no checkpoints"): default_run()
