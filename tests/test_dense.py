"""The dense (linear segmentation) probe: `dino-eval seg` end to end, clear errors on a bad data folder, mIoU by hand."""
import json, math, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import run_cli, cli_env, REPO_ROOT, one_thread  # noqa: E402,F401

from dino_from_scratch.dense import (CAMVID_CLASSES, default_camvid, load_seg_folder, miou, confusion_matrix,  # noqa: E402
                                     seg_eval)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Every test here runs with one intra-op thread (see dino_test_utils.one_thread)."


@pytest.fixture(scope="module")
def camvid(shared_data) -> Path:
    d = shared_data / "camvid"
    if not (d / "train").is_dir(): pytest.skip(f"CamVid not found at {d}")
    return d


def _one_json_line(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected exactly one line on stdout, got {lines!r}"
    return json.loads(lines[0])


def _main_exit(argv) -> str:
    "Run `dino-eval ARGV` in this process, expecting sys.exit(message); return the message."
    from dino_from_scratch import cli as ev
    with pytest.raises(SystemExit) as e:
        ev.eval_main([str(a) for a in argv])
    assert isinstance(e.value.code, str) and e.value.code.startswith("dino-eval: error:"), e.value.code
    return e.value.code


def test_seg_cli_random_init(camvid):
    p = run_cli("dino-eval", "seg", "--recipe", "tiny_v1", "--random-init", "--epochs", 2, "--limit", 8, "--data", camvid)
    assert p.returncode == 0, p.stderr[-3000:]
    res = _one_json_line(p.stdout)
    assert res["eval"] == "seg" and res["model"] == "random:tiny_v1"
    assert 0 <= res["miou"] <= 1 and 0 <= res["pixel_acc"] <= 1
    assert (res["n_train"], res["n_val"], res["epochs"], res["size"]) == (8, 8, 2, [192, 256])  # 12x16 grid of patch 16
    assert list(res["per_class"]) == list(CAMVID_CLASSES)
    present = [v for v in res["per_class"].values() if v is not None]
    assert present and all(0 <= v <= 1 for v in present)
    assert res["miou"] == pytest.approx(sum(present) / len(present), abs=1e-3)   # nan-mean over present classes
    # the library in this process gives the same number (seeded backbone, seeded probe)
    from dino_from_scratch.config import get_recipe
    from dino_from_scratch.eval import random_backbone
    lib = seg_eval(random_backbone(get_recipe("tiny_v1"), 0), camvid, epochs=2, limit=8)
    assert lib["miou"] == pytest.approx(res["miou"], abs=1e-6)


def test_seg_default_data(camvid, monkeypatch):
    "--data defaults to $DINO_CAMVID, else ../shared/data/camvid beside the repository."
    monkeypatch.delenv("DINO_CAMVID", raising=False)
    assert default_camvid().resolve() == (REPO_ROOT.parent / "shared" / "data" / "camvid").resolve()
    monkeypatch.setenv("DINO_CAMVID", "/somewhere/else")
    assert default_camvid() == Path("/somewhere/else")


def test_seg_cli_bad_data(tmp_path):
    missing = tmp_path / "no_such_camvid"
    p = run_cli("dino-eval", "seg", "--recipe", "tiny_v1", "--random-init", "--data", missing, "--epochs", 1)
    assert p.returncode != 0 and p.stdout.strip() == ""
    assert "dino-eval: error:" in p.stderr and str(missing) in p.stderr
    # images without their annotation folder: the message names the missing folder
    (tmp_path / "half" / "train").mkdir(parents=True)
    msg = _main_exit(["seg", "--recipe", "tiny_v1", "--random-init", "--data", tmp_path / "half"])
    assert str(tmp_path / "half" / "trainannot") in msg
    # an image without its mask: the message names the mask file
    (tmp_path / "half" / "trainannot").mkdir()
    from PIL import Image
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "half" / "train" / "x.jpg")
    msg = _main_exit(["seg", "--recipe", "tiny_v1", "--random-init", "--data", tmp_path / "half"])
    assert str(tmp_path / "half" / "trainannot" / "x.png") in msg


