"""The batched data pipeline (chapter 00, section 3) against the PIL path it replaces.

Tolerances are in grey levels (0..255) on real 128 px Imagenette images; the PIL path rounds to 8 bits after every
operation, the batched path stays in float32, so the per-operation gaps below are rounding unless said otherwise.
"""
import math, os, sys, warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from dino_from_scratch import data as D
from dino_from_scratch.data import (BatchedMultiCrop, CachedMultiCrop, ImageCache, ImageDataset, MultiCrop, MultiCropConfig,
                                    batched_color_jitter, batched_flip, batched_gaussian_blur, batched_grayscale,
                                    batched_resized_crop, batched_solarize, collate_crops, crop_loader, multicrop_data,
                                    reference_views, resolve_data, sample_crop_params, _item_seed)

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import SMALL_OVERRIDES, make_small_folder, one_thread  # noqa: E402,F401

BICUBIC = InterpolationMode.BICUBIC
TINY = MultiCropConfig(global_size=64, local_size=32, n_local=4, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25),
                       jitter_p=0.5, gray_p=0.1)   # tiny_v1's crops


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "One intra-op thread (see dino_test_utils.one_thread)."


@pytest.fixture(scope="module")
def images(shared_data):
    "16 real 128 px training images: (uint8 [16, 3, 128, 128], the same as PIL images, their dataset)."
    ds = ImageDataset.from_folder(shared_data / "imagenette2-128", "train").subset(16, seed=3)
    x, keep = ImageCache(ds.sources, verbose=False).get(list(range(16)))
    assert keep == list(range(16))
    return x, [Image.fromarray(x[b].permute(1, 2, 0).numpy()) for b in range(16)], ds


