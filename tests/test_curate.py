"""Data curation (chapter 26): deduplication, retrieval, hierarchical k-means + balanced sampling, batch mixing,
embeddings across processes, `dino-curate`, and clear errors on bad input."""
import io, json, shutil, socket, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import REPO_ROOT, SMALL_OVERRIDES, cli_env, make_small_folder, one_thread  # noqa: E402,F401

from dino_from_scratch import curate  # noqa: E402
from dino_from_scratch.curate import (CurationError, MixedBatches, PixelDescriptor, balanced_split,  # noqa: E402
                                      connected_components, embed_pool, embed_sources, hierarchical_kmeans,
                                      hierarchical_sample, image_pool, kmeans, knn_search, relative_dedup,
                                      retrieve_samples, self_dedup)
from dino_from_scratch.data import _item_seed  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Every test here runs with one intra-op thread (see dino_test_utils.one_thread)."


def unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rings(sizes, seed=0):
    "Points on 5 well-separated rings of equal area with long-tailed counts (the ssl-data-curation README toy)."
    rng = np.random.default_rng(seed)
    centres = np.array([[-2.2, 1.], [1.2, 0.2], [2.2, 1.], [-1.2, 0.2], [0., 1.]])
    pts, ring = [], []
    for m, (n, c) in enumerate(zip(sizes, centres)):
        r, t = rng.uniform(0.7, 1.0, n), rng.uniform(0, 2 * np.pi, n)
        pts.append(np.stack([r * np.cos(t), r * np.sin(t)], 1) + c); ring += [m] * n
    return np.concatenate(pts).astype(np.float32), np.array(ring)


# ------------------------------------------------------------------ nearest neighbours
def test_faiss_and_torch_return_the_same_neighbours():
    base, q = unit(600, 32, 0), unit(80, 32, 1)
    s_f, i_f = knn_search(q, base, 10, "faiss", "flat")
    s_t, i_t = knn_search(q, base, 10, "torch")
    np.testing.assert_array_equal(i_f, i_t)
    np.testing.assert_allclose(s_f, s_t, atol=1e-5)
    assert (np.diff(s_f, axis=1) <= 1e-7).all()                       # sorted by decreasing similarity
    # the same on self-search without the query itself, and exact against a brute-force argsort
    s_f, i_f = knn_search(base, base, 5, "faiss", exclude_self=True)
    _, i_t = knn_search(base, base, 5, "torch", exclude_self=True)
    np.testing.assert_array_equal(i_f, i_t)
    sims = base @ base.T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_array_equal(i_f, np.argsort(-sims, axis=1)[:, :5])


def test_ivf_scanning_every_cell_is_exact_and_probing_few_is_close():
    base, q = unit(4000, 16, 2), unit(100, 16, 3)
    _, exact = knn_search(q, base, 10, "torch")
    ix = curate.build_index(base, "ivf", nlist=50, nprobe=50)          # all cells probed: an exact search
    _, i_all = knn_search(q, base, 10, "faiss", ix)
    np.testing.assert_array_equal(i_all, exact)
    ix.nprobe = 8
    _, i_few = knn_search(q, base, 10, "faiss", ix)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_few, exact)])
    assert 0.5 < recall < 1.0, recall                                   # approximate, but most neighbours found


# ------------------------------------------------------------------ deduplication
def _edits(img):
    w, h = img.size
    b = io.BytesIO(); img.save(b, "JPEG", quality=40)
    return [img.copy(), Image.open(io.BytesIO(b.getvalue())).convert("RGB"), img.resize((int(w * .6), int(h * .6))),
            ImageEnhance.Contrast(img).enhance(0.7), ImageEnhance.Brightness(img).enhance(1.15)]


