"""Reliability (issue 15): unusable data stops with a reason, a run directory belongs to one run, resume refuses a
changed recipe, SIGTERM/SIGINT checkpoint and stop, a failed save keeps the previous checkpoint, collapse warns.
Each test fails on the code before issue 15 (df9bcfb)."""
import errno, json, math, os, signal, socket, subprocess, sys, time, warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import (SMALL_OVERRIDES, small_recipe, make_small_folder, run_cli, read_metrics,  # noqa: E402
                             optimizer_of, one_thread, fresh, cli_env, VENV_BIN, REPO_ROOT)

from dino_from_scratch import data, train, checkpoint  # noqa: E402
from dino_from_scratch.checkpoint import NonFiniteLoss  # noqa: E402
import importlib  # noqa: E402
cli = importlib.import_module("dino_from_scratch.cli")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "One intra-op thread per test."


@pytest.fixture(scope="module")
def train_images(shared_data):
    "16 real training images: with batch 8 that is 2 steps per epoch."
    return data.ImageDataset.from_folder(shared_data / "imagenette2-128", "train").subset(16)


def _same_weights(a, b):
    for name in ("student", "teacher"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        for k in sa: assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs"


# ---------------------------------------------------------------- 1. unusable data
def test_unreadable_folder_stops_with_a_reason(tmp_path):
    "16 random-byte .jpg files: before, `fit` spun forever; now it stops naming the count and an example."
    folder = tmp_path / "junk"; folder.mkdir()
    for i in range(16): (folder / f"img{i:02d}.jpg").write_bytes(os.urandom(500))
    ds = data.ImageDataset.from_folder(folder)
    t = train.Trainer(small_recipe("optim.epochs=50"), out=tmp_path / "run", dataset=ds, verbose=False)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(train.DataUnusable) as e: t.fit(max_steps=100, progress=False)
    assert time.time() - t0 < 60
    msg = str(e.value)
    assert "16 of 16 files checked are unreadable" in msg and "16 files in" in msg and "img" in msg and ".jpg" in msg
    assert t.step == 2               # per_epoch = 2: a whole epoch of empty global batches, then the stop


def test_unreadable_folder_cli_exits(tmp_path):
    folder = tmp_path / "junk"; folder.mkdir()
    for i in range(16): (folder / f"img{i:02d}.jpg").write_bytes(os.urandom(500))
    p = run_cli("dino-train", "--recipe", "tiny_v1", "--data", folder, "--out", tmp_path / "run", "--no-eval",
                "--max-steps", 50, "--set", *SMALL_OVERRIDES, "optim.epochs=50", timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("dino-train: error:") and "16 of 16 files checked are unreadable" in last


def _with_bad_batch(images, r, bad_step: int):
    "A dataset whose items of global batch `bad_step` (epoch 0) are undecodable bytes; the others are real images."
    b = train.StepBatches(len(images), r.data.batch_size, seed=r.run.seed)
    bad = {int(i) for i in b.epoch_order(0)[bad_step * 8:(bad_step + 1) * 8]}
    src = [b"not an image" if i in bad else s for i, s in enumerate(images.sources)]
    return data.ImageDataset(src, images.labels, classes=images.classes, name="half-bad")


def test_empty_batch_is_a_step_and_resume_stays_exact(train_images, tmp_path):
    "A wholly unreadable global batch counts as a (learning-free) step: data order and schedules stay in step."
    r = small_recipe("optim.epochs=2")                               # 4 steps; step 2 (0-based 1) is all unreadable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = train.Trainer(r, out=tmp_path / "a", dataset=_with_bad_batch(train_images, r, 1), verbose=False)
        straight.fit(progress=False)
        assert straight.step == 4 and straight.skipped >= 8
        assert [m["step"] for m in read_metrics(tmp_path / "a")] == [1, 3, 4]     # step 2 learned nothing, logged nothing
        first = train.Trainer(r, out=tmp_path / "b", dataset=_with_bad_batch(train_images, r, 1), verbose=False)
        first.fit(max_steps=2, progress=False)
        assert first.step == 2
        second = train.Trainer(r, out=tmp_path / "b", dataset=_with_bad_batch(train_images, r, 1), resume=True, verbose=False)
        assert second.step == 2
        second.fit(progress=False)
    _same_weights(straight, second)


# ---------------------------------------------------------------- 2. one run per directory
def _main(*args):
    "cli.main in this process; returns the exit code (0 when it returned)."
    try: cli.main([str(a) for a in args])
    except SystemExit as e: return e.code
    return 0


@pytest.fixture
def small_folder(shared_data, tmp_path):
    return make_small_folder(shared_data, tmp_path / "data", n_classes=2, n_train=8, n_val=2)   # 16 images: 2 steps


def test_out_reuse_refused_without_resume_or_overwrite(small_folder, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--recipe", "tiny_v1", "--data", small_folder, "--out", out, "--no-eval", "--set", *SMALL_OVERRIDES]
    assert _main(*common) == 0
    first = checkpoint.list_checkpoints(out)
    assert [c.name for c in first] == ["step_0000002.safetensors"]
    before = first[0].read_bytes()
    code = _main(*common[:-len(SMALL_OVERRIDES) - 1], "--set", *SMALL_OVERRIDES, "optim.lr=1e-3")
    assert isinstance(code, str) and "already holds a run" in code and "--resume" in code and "--overwrite" in code
    assert first[0].read_bytes() == before and len(read_metrics(out)) == 2           # the old run is untouched
    assert not (out / ".lock").exists()                                               # the refused run released its lock
    assert _main(*common, "--resume", "--overwrite").startswith("dino-train: error: --resume continues")
    assert _main(*common, "--overwrite") == 0
    assert [m["step"] for m in read_metrics(out)] == [1, 2]                          # one run's log, not two interleaved


def test_lock_refuses_a_live_run_and_replaces_a_stale_one(small_folder, tmp_path, capsys):
    out = tmp_path / "run"; out.mkdir()
    common = ["--recipe", "tiny_v1", "--data", small_folder, "--out", out, "--no-eval", "--set", *SMALL_OVERRIDES]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "time": time.time()}))
        code = _main(*common)
        assert isinstance(code, str) and f"in use by pid {sleeper.pid}" in code
        assert checkpoint.list_checkpoints(out) == []
    finally:
        sleeper.kill(); sleeper.wait()
    capsys.readouterr()
    assert _main(*common) == 0                                                        # its process is gone now
    assert f"stale lock {out / '.lock'} of pid {sleeper.pid}" in capsys.readouterr().err
    assert not (out / ".lock").exists() and checkpoint.list_checkpoints(out)


