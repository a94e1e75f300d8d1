"Hugging Face `datasets` is a first-class data source: the same folder read through `datasets` gives the same items."
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import make_small_folder  # noqa: E402
from dino_from_scratch.data import ImageDataset, resolve_data  # noqa: E402


def test_hf_imagefolder_matches_folder(shared_data, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = make_small_folder(shared_data, tmp_path / "data", n_classes=3, n_train=5, n_val=2)
    hf = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "hf_cache"))["train"]
    a = ImageDataset.from_hf(hf)
    b = ImageDataset.from_folder(folder, "train")
    assert len(a) == len(b) == 15
    assert a.classes == b.classes                                  # same class names, same label ids
    # HF may order files differently: match by pixel content
    def key(item): return np.asarray(item[0]).tobytes()
    pa = sorted((key(a[i]), a[i][1]) for i in range(len(a)))
    pb = sorted((key(b[i]), b[i][1]) for i in range(len(b)))
    assert pa == pb                                                # identical pixels and labels


def test_resolve_data_order(shared_data, tmp_path, monkeypatch):
    "An explicit path beats $DINO_DATA; $DINO_DATA is used when no path is given; a missing split is named."
    folder = make_small_folder(shared_data, tmp_path / "data", n_classes=2, n_train=3, n_val=1)
    monkeypatch.setenv("DINO_DATA", str(shared_data / "imagenette2-128"))
    ds, where = resolve_data(folder, "val", verbose=False)
    assert len(ds) == 2 and where.endswith("val")
    ds, where = resolve_data(None, "val", verbose=False)
    assert len(ds) == 2000
    with pytest.raises(FileNotFoundError, match="no 'test2' split"):
        resolve_data(folder, "test2", verbose=False)


def test_bundled_photos_fallback(tmp_path, monkeypatch):
    "Offline with no data anywhere, the real photos shipped inside scikit-image/matplotlib are used."
    from dino_from_scratch import data
    monkeypatch.delenv("DINO_DATA", raising=False)
    monkeypatch.setenv("DINO_NO_DOWNLOAD", "1")
    monkeypatch.setattr(data, "project_data_dir", lambda: tmp_path / "nothing")
    ds, where = resolve_data(None, "train", verbose=False)
    assert where == "bundled-photos" and len(ds) >= 10
    img, label = ds[0]
    assert img.mode == "RGB" and min(img.size) >= 64 and label == -1