def grey(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    "Absolute differences in grey levels between two images (uint8 tensors, or floats in [0, 1] scaled to 0..255)."
    return (a.double() - b.double()).abs()


def pil_batch(ims) -> torch.Tensor:
    return torch.stack([TF.pil_to_tensor(im) for im in ims]).double()


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    "Two-sample Kolmogorov-Smirnov distance."
    a, b = a.double().flatten(), b.double().flatten()
    grid = torch.cat([a, b]).sort()[0]
    cdf = lambda x: torch.searchsorted(x.sort()[0].contiguous(), grid, right=True).double() / len(x)
    return (cdf(a) - cdf(b)).abs().max().item()


def ks_critical(n: int, m: int, alpha_coef: float = 1.95) -> float:
    "The two-sample KS critical value at the 0.1 % level (coefficient 1.95)."
    return alpha_coef * math.sqrt((n + m) / (n * m))


def binomial_ok(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    "k successes out of n within `sigmas` standard deviations of n p."
    return abs(k - n * p) <= sigmas * math.sqrt(max(n * p * (1 - p), 1e-12)) + 1e-9


# ------------------------------------------------------------------ each batched op with fixed parameters vs PIL
def test_resized_crop_matches_pil(images):
    "Crop + antialiased bicubic resize: mean < 0.1 grey level, 99.9 % of pixels within 1, all within 3."
    x, pils, _ = images
    p = sample_crop_params(TINY, range(16), (128, 128))
    for views, size in ((slice(0, 2), 64), (slice(2, 6), 32)):
        ours = batched_resized_crop(x, p["box"][views], size)
        ref = pil_batch([TF.resized_crop(pils[b], *box, [size, size], interpolation=BICUBIC)
                         for view in p["box"][views].tolist() for b, box in enumerate(view)])
        d = grey(ours, ref)
        assert ours.dtype == torch.uint8 and ours.shape == (len(ref), 3, size, size)
        assert d.mean() < 0.1 and d.flatten().quantile(0.999) <= 1 and d.max() <= 3, (size, d.mean(), d.max())


def test_flip_matches_pil(images):
    "Horizontal flip: exact, and only on the rows that drew it."
    x, pils, _ = images
    mask = torch.arange(16) % 3 == 0
    ref = pil_batch([TF.horizontal_flip(im) if m else im for im, m in zip(pils, mask)])
    assert torch.equal(batched_flip(x, mask).double(), ref)


@pytest.mark.parametrize("op,lo,hi,tol_mean,tol_max", [
    (0, 0.6, 1.4, 0.6, 1.0),     # brightness: PIL truncates to 8 bits
    (1, 0.6, 1.4, 0.6, 1.5),     # contrast: PIL also rounds the grey mean to an integer
    (2, 0.8, 1.2, 0.6, 1.5),     # saturation
    (3, -0.1, 0.1, 0.3, 10.0),   # hue: PIL shifts hue in 8-bit HSV (hue in 1/255 turns, S and V rounded)
])
def test_color_jitter_component_matches_pil(images, op, lo, hi, tol_mean, tol_max):
    "One colour operation at a time, per-sample factors over the recipes' ranges."
    x, pils, _ = images
    f = lo + (hi - lo) * torch.rand(16, generator=torch.Generator().manual_seed(op))
    factors = torch.zeros(16, 4); factors[:, op] = f
    order = torch.tensor([op] + [k for k in range(4) if k != op]).expand(16, 4)
    strength = [0.0] * 4; strength[op] = 1.0
    apply = torch.arange(16) != 5                                 # row 5 does not draw the jitter: untouched
    ours = batched_color_jitter(x.float() / 255, apply, factors, order, strength) * 255
    fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
    ref = pil_batch([fn(im, float(f[b])) if apply[b] else im for b, im in enumerate(pils)])
    d = grey(ours, ref)
    assert d.mean() < tol_mean and d.max() <= tol_max, (op, d.mean().item(), d.max().item())
    assert d[5].max() < 1e-4


def test_color_jitter_order_matters_and_is_followed(images):
    "Two operations in both orders: each row follows its own order (contrast after brightness differs from before)."
    x, pils, _ = images
    factors = torch.tensor([[1.4, 0.6, 1.0, 0.0]]).expand(16, 4)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]]).repeat(8, 1)
    ours = batched_color_jitter(x.float() / 255, torch.ones(16, dtype=torch.bool), factors, order, (1, 1, 0, 0)) * 255
    ref = pil_batch([TF.adjust_contrast(TF.adjust_brightness(im, 1.4), 0.6) if b % 2 == 0 else
                     TF.adjust_brightness(TF.adjust_contrast(im, 0.6), 1.4) for b, im in enumerate(pils)])
    assert grey(ours, ref).max() <= 3.0      # PIL's rounding compounds: 1.2 (contrast) x 1.4 (brightness) + 1
    assert grey(ours[0::2], ours[1::2]).mean() > 1.0               # the order changes the result


def test_grayscale_matches_pil(images):
    "ITU-R 601 luma on 3 channels: every pixel within 1 grey level (PIL rounds)."
    x, pils, _ = images
    mask = torch.arange(16) % 2 == 1
    ours = batched_grayscale(x.float() / 255, mask) * 255
    ref = pil_batch([TF.rgb_to_grayscale(im, num_output_channels=3) if m else im for im, m in zip(pils, mask)])
    assert grey(ours, ref).max() <= 1.0


def test_gaussian_blur_matches_pil(images):
    """kornia's Gaussian vs PIL's GaussianBlur(radius=sigma) over sigma in [0.1, 2]: mean < 0.7 grey level; away from the
    border (3 sigma) 99.9 % of pixels within 4 and all within 10. PIL approximates the Gaussian by three box blurs: the
    approximation is coarsest for radii below 1 (single pixels at sharp edges differ by up to ~8 levels) and at the
    border, where it weighs the edge pixel differently from a Gaussian with replicated edges (up to ~35 levels)."""
    x, pils, _ = images
    sigma = 0.1 + 1.9 * torch.rand(16, generator=torch.Generator().manual_seed(7))
    ours = batched_gaussian_blur(x.float() / 255, torch.ones(16, dtype=torch.bool), sigma) * 255
    ref = pil_batch([im.filter(ImageFilter.GaussianBlur(radius=float(s))) for im, s in zip(pils, sigma)])
    d = grey(ours, ref)
    assert d.mean() < 0.7, d.mean()
    inner = d[..., 6:-6, 6:-6]
    assert inner.flatten().quantile(0.999) <= 4 and inner.max() <= 10, (inner.flatten().quantile(0.999), inner.max())
    sharp = batched_gaussian_blur(x.float() / 255, torch.ones(16, dtype=torch.bool), torch.full((16,), 0.1)) * 255
    assert grey(sharp, x).max() <= 0.5                              # sigma 0.1: the identity up to float rounding


