"""DINOv2 end to end: the trainer a recipe picks, exact resume with masks and three loss terms, bad configurations,
and two processes computing the same losses as one (Sinkhorn-Knopp and iBOT normalisation stay global)."""
import os, socket, sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import SMALL_OVERRIDES, make_small_folder, run_cli, read_metrics, optimizer_of, one_thread, fresh as _fresh  # noqa: E402,F401

from dino_from_scratch import data, train, cli, checkpoint  # noqa: E402
from dino_from_scratch.config import tiny_v2, override  # noqa: E402
from dino_from_scratch.dinov2 import DINOv2Trainer  # noqa: E402

V2_SMALL = SMALL_OVERRIDES + ["ibot.out_dim=48"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "One intra-op thread (see dino_test_utils.one_thread)."


def small_v2(*extra):
    return override(tiny_v2(), V2_SMALL + list(extra))


def test_recipe_picks_the_v2_trainer(train_images, tmp_path):
    t = cli.make_trainer(small_v2(), out=tmp_path, dataset=_fresh(train_images), verbose=False)
    assert isinstance(t, DINOv2Trainer)
    assert type(cli.make_trainer(override(tiny_v2(), V2_SMALL + ["ibot.loss_weight=0", "loss.koleo_weight=0"]),
                                   out=tmp_path / "b", dataset=_fresh(train_images), verbose=False)) is train.Trainer


def test_koleo_without_ibot_needs_no_masks(train_images, tmp_path):
    "KoLeo alone (iBOT off) on a ViT without a mask token: no masks drawn, no patch head built, loss = DINO + w * KoLeo."
    from dino_from_scratch.config import tiny_v1
    r = override(tiny_v1(), SMALL_OVERRIDES + ["loss.koleo_weight=0.1"])
    assert r.model.mask_token is False and r.ibot.loss_weight == 0
    t = cli.make_trainer(r, out=tmp_path, dataset=_fresh(train_images), verbose=False)
    assert isinstance(t, DINOv2Trainer) and t.student.ibot_head is None
    assert not any(k.startswith("ibot_head") for k in t.student.state_dict())
    h = t.fit(max_steps=2, progress=False)
    assert all(m["n_masked"] == 0 and m["ibot_loss"] == 0 and m["koleo_loss"] != 0 for m in h)
    assert h[-1]["loss"] == pytest.approx(h[-1]["dino_loss"] + 0.1 * h[-1]["koleo_loss"], rel=1e-6)


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
def test_v2_resume_is_bit_identical(train_images, tmp_path, centering):
    r = small_v2("optim.epochs=3", f"loss.centering={centering}", f"ibot.centering={centering}")   # 6 steps
    straight = DINOv2Trainer(r, out=tmp_path / "straight", dataset=_fresh(train_images), verbose=False)
    h = straight.fit(max_steps=6, progress=False)
    assert all(m["ibot_loss"] > 0 and m["n_masked"] > 0 and abs(m["koleo_loss"]) > 0 for m in h)
    assert h[-1]["loss"] == pytest.approx(h[-1]["dino_loss"] + h[-1]["ibot_loss"] + 0.1 * h[-1]["koleo_loss"], rel=1e-5)

    first = DINOv2Trainer(r, out=tmp_path / "split", dataset=_fresh(train_images), verbose=False)
    first.fit(max_steps=3, progress=False)
    del first
    second = DINOv2Trainer(r, out=tmp_path / "split", dataset=_fresh(train_images), resume=True, verbose=False)
    assert second.step == 3
    second.fit(max_steps=6, progress=False)
    for name in ("student", "teacher", "loss_fn"):
        sa, sb = getattr(straight, name).state_dict(), getattr(second, name).state_dict()
        assert sa.keys() == sb.keys() and len(sa) > 0
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after resume"
    if centering == "softmax":   # the iBOT center is state too, and it moved
        assert straight.loss_fn["ibot"].center.abs().sum() > 0
    oa, ob = optimizer_of(straight).state_dict(), optimizer_of(second).state_dict()
    for pid in oa["state"]:
        assert torch.equal(oa["state"][pid]["exp_avg"], ob["state"][pid]["exp_avg"])
    assert [m["loss"] for m in read_metrics(tmp_path / "straight")] == [m["loss"] for m in read_metrics(tmp_path / "split")]


def test_cli_trains_tiny_v2_and_high_res_phase(shared_data, tmp_path):
    folder = make_small_folder(shared_data, tmp_path / "data")
    common = ["--data", folder, "--no-eval", "--set", *V2_SMALL]
    p = run_cli("dino-train", "--recipe", "tiny_v2", "--out", tmp_path / "low", "--max-steps", 2, *common)
    assert p.returncode == 0, p.stderr[-3000:]
    m = read_metrics(tmp_path / "low")
    assert {"dino_loss", "ibot_loss", "koleo_loss"} <= set(m[-1])
    # high-resolution phase: start from those weights at 2x the crop size, position embedding resized
    p = run_cli("dino-train", "--recipe", "tiny_v2", "--out", tmp_path / "high", "--max-steps", 1, *common,
                "data.crops.global_size=128", "data.crops.local_size=64", "model.img_size=128",
                f"run.init_from={tmp_path / 'low'}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[init] weights from" in p.stdout
    low, _ = checkpoint.read_checkpoint(checkpoint.list_checkpoints(tmp_path / "low")[0])
    high, _ = checkpoint.read_checkpoint(checkpoint.list_checkpoints(tmp_path / "high")[0])
    assert low["student.backbone.pos_embed"].shape[1] == 1 + 4 * 4 and high["student.backbone.pos_embed"].shape[1] == 1 + 8 * 8
    # a model that does not fit is refused with the names of the tensors
    p = run_cli("dino-train", "--recipe", "tiny_v2", "--out", tmp_path / "bad", "--max-steps", 1, *common,
                "model.embed_dim=64", f"run.init_from={tmp_path / 'low'}")
    assert p.returncode != 0 and "run.init_from" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("overrides, message", [
    (["mask.ratio_min=-0.1"], "mask.ratio_min"),
    (["mask.ratio_max=1.2"], "mask.ratio_max"),
    (["model.num_registers=-1"], "model.num_registers"),
    (["data.crops.global_size=72"], "data.crops.global_size (72) must be a multiple of model.patch_size (16)"),
    (["ibot.separate_head=false"], "ibot.out_dim (256) must equal head.out_dim (64)"),
    (["model.mask_token=false"], "model.mask_token"),
])
def test_bad_v2_configs_name_the_field(overrides, message):
    with pytest.raises((ValueError, KeyError), match=message.replace("(", r"\(").replace(")", r"\)")):
        override(tiny_v2(), ["head.out_dim=64"] + overrides)


def test_bad_v2_config_cli(tmp_path):
    p = run_cli("dino-train", "--recipe", "tiny_v2", "--print-recipe", "--set", "mask.ratio_max=1.5")
    assert p.returncode != 0 and "mask.ratio_max" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------- two processes = one process
def _losses(student_cls, teacher_cls, student_patch, teacher_patch, masks, temp=0.05):
    "DINO CLS loss with Sinkhorn-Knopp and the iBOT loss with Sinkhorn-Knopp, on this process's share."
    from dino_from_scratch.dino import DINOLoss, DINOLossConfig
    from dino_from_scratch.ibot import IBOTPatchLoss, IBOTConfig, mask_weights
    dl = DINOLoss(student_cls.shape[-1], DINOLossConfig(centering="sinkhorn"))
    il = IBOTPatchLoss(IBOTConfig(out_dim=teacher_patch.shape[-1], centering="sinkhorn"))
    l_dino = dl(student_cls, teacher_cls, temp)
    idx = masks.flatten().nonzero().flatten()
    p = il.teacher_probs(teacher_patch.flatten(0, 1)[idx], temp)
    l_ibot = il.forward_masked(student_patch.flatten(0, 1)[idx], p, mask_weights(masks), n_images=masks.shape[0])
    return torch.stack([l_dino, l_ibot])


def _inputs():
    g = torch.Generator().manual_seed(0)
    B, N, K = 8, 9, 12
    masks = torch.rand(2 * B, N, generator=g) < 0.4
    masks[::2] = False                               # half of the crops unmasked, as DINOv2
    return (torch.randn(4, B, K, generator=g), torch.randn(2, B, K, generator=g),
            torch.randn(2 * B, N, K, generator=g), torch.randn(2 * B, N, K, generator=g), masks)


def _worker(rank, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        s_cls, t_cls, s_patch, t_patch, masks = _inputs()
        B = s_cls.shape[1]
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        # this rank's images: views [V, B/2, K]; global crops are laid out crop-major ([crop 0 of all, crop 1 of all])
        rows = torch.cat([torch.arange(B)[half] + c * B for c in range(2)])
        loss = _losses(s_cls[:, half], t_cls[:, half], s_patch[rows], t_patch[rows], masks[rows])
        dist.all_reduce(loss); loss /= 2                 # what DDP's gradient averaging optimises
        q.put((rank, loss.tolist()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(2)]
    for p in procs: p.start()
    for p in procs: p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = dict(q.get() for _ in range(2))
    one = _losses(*_inputs()).tolist()
    for r in range(2):
        assert got[r] == pytest.approx(one, abs=1e-5), (got[r], one)
