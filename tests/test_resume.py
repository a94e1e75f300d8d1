"""Exact resume, damaged checkpoints, NaN losses and pickle-free checkpoints."""
import json, math, pickle, shutil, struct, sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import (SMALL_OVERRIDES, small_recipe, make_small_folder, run_cli, read_metrics,  # noqa: E402
                             optimizer_of, one_thread)

from dino_from_scratch import data, dino, train, checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Every test here runs with one intra-op thread (see dino_test_utils.one_thread)."


@pytest.fixture(scope="module")
def train_images(shared_data):
    "16 real training images: with batch 8 that is 2 steps per epoch."
    return data.ImageDataset.from_folder(shared_data / "imagenette2-128", "train").subset(16)


def _fresh(ds):
    "A copy of the dataset (the Trainer sets its transform and seed in place)."
    return data.ImageDataset(ds.sources, ds.labels, classes=ds.classes, name=ds.name)


def _assert_same_state(a, b):
    "Bit-identical student, teacher, center and optimizer state of two trainers."
    for name in ("student", "teacher"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs"
    assert torch.equal(a.loss_fn["dino"].center, b.loss_fn["dino"].center)
    oa, ob = optimizer_of(a).state_dict(), optimizer_of(b).state_dict()
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for pid in oa["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][pid][k], ob["state"][pid][k]), f"optimizer state {pid}.{k} differs"
    for ga, gb in zip(oa["param_groups"], ob["param_groups"]):
        assert (ga["lr"], ga["weight_decay"]) == (gb["lr"], gb["weight_decay"])


@pytest.mark.parametrize("backend,num_workers", [("pil", 0), ("pil", 2), ("batched", 0), ("batched", 1)])
def test_resume_is_bit_identical(train_images, tmp_path, backend, num_workers):
    # PIL multi-crop per image, or the uint8 cache + batched multi-crop of chapter 00: both resume exactly
    r = small_recipe(f"data.num_workers={num_workers}", "optim.epochs=3", f"data.crops.backend={backend}")  # 2 steps/epoch -> 6 steps
    straight = train.Trainer(r, out=tmp_path / "straight", dataset=_fresh(train_images), verbose=False)
    assert len(straight.sched) == 6
    straight.fit(max_steps=6, progress=False)
    assert straight.step == 6

    first = train.Trainer(r, out=tmp_path / "split", dataset=_fresh(train_images), verbose=False)
    first.fit(max_steps=3, progress=False)
    assert first.step == 3
    at3 = {k: v.clone() for k, v in first.student.state_dict().items()}
    del first
    second = train.Trainer(r, out=tmp_path / "split", dataset=_fresh(train_images), resume=True, verbose=False)
    assert second.step == 3
    assert all(torch.equal(at3[k], v) for k, v in second.student.state_dict().items())
    second.fit(max_steps=6, progress=False)
    assert second.step == 6
    # the resumed run really trained after the resume (so equality below is not "nothing happened")
    assert not all(torch.equal(at3[k], v) for k, v in second.student.state_dict().items())

    _assert_same_state(straight, second)
    # the logs agree too: steps 1..6 once each, identical losses
    ma, mb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    # and the final checkpoints hold the same tensors
    ta, _ = checkpoint.read_checkpoint(checkpoint.list_checkpoints(tmp_path / "straight")[0])
    tb, _ = checkpoint.read_checkpoint(checkpoint.list_checkpoints(tmp_path / "split")[0])
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_through_cli(shared_data, tmp_path):
    folder = make_small_folder(shared_data, tmp_path / "data")      # 36 train images: 4 steps per epoch
    common = ["--recipe", "tiny_v1", "--data", folder, "--no-eval", "--set", *SMALL_OVERRIDES, "optim.epochs=2"]
    p = run_cli("dino-train", *common[:4], "--out", tmp_path / "straight", "--max-steps", 6, *common[4:])
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli("dino-train", *common[:4], "--out", tmp_path / "split", "--max-steps", 3, *common[4:])
    assert p.returncode == 0, p.stderr[-3000:]
    assert checkpoint.list_checkpoints(tmp_path / "split")[0].name == "step_0000003.safetensors"
    p = run_cli("dino-train", *common[:4], "--out", tmp_path / "split", "--resume", "--max-steps", 6, *common[4:])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step_0000003.safetensors (step 3)" in p.stdout

    ca, cb = checkpoint.list_checkpoints(tmp_path / "straight")[0], checkpoint.list_checkpoints(tmp_path / "split")[0]
    assert ca.name == cb.name == "step_0000006.safetensors"
    (ta, ma), (tb, mb) = checkpoint.read_checkpoint(ca), checkpoint.read_checkpoint(cb)
    assert ma["step"] == mb["step"] == 6
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs between the straight and the resumed run"
    # the weights did move from their initial values (same seed -> identical init in both runs)
    from dino_from_scratch.train import build_models
    from dino_from_scratch.config import recipe_from_dict
    torch.manual_seed(0)
    init, _ = build_models(recipe_from_dict(ma["recipe"]))
    assert not torch.equal(init.state_dict()["backbone.pos_embed"], ta["student.backbone.pos_embed"])
    assert [m["step"] for m in read_metrics(tmp_path / "split")] == [1, 2, 3, 4, 5, 6]


def test_truncated_checkpoint_falls_back(train_images, tmp_path, capsys):
    r = small_recipe("optim.epochs=2")                              # 4 steps; checkpoints at 2 and 4
    out = tmp_path / "run"
    t = train.Trainer(r, out=out, dataset=_fresh(train_images), verbose=False)
    t.fit(max_steps=4, progress=False)
    newest, older = checkpoint.list_checkpoints(out)
    assert (newest.name, older.name) == ("step_0000004.safetensors", "step_0000002.safetensors")
    # read_checkpoint's tensors are memory-mapped views of the file (safetensors load_file): copy them
    # before the file is cut short in place, or reading them later raises SIGBUS
    good4 = {k: v.clone() for k, v in checkpoint.read_checkpoint(newest)[0].items()}
    good2 = {k: v.clone() for k, v in checkpoint.read_checkpoint(older)[0].items()}
    raw = newest.read_bytes()
    newest.write_bytes(raw[: int(len(raw) * 0.4)])                 # cut short, as by a crash mid-copy
    with pytest.raises(ValueError, match="step_0000004"):
        checkpoint.read_checkpoint(newest)

    capsys.readouterr()
    t2 = train.Trainer(r, out=out, dataset=_fresh(train_images), resume=True, verbose=True)
    err = capsys.readouterr().err
    assert t2.step == 2
    assert "step_0000004.safetensors" in err
    sd = t2.student.state_dict()
    assert all(torch.equal(sd[k[len("student."):]], v) for k, v in good2.items() if k.startswith("student."))
    # training on from the older checkpoint reproduces the lost step-4 state exactly
    t2.fit(max_steps=4, progress=False)
    redone, _ = checkpoint.read_checkpoint(checkpoint.list_checkpoints(out)[0])
    assert redone.keys() == good4.keys()
    assert [k for k in good4 if not torch.equal(redone[k], good4[k])] == []


def _nan_after(monkeypatch, n_good: int):
    "Make the DINO loss return NaN from call n_good + 1 on (the loss of 0-based step n_good)."
    orig, calls = dino.DINOLoss.loss_from_probs, {"n": 0}
    def loss_from_probs(self, student_out, p_t):
        calls["n"] += 1
        loss = orig(self, student_out, p_t)
        return loss * float("nan") if calls["n"] > n_good else loss
    monkeypatch.setattr(dino.DINOLoss, "loss_from_probs", loss_from_probs)


def test_nan_loss_stops_with_last_good_checkpoint(train_images, tmp_path, monkeypatch):
    r = small_recipe("optim.epochs=3")                              # 6 steps; checkpoints every 2
    out = tmp_path / "run"
    t = train.Trainer(r, out=out, dataset=_fresh(train_images), verbose=False)
    _nan_after(monkeypatch, 3)
    with pytest.raises(checkpoint.NonFiniteLoss) as e:
        t.fit(progress=False)
    msg = str(e.value)
    good = out / "checkpoints" / "step_0000002.safetensors"
    assert t.step == 3                                              # 3 steps done, the 4th produced NaN
    assert "nan" in msg and "step 4" in msg                         # the 4th step (1-based, as in metrics.jsonl) failed
    assert str(good) in msg
    assert [c.name for c in checkpoint.list_checkpoints(out)] == ["step_0000002.safetensors"]
    # the metrics hold the 3 good steps only
    m = read_metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in m)
    # the named checkpoint loads, is finite, and resuming from it works
    tensors, meta = checkpoint.read_checkpoint(good)
    assert meta["step"] == 2 and all(torch.isfinite(v).all() for v in tensors.values())
    monkeypatch.undo()
    t2 = train.Trainer(r, out=out, dataset=_fresh(train_images), resume=True, verbose=False)
    assert t2.step == 2
    h = t2.fit(max_steps=4, progress=False)
    assert [x["step"] for x in h] == [3, 4] and all(math.isfinite(x["loss"]) for x in h)


def test_nan_loss_cli(shared_data, tmp_path):
    "An absurd learning rate: step 1 runs at lr 0 (warm-up starts at 0) and is checkpointed; then the weights explode."
    folder = make_small_folder(shared_data, tmp_path / "data")
    out = tmp_path / "run"
    p = run_cli("dino-train", "--recipe", "tiny_v1", "--data", folder, "--out", out, "--no-eval", "--max-steps", 4,
                "--set", *SMALL_OVERRIDES, "run.ckpt_every=1", "optim.lr=1e30", "optim.warmup_epochs=1")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("dino-train:") and ("nan" in last or "non-finite" in last)
    kept = checkpoint.list_checkpoints(out)
    assert kept and kept[0].name in ("step_0000001.safetensors", "step_0000002.safetensors")
    assert str(kept[0]) in last                                      # the message names the checkpoint that was kept
    tensors, meta = checkpoint.read_checkpoint(kept[0])
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("student."))  # and it is really good
    assert f"step {meta['step'] + 1}" in last                        # the failing step is the one after it


