"""DINOv3's training stages: the Gram teacher's undistorted high-resolution crops, DINOv3's DINO-loss weighting and
its schedules, branching a run into a Gram-anchoring stage, mixed-resolution batches (resumed exactly), and the
official presets."""
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import SMALL_OVERRIDES, read_metrics, one_thread, fresh as _fresh  # noqa: E402,F401

from dino_from_scratch import train, cli  # noqa: E402
from dino_from_scratch.config import tiny_v2, override, get_recipe, recipe_diff  # noqa: E402
from dino_from_scratch.data import MultiCrop, MultiCropConfig, load_rgb  # noqa: E402
from dino_from_scratch.dinov2 import DINOv2Trainer  # noqa: E402
from dino_from_scratch.dinov3 import DINOv3Trainer
from dino_from_scratch.checkpoint import branch_run  # noqa: E402
from dino_from_scratch.train import StepBatches  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "One intra-op thread (see dino_test_utils.one_thread)."


def small(*extra):
    return override(tiny_v2(), SMALL_OVERRIDES + ["ibot.out_dim=48", "optim.epochs=4", "optim.schedule=constant"] + list(extra))


PLAIN = dict(jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


def test_gram_crops_are_the_same_box_at_twice_the_resolution(train_images):
    img = load_rgb(train_images.sources[0])
    cfg = MultiCropConfig(global_size=64, local_size=32, n_local=2, gram_size=128, **PLAIN)
    for seed in range(3):
        torch.manual_seed(seed)
        g1, g2, l1, l2, gr1, gr2 = MultiCrop(cfg)(img)
        assert gr1.shape[-1] == gr2.shape[-1] == 128 and l1.shape[-1] == 32
        d1 = F.interpolate(gr1[None], size=64, mode="bicubic", antialias=True)[0]
        d2 = F.interpolate(gr2[None], size=64, mode="bicubic", antialias=True)[0]
        own, cross = (d1 - g1).abs().mean().item(), (d1 - g2).abs().mean().item()
        assert own < 0.1 and own < cross / 3, (own, cross)     # copy 1 is crop 1's box, not crop 2's
        assert (d2 - g2).abs().mean().item() < 0.1


def test_gram_crops_skip_the_distortions_unless_asked(train_images):
    img = load_rgb(train_images.sources[1])
    strong = dict(jitter_p=1.0, gray_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=1.0)   # crop 2 always solarized
    for no_dist in (True, False):
        torch.manual_seed(0)
        g1, g2, gr1, gr2 = MultiCrop(MultiCropConfig(global_size=64, local_size=32, n_local=0, gram_size=128,
                                                     gram_no_distortion=no_dist, **strong))(img)
        d2 = F.interpolate(gr2[None], size=64, mode="bicubic", antialias=True)[0]
        err = (d2 - g2).abs().mean().item()
        assert (err > 0.3) if no_dist else (err < 0.1), (no_dist, err)   # undistorted copy differs from the solarized crop


def test_without_gram_size_the_views_are_unchanged(train_images):
    "gram_size=0 draws the same random numbers in the same order: two configs differing only in a no-op agree."
    img = load_rgb(train_images.sources[2])
    torch.manual_seed(5); a = MultiCrop(MultiCropConfig(global_size=48, local_size=32, n_local=3))(img)
    torch.manual_seed(5); b = MultiCrop(MultiCropConfig(global_size=48, local_size=32, n_local=3, gram_no_distortion=False))(img)
    assert len(a) == 5 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_mixed_resolution_groups_follow_the_ratios_on_every_rank():
    ratios = (0.3, 0.3, 0.3, 0.05, 0.05)
    r0, r1 = StepBatches(1000, 4, 0, 2, seed=3, ratios=ratios), StepBatches(1000, 4, 1, 2, seed=3, ratios=ratios)
    groups = [r0.group(s) for s in range(20000)]
    assert groups == [r1.group(s) for s in range(20000)]                        # every rank draws the same group
    freq = Counter(groups)
    for g, p in enumerate(ratios): assert abs(freq[g] / 20000 - p) < 0.015, (g, freq[g])
    batch = next(iter(StepBatches(1000, 4, seed=3, ratios=ratios)))
    assert all(len(k) == 3 and k[2] == groups[0] for k in batch)
    assert all(len(k) == 2 for k in next(iter(StepBatches(1000, 4, seed=3))))   # no ratios: (epoch, index) as before


def test_dinov3_dino_term_is_dinov2_at_local_weight_1_and_follows_the_schedule(train_images, tmp_path):
    t = DINOv3Trainer(small("gram.loss_weight=1.0"), out=tmp_path, dataset=_fresh(train_images), verbose=False)
    torch.manual_seed(0)
    logits, probs = torch.randn(6, 4, 16), torch.softmax(torch.randn(2, 4, 16), -1)
    tg = {"p_cls": probs, "metrics": {}}
    v3, parts = t.dino_term(logits, tg), tg["metrics"]
    assert torch.allclose(v3, t.loss_fn["dino"].loss_from_probs(logits, probs), atol=1e-6)
    # by hand: 2 global pairs and 8 local pairs; local weight 0.5 halves the local share
    t2 = DINOv3Trainer(small("gram.loss_weight=1.0", "loss.local_weight_schedule={start: 0.5, peak: 0.5, end: 0.5}"),
                       out=tmp_path / "b", dataset=_fresh(train_images), verbose=False)
    tg2 = {"p_cls": probs, "metrics": {}}
    half, p2 = t2.dino_term(logits, tg2), tg2["metrics"]
    assert p2["local_weight"] == 0.5
    assert abs(half.item() - (2 / 10 * parts["dino_global"] + 8 / 10 * 0.5 * parts["dino_local"])) < 1e-5
    # a schedule: 0 for the first 2 epochs, then a 1-epoch cosine to 2.0 (epochs of 2 steps here: 16 images / 8)
    t3 = DINOv3Trainer(small("gram.loss_weight=1.0", "gram.weight_schedule={start: 0, peak: 0, end: 2.0, warmup_epochs: 2, cosine_epochs: 1}"),
                       out=tmp_path / "c", dataset=_fresh(train_images), verbose=False)
    seen = []
    for s in range(8): seen.append(t3.sched[s]["gram_weight"])
    assert seen == [0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0]


def test_branching_a_run_into_a_gram_stage_with_real_gram_crops(train_images, tmp_path):
    base = small("run.ckpt_every=3")
    src = cli.make_trainer(base, out=tmp_path / "src", dataset=_fresh(train_images), verbose=False)
    assert type(src) is DINOv2Trainer
    src.fit(max_steps=3, progress=False)
    out = branch_run(tmp_path / "src", tmp_path / "gram", step=3)
    with pytest.raises(FileExistsError): branch_run(tmp_path / "src", out, step=3)
    with pytest.raises(FileNotFoundError): branch_run(tmp_path / "src", tmp_path / "x", step=2)
    stage = override(base, ["gram.loss_weight=1.0", "gram.it_first_update=3", "data.crops.gram_size=64"])
    t = cli.make_trainer(stage, out=out, dataset=_fresh(train_images), resume=True, verbose=False)
    assert type(t) is DINOv3Trainer and t.step == 3 and int(t.loss_fn["gram"].n_updates) == 0
    for a, b in zip(t.student.parameters(), src.student.parameters()): assert torch.equal(a, b)   # same weights
    h = t.fit(max_steps=5, progress=False)
    assert [m["gram_loss"] > 0 for m in h if m["step"] > 3] == [True, True]
    assert int(t.loss_fn["gram"].n_updates) == 1
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]          # the source's metrics came along