def test_connected_components_hand_computed():
    np.testing.assert_array_equal(connected_components(7, [(0, 1), (1, 2), (4, 5)]), [0, 0, 0, 3, 4, 4, 6])
    # a chain given back to front still ends with one label, the smallest index
    np.testing.assert_array_equal(connected_components(6, [(4, 5), (3, 4), (2, 3), (1, 2)]), [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(connected_components(3, []), [0, 1, 2])


def test_self_dedup_finds_planted_copies_and_no_false_pairs(shared_data):
    files = sorted((shared_data / "imagenette2-128" / "train").rglob("*.jpg"))
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:80]]
    originals = [Image.open(f).convert("RGB") for f in files]
    planted_of = []                                                     # pool row -> original row
    pool = list(originals)
    for o in range(0, 80, 10):                                          # 8 originals, 5 edited copies each
        for e in _edits(originals[o]):
            pool.append(e); planted_of.append(o)
    emb, valid = embed_sources(PixelDescriptor(16), pool, progress=False)
    assert valid.all()
    r = self_dedup(emb, 0.95, k=16)
    for j, o in enumerate(planted_of):                                  # every copy is grouped with its original
        assert r.group[80 + j] == r.group[o] == o, (j, o)
        assert not r.keep[80 + j]
    assert r.keep[:80].all()                                            # every original is kept
    # no pair between two distinct originals: each found pair involves a planted copy
    assert all(b >= 80 for a, b in r.pairs), r.pairs[r.pairs[:, 1] < 80]
    d = emb[:80] @ emb[:80].T
    np.fill_diagonal(d, -1)
    assert d.max() < 0.95                                               # (the distinct photos are indeed below it)
    assert len(r.pairs) >= 8 * 5


def test_relative_dedup_removes_a_planted_copy_of_an_eval_image(shared_data):
    val = sorted((shared_data / "imagenette2-128" / "val").rglob("*.jpg"))[:40]
    train = sorted((shared_data / "imagenette2-128" / "train").rglob("*.jpg"))[:30]
    img = Image.open(val[7]).convert("RGB")
    b = io.BytesIO(); img.resize((100, 100)).save(b, "JPEG", quality=50)
    desc = PixelDescriptor(16)
    pool_emb, _ = embed_sources(desc, [*train, b.getvalue()], progress=False)
    eval_emb, _ = embed_sources(desc, val, progress=False)
    r = relative_dedup(pool_emb, eval_emb, 0.95)
    assert r.drop.tolist() == [False] * 30 + [True]
    assert r.nearest[30] == 7 and r.sims[30] > 0.95


# ------------------------------------------------------------------ hierarchical k-means and balanced sampling
@pytest.mark.parametrize("seed", [0, 1])
def test_hierarchical_kmeans_covers_a_long_tailed_mixture_uniformly(seed):
    """On 5 equal-area rings holding 8000/3200/400/200/80 points, a balanced sample of 400 over the clusters of
    2-level k-means with resampling gives each ring within 3x of its uniform share (80); plain k-means with the same
    top-level k gives the largest ring more than 2x and the smallest less than 0.3x (measured: hierarchy 0.44-1.78,
    plain 2.3-2.6 and 0.12-0.21)."""
    x, ring = rings((8000, 3200, 400, 200, 80), seed)
    T = 400
    hier = hierarchical_kmeans(x, [400, 120], n_resamples=10, seed=seed)
    plain = hierarchical_kmeans(x, [120], n_resamples=0, seed=seed)
    h = np.bincount(ring[hierarchical_sample(hier, T, seed=seed)], minlength=5) / (T / 5)
    p = np.bincount(ring[hierarchical_sample(plain, T, seed=seed)], minlength=5) / (T / 5)
    assert h.max() < 3 and h.min() > 1 / 3, h
    assert p.max() > 2 and p.min() < 0.3, p
    r = np.bincount(ring[np.random.default_rng(seed).permutation(len(x))[:T]], minlength=5) / (T / 5)
    assert r.max() > 3                                                   # random sampling follows the mass


def test_balanced_split_hand_computed():
    rng = np.random.default_rng(0)
    assert balanced_split([10, 1, 5, 3], 10, rng).tolist() == [3, 1, 3, 3]
    c = balanced_split([10, 1, 5, 3], 11, rng).tolist()
    assert c in ([4, 1, 3, 3], [3, 1, 4, 3])
    assert balanced_split([10, 1, 5, 3], 19, rng).tolist() == [10, 1, 5, 3]
    assert balanced_split([4, 4, 4], 6, rng).tolist() == [2, 2, 2]