# ---------------------------------------------------------------- 3. resume with a changed recipe
def test_resume_refuses_a_changed_recipe_with_a_diff(train_images, tmp_path, capsys):
    r = small_recipe("optim.epochs=2")
    t = train.Trainer(r, out=tmp_path / "run", dataset=fresh(train_images), verbose=False)
    t.fit(max_steps=2, progress=False)
    for change, row in ((["optim.lr=0.01"], f"optim.lr: {r.optim.lr!r} -> 0.01"),
                        (["data.batch_size=4"], "data.batch_size: 8 -> 4"),
                        (["model.depth=2"], "model.depth: 1 -> 2")):               # before: a load_state_dict traceback
        with pytest.raises(ValueError) as e:
            train.Trainer(small_recipe("optim.epochs=2", *change), out=tmp_path / "run", dataset=fresh(train_images),
                          resume=True, verbose=False)
        assert "--resume with a changed recipe" in str(e.value) and row in str(e.value)
    ok = train.Trainer(small_recipe("optim.epochs=2", "run.log_every=2", "run.ckpt_every=1"), out=tmp_path / "run",
                       dataset=fresh(train_images), resume=True, verbose=True)
    assert ok.step == 2 and "run.log_every: 1 -> 2" in capsys.readouterr().out


def test_resume_with_changed_recipe_cli_is_one_line(small_folder, tmp_path):
    out = tmp_path / "run"
    common = ["--recipe", "tiny_v1", "--data", small_folder, "--out", out, "--no-eval", "--set", *SMALL_OVERRIDES]
    assert _main(*common, "optim.epochs=2", "--max-steps", 2) == 0
    code = _main(*common, "optim.epochs=2", "data.batch_size=4", "--resume")
    assert isinstance(code, str) and "data.batch_size: 8 -> 4" in code and "--branch-from" in code