def test_mixed_resolution_gram_stage_resumes_exactly(train_images, tmp_path):
    r = small("gram.loss_weight=1.0", "gram.it_first_update=0", "gram.max_updates=1",
              "data.crops.resolutions=[[32, 16, 64, 0.5], [48, 16, 96, 0.5]]")
    straight = DINOv3Trainer(r, out=tmp_path / "a", dataset=_fresh(train_images), verbose=False)
    h = straight.fit(max_steps=6, progress=False)
    sizes = {straight.batches.group(s) for s in range(6)}
    assert sizes == {0, 1}                                                       # both sizes were trained on
    first = DINOv3Trainer(r, out=tmp_path / "b", dataset=_fresh(train_images), verbose=False)
    first.fit(max_steps=4, progress=False); del first
    second = DINOv3Trainer(r, out=tmp_path / "b", dataset=_fresh(train_images), resume=True, verbose=False)
    second.fit(max_steps=6, progress=False)
    for name in ("student", "teacher", "loss_fn"):
        sa, sb = getattr(straight, name).state_dict(), getattr(second, name).state_dict()
        for k in sa: assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after resume"
    assert all(m["gram_loss"] > 0 for m in h)


def test_dinov3_presets_match_the_official_configs():
    r = get_recipe("dinov3_vit7b16")
    with torch.device("meta"):
        from dino_from_scratch.vit import VisionTransformer
        n = sum(p.numel() for p in VisionTransformer(r.model).parameters())
    assert n == 6_716_043_264
    assert (r.head.out_dim, r.head.hidden_dim, r.head.bottleneck_dim) == (262144, 8192, 512)
    assert (r.ibot.out_dim, r.ibot.hidden_dim, r.ibot.bottleneck_dim) == (98304, 4096, 384)
    assert r.data.batch_size * 256 == 4096 and r.optim.schedule == "constant" and r.optim.lr_scaling == "sqrt4"
    g, h = get_recipe("dinov3_vit7b16_gram"), get_recipe("dinov3_vit7b16_highres")
    d = recipe_diff(r, g)
    assert d["gram.it_first_update"] == (0, 1_010_000) and d["data.crops.gram_size"] == (0, 512)
    assert d["optim.epochs"] == (1000, 1200) and d["optim.momentum_teacher"] == (0.994, 0.999)
    assert [x[3] for x in h.data.crops.resolutions] == [0.3, 0.3, 0.3, 0.05, 0.05] and h.gram.loss_weight == 1.5
    d = recipe_diff(get_recipe("dinov3_vitl16_7b_recipe"), r)                    # same recipe, another backbone
    assert "model.embed_dim" in d and all(k == "name" or k.startswith("model.") for k in d)


