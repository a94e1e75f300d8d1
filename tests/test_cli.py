"""End-to-end tests of the `dino-train` and `dino-eval` commands on a small labelled folder (3 classes)."""
import json, math, sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import SMALL_OVERRIDES, make_small_folder, run_cli, read_metrics, one_thread  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Every test here runs with one intra-op thread (see dino_test_utils.one_thread)."


N_TRAIN, N_VAL = 3 * 12, 3 * 6


@pytest.fixture(scope="module")
def small_folder(shared_data, tmp_path_factory):
    return make_small_folder(shared_data, tmp_path_factory.mktemp("small_data"))


@pytest.fixture(scope="module")
def trained_run(small_folder, tmp_path_factory):
    "One `dino-train` run (4 steps, evaluation on): (run directory, completed process)."
    out = tmp_path_factory.mktemp("cli_run") / "run"
    p = run_cli("dino-train", "--recipe", "tiny_v1", "--data", small_folder, "--out", out, "--max-steps", 4,
                "--set", *SMALL_OVERRIDES)
    return out, p


def _one_json_line(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected exactly one line on stdout, got {lines!r}"
    return json.loads(lines[0])


def _is_multiple_of_one_sample(top1: float, n: int) -> bool:
    "An accuracy in % over n samples is 100 * (correct / n): correct must be an integer."
    c = top1 * n / 100
    return abs(c - round(c)) < 1e-4


def test_train_end_to_end(trained_run, small_folder):
    out, p = trained_run
    assert p.returncode == 0, p.stderr[-3000:]
    # metrics: one line per step (log_every=1), steps 1..4, finite losses
    m = read_metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    assert all(math.isfinite(x["loss"]) and x["loss"] > 0 for x in m)
    assert all(x["skipped"] == 0 for x in m)
    # 36 images / batch 8 -> 4 steps per epoch: epoch = step / 4
    assert [x["epoch"] for x in m] == [0.25, 0.5, 0.75, 1.0]
    # checkpoints at ckpt_every=2 and at the end; the newest is the last step
    from dino_from_scratch.checkpoint import list_checkpoints, read_checkpoint
    ck = list_checkpoints(out)
    assert [c.name for c in ck] == ["step_0000004.safetensors", "step_0000002.safetensors"]
    tensors, meta = read_checkpoint(ck[0])
    assert meta["step"] == 4 and meta["recipe"]["model"]["embed_dim"] == 32
    assert tensors["student.backbone.cls_token"].shape == (1, 1, 32)
    # the recipe written beside the run is the overridden one
    from dino_from_scratch.config import load_recipe
    r = load_recipe(out / "recipe.yaml")
    assert (r.model.depth, r.head.out_dim, r.data.crops.n_local, str(Path(r.data.path))) == (1, 64, 2, str(small_folder))
    # evaluation at the end
    ev = json.loads((out / "eval.json").read_text())
    for key in ("knn", "knn_random_init"):
        knn = ev[key]
        assert 0 <= knn["top1"] <= 100 and knn["top1"] <= knn["top5"] <= 100
        assert (knn["n_train"], knn["n_test"], knn["k"]) == (N_TRAIN, N_VAL, 20)
        assert _is_multiple_of_one_sample(knn["top1"], N_VAL)
    png = out / "patch_similarity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert Path(ev["figure"]) == png
    # the report: the k-NN curve over the kept checkpoints starts at random init and ends at the trained teacher;
    # with 36 training images the curve's 2,000-image memory bank is the whole train split, so both ends equal eval.json
    curve = json.loads((out / "knn_curve.json").read_text())
    assert [c["step"] for c in curve] == [0, 2, 4]
    assert curve[0]["top1"] == pytest.approx(ev["knn_random_init"]["top1"], abs=1e-6)
    assert curve[-1]["top1"] == pytest.approx(ev["knn"]["top1"], abs=1e-6)
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 400


def _main_json(capsys, argv) -> dict:
    "Run `dino-eval ARGV` in this process (the console script calls eval.main) and parse its single stdout line."
    from dino_from_scratch import cli as ev
    capsys.readouterr()
    ev.eval_main([str(a) for a in argv])
    return _one_json_line(capsys.readouterr().out)


def test_eval_knn_ckpt(trained_run, small_folder, capsys):
    out, p = trained_run
    assert p.returncode == 0, p.stderr[-3000:]
    q = run_cli("dino-eval", "knn", "--ckpt", out, "--data", small_folder)
    assert q.returncode == 0, q.stderr[-3000:]
    res = _one_json_line(q.stdout)
    assert res["eval"] == "knn" and res["k"] == 20 and res["model"] == str(out)
    assert (res["n_train"], res["n_test"]) == (N_TRAIN, N_VAL)
    assert 0 <= res["top1"] <= 100 and _is_multiple_of_one_sample(res["top1"], N_VAL)
    # the same teacher, k and data as dino-train's own evaluation: the same accuracy
    ev = json.loads((out / "eval.json").read_text())
    assert res["top1"] == pytest.approx(ev["knn"]["top1"], abs=1e-6)
    # and the same as computing it with the library in this process
    from dino_from_scratch.eval import load_backbone, knn_eval
    model, recipe = load_backbone(out)
    assert knn_eval(model, recipe, small_folder, k=20, progress=False)["top1"] == pytest.approx(res["top1"], abs=1e-6)
    # --k 5 is passed through (and changes nothing else)
    res5 = _main_json(capsys, ["knn", "--ckpt", out, "--data", small_folder, "--k", 5])
    assert res5["k"] == 5 and (res5["n_train"], res5["n_test"]) == (N_TRAIN, N_VAL)
    assert _is_multiple_of_one_sample(res5["top1"], N_VAL)
    assert knn_eval(model, recipe, small_folder, k=5, progress=False)["top1"] == pytest.approx(res5["top1"], abs=1e-6)


def test_eval_knn_random_init(small_folder, capsys):
    res = _main_json(capsys, ["knn", "--recipe", "tiny_v1", "--random-init", "--data", small_folder])
    assert res["model"] == "random:tiny_v1" and res["k"] == 20 and res["eval_size"] == 64
    assert (res["n_train"], res["n_test"]) == (N_TRAIN, N_VAL)
    assert 0 <= res["top1"] <= 100 and _is_multiple_of_one_sample(res["top1"], N_VAL)
    # --random-init is the recipe's architecture at seed 0: the library gives the same number
    from dino_from_scratch.config import tiny_v1
    from dino_from_scratch.eval import random_backbone, knn_eval
    r = tiny_v1()
    m = random_backbone(r, 0)
    assert m.cfg.embed_dim == r.model.embed_dim and len(m.blocks) == r.model.depth
    assert knn_eval(m, r, small_folder, k=20, progress=False)["top1"] == pytest.approx(res["top1"], abs=1e-6)
    # a different seed is a different network (so the comparison above is not vacuous)
    m1 = random_backbone(r, 1)
    assert not torch.equal(m.pos_embed, m1.pos_embed)
    # --random-init without --recipe is refused with a message
    from dino_from_scratch import cli
    with pytest.raises(SystemExit) as e:
        cli.eval_main(["knn", "--random-init", "--data", str(small_folder)])
    assert "--recipe" in str(e.value.code)


def test_cli_config_errors(small_folder, tmp_path):
    from dino_from_scratch import cli
    # unknown recipe, through the installed command: non-zero exit, stderr lists the valid recipes
    p = run_cli("dino-train", "--recipe", "no_such_recipe", "--out", tmp_path / "a", "--no-eval")
    assert p.returncode != 0
    assert "no_such_recipe" in p.stderr
    for name in ("tiny_v1", "dinov1_vits16", "dinov1_vitb16"):
        assert name in p.stderr
    assert "Traceback" not in p.stderr
    # the other errors through dino-train's main() in this process (what the console script calls):
    # sys.exit(message) means exit status 1 and the message on stderr.
    def exit_message(*argv):
        with pytest.raises(SystemExit) as e:
            cli.main([str(a) for a in argv])
        assert isinstance(e.value.code, str) and e.value.code.startswith("dino-train: error:")
        return e.value.code
    # unknown field: the message names the bad field and the valid fields of its section
    msg = exit_message("--recipe", "tiny_v1", "--out", tmp_path / "b", "--set", "optim.warmup_epoch=1")
    assert "optim.warmup_epoch" in msg
    for valid in ("warmup_epochs", "lr", "min_lr", "weight_decay", "momentum_teacher", "clip_grad"):
        assert valid in msg
    # crop size not a multiple of the patch size: both sizes named
    msg = exit_message("--recipe", "tiny_v1", "--out", tmp_path / "c", "--set", "data.crops.global_size=60", "model.patch_size=8")
    assert "global_size (60)" in msg and "patch_size (8)" in msg
    msg = exit_message("--recipe", "tiny_v1", "--out", tmp_path / "d", "--set", "data.crops.local_size=36", "model.patch_size=8")
    assert "local_size (36)" in msg and "patch_size (8)" in msg
    # none of them started a run
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_eval_linear(trained_run, small_folder, capsys):
    out, p = trained_run
    assert p.returncode == 0, p.stderr[-3000:]
    res = _main_json(capsys, ["linear", "--ckpt", out, "--data", small_folder, "--epochs", 30])
    assert res["eval"] == "linear" and res["epochs"] == 30 and res["eval_size"] == 64
    assert 0 <= res["top1"] <= 100 and _is_multiple_of_one_sample(res["top1"], N_VAL)
    assert 0 <= res["train_top1"] <= 100 and _is_multiple_of_one_sample(res["train_top1"], N_TRAIN)
    from dino_from_scratch.eval import load_backbone, linear_eval
    model, recipe = load_backbone(out)
    assert linear_eval(model, recipe, small_folder, epochs=30, progress=False)["top1"] == pytest.approx(res["top1"], abs=1e-6)


def test_dino_train_starts_its_own_processes(small_folder, tmp_path):
    "`run.processes=2` on a CPU: `dino-train` relaunches itself under `accelerate launch`; two ranks, one run."
    out = tmp_path / "ddp"
    p = run_cli("dino-train", "--recipe", "tiny_v1", "--data", small_folder, "--out", out, "--max-steps", 2, "--no-eval",
                "--set", *SMALL_OVERRIDES, "run.processes=2", "data.batch_size=4", timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "starting 2 processes" in p.stdout
    assert [m["step"] for m in read_metrics(out)] == [1, 2]          # one writer: each step logged once
    from dino_from_scratch.checkpoint import list_checkpoints, read_checkpoint
    _, meta = read_checkpoint(list_checkpoints(out)[0])
    assert meta["world_size"] == 2 and meta["step"] == 2
    # the global batch is 2 ranks x 4 = 8: 36 images make 4 full steps per epoch, so step 2 is epoch 0.5
    assert read_metrics(out)[-1]["epoch"] == pytest.approx(0.5)
