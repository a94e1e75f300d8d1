"""DAVIS label propagation: J and F by hand, propagation properties, `dino-eval davis` end to end, clear errors."""
import json, math, sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import run_cli, REPO_ROOT, one_thread  # noqa: E402,F401

from dino_from_scratch.davis import (db_iou, db_f, seg2bmap, dilate_disk, boundary_radius, score_sequence,  # noqa: E402
                                     neighbourhood_mask, propagate_step, propagate_masks, labels_to_mask,
                                     davis_input_size, load_sequence, list_sequences, default_davis, davis_eval,
                                     patch_fg_labels, fit_fg_probe, DAVIS_SEQUENCES)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Every test here runs with one intra-op thread (see dino_test_utils.one_thread)."


@pytest.fixture(scope="module")
def davis(shared_data) -> Path:
    d = shared_data / "davis2016-mini"
    if not (d / "JPEGImages").is_dir(): pytest.skip(f"DAVIS not found at {d}")
    return d


@pytest.fixture(scope="module")
def rand():
    from dino_from_scratch.config import get_recipe
    from dino_from_scratch.eval import random_backbone
    return random_backbone(get_recipe("tiny_v1"), 0)


def _square(H=40, W=50, r0=10, c0=10, n=10):
    m = torch.zeros(H, W, dtype=torch.bool); m[r0:r0 + n, c0:c0 + n] = True
    return m


def _below(row, H=30, W=40):
    "Half-plane mask: rows >= row are the object."
    return (torch.arange(H)[:, None] >= row).expand(H, W)


# ---------------------------------------------------------------- J
def test_iou_by_hand():
    sq = _square()
    assert db_iou(sq, sq) == 1.0
    assert db_iou(sq, ~sq) == 0.0
    assert db_iou(sq, _square(c0=30)) == 0.0                               # disjoint squares
    assert db_iou(sq, _square(c0=13)) == pytest.approx(70 / 130)           # 10x7 overlap, union 2*100-70
    assert db_iou(sq, _square(r0=12, c0=12)) == pytest.approx(64 / 136)    # 8x8 overlap
    assert db_iou(torch.zeros(4, 4), torch.zeros(4, 4)) == 1.0             # both empty: 1 (DAVIS toolkit)
    assert db_iou(sq, torch.zeros_like(sq)) == 0.0
    # void pixels leave the count: voiding the 30 pixels the prediction adds beyond the truth gives 70/100
    pred = _square(c0=13)
    assert db_iou(sq, pred, void=pred & ~sq) == pytest.approx(70 / 100)
    with pytest.raises(ValueError, match="shape"): db_iou(sq, sq[:-1])


# ---------------------------------------------------------------- F
def test_boundary_map_and_radius():
    sq = _square()
    b = seg2bmap(sq)
    assert int(b.sum()) == 40                                  # a filled n x n square: the outline of (n+1)^2, 4n pixels
    assert b[9, 9:20].all() and b[9:20, 9].all() and b[19, 9:20].all() and b[9:20, 19].all()
    assert not b[10:19, 10:19].any()                           # no interior pixel
    full = torch.ones(8, 9, dtype=torch.bool)
    assert not seg2bmap(full).any()                            # the image border is not a boundary
    assert boundary_radius((480, 854)) == 8                    # ceil(0.008 * 979.7) = ceil(7.84)
    assert boundary_radius((100, 100)) == 2                    # ceil(1.13)
    assert boundary_radius((100, 100), bound_th=3) == 3        # >= 1: pixels


def test_dilation_matches_scipy_disk():
    from scipy.ndimage import binary_dilation
    from skimage.morphology import disk
    g = torch.Generator().manual_seed(0)
    for r in (1, 2, 5, 8):
        b = torch.rand(70, 90, generator=g) > 0.996
        b[0, 0] = b[-1, -1] = True                             # corners: the dilation is clipped at the border
        assert np.array_equal(dilate_disk(b, r).numpy(), binary_dilation(b.numpy(), structure=disk(r)))