def test_bad_stage_configs_are_named():
    with pytest.raises(ValueError, match=r"resolutions\[1\] \(40\) must be a multiple of model.patch_size"):
        small("data.crops.resolutions=[[32, 16, 64, 0.5], [40, 16, 64, 0.5]]")
    with pytest.raises(ValueError, match="resolutions entries must be"):
        small("data.crops.resolutions=[[32, 16, 0.5]]")
    with pytest.raises(ValueError, match="gram.weight_schedule must be a dict with keys start, peak, end"):
        small("gram.weight_schedule={start: 0, stop: 1}")
    with pytest.raises(ValueError, match="loss.local_weight_schedule must be a dict"):
        small("loss.local_weight_schedule={peak: 1}")
    with pytest.raises(ValueError, match="gram_size"):
        small("data.crops.gram_size=40")


def test_cli_branch_from_continues_another_run_as_a_gram_stage(shared_data, tmp_path):
    from dino_test_utils import make_small_folder
    folder = make_small_folder(shared_data, tmp_path / "data")
    sets = SMALL_OVERRIDES + ["ibot.out_dim=48", "optim.epochs=4", "optim.schedule=constant", "run.ckpt_every=2"]
    common = ["--recipe", "tiny_v2", "--data", str(folder), "--no-eval"]
    cli.main(common + ["--out", str(tmp_path / "a"), "--max-steps", "2", "--set", *sets])
    branch = common + ["--out", str(tmp_path / "b"), "--branch-from", f"{tmp_path / 'a'}:2", "--max-steps", "4",
                       "--set", *sets, "gram.loss_weight=1.0", "gram.it_first_update=2"]
    cli.main(branch)
    m = read_metrics(tmp_path / "b")
    assert [x["step"] for x in m] == [1, 2, 3, 4] and "gram_loss" not in m[0] and m[-1]["gram_loss"] > 0
    with pytest.raises(SystemExit, match="already has checkpoints"): cli.main(branch)
    with pytest.raises(SystemExit, match="no checkpoint for step 3"):
        cli.main(common + ["--out", str(tmp_path / "c"), "--branch-from", f"{tmp_path / 'a'}:3"])
