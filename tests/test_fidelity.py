"""Fidelity to the official recipes (issue 14): what an epoch is, the Gram teacher at the start of the Gram stage, the
high-resolution stage's starting weights, DINOv3's plain linear head, DINOv3's mask sampling, DINOv2 ViT-L/g's iBOT
bottleneck, the center update on [N, K] teacher outputs, and the presets against the official configs."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import SMALL_OVERRIDES, one_thread, fresh as _fresh  # noqa: E402,F401

from dino_from_scratch.config import tiny_v2, override, get_recipe  # noqa: E402
from dino_from_scratch.schedules import Schedules  # noqa: E402
from dino_from_scratch.gram import gram_refresh_due, gram_loss  # noqa: E402
from dino_from_scratch.dino import DINOHead, HeadConfig, DINOLoss, DINOLossConfig  # noqa: E402
from dino_from_scratch.dinov3 import DINOv3Trainer, add_v3_weight_schedules  # noqa: E402
from dino_from_scratch.dinov2 import DINOv2Trainer  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "One intra-op thread (see dino_test_utils.one_thread)."


def small(*extra):
    return override(tiny_v2(), SMALL_OVERRIDES + ["ibot.out_dim=48", "optim.epochs=4", "optim.schedule=constant"] + list(extra))


# --- an epoch is OFFICIAL_EPOCH_LENGTH iterations in the official presets --------------------------------------------
@pytest.mark.parametrize("n_images", [10_000, 1_281_167, 142_000_000])
def test_7b_gram_preset_refreshes_at_the_official_iterations_whatever_the_data_size(n_images):
    r = get_recipe("dinov3_vit7b16_gram")
    gpus = 256
    total_batch = r.data.batch_size * gpus
    s = Schedules(r.optim, r.loss, max(1, n_images // total_batch), total_batch)
    add_v3_weight_schedules(r, s)
    assert len(s) == 1_200_000                                     # 1,200 epochs of OFFICIAL_EPOCH_LENGTH 1,000
    refreshes = [it for it in range(1_000_000, len(s)) if gram_refresh_due(it, r.gram)]
    assert refreshes == [1_010_000, 1_020_000, 1_030_000]          # dinov3_vit7b16_gram_anchor.yaml: 3 updates
    w = s.extra["gram_weight"]
    assert w[999_999] == 0 and 0 < w[1_000_500] < 2.0 and w[1_001_000] == 2.0   # ramps from the stage start (1M)
    assert s.extra["local_weight"][1_001_000] == 0.5


def test_epoch_length_sets_every_schedule():
    r = override(tiny_v2(), ["optim.epoch_length=10", "optim.epochs=3", "optim.warmup_epochs=1",
                             "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07", "loss.warmup_teacher_temp_epochs=2",
                             "optim.freeze_last_layer_epochs=1"])
    s = Schedules(r.optim, r.loss, steps_per_epoch=7, total_batch=32)   # a data pass (7 steps) does not matter
    assert len(s) == 30 and s.freeze_last_layer_steps == 10
    assert s.teacher_temp[18] < 0.07 and s.teacher_temp[19] == pytest.approx(0.07)   # 20 warm-up steps, the last at 0.07
    with pytest.raises(ValueError, match="optim.epoch_length must be an integer >= 1"):
        override(tiny_v2(), ["optim.epoch_length=0"])


# --- the Gram stage's first Gram teacher comes from gram.ckpt ----------------------------------------------------------
def test_gram_stage_starts_with_the_gram_teacher_from_its_checkpoint(train_images, tmp_path):
    src = DINOv2Trainer(small("run.ckpt_every=3"), out=tmp_path / "pre", dataset=_fresh(train_images), verbose=False)
    src.fit(max_steps=3, progress=False)
    stage = small("gram.loss_weight=1.0", "gram.it_first_update=1000", f"gram.ckpt={tmp_path / 'pre'}")
    t = DINOv3Trainer(stage, out=tmp_path / "gram", dataset=_fresh(train_images), verbose=False)
    g = t.loss_fn["gram"]
    assert int(g.n_updates) == 1
    for a, b in zip(g.backbone.state_dict().values(), src.teacher.backbone.state_dict().values()): assert torch.equal(a, b)
    assert not torch.equal(next(g.backbone.parameters()), next(t.teacher.backbone.parameters()))   # not the new EMA teacher
    h = t.fit(max_steps=2, progress=False)
    assert all(m["gram_loss"] > 0 for m in h)                      # on from the first step, no refresh needed
    resumed = DINOv3Trainer(stage, out=tmp_path / "gram", dataset=_fresh(train_images), resume=True, verbose=False)
    assert int(resumed.loss_fn["gram"].n_updates) == 1             # the checkpoint's Gram teacher, not loaded again
    with pytest.raises(FileNotFoundError, match="gram.ckpt: .* does not exist"):
        DINOv3Trainer(override(stage, [f"gram.ckpt={tmp_path / 'nothing'}"]), out=tmp_path / "x",
                      dataset=_fresh(train_images), verbose=False)


# --- the high-resolution stage starts its student from the Gram stage's teacher ----------------------------------------
def test_init_student_from_teacher(train_images, tmp_path):
    src = DINOv2Trainer(small("run.ckpt_every=3", "optim.momentum_teacher=0.5"), out=tmp_path / "a",
                        dataset=_fresh(train_images), verbose=False)
    src.fit(max_steps=3, progress=False)
    t = DINOv2Trainer(small("run.init_student_from=teacher", f"run.init_from={tmp_path / 'a'}"), out=tmp_path / "b",
                      dataset=_fresh(train_images), verbose=False)
    for a, b, c in zip(t.student.parameters(), src.teacher.parameters(), t.teacher.parameters()):
        assert torch.equal(a, b) and torch.equal(c, b)
    assert any(not torch.equal(a, b) for a, b in zip(src.student.parameters(), src.teacher.parameters()))
    h = get_recipe("dinov3_vit7b16_highres")
    assert h.run.init_student_from == "teacher" and h.run.init_from == h.gram.ckpt == "runs/dinov3_vit7b16_gram"
    with pytest.raises(ValueError, match="run.init_student_from must be 'student' or 'teacher'"):
        small("run.init_student_from=ema")


# --- DINOv3 heads: a plain linear last layer ---------------------------------------------------------------------------
def test_linear_last_layer_head():
    torch.manual_seed(0)
    h = DINOHead(32, HeadConfig(out_dim=1000, hidden_dim=64, bottleneck_dim=16, last_layer="linear"))
    assert type(h.last_layer) is nn.Linear and h.last_layer.bias is None
    assert {n for n, _ in h.last_layer.named_parameters()} == {"weight"}
    w = h.last_layer.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002        # trunc_normal_(std=0.02), as DINOv3
    x = torch.randn(5, 32)
    z = nn.functional.normalize(h.mlp(x), dim=-1)
    torch.testing.assert_close(h(x), z @ w.T)
    for name in ("dinov3_vit7b16", "dinov3_vit7b16_gram", "dinov3_vit7b16_highres", "dinov3_vitl16_im1k"):
        assert get_recipe(name).head.last_layer == "linear", name
    assert get_recipe("dinov2_vitl14").head.last_layer == "weight_norm"
    with pytest.raises(ValueError, match="head.last_layer must be 'weight_norm' or 'linear'"):
        HeadConfig(last_layer="cosine")


def test_dinov3_presets_sample_masks_the_v3_way_and_v2_large_ibot_bottleneck():
    from dino_from_scratch.config import PRESETS
    for name in PRESETS:
        r = get_recipe(name)
        if name.startswith("dinov3") or name == "distill_vits16_from_vitl16": assert r.mask.mode == "v3", name
        if name.startswith("dinov2"): assert r.mask.mode == "v2", name
    for name in ("dinov2_vitl14", "dinov2_vitg14"):
        r = get_recipe(name)
        assert (r.head.bottleneck_dim, r.ibot.bottleneck_dim or r.head.bottleneck_dim) == (384, 256), name


# --- DINOLoss.update_center on [N, K] -----------------------------------------------------------------------------------
def test_update_center_on_two_dimensional_teacher_outputs():
    loss = DINOLoss(4, DINOLossConfig(center_momentum=0.5))
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    loss.update_center(t)
    torch.testing.assert_close(loss.center, torch.tensor([[1.0, 1.0, 1.0, 1.0]]))    # 0.5 * 0 + 0.5 * column means
    loss3 = DINOLoss(4, DINOLossConfig(center_momentum=0.5))
    loss3.update_center(t.view(2, 1, 4))                                                # [T, B, K]: the same rows
    torch.testing.assert_close(loss3.center, loss.center)
    with pytest.raises(ValueError, match=r"update_center needs teacher outputs \[\.\.\., 4\]"):
        loss.update_center(torch.zeros(2, 5))


# --- Gram remove_only_teacher_neg = MSE(student, relu(teacher)) --------------------------------------------------------
def test_remove_only_teacher_neg_is_mse_against_relu_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    gs = nn.functional.normalize(s, dim=-1) @ nn.functional.normalize(s, dim=-1).transpose(1, 2)
    gt = nn.functional.normalize(t, dim=-1) @ nn.functional.normalize(t, dim=-1).transpose(1, 2)
    assert ((gs < 0) & (gt < 0)).any()                              # a case where the two readings differ
    torch.testing.assert_close(gram_loss(s, t, remove_only_teacher_neg=True), ((gs - gt.clamp(min=0)) ** 2).mean())


# --- the fidelity table ------------------------------------------------------------------------------------------------
def _flat(d, pre=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("weight_schedule", "local_weight_schedule"): out.update(_flat(v, f"{pre}{k}."))
        else: out[f"{pre}{k}"] = v
    return out


def test_fidelity_table_is_in_sync_with_the_presets():
    from dino_from_scratch.config import PRESETS, DEVIATIONS, fidelity_table, _NOT_OFFICIAL
    assert set(DEVIATIONS) == set(PRESETS) - _NOT_OFFICIAL                  # every official preset has its (maybe empty) list
    table = fidelity_table()
    for name, devs in DEVIATIONS.items():
        flat = _flat(get_recipe(name).to_dict())
        assert f"| `{name}` |" in table
        for d in devs:
            assert d.ours != d.official and d.source and d.reason, (name, d)
            assert f"`{d.field}` | {d.ours} | {d.official} | {d.source} |" in table
            if d.field in flat:                                              # a recipe field: the preset holds `ours`
                v = flat[d.field]
                assert (list(v) if isinstance(v, (list, tuple)) else v) == d.ours, (name, d.field, v, d.ours)
        if not devs: assert f"| `{name}` | (matches the official config) |" in table
    for name in _NOT_OFFICIAL: assert f"`{name}`" not in table


def test_presets_are_derived_and_derive_refuses_unknown_fields():
    from dino_from_scratch.config import derive, dinov2_vitl14, dinov2_vitg14, recipe_diff
    d = recipe_diff(dinov2_vitl14(), dinov2_vitg14())                      # vitg14.yaml vs vitl14.yaml: backbone + batch
    assert all(k in ("name", "data.batch_size") or k.startswith("model.") for k in d), d
    with pytest.raises(KeyError, match="derive: unknown field 'optim.lrr'"):
        derive(tiny_v2(), {"optim.lrr": 1.0})
    with pytest.raises(KeyError, match="derive: unknown section 'optimm'"):
        derive(tiny_v2(), {"optimm.lr": 1.0})


# --- conventions per generation ----------------------------------------------------------------------------------------
def test_warmup_reaches_the_peak_on_its_last_step_for_v1_v2_but_not_v3():
    r = override(tiny_v2(), ["optim.warmup_epochs=1", "optim.epochs=3", "optim.lr_scaling=none", "optim.lr=0.1"])
    s = Schedules(r.optim, r.loss, steps_per_epoch=5, total_batch=32)
    assert s.lr[4] == pytest.approx(0.1) and s.lr[5] == pytest.approx(0.1)          # np.linspace(0, peak, 5): 0 ... peak
    assert list(s.lr[:5]) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    c = Schedules(override(r, ["optim.schedule=constant"]).optim, r.loss, steps_per_epoch=5, total_batch=32)
    assert list(c.lr[:6]) == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.1])       # linear_warmup_cosine_decay: peak excluded


def test_dinov1_teacher_temperature_warms_up_per_epoch():
    r = get_recipe("dinov1_vits16")
    assert r.loss.teacher_temp_per_epoch and not get_recipe("dinov2_vitl14").loss.teacher_temp_per_epoch
    s = Schedules(r.optim, r.loss, steps_per_epoch=4, total_batch=1024)
    t = s.teacher_temp.reshape(-1, 4)
    assert (t == t[:, :1]).all()                                                     # constant within an epoch
    assert t[0, 0] == pytest.approx(0.04) and t[1, 0] == pytest.approx(0.04 + 0.03 / 29) and t[29, 0] == pytest.approx(0.07)
    v2 = Schedules(get_recipe("dinov2_vits14").optim, get_recipe("dinov2_vits14").loss, 1, 1024)
    assert v2.teacher_temp[1] > v2.teacher_temp[0] and v2.teacher_temp[30 * 1250 - 1] == pytest.approx(0.07)


def test_trunc_extra_cosine_matches_dinov3_formula():
    from dino_from_scratch.schedules import cosine_schedule
    import numpy as np
    v = cosine_schedule(1.0, 0.1, 100, trunc_extra=0.25)
    c = (np.cos(np.linspace(0, np.pi, 125)[:100]) + 1) / 2                      # DINOv3 CosineScheduler, by hand
    assert v[0] == pytest.approx(1.0) and v[-1] == pytest.approx(0.1)
    assert v[50] == pytest.approx(0.1 + 0.9 * (c[50] - c[-1]) / (1 - c[-1]))
    assert v[50] > cosine_schedule(1.0, 0.1, 100)[50]                            # higher midway, a steeper end


@pytest.mark.parametrize("mode", ["grad", "lr"])
def test_freezing_the_last_layer_by_lr_keeps_adamw_moments(train_images, tmp_path, mode):
    r = small(f"optim.freeze_last_layer_mode={mode}", "optim.freeze_last_layer_epochs=100")
    t = DINOv2Trainer(r, out=tmp_path / mode, dataset=_fresh(train_images), verbose=False)
    w0 = t.student.head.last_layer.weight_v.detach().clone()
    t.fit(max_steps=2, progress=False)
    assert torch.equal(t.student.head.last_layer.weight_v, w0)                    # frozen either way
    opt = t.opt.optimizer if hasattr(t.opt, "optimizer") else t.opt
    state = opt.state.get(t.student.head.last_layer.weight_v, {})
    moved = "exp_avg" in state and state["exp_avg"].abs().sum() > 0
    assert moved == (mode == "lr")                                                   # DINOv2/v3: moments accumulate
    assert get_recipe("dinov2_vitl14").optim.freeze_last_layer_mode == "lr" and get_recipe("dinov1_vits16").optim.freeze_last_layer_mode == "grad"


def test_batch_subset_drop_path_threshold_and_token_init():
    from dino_from_scratch.vit import VisionTransformer, ViTConfig
    from dino_from_scratch.vit_v2 import dinov2_vit_config
    from dino_from_scratch.vit_v3 import dinov3_vit_config
    kw = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.05, drop_path_mode="uniform",
              num_registers=4)
    assert not any(b.batch_subset for b in VisionTransformer(ViTConfig(**kw)).blocks)                     # DINOv2: only above 0.1
    assert all(b.batch_subset for b in VisionTransformer(ViTConfig(**kw, drop_path_subset_above=0.0)).blocks)   # DINOv3: any > 0
    assert dinov3_vit_config("vits16").drop_path_subset_above == 0.0 and dinov2_vit_config("vits14").drop_path_subset_above == 0.1
    torch.manual_seed(0)
    v2 = VisionTransformer(ViTConfig(**{**kw, "embed_dim": 384, "num_heads": 6}, token_init="dinov2"))
    v3 = VisionTransformer(ViTConfig(**{**kw, "embed_dim": 384, "num_heads": 6}, token_init="dinov3"))
    assert v2.cls_token.std() < 1e-5 and v2.register_tokens.std() < 1e-5
    assert 0.015 < v3.cls_token.std() < 0.025 and 0.015 < v3.register_tokens.std() < 0.025
    assert get_recipe("dinov2_vitl14").model.token_init == "dinov2" and get_recipe("dinov3_vit7b16").model.token_init == "dinov3"
    for name in ("dinov1_vits16", "dinov1_vitb16", "dinov2_vits14", "dinov2_vitg14"):
        assert get_recipe(name).model.interpolate_offset == 0.1, name


def test_official_presets_blur_with_torchvision_kernel_9(train_images):
    from PIL import Image
    from dino_from_scratch.data import RandomGaussianBlur
    import torchvision.transforms.v2.functional as TF
    img = Image.new("RGB", (32, 32)); img.putpixel((16, 16), (255, 255, 255))
    torch.manual_seed(0)
    out = RandomGaussianBlur(1.0, 1.0, 1.0, kernel_size=9)(img)
    assert out.tobytes() == TF.gaussian_blur(img, [9, 9], [1.0, 1.0]).tobytes()
    assert out.tobytes() != RandomGaussianBlur(1.0, 1.0, 1.0)(img).tobytes()         # PIL radius blur differs
    for name in ("dinov2_vitl14", "dinov3_vitl16_im1k", "dinov3_vit7b16"):
        c = get_recipe(name).data.crops
        assert (c.blur_kernel, c.blur_radius) == (9, (0.1, 2.0)), name
    assert get_recipe("dinov1_vits16").data.crops.blur_kernel == 0                   # DINOv1: PIL radius


def test_koleo_topk_and_rope_min_max_periods():
    from dino_from_scratch.koleo import koleo_loss
    from dino_from_scratch.rope import rope_periods, Rope2D
    import math
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    z = nn.functional.normalize(x.double(), dim=-1)
    by_hand = []
    for i in range(6):
        d = sorted(float((z[i] - z[j]).norm()) for j in range(6) if j != i)
        by_hand.append(d)
    for k in (1, 2):
        want = -sum(math.log(d[m]) for d in by_hand for m in range(k)) / (6 * k)
        assert koleo_loss(x, eps=0.0, topk=k).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match=r"topk must be in \[1, n - 1\] = \[1, 5\]"):
        koleo_loss(x, topk=6)
    p = rope_periods(16, min_period=0.5, max_period=32.0)
    official = (32.0 / 0.5) ** torch.linspace(0, 1, 4, dtype=torch.float64) / (32.0 / 0.5) * 32.0   # dinov3 _init_weights
    torch.testing.assert_close(p, official.float())
    assert torch.equal(Rope2D(16, min_period=0.5, max_period=32.0).periods, p)
    with pytest.raises(ValueError, match="min_period and max_period go together"):
        rope_periods(16, min_period=1.0)
    from dino_from_scratch.vit import VisionTransformer, ViTConfig
    v = VisionTransformer(ViTConfig(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, pos_embed="rope",
                                    rope_min_period=0.5, rope_max_period=32.0))
    assert torch.equal(v.rope.periods, p)