# ---------------------------------------------------------------- 4. SIGINT / SIGTERM
def _signal_at(t, step: int, sig):
    "Deliver `sig` to this process right after `step` (as Ctrl-C / a notebook interrupt / a scheduler would)."
    orig = t.train_step
    def train_step(crops):
        m = orig(crops)
        if t.step == step: signal.raise_signal(sig)
        return m
    t.train_step = train_step


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_and_trainer_stays_usable(train_images, tmp_path, capsys, sig):
    r = small_recipe("optim.epochs=3", "run.ckpt_every=100")        # 6 steps, no periodic checkpoint
    straight = train.Trainer(r, out=tmp_path / "a", dataset=fresh(train_images), verbose=False)
    straight.fit(progress=False)
    t = train.Trainer(r, out=tmp_path / "b", dataset=fresh(train_images), verbose=True)
    _signal_at(t, 3, sig)
    before = signal.getsignal(sig)
    t.fit(progress=False)                                            # returns: no KeyboardInterrupt, no exit
    err = capsys.readouterr().err
    assert t.step == 3 and t.stop_signal == sig.name
    ck = tmp_path / "b" / "checkpoints" / "step_0000003.safetensors"
    assert f"stopped by {sig.name} after step 3; checkpoint {ck} written" in err
    assert checkpoint.read_checkpoint(ck)[1]["step"] == 3
    assert signal.getsignal(sig) == before                           # the handlers are put back
    t.train_step = type(t).train_step.__get__(t)
    t.fit(progress=False)                                            # the same object goes on to the end
    assert t.step == 6
    _same_weights(straight, t)


def test_sigterm_cli_exit_code_and_resume(small_folder, tmp_path):
    "A real SIGTERM to `dino-train`: exit 143 after writing a checkpoint; --resume finishes the run."
    out = tmp_path / "run"
    args = ["--recipe", "tiny_v1", "--data", small_folder, "--out", out, "--no-eval",
            "--set", *SMALL_OVERRIDES, "optim.epochs=400", "run.ckpt_every=100000"]
    p = subprocess.Popen([str(VENV_BIN / "dino-train"), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=cli_env(), cwd=REPO_ROOT)
    t0 = time.time()
    while not (out / "metrics.jsonl").exists() and time.time() - t0 < 120: time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err
    ck = checkpoint.list_checkpoints(out)
    assert len(ck) == 1 and f"checkpoint {ck[0]} written" in err
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------- 6. a save that fails
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_failed_save_keeps_previous_checkpoint(train_images, tmp_path, monkeypatch, err):
    r = small_recipe("optim.epochs=2")                               # checkpoints at 2 and 4
    out = tmp_path / "run"
    t = train.Trainer(r, out=out, dataset=fresh(train_images), verbose=False)
    t.fit(max_steps=2, progress=False)
    good = checkpoint.list_checkpoints(out)[0]
    real_fsync = os.fsync
    def full(fd): raise OSError(err, os.strerror(err))                # the disk fills (or goes read-only) mid-save
    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(checkpoint.CheckpointWriteError) as e: t.fit(max_steps=4, progress=False)
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)
    msg = str(e.value)
    assert "step_0000004.safetensors" in msg and os.strerror(err) in msg and str(good) in msg and "--resume" in msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [good.name]    # no .tmp left behind
    assert checkpoint.read_checkpoint(good)[1]["step"] == 2
    again = train.Trainer(r, out=out, dataset=fresh(train_images), resume=True, verbose=False)
    assert again.step == 2


