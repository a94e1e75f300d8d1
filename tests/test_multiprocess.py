"""A real 2-process DDP run on CPU (gloo) under `accelerate launch`: the ranks stay in sync and see different data.

accelerate 1.15 on CPU: `--cpu --num_processes 2` starts ONE process; `ACCELERATE_USE_CPU=true` with `--multi_gpu`
starts two that talk over gloo (DESIGN.md section 2). The script asserts nothing itself; it dumps what each rank holds.
"""
import json, socket, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import REPO_ROOT, VENV_BIN, cli_env, make_small_folder  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "ddp_step.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    folder = make_small_folder(shared_data, tmp / "data")           # 36 train images
    out = tmp / "out"
    out.mkdir()
    env = cli_env() | {"ACCELERATE_USE_CPU": "true"}
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(SCRIPT), str(out), str(folder)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO_ROOT)
    assert p.returncode == 0, f"accelerate launch failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    state = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    return out, info, state


def test_two_real_processes_over_gloo(ddp_run):
    out, info, _ = ddp_run
    assert [i["rank"] for i in info] == [0, 1]
    assert all(i["world"] == 2 and i["backend"] == "gloo" and i["step"] == 2 for i in info)
    # only the main process writes the log: one line per step
    lines = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]


def test_ranks_hold_identical_weights_that_moved(ddp_run):
    _, _, (s0, s1) = ddp_run
    assert s0.keys() == s1.keys()
    finals = [k for k in s0 if k.startswith("final.")]
    assert any(k.startswith("final.student.") for k in finals) and any(k.startswith("final.teacher.") for k in finals)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between rank 0 and rank 1"
    # the steps changed the weights (a run that did nothing would also be "in sync")
    for net in ("student", "teacher"):
        keys = [k for k in s0 if k.startswith(f"final.{net}.")]
        moved = [k for k in keys if not torch.equal(s0[k], s0["init." + k[len("final."):]])]
        assert f"final.{net}.backbone.pos_embed" in moved and f"final.{net}.head.mlp.0.weight" in moved
        assert f"final.{net}.head.last_layer.weight_v" in moved
    # the loss center is the same on both ranks and no longer its initial zeros
    assert torch.equal(s0["final.center"], s1["final.center"])
    assert s0["final.center"].abs().sum() > 0


def test_ranks_see_different_images(ddp_run):
    _, info, _ = ddp_run
    seen = [{tuple(k) for k in i["seen"]} for i in info]
    # each rank loaded 2 steps x 4 images, exactly what its sampler slice said, and nothing the other rank loaded
    for i, s in zip(info, seen):
        assert len(i["seen"]) == 8 and len(s) == 8
        assert sorted(i["seen"]) == sorted(k for b in i["sampler_batches"] for k in b)
    assert not (seen[0] & seen[1])
    # together they cover the first 2 global batches of 8 of epoch 0's order (the same for every rank)
    from dino_from_scratch.train import StepBatches
    sb = StepBatches(36, 4, rank=0, world=2, seed=0)
    order = sb.epoch_order(0)[:16].tolist()
    assert sorted(i for _, i in seen[0] | seen[1]) == sorted(order)
    assert [[i for _, i in b] for b in info[0]["sampler_batches"]] == [order[0:8:2], order[8:16:2]]
    assert [[i for _, i in b] for b in info[1]["sampler_batches"]] == [order[1:8:2], order[9:16:2]]
    # the two ranks computed different local losses (different images), yet ended with the same weights
    assert info[0]["losses"] != info[1]["losses"]