def test_balanced_sampling_takes_the_same_count_from_every_cluster_at_every_level():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.3, (n, 4)) for c, n in zip(range(0, 30, 3), np.geomspace(2000, 20, 10).astype(int))])
    h = hierarchical_kmeans(x.astype(np.float32), [60, 12, 3], n_resamples=3)
    target = 300
    idx, counts = hierarchical_sample(h, target, return_counts=True, seed=1)
    assert len(idx) == target == len(set(idx.tolist()))
    for l in range(len(h)):
        sizes, c = h.sizes(l), counts[l]
        parent = h.levels[l + 1].assign if l + 1 < len(h) else np.zeros(len(sizes), int)
        for p in np.unique(parent):
            kids = np.flatnonzero(parent == p)
            tot = c[kids].sum()
            if tot == 0: continue
            cut = c[kids].max()
            # every cluster gives min(size, cut) or cut - 1 (the remainder is spread one by one): equal counts
            assert all(c[k] == sizes[k] or c[k] in (cut, cut - 1) for k in kids), (l, p, c[kids], sizes[kids])
        # the counts of a level add up to the counts of its parents
        if l + 1 < len(h):
            np.testing.assert_array_equal(np.bincount(parent, weights=c, minlength=len(counts[l + 1])).astype(int), counts[l + 1])
    # the bottom-level counts are what was drawn
    np.testing.assert_array_equal(np.bincount(h.levels[0].assign[idx], minlength=len(counts[0])), counts[0])


def test_torch_kmeans_fallback_separates_blobs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, (200, 3)) for c in (0, 5, 10)]).astype(np.float32)
    truth = np.repeat(np.arange(3), 200)
    for backend in ("torch", "faiss"):
        c, a, d = kmeans(x, 3, seed=0, backend=backend)
        assert len(np.unique(a)) == 3
        for t in range(3): assert len(np.unique(a[truth == t])) == 1, backend   # each blob is one cluster
        np.testing.assert_allclose(d, ((x - c[a]) ** 2).sum(1), rtol=1e-3, atol=1e-4)


def test_retrieval_budget_and_backends():
    pool, seeds = unit(500, 16, 4), unit(20, 16, 5)
    got = retrieve_samples(pool, seeds, budget=137)
    assert len(got) == 137 == len(set(got.tolist()))
    first = retrieve_samples(pool, seeds, n_per_seed=1)
    _, nn1 = knn_search(seeds, pool, 1, "torch")
    assert set(first.tolist()) == set(nn1[:, 0].tolist())
    assert set(got[:len(first)].tolist()) == set(first.tolist())        # rank order: all first neighbours first
    assert set(retrieve_samples(pool, seeds, 4, backend="torch").tolist()) == set(retrieve_samples(pool, seeds, 4, backend="faiss").tolist())


# ------------------------------------------------------------------ batch mixing
def test_vectorised_hash_equals_the_python_one():
    steps = np.array([0, 1, 2, 17, 12345, 10**9])
    for seed in (0, 3):
        got = curate._item_seed_np(seed, steps, -3)
        assert [int(v) for v in got] == [_item_seed(seed, int(s), -3) for s in steps]


def test_mixed_batches_fraction_ranks_and_resume():
    sizes, p = [50, 130], 0.1
    s0 = MixedBatches(sizes, 4, rank=0, world=2, seed=3, p=p)
    s1 = MixedBatches(sizes, 4, rank=1, world=2, seed=3, p=p)
    # over 20,000 steps the homogeneous fraction is within 0.01 of p (binomial sd 0.0021: 4.7 sd)
    frac = s0.homogeneous_steps(np.arange(20_000)).mean()
    assert abs(frac - p) < 0.01, frac
    np.testing.assert_array_equal(s0.homogeneous_steps(np.arange(5000)), s1.homogeneous_steps(np.arange(5000)))
    it0, it1 = iter(s0), iter(s1)
    seen_h = seen_m = 0
    for step in range(300):
        b0, b1 = next(it0), next(it1)
        kind, whole = s0.global_batch(step)
        assert kind == s1.global_batch(step)[0]                          # the same decision on every rank
        assert sorted(b0 + b1) == sorted(whole) and not set(b0) & set(b1)
        assert len(b0) == len(b1) == 4
        if kind == "homogeneous":
            seen_h += 1
            assert all(i < 50 for _, i in whole)
        else: seen_m += 1
    assert seen_h > 10 and seen_m > 200
    # exact on resume: a sampler started at step 123 yields what the fresh one yields from step 123
    fresh = iter(MixedBatches(sizes, 4, 0, 2, seed=3, p=p))
    for _ in range(123): next(fresh)
    resumed = iter(MixedBatches(sizes, 4, 0, 2, seed=3, start_step=123, p=p))
    for _ in range(80): assert next(resumed) == next(fresh)
    # a mixture epoch visits every image once (no homogeneous steps with p = 0)
    m = MixedBatches(sizes, 4, 0, 1, seed=0, p=0.0)
    it = iter(m)
    idx = [i for _ in range(m.per_epoch) for _, i in next(it)]
    assert len(set(idx)) == len(idx) == m.per_epoch * 4
    with pytest.raises(CurationError, match="probability"): MixedBatches(sizes, 4, p=1.5)
    with pytest.raises(CurationError, match="homogeneous=2"): MixedBatches(sizes, 4, homogeneous=2)


