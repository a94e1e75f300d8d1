"""The miniature curation experiment of chapter 26: which sample of a messy pool trains the better tiny_v2?

Pool: every image of the shared sources that is not an evaluation image: Imagenette train (7,469), Flickr8k photos
of captions-mini/train (6,091), NYU frames of depth-mini/train (975, RGB only), CamVid train frames (367) and DAVIS
frames (249): long-tailed, with near-duplicate video frames, partly off-task. Never Imagenette val, CamVid val, or
the captions / depth val splits: those are the evaluation sets, and relative deduplication (copy descriptor, cosine
> 0.95) removes any pool image that is a near-copy of one of them, in every arm.

Curation (`--stage curate`): copy descriptors (pixels:16) -> self-deduplication (0.95) for the curated arms;
semantic embeddings from a trained teacher (`--embedder RUN_DIR`, default the shared tiny_v2 run; random
init if absent; the stored results used the flagship run `tiny`);
then four file lists of the same size `--budget`:
  random      a uniform sample of the pool (relative dedup only: the uncurated baseline)
  clusters    hierarchical k-means [400, 80, 16] with 10 resampling steps + balanced sampling (Vo et al. 2024)
  retrieval   sample-based retrieval (DINOv2) from the deduplicated pool, seeded by 50 Imagenette train images
              per class (500; they are in the pool and are their own first neighbours)
  combined    half retrieval + half balanced clusters (disjoint), trained with DINOv3 batch mixing: 10% of the
              steps a homogeneous batch from the retrieval half
Training (`--stage train --arm NAME`): tiny_v2 for `--steps` steps at batch 32 (schedules sized to end there), one
thread, once per training seed of `--train-seeds` (the file lists stay those of `--seed`). Evaluation: weighted k-NN
(k=20, T=0.07) on imagenette2-128/val with imagenette2-128/train as memory bank, and the CamVid linear probe
(dense.seg_eval, `--seg-epochs` epochs, probe seeded by the training seed). `--arm random-init` evaluates the
untrained tiny_v2 backbone (init seeded by the training seed): the floor every arm must clear.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curate_experiment.py                  # curate + all arms + summary
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curate_experiment.py --stage train --arm random --train-seeds 0 1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curate_experiment.py --stage summary

Writes benchmarks/out/curate_experiment/ (file lists, runs) and data/runs/curate_experiment.json.
"""
import argparse, json, os, sys, time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ARMS = ("random", "clusters", "retrieval", "combined")
BASELINE = "random-init"


def sources(shared):
    return {"imagenette": shared/"imagenette2-128"/"train", "flickr": shared/"captions-mini"/"train",
            "nyu": shared/"depth-mini"/"train", "camvid": shared/"camvid"/"train", "davis": shared/"davis2016-mini"/"JPEGImages"}


def eval_sets(shared):
    return {"imagenette val": shared/"imagenette2-128"/"val", "camvid val": shared/"camvid"/"val",
            "flickr val": shared/"captions-mini"/"val", "nyu val": shared/"depth-mini"/"val"}


def composition(pool, idx):
    return {name: int((pool.source[idx] == s).sum()) for s, name in enumerate(pool.names)}


