"""Two processes against one, at the trainer level, with every random term on.

tests/scripts/ddp_equality_step.py trains a tiny DINOv3 recipe with iBOT masks, KoLeo over the global batch, Sinkhorn-Knopp,
drop-path 0.2 and RoPE jitter + rescale: once in this venv's python (1 process, 8 images a step) and once under
`accelerate launch` (2 processes over gloo, 4 images each: the same global batch). Every random draw of the step is a
function of (seed, step, the image's position in the global batch), so the two runs must agree: the mean of the two
ranks' losses equals the 1-process loss, and the final checkpoints (weights, loss state, AdamW moments) are equal.
The AdamW moments scale with the gradient (first) and its square (second), so a run that summed the gradients over
processes instead of averaging them fails here even though Adam's update itself hardly changes (tolerance 1e-5
everywhere, relative for the moments); the script turns gradient clipping off, which would otherwise scale a doubled
gradient back to the same norm (with the recipe's clip at 3.0 the summing run matched the correct one to 3 digits).
At the recipe's lr (a few 1e-5 per step): Adam turns float noise of near-zero gradients into weight
differences proportional to the lr (at lr 0.01: up to 4e-5 on the student, losses and moments still <= 2e-6).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import launch_ranks, make_small_folder  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "ddp_equality_step.py"
STEPS, GLOBAL_BATCH, TOL = 3, 8, 1e-5


def launch(out: Path, folder: Path, world: int, env_extra: dict | None = None) -> list[dict]:
    "Run the script on `world` processes (accelerate launch, gloo) or directly (world 1); the ranks' json dumps."
    return launch_ranks(SCRIPT, out, world, folder, STEPS, GLOBAL_BATCH // world, env_extra=env_extra)


def final_checkpoint(out: Path) -> dict:
    from dino_from_scratch.checkpoint import read_checkpoint
    tensors, meta = read_checkpoint(out / "run" / "checkpoints" / f"step_{STEPS:07d}.safetensors")
    assert meta["step"] == STEPS
    return tensors


def compare(single: list[dict], pair: list[dict], one: dict, two: dict) -> dict:
    "Largest differences between the runs: losses (mean over the 2 ranks vs 1 process) and every checkpoint tensor."
    diffs = {}
    for term in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
        s, (a, b) = single[0][term], (pair[0][term], pair[1][term])
        assert len(s) == len(a) == len(b) == STEPS
        diffs[term] = max(abs((x + y) / 2 - z) for x, y, z in zip(a, b, s))
    assert one.keys() == two.keys()
    for prefix, name in (("student.", "student"), ("teacher.", "teacher"), ("optim.", "optim"), ("loss.", "loss_state")):
        keys = [k for k in one if k.startswith(prefix)]
        # the AdamW moments relative to the tensor's largest entry (when above 1): without clipping the second moment
        # holds squared gradients of a few units, where float32 rounding alone exceeds 1e-5 in absolute terms
        scale = (lambda k: max(1.0, one[k].double().abs().max().item())) if prefix == "optim." else (lambda k: 1.0)
        diffs[name] = max((one[k].double() - two[k].double()).abs().max().item() / scale(k) for k in keys) if keys else 0.0
    return diffs


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_eq")
    folder = make_small_folder(shared_data, tmp / "data")      # 36 train images: 4 steps of 8 per epoch
    single = launch(tmp / "single", folder, 1)
    pair = launch(tmp / "pair", folder, 2)
    return dict(single=single, pair=pair, one=final_checkpoint(tmp / "single"), two=final_checkpoint(tmp / "pair"))


def test_every_term_ran(runs):
    s, (r0, r1) = runs["single"][0], runs["pair"]
    assert (s["world"], r0["world"], r1["world"], r0["backend"]) == (1, 2, 2, "gloo")
    for term in ("dino_loss", "ibot_loss", "koleo_loss"):
        assert all(abs(v) > 0 for v in s[term]), (term, s[term])
    assert r0["ibot_loss"] != r1["ibot_loss"] and r0["dino_loss"] != r1["dino_loss"]    # the ranks saw different images
    # KoLeo over the global batch: each rank averages over its own images, neighbours searched among all 8
    assert r0["koleo_loss"] != r1["koleo_loss"]
    assert "student.backbone.blocks.0.attn.qkv.weight" in runs["one"]
    assert any(k.startswith("student.ibot_head.") for k in runs["one"])              # a separate iBOT head was trained


def test_two_processes_reproduce_one_on_the_global_batch(runs):
    diffs = compare(runs["single"], runs["pair"], runs["one"], runs["two"])
    print("max |2 processes - 1 process|:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert any(k.startswith("optim.") for k in runs["one"])            # the AdamW moments are compared too
    for k, v in diffs.items(): assert v <= TOL, (k, v, diffs)
    # and the weights moved: equal because both runs learned the same thing, not because nothing happened
    k = "backbone.blocks.0.attn.qkv.weight"
    moved = (runs["one"]["student." + k] - runs["one"]["teacher." + k]).abs().max().item()   # the EMA teacher lags
    assert moved > 5 * TOL, moved