def test_f_within_and_beyond_tolerance():
    half = _below(10)                                           # boundary: row 9, 40 pixels
    assert db_f(half, half) == 1.0
    assert db_f(half, _below(13), bound_th=3) == 1.0            # every boundary pixel 3 rows off: within 3 px
    assert db_f(half, _below(14), bound_th=3) == 0.0            # 4 rows off: none matched
    sq = _square()
    assert db_f(sq, _square(c0=13), bound_th=3) == 1.0          # shifted by 3 columns, tolerance 3
    assert db_f(sq, _square(c0=14), bound_th=3) < 1.0
    assert db_f(sq, torch.zeros_like(sq)) == 0.0                # nothing predicted: P=1, R=0
    assert db_f(torch.zeros_like(sq), sq) == 0.0                # nothing true: P=0, R=1
    assert db_f(torch.zeros(5, 5), torch.zeros(5, 5)) == 1.0


def test_f_partial_by_hand():
    """Truth: half-plane below row 10 (boundary row 9, 40 px). Prediction: the same on columns 0-19, 5 rows lower on
    20-39. Its boundary: row 9 cols 0-19 (20), a step on col 19 rows 10-14 (5), row 14 cols 20-39 (20) = 45 px.
    Tolerance 3: matched prediction pixels 20 + 3 (rows 10-12) -> P = 23/45; matched truth pixels: cols 0-19 plus
    cols 20-22 (within 3 px of (9, 19)) -> R = 23/40."""
    half = _below(10)
    step = half.clone(); step[10:15, 20:] = False
    assert int(seg2bmap(step).sum()) == 45
    P, R = 23 / 45, 23 / 40
    assert db_f(half, step, bound_th=3) == pytest.approx(2 * P * R / (P + R))
    # F is symmetric in its two masks (precision and recall swap)
    assert db_f(step, half, bound_th=3) == pytest.approx(2 * P * R / (P + R))


def test_score_sequence_excludes_first_and_last():
    gt = torch.zeros(5, 30, 40, dtype=torch.uint8); gt[:, 10:] = 1
    pred = gt.clone()
    pred[0] = 0; pred[4] = 0                                    # errors on the first and last frame do not count
    s = score_sequence(gt, pred)
    assert (s["J"], s["F"], s["J&F"]) == (1.0, 1.0, 1.0) and len(s["J_frames"][0]) == 3
    pred[2, 10:20] = 0                                          # frame 2: half of the object missing -> J = 1/2
    s = score_sequence(gt, pred)
    assert s["J"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert s["J&F"] == pytest.approx((s["J"] + s["F"]) / 2)
    with pytest.raises(ValueError, match="at least 3 frames"): score_sequence(gt[:2], gt[:2])


# ---------------------------------------------------------------- propagation
def test_propagate_step_properties():
    g = torch.Generator().manual_seed(1)
    h, w, M, D, C = 4, 6, 3, 16, 3
    q = torch.nn.functional.normalize(torch.randn(h * w, D, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(M, h * w, D, generator=g), dim=-1)
    y = torch.softmax(torch.randn(M, C, h * w, generator=g), dim=1)
    out = propagate_step(q, k, y, topk=5, temperature=0.1, allowed=neighbourhood_mask(h, w, 2))
    assert torch.allclose(out.sum(0), torch.ones(h * w), atol=1e-5)          # convex combinations of labels
    # radius 0 and top-1: each patch copies the label at its own position in the most similar context frame
    out = propagate_step(q, k, y, topk=1, allowed=neighbourhood_mask(h, w, 0))
    best = torch.einsum("id,mid->im", q, k).argmax(1)
    assert torch.allclose(out, y[best, :, torch.arange(h * w)].T)
    # a very high temperature averages the k neighbours equally
    out = propagate_step(q, k, y, topk=4, temperature=1e6)
    idx = torch.einsum("id,mjd->imj", q, k).reshape(h * w, -1).topk(4, 1).indices
    lab = y.permute(0, 2, 1).reshape(M * h * w, C)
    assert torch.allclose(out.T, lab[idx].mean(1), atol=1e-5)
    assert neighbourhood_mask(3, 4, 1).sum().item() == sum(
        sum(1 for a in range(3) for b in range(4) if abs(a - i) <= 1 and abs(b - j) <= 1) for i in range(3) for j in range(4))


@pytest.mark.parametrize("seed", [0, 1])
def test_identical_frames_reproduce_first_mask(rand, seed):
    "Every patch's nearest neighbour is itself: with k=1 the first mask (bands on patch rows, 3 objects) comes back exactly."
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, 64, 112), dtype=torch.uint8, generator=g)
    mask = torch.zeros(64, 112, dtype=torch.uint8); mask[16:32] = 1; mask[32:48] = 3; mask[48:] = 2
    frames = img.expand(7, -1, -1, -1)
    pred, soft = propagate_masks(rand, frames, mask, size=(64, 112), topk=1, return_soft=True)
    assert torch.equal(pred, mask.expand(7, -1, -1))
    assert torch.equal(soft, soft[:1].expand(7, -1, -1)) and soft.shape == (7, 4, 4 * 7)
    s = score_sequence(mask.expand(7, -1, -1), pred)
    assert s["objects"] == [1, 2, 3] and s["J&F"] == 1.0
    # at half the frame's resolution the labels are resized back to the frame size
    pred_half = propagate_masks(rand, frames, mask, size=(32, 64), topk=1)
    assert pred_half.shape == (7, 64, 112)


