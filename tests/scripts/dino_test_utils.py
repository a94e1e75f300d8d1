"""Helpers shared by the integration tests: a very small recipe, a small labelled image folder, CLI runners.

Imported by the test modules after `sys.path.insert(0, <tests/scripts>)`; not a test module itself.
"""
from __future__ import annotations
import json, os, subprocess, sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = REPO_ROOT / ".venv" / "bin"

# A recipe small enough that a step takes a few milliseconds on one CPU core.
SMALL_OVERRIDES = ["data.batch_size=8", "data.num_workers=0", "model.depth=1", "model.embed_dim=32",
                   "model.num_heads=2", "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
                   "optim.epochs=1", "run.log_every=1", "run.ckpt_every=2", "data.crops.n_local=2"]


def small_recipe(*extra: str):
    "tiny_v1 shrunk by SMALL_OVERRIDES, then `extra` overrides."
    from dino_from_scratch.config import tiny_v1, override
    return override(tiny_v1(), SMALL_OVERRIDES + list(extra))


def make_small_folder(shared_data: Path, dest: Path, n_classes=3, n_train=12, n_val=6) -> Path:
    "dest/{train,val}/<class>/ with symlinks to the first few images of the first classes of imagenette2-128."
    src = Path(shared_data) / "imagenette2-128"
    for split, n in (("train", n_train), ("val", n_val)):
        for c in sorted(p for p in (src / split).iterdir() if p.is_dir())[:n_classes]:
            (dest / split / c.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(c.iterdir())[:n]:
                (dest / split / c.name / f.name).symlink_to(f)
    return dest


def cli_env() -> dict:
    "Environment for CLI subprocesses: one intra-op thread, offline, no colour, Agg backend."
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return env


def run_cli(tool: str, *args, timeout=180, cwd=None) -> subprocess.CompletedProcess:
    "Run `.venv/bin/<tool> args...` and return the completed process (text stdout/stderr)."
    cmd = [str(VENV_BIN / tool), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=cwd or REPO_ROOT)


def read_metrics(out: Path) -> list[dict]:
    "The lines of out/metrics.jsonl as dicts."
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def optimizer_of(trainer):
    "The plain torch optimizer behind Accelerate's wrapper."
    return trainer.opt.optimizer if hasattr(trainer.opt, "optimizer") else trainer.opt


import pytest  # noqa: E402


@pytest.fixture(autouse=False)
def one_thread():
    """One intra-op thread for the test (restored after): the machine has 2 cores shared with other jobs, and
    2 threads under contention make these tiny models ~20x slower. Import it into a test module with autouse."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fresh(ds):
    "A new ImageDataset over the same files (a trainer sets its own transform and seed on the dataset it gets)."
    from dino_from_scratch import data
    return data.ImageDataset(ds.sources, ds.labels, classes=ds.classes, name=ds.name)


def free_port() -> int:
    "A TCP port that is free right now on 127.0.0.1 (for a process group's rendezvous)."
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: Path, out: Path, world: int, *args: str, env_extra: dict | None = None, timeout: int = 300) -> list[dict]:
    """Run `script out *args` on `world` CPU processes (`accelerate launch`, gloo) or directly in the venv's Python (world
    1), and return the json each rank wrote to `out/rank{r}.json`."""
    env = cli_env() | {"ACCELERATE_USE_CPU": "true"} | (env_extra or {})
    argv = [str(script), str(out), *map(str, args)]
    if world == 1: cmd = [str(VENV_BIN / "python"), *argv]
    else: cmd = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(world), "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    assert p.returncode == 0, f"{Path(script).name} on {world} process(es) failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
