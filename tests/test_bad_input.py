"""Training survives unreadable and unusual images; bad shapes and missing folders fail with clear messages."""
import contextlib, math, shutil, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import small_recipe, run_cli, read_metrics, SMALL_OVERRIDES, one_thread  # noqa: E402,F401

from dino_from_scratch import data, train  # noqa: E402
from dino_from_scratch.vit import VisionTransformer, ViTConfig  # noqa: E402

N_VALID = 23  # + 9 special files = 32 images: with batch 8, exactly 4 steps per epoch, every image once per epoch
BAD = ("truncated.jpg", "random_bytes.jpg")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Every test here runs with one intra-op thread (see dino_test_utils.one_thread)."


@pytest.fixture(scope="module")
def messy_folder(shared_data, tmp_path_factory):
    "root/things/ with 23 real JPEG copies, 2 undecodable files and 7 decodable but unusual images."
    root = tmp_path_factory.mktemp("messy")
    d = root / "things"
    d.mkdir()
    real = sorted((shared_data / "imagenette2-128" / "train" / "tench").iterdir())[:N_VALID + 1]
    for i, f in enumerate(real[:N_VALID]):
        shutil.copy(f, d / f"valid_{i:02d}.jpg")
    raw = real[N_VALID].read_bytes()
    (d / "truncated.jpg").write_bytes(raw[: int(len(raw) * 0.4)])
    (d / "random_bytes.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    photo = Image.open(real[0]).convert("RGB")
    # grayscale: a horizontal ramp 0..255
    Image.fromarray(np.tile(np.linspace(0, 255, 40).astype(np.uint8), (24, 1)), "L").save(d / "gray.png")
    # RGBA: left half transparent red, right half opaque blue
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[:, :15] = (255, 0, 0, 0)
    rgba[:, 15:] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    photo.convert("CMYK").save(d / "cmyk.jpg")
    # palette: indices 0..3 in 4 columns, palette black/red/green/blue
    pal = Image.frombytes("P", (20, 10), np.tile(np.repeat(np.arange(4, dtype=np.uint8), 5), (10, 1)).tobytes())
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 - 4) * 3)
    pal.save(d / "palette.png")
    # 16-bit grayscale: values 1000..60000
    a16 = np.linspace(1000, 60000, 12 * 16).reshape(12, 16).astype(np.uint16)
    Image.fromarray(a16).save(d / "gray16.png")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(d / "one_pixel.png")
    photo.resize((3, 5)).save(d / "three_by_five.png")
    return root