def test_input_size():
    assert davis_input_size((480, 854), 16) == (480, 848)          # the default short side 480 (DINO's read_frame)
    assert davis_input_size((480, 854), 16, 320) == (320, 560)
    assert davis_input_size((480, 854), 16, 240) == (240, 416)
    assert davis_input_size((480, 854), 16, 64) == (64, 112)
    assert davis_input_size((480, 854), 14, 240) == (238, 420)
    assert davis_input_size((854, 480), 16, "64") == (112, 64)     # portrait
    assert davis_input_size((480, 854), 16, "48x80") == (48, 80)
    with pytest.raises(ValueError, match="patch size 16"): davis_input_size((480, 854), 16, "50x80")
    with pytest.raises(ValueError, match="short side"): davis_input_size((480, 854), 16, "big")


def test_patch_fg_labels_by_hand():
    m = torch.zeros(1, 32, 48, dtype=torch.uint8); m[0, :16, :16] = 1; m[0, 16:, 16:24] = 255
    lab = patch_fg_labels(m, (2, 3))
    assert torch.equal(lab, torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g); y = (x[..., 1] > 0).float()
    probe = fit_fg_probe(x + 4 * y[..., None], y, epochs=200)
    assert torch.equal((probe.logits(x + 4 * y[..., None]) > 0).float(), y)


# ---------------------------------------------------------------- data and CLI
def test_default_davis(monkeypatch):
    monkeypatch.delenv("DINO_DAVIS", raising=False)
    assert default_davis().resolve() == (REPO_ROOT.parent / "shared" / "data" / "davis2016-mini").resolve()
    monkeypatch.setenv("DINO_DAVIS", "/somewhere/else")
    assert default_davis() == Path("/somewhere/else")


def test_shared_sequences(davis):
    assert tuple(list_sequences(davis)) == DAVIS_SEQUENCES
    s = load_sequence(davis, "car-shadow", max_frames=3)
    assert s.frames.shape == (3, 3, 480, 854) and s.frames.dtype == torch.uint8
    assert set(s.masks.unique().tolist()) == {0, 1} and s.n_objects == 1