def test_solarize_matches_pil(images):
    "Solarize at 128 on 8-bit values: exact."
    x, pils, _ = images
    mask = torch.arange(16) < 8
    ours = batched_solarize(x.float() / 255, mask) * 255
    ref = pil_batch([TF.solarize(im, 128) if m else im for im, m in zip(pils, mask)])
    assert grey(ours, ref).max() < 1e-3


# ------------------------------------------------------------------ the PIL reference with recorded parameters
class Recorder:
    "Hooks on a MultiCrop's transforms that record the parameters it draws, in call order."
    def __init__(self, mc: MultiCrop, group: int = 0):
        self.events, p = [], mc.pipelines(group)
        geo, local = p["geo"].transforms, p["local"].transforms
        jitter = next(t for t in local if isinstance(t, T.RandomApply))
        gray = next(t for t in local if isinstance(t, T.RandomGrayscale))
        sol = next(t for t in p["photo"][1].transforms if isinstance(t, T.RandomSolarize))
        for name, t in (("box", geo[0]), ("box", local[0]), ("flip", geo[1]), ("flip", local[1]), ("jitter", jitter.transforms[0]),
                        ("gray", gray), ("solarize", sol)):
            self._hook(name, t)

    def _hook(self, name, t):
        f = t.make_params
        def rec(*a, **k):
            out = f(*a, **k); self.events.append((name, out)); return out
        t.make_params = rec

    def params(self, cfg: MultiCropConfig) -> dict:
        "The recorded draws as `sample_crop_params` lays them out ([V, 1, ...])."
        views = []
        for name, ev in self.events:
            if name == "box": views.append({"box": [ev["top"], ev["left"], ev["height"], ev["width"]]})
            else: views[-1][name] = ev
        assert len(views) == cfg.n_global + cfg.n_local, len(views)
        out = {"box": torch.tensor([[v["box"]] for v in views])}
        for k in ("flip", "gray", "solarize"): out[k] = torch.tensor([[k in v] for v in views])
        out["jitter"] = torch.tensor([["jitter" in v] for v in views])
        out["order"] = torch.stack([v["jitter"]["fn_idx"] if "jitter" in v else torch.arange(4) for v in views])[:, None]
        keys = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        out["factors"] = torch.tensor([[[(v["jitter"][k] or 0.0) if "jitter" in v else 0.0 for k in keys]] for v in views])
        out["blur"] = torch.tensor([["blur" in v] for v in views])
        out["sigma"] = torch.tensor([[v.get("blur", 0.0)] for v in views])
        return out


def record_multicrop(mc: MultiCrop, img, seed: int, monkeypatch, group: int = 0):
    "MultiCrop's views of `img` under `seed`, and the parameters it drew (blur radii recorded from PIL's filter)."
    recorders = mc.__dict__.setdefault("_test_recorders", {})
    rec = recorders.get(group) or recorders.setdefault(group, Recorder(mc, group))   # hook each transform once
    rec.events.clear()
    real = ImageFilter.GaussianBlur
    class RecordingBlur(real):
        def __init__(self, radius=2):
            rec.events.append(("blur", float(radius))); super().__init__(radius)
    monkeypatch.setattr(D.ImageFilter, "GaussianBlur", RecordingBlur)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        views = mc(img, group)
    monkeypatch.setattr(D.ImageFilter, "GaussianBlur", real)
    return views, rec.params(mc.cfg)