def test_stale_tmp_of_a_crashed_run_is_cleaned(train_images, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_0000009.safetensors.tmp").write_bytes(b"half a checkpoint")
    (out / "checkpoints" / "step_0000008.dcp.tmp").mkdir()
    t = train.Trainer(small_recipe(), out=out, dataset=fresh(train_images), verbose=True)
    t.fit(max_steps=1, progress=False)
    assert "removed 2 unfinished save(s)" in capsys.readouterr().err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000001.safetensors"]


def test_metrics_line_cut_by_a_kill_is_dropped_on_resume(train_images, tmp_path):
    out = tmp_path / "run"
    t = train.Trainer(small_recipe("optim.epochs=2"), out=out, dataset=fresh(train_images), verbose=False)
    t.fit(max_steps=2, progress=False)
    with open(out / "metrics.jsonl", "a") as f: f.write('{"step": 3, "loss": 4.1')          # killed mid-line
    again = train.Trainer(small_recipe("optim.epochs=2"), out=out, dataset=fresh(train_images), resume=True, verbose=False)
    again.fit(progress=False)
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


# ---------------------------------------------------------------- 8. collapse
def test_collapse_warnings_fire_once_with_values(train_images, tmp_path):
    "No sharpening (tau_t = tau_s = 0.1): the teacher drifts to uniform and the warning fires once; DINO's recipe: none."
    base = ["optim.epochs=10", "run.collapse_steps=3"]                 # 20 steps
    runs = {"uniform": ["loss.teacher_temp=0.1", "loss.warmup_teacher_temp=0.1"], "healthy": []}
    for kind, extra in runs.items():
        t = train.Trainer(small_recipe(*base, *extra), out=tmp_path / kind, dataset=fresh(train_images), verbose=False)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            h = t.fit(progress=False)
        col = [str(x.message) for x in w if issubclass(x.category, train.CollapseWarning)]
        if kind == "uniform":
            assert len(col) == 1, col
            assert "per-sample entropy" in col[0] and "ln K = 4.159" in col[0] and "teacher_temp" in col[0]
            assert h[-1]["teacher_entropy"] > 0.95 * math.log(64)
        else:
            assert col == [] and h[-1]["teacher_entropy"] < 0.9 * math.log(64)


def test_collapse_counts_steps_in_a_row(train_images, tmp_path):
    "The one-prototype warning: only after `collapse_steps` steps in a row, once, naming the measured batch entropy."
    t = train.Trainer(small_recipe("run.collapse_steps=3"), out=tmp_path / "x", dataset=fresh(train_images), verbose=False)
    lnK = math.log(64)
    ok, one = {"teacher_entropy": 0.5 * lnK, "teacher_batch_entropy": 0.5 * lnK}, {"teacher_entropy": 0.01, "teacher_batch_entropy": 0.02}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for m in (one, one, ok, one, one): t.watch_collapse(m)                # never 3 in a row
        assert not [x for x in w if issubclass(x.category, train.CollapseWarning)]
        for m in (one, one, one, one): t.watch_collapse(m)                    # 3 in a row (and a 4th): one warning
    col = [str(x.message) for x in w if issubclass(x.category, train.CollapseWarning)]
    assert len(col) == 1 and "batch-mean entropy 0.020" in col[0] and "centering" in col[0]
    t2 = train.Trainer(small_recipe("run.collapse_steps=0"), out=tmp_path / "y", dataset=fresh(train_images), verbose=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(5): t2.watch_collapse(one)                             # 0 switches it off
    assert not w


# ---------------------------------------------------------------- 7. a non-finite value in each loss term
from dino_from_scratch import dinov2 as _v2, dinov3 as _v3, ibot as _ibot, dino as _dino  # noqa: E402
from dino_from_scratch.config import tiny_v2, override  # noqa: E402

V2 = SMALL_OVERRIDES + ["ibot.out_dim=48", "loss.koleo_weight=0.1", "optim.epochs=2"]   # 4 steps, checkpoints at 2 and 4
GRAM = ["gram.loss_weight=1.0", "gram.it_first_update=1", "gram.update_frequency=100", "gram.max_updates=1"]


def _nan_from_step(monkeypatch, owner, name, trainer_box, first_bad_step=2):
    "Wrap owner.name so its result is multiplied by NaN from 0-based step `first_bad_step` of the trainer on."
    orig = getattr(owner, name)
    def wrapped(*a, **k):
        v = orig(*a, **k)
        return v * float("nan") if trainer_box[0].step >= first_bad_step else v
    monkeypatch.setattr(owner, name, wrapped)


def _teacher_run(train_images, tmp_path):
    out = tmp_path / "teacher"
    _v2.DINOv2Trainer(override(tiny_v2(), V2), out=out, dataset=fresh(train_images), verbose=False).fit(max_steps=2, progress=False)
    return out


@pytest.mark.parametrize("term", ["dino_loss", "ibot_loss", "koleo_loss", "gram_loss", "distillation"])
def test_nan_in_each_term_is_named_and_last_checkpoint_kept(train_images, tmp_path, monkeypatch, term):
    box = [None]
    if term == "distillation":       # distillation's DINO term: the student against a frozen teacher's targets
        from dino_from_scratch.distill import DistillTrainer, DistillConfig
        cfg = DistillConfig(enabled=True, teacher=str(_teacher_run(train_images, tmp_path)))
        make = lambda: DistillTrainer(override(tiny_v2(), V2 + ["model.embed_dim=16"]), out=tmp_path / "run",
                                      dataset=fresh(train_images), distill=cfg, verbose=False)
        owner, name, named = _dino.DINOLoss, "loss_from_probs", "dino_loss"
    elif term == "gram_loss":
        make = lambda: _v3.DINOv3Trainer(override(tiny_v2(), V2 + GRAM), out=tmp_path / "run", dataset=fresh(train_images), verbose=False)
        owner, name, named = _v3.GramAnchor, "forward", term
    else:
        make = lambda: _v2.DINOv2Trainer(override(tiny_v2(), V2), out=tmp_path / "run", dataset=fresh(train_images), verbose=False)
        owner, name = {"dino_loss": (_dino.DINOLoss, "loss_from_probs"), "ibot_loss": (_ibot.IBOTPatchLoss, "forward_masked"),
                       "koleo_loss": (_v2, "koleo_loss")}[term]
        named = term
    t = make(); box[0] = t
    _nan_from_step(monkeypatch, owner, name, box)
    with pytest.raises(NonFiniteLoss) as e: t.fit(max_steps=4, progress=False)
    msg = str(e.value)
    assert f"non-finite: {named}=nan)" in msg and "step 3" in msg, msg                  # only this term is named
    good = tmp_path / "run" / "checkpoints" / "step_0000002.safetensors"
    assert str(good) in msg and [c.name for c in checkpoint.list_checkpoints(tmp_path / "run")] == [good.name]
    tensors, meta = checkpoint.read_checkpoint(good)
    assert meta["step"] == 2 and all(torch.isfinite(v).all() for v in tensors.values())


# ---------------------------------------------------------------- 1b. under DDP every rank agrees to skip
def test_ddp_ranks_agree_to_skip_an_empty_share(shared_data, tmp_path):
    import socket as _s
    folder = make_small_folder(shared_data, tmp_path / "data", n_classes=2, n_train=8)     # 16 images: global batch 8
    out = tmp_path / "out"; out.mkdir()
    with _s.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(Path(__file__).parent / "scripts" / "ddp_skip.py"), str(out), str(folder)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env() | {"ACCELERATE_USE_CPU": "true"}, cwd=REPO_ROOT)
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["step"] == r1["step"] == 3                      # step 1 was skipped by both, steps 2 and 3 trained
    assert r0["logged"] == [2, 3] and r1["skipped"] >= 4 and r0["checksum"] == r1["checksum"]


# ---------------------------------------------------------------- 10. a chapter without its data is a visible skip
@pytest.mark.parametrize("stem,var", [("06_eval", "DINO_DATA"), ("13_dense_eval", "DINO_CAMVID"), ("15_davis", "DINO_DAVIS"),
                                      ("16_explore", "DINO_VIZ_DATA")])
def test_notebook_without_its_data_is_skipped_with_the_reason(tmp_path, stem, var):
    missing = tmp_path / "nowhere"
    env = cli_env() | {var: str(missing)}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_notebooks.py", "-k", stem],
                       capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert "1 skipped" in p.stdout and "passed" not in p.stdout, p.stdout[-2000:]
    assert f"{stem} needs {missing}" in p.stdout


# ---------------------------------------------------------------- 6b. a damaged sharded (DCP) checkpoint
def test_damaged_sharded_checkpoint_falls_back(train_images, tmp_path, capsys):
    "One process, FSDP over a world of 1: the newest step_*.dcp loses a shard file; resume takes the previous one."
    import torch.distributed as dist
    if dist.is_initialized(): pytest.skip("a process group already exists in this test process")
    r = small_recipe("optim.epochs=2", "shard.strategy=fsdp")            # checkpoints at steps 2 and 4
    try:
        t = cli.make_trainer(r, out=tmp_path / "run", dataset=fresh(train_images), verbose=False)
        assert t.sharded
        t.fit(progress=False)
        newest, older = sorted((tmp_path / "run" / "checkpoints").glob("step_*.dcp"), reverse=True)
        assert newest.name == "step_0000004.dcp" and (newest / "meta.json").exists()
        shard = sorted(newest.glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])          # cut short, as by a crash mid-copy
        capsys.readouterr()
        t2 = cli.make_trainer(r, out=tmp_path / "run", dataset=fresh(train_images), resume=True, verbose=True)
        err = capsys.readouterr().err
        assert t2.step == 2 and "step_0000004.dcp is unreadable" in err and "trying the previous one" in err
        h = t2.fit(progress=False)                                               # and it trains on from there
        assert [m["step"] for m in h] == [3, 4]
    finally:
        dist.destroy_process_group()