def _one_json_line(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected exactly one line on stdout, got {lines!r}"
    return json.loads(lines[0])


def test_davis_cli_random_init(davis, rand):
    p = run_cli("dino-eval", "davis", "--recipe", "tiny_v1", "--random-init", "--sequences", "blackswan",
                "--max-frames", 5, "--size", 64, "--data", davis, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    res = _one_json_line(p.stdout)
    assert res["eval"] == "davis" and res["model"] == "random:tiny_v1"
    assert res["size"] == [64, 112] and list(res["per_sequence"]) == ["blackswan"]
    seq = res["per_sequence"]["blackswan"]
    assert (seq["n_frames"], seq["n_scored"]) == (5, 3)
    for k in ("J", "F", "J&F"): assert 0 <= res[k] <= 1
    assert res["J&F"] == pytest.approx((res["J"] + res["F"]) / 2)
    assert (res["topk"], res["temperature"], res["n_last_frames"], res["size_mask_neighborhood"]) == (5, 0.1, 7, 12)
    # the library in this process gives the same numbers (seeded backbone, deterministic propagation)
    lib = davis_eval(rand, davis, ["blackswan"], size=64, max_frames=5)
    assert lib["J"] == pytest.approx(res["J"], abs=1e-9) and lib["F"] == pytest.approx(res["F"], abs=1e-9)


def _fake_davis(root: Path, name="cat", n=3, masks=True):
    from PIL import Image
    (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
    if masks: (root / "Annotations" / "480p" / name).mkdir(parents=True)
    for i in range(n):                                          # a bright square on a dark, slowly brightening field
        img = np.full((96, 128, 3), 20 + 10 * i, np.uint8); img[16:64, 16:64] = (230, 180, 60)
        Image.fromarray(img).save(root / "JPEGImages" / "480p" / name / f"{i:05d}.png")
        if masks:
            m = np.zeros((96, 128), np.uint8); m[16:64, 16:64] = 255
            Image.fromarray(m).save(root / "Annotations" / "480p" / name / f"{i:05d}.png")
    return root


def _main_exit(argv) -> str:
    from dino_from_scratch import cli as ev
    with pytest.raises(SystemExit) as e:
        ev.eval_main([str(a) for a in argv])
    assert isinstance(e.value.code, str) and e.value.code.startswith("dino-eval: error:"), e.value.code
    return e.value.code


def test_bad_input(tmp_path):
    # a sequence folder without masks: the message names the missing Annotations folder
    root = _fake_davis(tmp_path / "nomasks", masks=False)
    with pytest.raises(FileNotFoundError, match="no masks for sequence 'cat'") as e:
        load_sequence(root, "cat")
    assert str(root / "Annotations" / "480p" / "cat") in str(e.value)
    msg = _main_exit(["davis", "--recipe", "tiny_v1", "--random-init", "--data", root, "--sequences", "cat", "--size", 32])
    assert str(root / "Annotations" / "480p" / "cat") in msg
    # a frame without its mask
    root = _fake_davis(tmp_path / "onemissing")
    (root / "Annotations" / "480p" / "cat" / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match="00001.png"): load_sequence(root, "cat")
    # an unknown sequence, a missing folder, too few frames, a first mask without the object
    root = _fake_davis(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="no frames for sequence 'dog'"): load_sequence(root, "dog")
    with pytest.raises(FileNotFoundError, match="DAVIS folder not found"): load_sequence(tmp_path / "nowhere", "cat")
    assert "at least 3 frames" in _main_exit(["davis", "--recipe", "tiny_v1", "--random-init", "--data", root,
                                              "--sequences", "cat", "--max-frames", 2, "--size", 32])
    from PIL import Image
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(root / "Annotations" / "480p" / "cat" / "00000.png")
    with pytest.raises(ValueError, match="no object"): load_sequence(root, "cat")
    # and through the CLI process: non-zero exit, nothing on stdout, the reason on stderr
    p = run_cli("dino-eval", "davis", "--recipe", "tiny_v1", "--random-init", "--data", tmp_path / "nowhere", timeout=60)
    assert p.returncode != 0 and p.stdout.strip() == ""
    assert "dino-eval: error:" in p.stderr and str(tmp_path / "nowhere") in p.stderr


def test_fake_sequence_end_to_end(tmp_path, rand):
    "Without shared data: a 4-frame video of a patch-aligned square on a brightening field; even random features track it."
    root = _fake_davis(tmp_path / "d", n=4)
    res = davis_eval(rand, root, size=96)
    assert res["n_sequences"] == 1 and res["size"] == [96, 128] and res["per_sequence"]["cat"]["n_scored"] == 2
    assert res["J"] > 0.9 and res["F"] > 0.8          # (the square's corners are rounded by the bilinear upsampling)