def test_seg_cli_bad_size(camvid):
    msg = _main_exit(["seg", "--recipe", "tiny_v1", "--random-init", "--data", camvid, "--size", "100x256", "--limit", 2])
    assert "100x256" in msg and "patch size 16" in msg and "96x256" in msg
    assert "HxW" in _main_exit(["seg", "--recipe", "tiny_v1", "--random-init", "--data", camvid, "--size", "big"])


def _synthetic_folder(root: Path, n_train=6, n_val=3, H=96, W=128):
    "A CamVid-layout folder whose classes are flat colours (sky on top, road below, a car box, void border)."
    from PIL import Image
    rng = np.random.default_rng(0)
    colours = {0: (90, 140, 230), 3: (110, 100, 110), 8: (200, 30, 30)}
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True); (root / f"{split}annot").mkdir()
        for i in range(n):
            m = np.zeros((H, W), np.uint8); m[H // 2:] = 3
            r, c = rng.integers(H // 2, H - 24), rng.integers(0, W - 32)
            m[r:r + 20, c:c + 32] = 8
            m[:, :2] = 11
            img = np.zeros((H, W, 3), np.uint8)
            for k, col in colours.items(): img[m == k] = col
            Image.fromarray(img).save(root / split / f"f{i:02d}.png")     # PNG: the colours stay exact
            Image.fromarray(m).save(root / f"{split}annot" / f"f{i:02d}.png")


def test_seg_eval_synthetic(tmp_path):
    "Without shared data: a folder where colour gives the class; even a random backbone's patch tokens segment it."
    _synthetic_folder(tmp_path / "syn")
    d = load_seg_folder(tmp_path / "syn", "val")
    assert d.masks.dtype == torch.uint8 and d.images.shape == (3, 3, 96, 128) and set(d.masks.unique().tolist()) == {0, 3, 8, 11}
    from dino_from_scratch.config import get_recipe
    from dino_from_scratch.eval import random_backbone
    res = seg_eval(random_backbone(get_recipe("tiny_v1")), tmp_path / "syn", size=(96, 128), epochs=40)
    assert res["per_class"]["Pole"] is None and res["per_class"]["Sky"] is not None   # absent classes: null, not 0
    assert res["per_class"]["Sky"] > 0.8 and res["per_class"]["Road"] > 0.8
    assert 0.3 < res["miou"] <= 1


def test_miou_by_hand():
    # 4 classes, void = 4.   target: 0 0 0 1 | 1 2 4 4     pred: 0 0 1 1 | 2 2 0 1
    t = torch.tensor([[0, 0, 0, 1], [1, 2, 4, 4]])
    p = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 1]])
    # the two void pixels are skipped, 6 remain (numbered 0..5 row-major).
    # class 0: pred {0,1} true {0,1,2}: 2/3.  class 1: pred {2,3} true {3,4}: 1/3.  class 2: pred {4,5} true {5}: 1/2.
    # class 3: in neither -> NaN, and left out of the mean (DINOv2 / mmseg nan-mean), not counted as 0
    s = miou(p, t, n_classes=4, ignore_index=4)
    assert s["per_class"][:3] == pytest.approx([2 / 3, 1 / 3, 1 / 2]) and math.isnan(s["per_class"][3])
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx((2 + 1 + 1) / 6)           # the intersections over the 6 pixels
    assert confusion_matrix(p, t, 4, 4).sum() == 6
    assert miou(p, t, n_classes=3, ignore_index=4)["miou"] == pytest.approx(s["miou"])


def test_knn_does_not_import_dense():
    "The k-NN / linear evaluation module (chapter 06) does not import the segmentation probe (chapter 13)."
    code = ("import sys; from dino_from_scratch import eval; eval.knn_eval; "
            "assert 'dino_from_scratch.dense' not in sys.modules, 'eval imports dense eagerly'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO_ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