CONFIGS = {
    "tiny": TINY,
    "all_on": MultiCropConfig(global_size=48, local_size=24, n_local=3, jitter_p=1.0, gray_p=0.5, solarize_p=0.5, blur_p=(1.0, 0.5, 0.5)),
    "gram": MultiCropConfig(global_size=48, local_size=24, n_local=2, gram_size=80, jitter_p=1.0),
    "gram_distorted": MultiCropConfig(global_size=48, local_size=24, n_local=2, gram_size=80, gram_no_distortion=False, jitter_p=1.0),
    "groups": MultiCropConfig(n_local=2, jitter_p=1.0, resolutions=((32, 16, 0, 1.0), (48, 24, 64, 1.0))),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_views_reproduce_multicrop(images, name, monkeypatch):
    "`reference_views` fed the parameters MultiCrop drew gives MultiCrop's views bit for bit (the reference is faithful)."
    _, pils, _ = images
    cfg = CONFIGS[name]
    mc = MultiCrop(cfg)
    for seed, b in ((0, 0), (1, 3), (2, 7)):
        group = seed % len(mc.groups)
        views, p = record_multicrop(mc, pils[b], seed, monkeypatch, group)
        ref = reference_views(pils[b], p, 0, cfg, group)
        assert [v.shape for v in ref] == [v.shape for v in views]
        for v, (a, r) in enumerate(zip(views, ref)): assert torch.equal(a, r), (name, seed, v, (a - r).abs().max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_views_match_multicrop(images, name, monkeypatch):
    """The whole batched pipeline fed MultiCrop's own draws: every view within 3 grey levels on average (the
    rounding and blur-border gaps above, accumulated over up to 7 operations), in the same order and shapes."""
    x, pils, _ = images
    cfg = CONFIGS[name]
    mc, bm = MultiCrop(cfg), BatchedMultiCrop(cfg)
    for seed, b in ((0, 0), (1, 3), (2, 7)):
        group = seed % len(mc.groups)
        views, p = record_multicrop(mc, pils[b], seed, monkeypatch, group)
        ours = bm.apply(x[b:b + 1], p, group)
        assert [tuple(v.shape[1:]) for v in ours] == [tuple(v.shape) for v in views]
        for v, (a, o) in enumerate(zip(views, ours)):
            d = grey(D.denormalize(a, cfg.mean, cfg.std) * 255, D.denormalize(o[0], cfg.mean, cfg.std) * 255)
            assert d.mean() < 3.0, (name, seed, v, d.mean().item())


# ------------------------------------------------------------------ distributions of the random parameters
@pytest.fixture(scope="module")
def pil_draws(images):
    "Parameters the PIL path draws over 1,000 images (recorded from MultiCrop's transforms on a 128 px image)."
    _, pils, _ = images
    mp = pytest.MonkeyPatch()
    cfg = MultiCropConfig(global_size=16, local_size=8, n_local=4, global_scale=TINY.global_scale, local_scale=TINY.local_scale,
                          jitter_p=0.5, gray_p=0.1)   # tiny's probabilities at small output sizes (fast)
    mc = MultiCrop(cfg)
    ps = [record_multicrop(mc, pils[0], s, mp)[1] for s in range(1000)]
    mp.undo()
    return cfg, {k: torch.cat([p[k] for p in ps], 1) for k in ps[0]}


def test_parameter_distributions_match_pil(pil_draws):
    """Over 1,000 images each (6 views): crop area fraction, log aspect and position, and the colour factors, blur
    radii follow the same distributions (two-sample KS below the 0.1 % critical value); every switch (flip, jitter,
    grayscale, blur per view, solarize per view) fires at a rate within 4 standard errors of the PIL path's rate."""
    cfg, pil = pil_draws
    n = pil["box"].shape[1]
    ours = sample_crop_params(cfg, [_item_seed(0, 0, i) for i in range(n)], (128, 128))
    crit = ks_critical(n, n)
    for views in (slice(0, 2), slice(2, 6)):
        feats = lambda bx: {"area": bx[..., 2] * bx[..., 3] / 128**2, "log_aspect": torch.log(bx[..., 3] / bx[..., 2]),
                            "top": bx[..., 0] / (129 - bx[..., 2]), "left": bx[..., 1] / (129 - bx[..., 3])}
        fo, fp = feats(ours["box"][views]), feats(pil["box"][views])
        for k in fo: assert ks(fo[k], fp[k]) < ks_critical(fo[k].numel(), fp[k].numel()), (views, k, ks(fo[k], fp[k]))
    jo, jp = ours["jitter"], pil["jitter"]
    for op in range(4):
        a, b = ours["factors"][..., op][jo], pil["factors"][..., op][jp]
        assert ks(a, b) < ks_critical(len(a), len(b)), (op, ks(a, b))
    # the order of the four operations: each (slot, operation) pair about 1/4 of the time in both paths
    for p, j in ((ours, jo), (pil, jp)):
        o = p["order"][j]
        for slot in range(4):
            for op in range(4): assert binomial_ok(int((o[:, slot] == op).sum()), len(o), 0.25), (slot, op)
    bo, bp = ours["sigma"][ours["blur"]], pil["sigma"][pil["blur"]]
    assert ks(bo, bp) < ks_critical(len(bo), len(bp))
    for key in ("flip", "jitter", "gray", "blur", "solarize"):
        for v in range(6):
            ko, kp = int(ours[key][v].sum()), int(pil[key][v].sum())
            pooled = (ko + kp) / (2 * n)
            se = math.sqrt(max(2 * n * pooled * (1 - pooled), 1e-12))
            assert abs(ko - kp) <= 4 * se + 1e-9, (key, v, ko, kp)
    # and the rates are the configured ones (solarize: second global view only; blur: 1.0 / 0.1 / 0.5)
    assert bool(ours["blur"][0].all()) and bool(pil["blur"][0].all())
    assert not ours["solarize"][[0, 2, 3, 4, 5]].any() and not pil["solarize"][[0, 2, 3, 4, 5]].any()
    assert binomial_ok(int(ours["blur"][1].sum()), n, 0.1) and binomial_ok(int(ours["solarize"][1].sum()), n, 0.2)


# ------------------------------------------------------------------ determinism and batch independence
def test_same_seed_same_crops_and_batch_independence(images):
    x, _, _ = images
    bm = BatchedMultiCrop(TINY)
    seeds = [_item_seed(0, 3, i) for i in range(16)]
    a, b = bm(x, seeds), bm(x, seeds)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    sub = [11, 2, 5]                                                # other batch mates, other positions
    c = bm(x[sub], [seeds[i] for i in sub])
    assert all(torch.equal(u[sub], v) for u, v in zip(a, c))
    other_epoch = bm(x, [_item_seed(0, 4, i) for i in range(16)])
    assert not torch.equal(a[0], other_epoch[0])


def test_one_process_equals_two(images):
    "The keys of a global batch split over 2 ranks (StepBatches' rank::world slices) give the views of 1 process."
    _, _, ds = images
    cached = CachedMultiCrop(ImageDataset(ds.sources, ds.labels), TINY, seed=3, verbose=False)
    keys = [(5, i, 0) for i in (3, 14, 0, 9, 7, 1, 12, 6)]
    one_views, one_labels, skipped = next(iter(crop_loader(cached, [keys])))
    assert skipped == 0 and torch.equal(one_labels, torch.tensor([ds.labels[k[1]] for k in keys]))
    halves = [next(iter(crop_loader(cached, [keys[r::2]]))) for r in (0, 1)]
    for v, full in enumerate(one_views):
        merged = torch.stack([halves[0][0][v], halves[1][0][v]], 1).flatten(0, 1)
        assert torch.equal(merged, full), v


def test_worker_process_gives_the_same_batches(images):
    "A DataLoader worker draws exactly what the main process draws (the parameters travel with the keys)."
    _, _, ds = images
    cached = CachedMultiCrop(ImageDataset(ds.sources, ds.labels), TINY, seed=1, verbose=False)
    batches = [[(0, i) for i in range(4)], [(1, i) for i in range(8, 12)]]
    main = list(crop_loader(cached, batches, num_workers=0))
    worker = list(crop_loader(cached, batches, num_workers=1))
    for (va, la, sa), (vb, lb, sb) in zip(main, worker):
        assert sa == sb == 0 and torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(va, vb))


def test_cached_item_matches_pil_item_interface(images):
    "`CachedMultiCrop[key]` has the shape of `ImageDataset[key]` with a MultiCrop transform, and collates the same way."
    _, _, ds = images
    pil = multicrop_data(ImageDataset(ds.sources, ds.labels), TINY, seed=2)
    cached = multicrop_data(ImageDataset(ds.sources, ds.labels), MultiCropConfig(**{**asdict(TINY), "backend": "batched"}), seed=2, verbose=False)
    assert isinstance(cached, CachedMultiCrop) and isinstance(pil.transform, MultiCrop)
    a, b = pil[(0, 4)], cached[(0, 4)]
    assert [v.shape for v in a[0]] == [v.shape for v in b[0]] and a[1] == b[1]
    va, la, _ = collate_crops([pil[(0, i)] for i in range(3)])
    vb, lb, _ = cached.__getitems__([(0, i) for i in range(3)])
    assert [v.shape for v in va] == [v.shape for v in vb] and torch.equal(la, lb)


# ------------------------------------------------------------------ the cache
@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_cache_budget_fallback_and_bad_files(images, tmp_path, capsys):
    _, pils, ds = images
    mem = ImageCache(ds.sources, budget_mb=1.0)                    # 16 x 48 KiB = 0.75 MB: fits
    assert mem.in_memory and "decoding each once into memory" in capsys.readouterr().out
    stream = ImageCache(ds.sources, budget_mb=0.5)                 # does not fit: streaming, with the reason printed
    out = capsys.readouterr().out
    assert not stream.in_memory and out.count("\n") == 1
    assert "16 images at 128x128 need 0.75 MB as uint8 > the cache budget 0.50 MB (crops.cache_mb): streaming" in out
    idx = [3, 0, 15, 3]
    assert torch.equal(mem.get(idx)[0], stream.get(idx)[0])
    # unreadable files: counted once in memory, skipped in both modes; a resize + center crop for other sizes
    pils[0].save(tmp_path / "a.png"); pils[1].resize((200, 100)).save(tmp_path / "wide.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    srcs = [tmp_path / "a.png", tmp_path / "bad.jpg", tmp_path / "wide.png"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for budget in (10, 0):
            c = ImageCache(srcs, budget_mb=budget, verbose=False)
            x, keep = c.get([0, 1, 2])
            assert keep == [0, 2] and x.shape == (2, 3, 128, 128) and c.hw == (128, 128)
            assert torch.equal(x[0], images[0][0])
            assert torch.equal(x[1], torch.from_numpy(__import__("numpy").array(D.fit_image(pils[1].resize((200, 100)), (128, 128)))).permute(2, 0, 1))
        assert any("bad.jpg" in str(m.message) for m in w)
    assert ImageCache(srcs, budget_mb=10, verbose=False).n_bad == 1
    sized = ImageCache(srcs, size=48, verbose=False)
    assert sized.get([2])[0].shape == (1, 3, 48, 48)
    cached = CachedMultiCrop(ImageDataset(srcs), TINY, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        views, labels, skipped = cached.__getitems__([(0, 0), (0, 1), (0, 2)])
        assert skipped == 1 and len(labels) == 2 and views[0].shape == (2, 3, 64, 64)
        assert cached.__getitems__([(0, 1)]) == (None, None, 1) and cached[(0, 1)] is None


def test_fit_image_is_identity_at_size_and_crops_the_center():
    img = Image.fromarray((torch.arange(60 * 40 * 3) % 251).to(torch.uint8).reshape(40, 60, 3).numpy())
    assert D.fit_image(img, (40, 60)) is img
    out = D.fit_image(img, (20, 20))
    assert out.size == (20, 20)
    assert D.fit_image(img, (40, 40)).tobytes() == img.crop((10, 0, 50, 40)).tobytes()   # same height: a pure center crop


def test_bad_inputs_have_clear_errors(images):
    x, _, _ = images
    bm = BatchedMultiCrop(TINY)
    with pytest.raises(ValueError, match="uint8"): bm(x.float(), range(16))
    with pytest.raises(ValueError, match="16 images but 3 seeds"): bm(x, range(3))
    with pytest.raises(ValueError, match="resolution group 2"): bm(x, range(16), group=2)
    with pytest.raises(ValueError, match="'pil' or 'batched'"): MultiCropConfig(backend="kornia")
    with pytest.raises(ValueError, match="cache_mb"): MultiCropConfig(cache_mb=-1)
    two = MultiCropConfig(n_local=1, resolutions=((32, 16, 0, 1.0), (48, 24, 0, 1.0)))
    cached = CachedMultiCrop(ImageDataset([Image.fromarray(x[0].permute(1, 2, 0).numpy())] * 2), two, verbose=False)
    assert [v.shape[-1] for v in cached.__getitems__([(0, 0, 1), (0, 1, 1)])[0]] == [48, 48, 24]
    with pytest.raises(ValueError, match="mixes resolution groups"): cached.__getitems__([(0, 0, 0), (0, 1, 1)])


# ------------------------------------------------------------------ CSV lists
def test_csv_list(shared_data, tmp_path):
    src = sorted((shared_data / "imagenette2-128" / "train" / "tench").iterdir())[:3]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jpg").symlink_to(src[0])
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,label\nsub/x.jpg,2\n{src[1]},\n{src[2]},7\n")
    ds, where = resolve_data(lst, verbose=False)
    assert where == str(lst) and len(ds) == 3 and ds.labels == [2, -1, 7] and ds.sources[0] == tmp_path / "sub" / "x.jpg"
    assert ds[0][0].size == (128, 128)
    (tmp_path / "nolabel.csv").write_text(f"path\n{src[0]}\n")
    assert ImageDataset.from_csv(tmp_path / "nolabel.csv").labels == [-1]
    named = tmp_path / "named.csv"
    named.write_text(f"path,split,label\n{src[0]},train,tench\n{src[1]},val,dog\n{src[2]},train,dog\n")
    tr, va = ImageDataset.from_csv(named, "train"), resolve_data(named, "val", verbose=False)[0]
    assert (tr.labels, tr.classes, len(va), va.labels) == ([1, 0], ["dog", "tench"], 1, [0])
    # the shared data set's own list: 7,469 train rows with class names
    files = shared_data / "imagenette2-128" / "files.csv"
    full = ImageDataset.from_csv(files, "train")
    folder = ImageDataset.from_folder(shared_data / "imagenette2-128", "train")
    assert len(full) == len(folder) and full.classes == folder.classes
    assert sorted(zip(map(str, full.sources), full.labels)) == sorted(zip(map(str, folder.sources), folder.labels))


def test_csv_list_errors(shared_data, tmp_path):
    src = sorted((shared_data / "imagenette2-128" / "train" / "tench").iterdir())[0]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label\n{src},1\nmissing/nope.jpg,2\n")
    with pytest.raises(FileNotFoundError, match=r"row 3: .*missing/nope\.jpg"): resolve_data(bad, verbose=False)
    with pytest.raises(FileNotFoundError, match="does not exist"): resolve_data(tmp_path / "absent.csv", verbose=False)
    (tmp_path / "nopath.csv").write_text(f"file,label\n{src},1\n")
    with pytest.raises(ValueError, match="'path' column"): ImageDataset.from_csv(tmp_path / "nopath.csv")
    (tmp_path / "flat.csv").write_text(f"path\n{src}\n")
    with pytest.raises(FileNotFoundError, match="no 'split' column"): resolve_data(tmp_path / "flat.csv", "val", verbose=False)
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(FileNotFoundError, match="lists no images"): resolve_data(tmp_path / "empty.csv", verbose=False)


def test_dino_train_reads_a_csv_list(shared_data, tmp_path):
    "`dino-train --data list.csv` trains, and the run's recipe keeps the list as its data path."
    from dino_from_scratch import cli
    folder = make_small_folder(shared_data, tmp_path / "imgs", n_classes=2, n_train=6, n_val=2)
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted((folder / "train").rglob("*.jpg"))]
    lst = tmp_path / "list.csv"
    lst.write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    cli.main(["--recipe", "tiny_v1", "--data", str(lst), "--out", str(out), "--max-steps", "1", "--no-eval",
                "--set", *SMALL_OVERRIDES])
    assert list((out / "checkpoints").glob("step_*.safetensors"))
    assert str(lst) in (out / "recipe.yaml").read_text()


def test_cpu_plan():
    "One loader worker and one torch thread on 2 cores; no worker on 1 core; more workers for the PIL path on many cores."
    from dino_from_scratch.data import cpu_plan
    assert {k: cpu_plan("batched", 2)[k] for k in ("threads", "num_workers")} == {"threads": 1, "num_workers": 1}
    assert {k: cpu_plan("batched", 1)[k] for k in ("threads", "num_workers")} == {"threads": 1, "num_workers": 0}
    assert {k: cpu_plan("batched", 32)[k] for k in ("threads", "num_workers")} == {"threads": 28, "num_workers": 4}
    assert {k: cpu_plan("pil", 8)[k] for k in ("threads", "num_workers")} == {"threads": 4, "num_workers": 4}
    assert isinstance(cpu_plan()["bf16"], bool)
    with pytest.raises(ValueError, match="'pil' or 'batched'"): cpu_plan("gpu")
    # bf16 autocast only where it measured faster: a native-bf16 CPU and a model at least BF16_MIN_WIDTH wide
    from dino_from_scratch.data import _native_bf16, BF16_MIN_WIDTH
    assert cpu_plan(embed_dim=BF16_MIN_WIDTH - 1)["bf16"] is False and cpu_plan()["bf16"] is False
    assert cpu_plan(embed_dim=BF16_MIN_WIDTH)["bf16"] is _native_bf16()


def test_trainer_threads(shared_data, tmp_path):
    "A CPU run takes the cores its loader workers leave (never more than already set); run.threads wins."
    import torch
    from dino_from_scratch.config import override, tiny_v1
    from dino_from_scratch.train import Trainer
    from dino_from_scratch.data import resolve_data
    ds = resolve_data(str(shared_data / "imagenette2-128"), "train", verbose=False)[0].subset(16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Trainer(override(tiny_v1(), ["data.num_workers=1", "data.batch_size=8"]), tmp_path / "a", dataset=ds, verbose=False)
        assert torch.get_num_threads() == (1 if (os.cpu_count() or 1) <= 2 else 2)      # 2 cores - 1 worker
        torch.set_num_threads(1)
        Trainer(override(tiny_v1(), ["data.num_workers=0", "data.batch_size=8"]), tmp_path / "b", dataset=ds, verbose=False)
        assert torch.get_num_threads() == 1                                          # never raised above what was set
        Trainer(override(tiny_v1(), ["data.num_workers=0", "data.batch_size=8", "run.threads=2"]), tmp_path / "c", dataset=ds, verbose=False)
        assert torch.get_num_threads() == 2                                          # an explicit run.threads wins
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="run.threads must be >= 0"): override(tiny_v1(), ["run.threads=-1"])
    with pytest.raises(ValueError, match="run.processes must be >= 1"): override(tiny_v1(), ["run.processes=0"])