def test_messy_folder_contents(messy_folder):
    d = messy_folder / "things"
    assert len(list(d.iterdir())) == 32
    with Image.open(d / "gray16.png") as im:
        assert im.mode == "I;16"                   # the test really exercises a 16-bit file
    with Image.open(d / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    with Image.open(d / "palette.png") as im:
        assert im.mode == "P"


def test_bad_files_raise_badimage(messy_folder):
    for name in BAD:
        with pytest.raises(data.BadImage, match=name):
            data.load_rgb(messy_folder / "things" / name)


def test_unusual_images_decode_to_rgb(messy_folder):
    d = messy_folder / "things"
    def rgb(name):
        im = data.load_rgb(d / name)
        assert im.mode == "RGB"
        return np.asarray(im)
    g = rgb("gray.png")
    assert g.shape == (24, 40, 3)
    ramp = np.linspace(0, 255, 40).astype(np.uint8)
    assert (g == ramp[None, :, None]).all()                 # R = G = B = gray value
    a = rgb("rgba.png")
    assert (a[:, :15] == (255, 255, 255)).all()             # transparent -> composited on white
    assert (a[:, 15:] == (0, 0, 255)).all()                 # opaque blue stays blue
    p = rgb("palette.png")
    assert p.shape == (10, 20, 3)
    for col, colour in enumerate([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        assert (p[:, col * 5:(col + 1) * 5] == colour).all()
    h = rgb("gray16.png")
    assert h.shape == (12, 16, 3)
    assert (h[..., 0] == h[..., 1]).all() and (h[..., 1] == h[..., 2]).all()
    assert h.min() == 0 and h.max() == 255                  # rescaled min..max -> 0..255, not clipped at 255
    assert h[0, 0, 0] == 0 and h[-1, -1, 0] == 255
    assert (np.diff(h[..., 0].ravel().astype(int)) >= 0).all()   # the ramp stays monotonic
    c = rgb("cmyk.jpg")
    with Image.open(d / "cmyk.jpg") as im:
        assert (c == np.asarray(im.convert("RGB"))).all()
    assert rgb("one_pixel.png").shape == (1, 1, 3) and tuple(rgb("one_pixel.png")[0, 0]) == (10, 200, 30)
    assert rgb("three_by_five.png").shape == (5, 3, 3)
    # the dataset gives every decodable odd image full multi-crop views, and None for the bad ones
    r = small_recipe()
    ds = data.ImageDataset.from_folder(messy_folder, transform=data.MultiCrop(r.data.crops))
    names = [Path(s).name for s in ds.sources]
    for name in ("gray.png", "rgba.png", "cmyk.jpg", "palette.png", "gray16.png", "one_pixel.png", "three_by_five.png"):
        views, label = ds[(0, names.index(name))]
        assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
        assert all(torch.isfinite(v).all() for v in views) and label == 0
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert ds[(0, names.index("truncated.jpg"))] is None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_skips_exactly_the_bad_files(messy_folder, tmp_path, num_workers):
    r = small_recipe(f"data.num_workers={num_workers}", "optim.epochs=2", "run.ckpt_every=100")
    ds = data.ImageDataset.from_folder(messy_folder)
    assert len(ds) == 32
    bad_idx = {i for i, s in enumerate(ds.sources) if Path(s).name in BAD}
    assert len(bad_idx) == 2
    t = train.Trainer(r, out=tmp_path / "run", dataset=ds, verbose=False)
    assert t.batches.per_epoch == 4 and len(t.sched) == 8
    # what the sampler hands out: (epoch, index) keys, 8 per step
    batches = [b for b, _ in zip(iter(t.batches), range(8))]
    for e in range(2):                              # each epoch draws every image exactly once
        assert sorted(i for b in batches[4 * e:4 * e + 4] for _, i in b) == list(range(32))
    expected = np.cumsum([sum(i in bad_idx for _, i in b) for b in batches]).tolist()
    assert expected[3] == 2 and expected[7] == 4
    with pytest.warns(UserWarning, match="skipping unreadable image") if num_workers == 0 else contextlib.nullcontext():
        hist = t.fit(progress=False)
    assert t.step == 8 and t.skipped == 4
    m = read_metrics(tmp_path / "run")
    assert [x["step"] for x in m] == list(range(1, 9))
    assert [x["skipped"] for x in m] == expected
    assert all(math.isfinite(x["loss"]) for x in m)


def test_vit_rejects_sizes_not_multiple_of_patch():
    m = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2))
    assert m(torch.zeros(1, 3, 16, 24)).shape == (1, 16)      # multiples of 8: fine, also non-square
    for h, w in ((30, 32), (32, 36)):
        with pytest.raises(ValueError) as e:
            m(torch.zeros(1, 3, h, w))
        msg = str(e.value)
        assert f"{h}x{w}" in msg and "patch size 8" in msg
    with pytest.raises(ValueError, match="3 channels, got 1"):
        m(torch.zeros(1, 1, 32, 32))


def test_folder_without_images(tmp_path):
    empty = tmp_path / "no_images_here"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError) as e:
        data.ImageDataset.from_folder(empty)
    assert str(empty) in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        data.resolve_data(empty, "train", verbose=False)
    assert str(empty) in str(e.value)
    # a folder without the requested split names the folder too
    with pytest.raises(FileNotFoundError) as e:
        data.ImageDataset.from_folder(empty, "val")
    assert str(empty) in str(e.value) and "val" in str(e.value)


@pytest.fixture(scope="module")
def missing_data_run(tmp_path_factory):
    "dino-train pointed at a folder that does not exist: (path, completed process)."
    tmp = tmp_path_factory.mktemp("missing")
    missing = tmp / "does_not_exist"
    p = run_cli("dino-train", "--recipe", "tiny_v1", "--data", missing, "--out", tmp / "run", "--set", *SMALL_OVERRIDES)
    return missing, p


def test_cli_missing_data_folder(missing_data_run):
    missing, p = missing_data_run
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert str(missing) in last and "does not exist" in last


def test_cli_missing_data_folder_is_a_one_line_error(missing_data_run):
    missing, p = missing_data_run
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("dino-train: error:")