def test_mixed_batches_drive_a_trainer(shared_data, tmp_path):
    from dino_from_scratch.config import tiny_v1, override
    from dino_from_scratch.data import ImageDataset
    from dino_from_scratch.train import StepBatches, Trainer
    a = sorted((shared_data / "imagenette2-128" / "train").rglob("*.jpg"))[:16]
    b = sorted((shared_data / "camvid" / "train").glob("*.jpg"))[:16]
    recipe = override(tiny_v1(), SMALL_OVERRIDES + ["data.batch_size=4"])
    tr = Trainer(recipe, out=tmp_path / "run", dataset=ImageDataset([*a, *b]), verbose=False)
    tr.batches = MixedBatches([16, 16], 4, tr.acc.process_index, tr.acc.num_processes, recipe.run.seed, p=0.5)
    assert tr.batches.per_epoch == StepBatches(32, 4).per_epoch          # the schedules' epochs stay the mixture's
    hist = tr.fit(max_steps=3, progress=False)
    assert tr.step == 3 and np.isfinite(hist[-1]["loss"])


# ------------------------------------------------------------------ embeddings on disk and across processes
def test_embed_pool_writes_reuses_and_marks_unreadable(shared_data, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for f in sorted((shared_data / "camvid" / "train").glob("*.jpg"))[:6]: shutil.copy(f, d / f.name)
    (d / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really")
    desc = PixelDescriptor(16)
    e = embed_pool(desc, image_pool([d]), tmp_path / "emb", 16, progress=False)
    assert e.emb.shape == (7, 256) and e.valid.tolist() == [True] * 6 + [False]
    assert e.meta["n_valid"] == 6 and all(Path(p).is_absolute() for p in e.paths)
    stamp = (tmp_path / "emb" / "embeddings.npy").stat().st_mtime_ns
    again = embed_pool(desc, image_pool([d]), tmp_path / "emb", 16, progress=False)
    assert (tmp_path / "emb" / "embeddings.npy").stat().st_mtime_ns == stamp           # reused
    np.testing.assert_array_equal(np.asarray(again.emb), np.asarray(e.emb))
    (d / "zz_broken.jpg").unlink()
    third = embed_pool(desc, image_pool([d]), tmp_path / "emb", 16, progress=False)   # a different pool: recomputed
    assert len(third) == 6 and third.valid.all()
    np.testing.assert_array_equal(np.asarray(third.emb), np.asarray(e.emb)[:6])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_embed_what_one_process_embeds(shared_data, tmp_path):
    folder = make_small_folder(shared_data, tmp_path / "data", n_classes=3, n_train=7, n_val=4)   # 33 images
    (folder / "train" / "broken.jpg").write_bytes(b"nope")                                      # + 1 unreadable
    env = cli_env() | {"ACCELERATE_USE_CPU": "true"}
    env["PYTHONPATH"] = ":".join([str(REPO_ROOT)] + [q for q in env.get("PYTHONPATH", "").split(":") if q])   # this checkout
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(Path(__file__).parent / "scripts" / "curate_embed.py"), str(tmp_path / "two"), str(folder)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert p.returncode == 0, f"accelerate launch failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    assert "rank 0/2" in p.stdout and "rank 1/2" in p.stdout
    two = curate.Embeddings.load(tmp_path / "two")
    assert two.meta["world"] == 2 and not list((tmp_path / "two").glob(".shard*"))
    model, size, eid = curate.load_embedder("random:tiny_v2")
    one = embed_pool(model, image_pool([folder]), tmp_path / "one", size, batch_size=8, embedder_id=eid, progress=False)
    assert two.paths == one.paths and len(one) == 34
    np.testing.assert_array_equal(two.valid, one.valid)
    assert int(one.valid.sum()) == 33
    np.testing.assert_allclose(np.asarray(two.emb), np.asarray(one.emb), atol=1e-5)


# ------------------------------------------------------------------ the command
def test_dino_curate_commands(shared_data, tmp_path):
    cam = shared_data / "camvid" / "train"
    env = cli_env()
    env["PYTHONPATH"] = ":".join([str(REPO_ROOT)] + [q for q in env.get("PYTHONPATH", "").split(":") if q])
    def run(*args):
        return subprocess.run([sys.executable, "-m", "dino_from_scratch.curate", *map(str, args)], capture_output=True,
                              text=True, timeout=300, env=env, cwd=REPO_ROOT)
    p = run("embed", cam, "--embedder", "pixels:16", "--out", tmp_path / "emb")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["n"] == 367
    curate.main(["dedup", "--emb", str(tmp_path / "emb"), "--threshold", "0.97", "--out", str(tmp_path / "d.csv")])
    kept = (tmp_path / "d.csv").read_text().splitlines()
    assert kept[0] == "path,label" and 1 < len(kept) - 1 < 367                          # consecutive frames merged
    curate.main(["cluster", "--emb", str(tmp_path / "emb"), "--subset", str(tmp_path / "d.csv"), "--levels", "12,3",
                 "--resamples", "2", "--out", str(tmp_path / "hkm")])
    curate.main(["sample", "--hierarchy", str(tmp_path / "hkm"), "--target", "30", "--out", str(tmp_path / "s.csv")])
    rows = [l.rsplit(",", 1) for l in (tmp_path / "s.csv").read_text().splitlines()[1:]]
    kept_paths = {l.rsplit(",", 1)[0] for l in kept[1:]}
    assert len(rows) == 30 and all(l == "-1" and Path(p).is_absolute() and p in kept_paths for p, l in rows)
    # bad input from the command line: a clear message, exit code 1
    p = run("sample", "--hierarchy", tmp_path / "hkm", "--target", 10**6, "--out", tmp_path / "x.csv")
    assert p.returncode == 1 and "pool smaller than the requested sample" in p.stderr and "1000000" in p.stderr


# ------------------------------------------------------------------ bad input: clear errors naming the values
def test_bad_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurationError, match="empty pool"): image_pool([tmp_path / "empty"])
    (tmp_path / "bad").mkdir()
    for i in range(3): (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(CurationError, match="unreadable pool: none of the 3 images"):
        embed_pool(PixelDescriptor(), image_pool([tmp_path / "bad"]), tmp_path / "e", progress=False)
    pool, seeds = unit(50, 8), unit(5, 8, 1)
    with pytest.raises(CurationError, match="budget=51 but the pool has 50"): retrieve_samples(pool, seeds, budget=51)
    x, _ = rings((60, 30, 10, 5, 5))
    h = hierarchical_kmeans(x, [10, 3], n_resamples=1)
    with pytest.raises(CurationError, match="target=111, pool has 110"): hierarchical_sample(h, 111)
    with pytest.raises(CurationError, match="dimension 12 but the pool's have 8"): retrieve_samples(pool, unit(5, 12), 4)
    with pytest.raises(CurationError, match="dimension 12 but the pool has dimension 8"): knn_search(unit(5, 12), pool, 3)
    with pytest.raises(CurationError, match="k=51 neighbours asked, but the pool has only 50"): knn_search(seeds, pool, 51)
    with pytest.raises(CurationError, match="k=51 clusters asked, but there are only 50 points"): kmeans(pool, 51)
    with pytest.raises(CurationError, match="level 2 asks for k=20 clusters, but level 1 has only 10"):
        hierarchical_kmeans(x, [10, 20])
    with pytest.raises(CurationError, match="evaluation set's have 12"): relative_dedup(pool, unit(4, 12), 0.9)
