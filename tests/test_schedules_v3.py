"""DINOv3's constant schedules inside the trainer's `Schedules` (optim.schedule='constant') and the `4 sqrt(B/1024)` rule."""
import numpy as np
import pytest

from dino_from_scratch.config import get_recipe, override
from dino_from_scratch.schedules import OptimConfig, Schedules, scaled_lr
from dino_from_scratch.schedules_v3 import warmup_cosine_constant


def test_constant_schedule_values_by_hand():
    o = OptimConfig(epochs=10, lr=1e-3, warmup_epochs=2, weight_decay=0.04, weight_decay_end=0.4,
                    momentum_teacher=0.994, momentum_teacher_end=1.0, schedule="constant", lr_scaling="none")
    r = get_recipe("tiny_v1")
    s = Schedules(o, r.loss, steps_per_epoch=3, total_batch=32)
    assert s.lr[:6].tolist() == pytest.approx([0, 1e-3 / 6, 2e-3 / 6, 3e-3 / 6, 4e-3 / 6, 5e-3 / 6])
    assert np.all(s.lr[6:] == 1e-3) and np.all(s.wd == 0.04) and np.all(s.momentum == 0.994)
    # the same as chapter 20's DINOv3 schedule with peak == end
    np.testing.assert_allclose(s.lr, warmup_cosine_constant(0.0, 1e-3, 1e-3, 6, 30))


def test_constant_schedule_can_be_extended_without_changing_the_past():
    r = get_recipe("tiny_v1")
    mk = lambda ep: Schedules(OptimConfig(epochs=ep, warmup_epochs=1, schedule="constant"), r.loss, 5, 64)
    short, long = mk(4), mk(9)
    for name in ("lr", "wd", "momentum", "teacher_temp"):
        np.testing.assert_array_equal(getattr(long, name)[:20], getattr(short, name))
    cos = lambda ep: Schedules(OptimConfig(epochs=ep, warmup_epochs=1), r.loss, 5, 64)
    assert not np.allclose(cos(9).lr[:20], cos(4).lr)


def test_dinov3_lr_rule_and_bad_values():
    assert scaled_lr(OptimConfig(lr=5e-5, lr_scaling="sqrt4"), 256 * 16) == pytest.approx(4e-4)   # ViT-7B: 256 GPUs x 16
    with pytest.raises(ValueError, match="optim.schedule"):
        override(get_recipe("tiny_v1"), ["optim.schedule=linear"])
    with pytest.raises(ValueError, match="sqrt4"):
        OptimConfig(lr_scaling="cubic")