def curate_stage(a, out):
    import torch
    torch.set_num_threads(1)
    from dino_from_scratch import curate as C
    t0, c0 = time.perf_counter(), time.process_time()
    shared = C.shared_data_dir()
    pool = C.image_pool(sources(shared), exclude=["*_depth.png"])
    evals = C.image_pool(eval_sets(shared), exclude=["*_depth.png"])
    assert not set(pool.paths) & set(evals.paths)
    rep = {"pool": composition(pool, np.arange(len(pool)))}
    # 1. copy descriptors: self- and relative deduplication
    cm, csize, cid = C.load_embedder("pixels:16")
    cp = C.embed_pool(cm, pool, out/"emb_copy", csize, embedder_id=cid)
    ev = C.embed_pool(cm, evals, out/"emb_eval_copy", csize, embedder_id=cid)
    rel = C.relative_dedup(cp.emb, ev.emb[ev.valid], a.threshold, valid=cp.valid)
    selfd = C.self_dedup(cp.emb, a.threshold, k=16, valid=cp.valid)
    safe = cp.valid & ~rel.drop                              # every arm: no unreadable image, no near-copy of an eval image
    dedup = safe & selfd.keep
    rep |= {"relative_dedup_dropped": composition(pool, np.flatnonzero(rel.drop)),
            "self_dedup_removed": composition(pool, np.flatnonzero(cp.valid & ~selfd.keep)),
            "self_dedup_pairs": int(len(selfd.pairs)), "after_dedup": int(dedup.sum()),
            "copy_embed_img_per_s": cp.meta["img_per_s"]}
    # 2. semantic embeddings
    run = Path(a.embedder) if a.embedder else C.find_run("tiny_v2")
    spec = str(run) if run and run.exists() else "random:tiny_v2"
    sm, ssize, sid = C.load_embedder(spec)
    sem = C.embed_pool(sm, pool, out/"emb_sem", ssize, embedder_id=sid)
    rep |= {"embedder": sid, "embedder_spec": spec, "sem_embed_img_per_s": sem.meta["img_per_s"]}
    rng = np.random.default_rng(a.seed)
    B = a.budget
    lists = {}
    # random: the uncurated baseline
    lists["random"] = np.sort(rng.permutation(np.flatnonzero(safe))[:B])
    # clusters: hierarchical k-means + balanced sampling on the deduplicated pool
    rows = np.flatnonzero(dedup & sem.valid)
    X = np.asarray(sem.emb[rows])
    h = C.hierarchical_kmeans(X, a.levels, n_resamples=10, seed=a.seed, progress=True)
    picked, counts = C.hierarchical_sample(h, B, seed=a.seed, return_counts=True)
    lists["clusters"] = rows[picked]
    rep["clusters_level1_sizes"] = h.sizes(0).tolist(); rep["clusters_level1_sampled"] = counts[0].tolist()
    plain = C.hierarchical_kmeans(X, a.levels[:1], n_resamples=0, seed=a.seed)     # for the figure: no hierarchy
    rep["plain_kmeans_sizes"] = plain.sizes(0).tolist()
    # retrieval: 50 seeds per Imagenette class
    cls = np.array([Path(p).parent.name if pool.source[i] == 0 else "" for i, p in enumerate(pool.paths)])
    seeds = np.concatenate([rng.permutation(np.flatnonzero((cls == c) & dedup & sem.valid))[:a.seeds_per_class]
                            for c in sorted(set(cls) - {""})])
    lists["retrieval"] = np.sort(rows[C.retrieve_samples(X, np.asarray(sem.emb[seeds]), budget=B)])
    # combined: half retrieval, half balanced clusters from what retrieval did not take
    r_half = rows[C.retrieve_samples(X, np.asarray(sem.emb[seeds]), budget=B // 2)]
    left = np.setdiff1d(rows, r_half)
    h2 = C.hierarchical_kmeans(np.asarray(sem.emb[left]), a.levels, n_resamples=10, seed=a.seed)
    c_half = left[C.hierarchical_sample(h2, B - len(r_half), seed=a.seed)]
    lists["combined"] = np.concatenate([np.sort(r_half), np.sort(c_half)])      # retrieval half first (homogeneous source)
    rep["combined_parts"] = [int(len(r_half)), int(len(c_half))]
    rep["n_seeds"] = int(len(seeds))
    for name, idx in lists.items():
        assert len(idx) == B == len(set(idx.tolist())), name
        C.write_file_list(out/f"{name}.csv", [pool.paths[i] for i in idx])
        rep[f"{name}_sources"] = composition(pool, idx)
    rep["seconds"], rep["cpu_s"] = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
    (out/"curation.json").write_text(json.dumps(rep, indent=1))
    print(json.dumps({k: v for k, v in rep.items() if "sizes" not in k and "sampled" not in k}, indent=1))


def read_list(f):
    import csv
    with open(f) as fh: return [r["path"] for r in csv.DictReader(fh)]


def evaluate(model, rec, seed, seg_epochs):
    from dino_from_scratch.curate import shared_data_dir
    from dino_from_scratch.dense import seg_eval
    from dino_from_scratch.eval import knn_eval
    t1, c1 = time.perf_counter(), time.process_time()
    knn = knn_eval(model, rec, data=str(shared_data_dir()/"imagenette2-128"), progress=False)
    seg = seg_eval(model, shared_data_dir()/"camvid", epochs=seg_epochs, seed=seed)
    return {"knn_top1": round(knn["top1"], 2), "knn_top5": round(knn["top5"], 2), "knn_n_test": knn.get("n_test"),
            "miou": round(100 * seg["miou"], 2), "pixel_acc": round(100 * seg["pixel_acc"], 2),
            "eval_seconds": round(time.perf_counter() - t1, 1), "eval_cpu_s": round(time.process_time() - c1, 1)}


def baseline_stage(a, out, seed):
    import torch
    torch.set_num_threads(1)
    from dino_from_scratch.config import get_recipe
    from dino_from_scratch.eval import random_backbone
    rec = get_recipe("tiny_v2")
    res = {"arm": BASELINE, "seed": seed, "n_images": 0, "steps": 0} | evaluate(random_backbone(rec, seed), rec, seed, a.seg_epochs)
    (out/f"result_{BASELINE}_s{seed}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


def train_stage(a, out, arm, seed):
    import torch
    torch.set_num_threads(1)
    from dino_from_scratch.config import get_recipe, override
    from dino_from_scratch.curate import MixedBatches
    from dino_from_scratch.data import ImageDataset
    from dino_from_scratch.eval import load_backbone
    from dino_from_scratch.cli import make_trainer
    paths = read_list(out/f"{arm}.csv")
    per_epoch = len(paths) // a.batch_size
    recipe = override(get_recipe("tiny_v2"), [f"optim.epochs={a.steps / per_epoch:.6f}", f"data.batch_size={a.batch_size}",
                                               "run.eval_at_end=false", "run.log_every=20", f"run.ckpt_every={a.steps}",
                                               f"run.seed={seed}", f"data.num_workers={a.workers}"])
    run_dir = out/"runs"/f"{arm}_s{seed}"
    if run_dir.exists(): import shutil; shutil.rmtree(run_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    tr = make_trainer(recipe, out=run_dir, dataset=ImageDataset(paths))
    if arm == "combined":
        n_r = json.loads((out/"curation.json").read_text())["combined_parts"][0]
        tr.batches = MixedBatches([n_r, len(paths) - n_r], a.batch_size, tr.acc.process_index, tr.acc.num_processes,
                                  seed, p=a.p)
        assert tr.batches.per_epoch == per_epoch
    tr.fit(max_steps=a.steps, progress=False)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    model, rec = load_backbone(run_dir)
    res = {"arm": arm, "seed": seed, "n_images": len(paths), "steps": tr.step, "batch_size": a.batch_size,
           "epochs": round(a.steps / per_epoch, 3)} | evaluate(model, rec, seed, a.seg_epochs)
    res |= {"final_loss": round(tr.history[-1]["loss"], 4), "train_seconds": round(train_s, 1), "train_cpu_s": round(train_cpu, 1),
            "img_per_s": round(tr.step * a.batch_size / train_s, 1)}
    if arm == "combined":
        h = tr.batches.homogeneous_steps(np.arange(tr.step))
        res["homogeneous_steps"] = int(h.sum())
    (out/f"result_{arm}_s{seed}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


def summary_stage(a, out):
    cur = json.loads((out/"curation.json").read_text())
    arms = {}
    for arm in (BASELINE,) + ARMS:
        runs = sorted((json.loads(f.read_text()) for f in out.glob(f"result_{arm}_s*.json")), key=lambda r: r["seed"])
        if not runs: continue
        mean = {k: round(float(np.mean([r[k] for r in runs])), 2) for k in ("knn_top1", "knn_top5", "miou", "pixel_acc")}
        spread = {f"{k}_range": round(float(np.ptp([r[k] for r in runs])), 2) for k in ("knn_top1", "miou")}
        arms[arm] = {"n_images": runs[0]["n_images"], "steps": runs[0]["steps"], "seeds": [r["seed"] for r in runs]} | mean | spread
        arms[arm] |= {"sources": cur.get(f"{arm}_sources", {}), "per_seed": runs}
    cmds = [json.loads(l) for l in (out/"commands.jsonl").read_text().splitlines()] if (out/"commands.jsonl").exists() else []
    cmds = [c for c in cmds if "summary" not in c["argv"]]               # the commands that produced results
    settings = {k: v for k, v in vars(a).items() if k not in ("stage", "arm", "json", "out", "train_seeds", "note")}
    settings |= {"embedder": cur["embedder"], "embedder_spec": cur.get("embedder_spec"), "retrieval_seeds": cur["n_seeds"],
                 "recipe": "tiny_v2", "threads": 1, "date": time.strftime("%Y-%m-%d"),
                 "note": "k-NN / mIoU per arm are means over the training seeds; *_range is max - min over them. " + a.note}
    res = {"settings": settings, "commands": cmds, "curation": cur, "arms": arms}
    dst = Path(a.json); dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(res, indent=1))
    print(f"{'arm':12s} {'seeds':>6s} {'k-NN':>6s} {'range':>6s} {'mIoU':>6s} {'range':>6s}  sources")
    for n, r in arms.items():
        print(f"{n:12s} {len(r['seeds']):6d} {r['knn_top1']:6.2f} {r['knn_top1_range']:6.2f} {r['miou']:6.2f} {r['miou_range']:6.2f}  {r['sources']}")
    print("wrote", dst)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="all", choices=["all", "curate", "train", "summary"])
    p.add_argument("--arm", default=None, choices=ARMS + (BASELINE,), help="one arm (default: the baseline and every arm)")
    p.add_argument("--out", default=str(REPO/"benchmarks/out/curate_experiment"))
    p.add_argument("--json", default=str(REPO/"data/runs/curate_experiment.json"))
    p.add_argument("--embedder", default=None, help="run directory of the embedding backbone (default: the shared tiny_v2 run)")
    p.add_argument("--budget", type=int, default=4000); p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32); p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threshold", type=float, default=0.95); p.add_argument("--levels", type=int, nargs="+", default=[400, 80, 16])
    p.add_argument("--seeds-per-class", type=int, default=50); p.add_argument("--p", type=float, default=0.1)
    p.add_argument("--seg-epochs", type=int, default=10); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0], help="training (and probe / random-init) seeds")
    p.add_argument("--note", default="", help="summary: a remark stored with the settings (how the runs went)")
    a = p.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    with open(out/"commands.jsonl", "a") as fh:
        fh.write(json.dumps({"argv": ["benchmarks/curate_experiment.py", *sys.argv[1:]], "start": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}) + "\n")
    if a.stage in ("all", "curate"): curate_stage(a, out)
    if a.stage in ("all", "train"):
        for seed in a.train_seeds:
            for arm in ([a.arm] if a.arm else (BASELINE,) + ARMS):
                if arm == BASELINE: baseline_stage(a, out, seed)
                else: train_stage(a, out, arm, seed)
    if a.stage in ("all", "summary"): summary_stage(a, out)


if __name__ == "__main__":
    main()