def test_checkpoints_never_unpickle(train_images, tmp_path, monkeypatch):
    r = small_recipe("optim.epochs=1")                              # 2 steps
    out = tmp_path / "run"
    t = train.Trainer(r, out=out, dataset=_fresh(train_images), verbose=False)
    t.fit(max_steps=2, progress=False)
    ck = checkpoint.list_checkpoints(out)[0]

    # the file is plain safetensors: an 8-byte little-endian header length, a JSON header, raw tensor bytes
    raw = ck.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    assert max(ends) == len(raw) - 8 - n
    assert json.loads(header["__metadata__"]["meta"])["step"] == 2
    from safetensors import safe_open
    with safe_open(str(ck), "pt") as f:
        keys = set(f.keys())
        assert "loss.dino.center" in keys and "student.backbone.cls_token" in keys
        assert torch.equal(f.get_tensor("loss.dino.center"), t.loss_fn["dino"].center)

    def refuse(*a, **k):
        raise AssertionError("a checkpoint load went through pickle")
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)

    tensors, meta = checkpoint.read_checkpoint(ck)
    assert meta["step"] == 2 and torch.equal(tensors["loss.dino.center"], t.loss_fn["dino"].center)
    t2 = train.Trainer(r, out=out, dataset=_fresh(train_images), resume=True, verbose=False)
    assert t2.step == 2
    _assert_same_state(t, t2)
    from dino_from_scratch.eval import load_backbone
    for src in (out, ck):
        model, recipe = load_backbone(src)
        assert recipe.model.embed_dim == 32
        assert torch.equal(model.pos_embed, t.teacher.backbone.pos_embed)
        student, _ = load_backbone(src, "student")
        assert torch.equal(student.pos_embed, t.student.backbone.pos_embed)
