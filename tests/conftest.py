"""Shared pytest setup: environment defaults (set before anything heavy is imported) and fixtures."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()

# --- environment defaults: this runs at conftest import, before test modules (and notebooks) import
# datasets / huggingface_hub / matplotlib. Subprocesses (notebook runs, nbdev_export) inherit them.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # hub names otherwise retry ~24 s before failing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("DINO_DATA") and (SHARED_DATA / "imagenette2-128").exists():
    os.environ["DINO_DATA"] = str(SHARED_DATA / "imagenette2-128")

# --- under pytest-xdist (2 workers on a 2-core machine) keep each worker to one intra-op thread
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")  # also reaches the notebook subprocesses
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def repo_root() -> Path:
    "Absolute path of the repository root."
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    "Absolute path of `<repo>/../shared/data`; skips the test when it is not there."
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def train_images(shared_data):
    "16 real training images (imagenette2-128/train), loaded once per test module; pass through `fresh` before training."
    from dino_from_scratch import data
    return data.ImageDataset.from_folder(shared_data / "imagenette2-128", "train").subset(16)


@pytest.fixture
def tmp_run_dir(tmp_path) -> Path:
    "A fresh, empty directory for a test's run outputs (checkpoints, logs, figures)."
    d = tmp_path / "run"
    d.mkdir()
    return d
