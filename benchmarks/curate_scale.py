"""Time and peak memory of the curation steps (chapter 26) at 10^4, 10^5, 10^6 embeddings, and the growth exponent.

Random unit vectors (dimension --dim, default 64) stand in for embeddings: the cost of these steps depends on the
number and dimension of the vectors, not on what they encode (IVF recall does: random vectors are its worst case,
so the recall printed here is a lower bound for real, clustered embeddings). Every (step, n) runs in a fresh
process with one thread; time is wall clock and CPU time, memory is the rise of the process' peak resident set
(getrusage ru_maxrss) above its level after the vectors were made (tracemalloc would miss faiss' C++ allocations).

Steps, as the library runs them with default settings:
  dedup      self_dedup(x, 0.95, k=16): k-NN graph (exact Flat up to 200,000 vectors, IVF above) + components
  retrieval  retrieve_samples(x, 1,000 seeds, n_per_seed=4): index build + search
  hkmeans    hierarchical_kmeans(x, [sqrt(n), sqrt(n)/10], n_resamples=[0, 10]) + hierarchical_sample(n/10)
             (no resampling at level 1, as the official large-scale config does "for efficiency")
  embed      embed_pool on real images (Imagenette train), tiny_v2 ViT at 64 px and the pixel descriptor, batch 64

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curate_scale.py                       # all, ~5 CPU minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curate_scale.py --sizes 10000 100000 --json /tmp/s.json

Prints a table and writes --json (default data/runs/curate_scale.json).
"""
import argparse, json, math, os, resource, subprocess, sys, time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def vectors(n, dim, seed=0):
    import numpy as np
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def one(step, n, dim):
    "Run one step in this process; print one JSON line."
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from dino_from_scratch import curate
    if step == "embed":
        import tempfile
        pool = curate.image_pool([curate.shared_data_dir()/"imagenette2-128"/"train"])
        pool = pool.subset(np.arange(min(n, len(pool))))
        out = {}
        for spec in ("random:tiny_v2", "pixels:16"):
            m, size, eid = curate.load_embedder(spec)
            with tempfile.TemporaryDirectory() as d:
                base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                t0, c0 = time.perf_counter(), time.process_time()
                e = curate.embed_pool(m, pool, d, size, batch_size=64, embedder_id=eid, progress=False)
                out[spec] = {"img_per_s": round(len(pool) / (time.perf_counter() - t0), 1),
                             "cpu_s": round(time.process_time() - c0, 2), "n": len(pool), "dim": int(e.emb.shape[1]),
                             "peak_rise_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, 1)}
        print(json.dumps({"step": "embed", **out}))
        return
    x = vectors(n, dim)
    extra = {}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    if step == "dedup":
        r = curate.self_dedup(x, 0.95, k=16)
        extra = {"index": "flat" if n <= curate.FLAT_MAX else "ivf", "pairs": int(len(r.pairs))}
    elif step == "retrieval":
        seeds = vectors(1000, dim, seed=1)
        got = curate.retrieve_samples(x, seeds, n_per_seed=4)
        extra = {"index": "flat" if n <= curate.FLAT_MAX else "ivf", "retrieved": int(len(got))}
    elif step == "hkmeans":
        k1 = int(round(math.sqrt(n))); k2 = max(2, k1 // 10)
        h = curate.hierarchical_kmeans(x, [k1, k2], n_resamples=[0, 10])
        idx = curate.hierarchical_sample(h, n // 10)
        extra = {"levels": [k1, k2], "sampled": int(len(idx))}
    elif step == "recall":   # IVF (library defaults) against the exact search, 1,000 queries
        # plant 1,000 near-duplicates: the last 1,000 rows become noisy copies (cosine ~0.97) of the first 1,000
        rng = np.random.default_rng(2)
        noisy = x[:1000] + 0.25 / np.sqrt(dim) * rng.standard_normal((1000, dim)).astype(np.float32)
        x[-1000:] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
        q = x[:1000]
        _, exact = curate.knn_search(q, x, 16, "faiss", "flat", exclude_self=False)
        ix = curate.build_index(x, "ivf")
        _, approx = curate.knn_search(q, x, 16, "faiss", ix)
        dup = np.arange(n - 1000, n)
        extra = {"recall@16": round(float(np.mean([len(set(a) & set(b)) / 16 for a, b in zip(approx, exact)])), 3),
                 "planted_dup_cos": round(float(np.median((x[:1000] * x[-1000:]).sum(1))), 3),
                 "planted_dup_found": round(float(np.mean([d in set(a) for a, d in zip(approx, dup)])), 3),
                 "nlist": int(ix.nlist), "nprobe": int(ix.nprobe)}
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"step": step, "n": n, "dim": dim, "seconds": round(secs, 2), "cpu_s": round(cpu, 2),
                      "peak_rise_mb": round((peak - base) / 1024, 1), "peak_mb": round(peak / 1024, 1),
                      "data_mb": round(x.nbytes / 2**20, 1), **extra}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", nargs="*", default=["dedup", "retrieval", "hkmeans"])
    p.add_argument("--embed-images", type=int, default=2000, help="real images for the embed step (0: skip)")
    p.add_argument("--recall-at", type=int, nargs="*", default=None, help="sizes for the IVF recall check (default: the largest)")
    p.add_argument("--append", action="store_true", help="merge the rows into an existing --json")
    p.add_argument("--json", default=str(REPO / "data/runs/curate_scale.json"))
    p.add_argument("--one", nargs=3, metavar=("STEP", "N", "DIM"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one: return one(a.one[0], int(a.one[1]), int(a.one[2]))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [q for q in os.environ.get("PYTHONPATH", "").split(os.pathsep) if q]))
    def launch(step, n):
        r = subprocess.run([sys.executable, __file__, "--one", step, str(n), str(a.dim)], capture_output=True, text=True, env=env)
        if r.returncode: sys.exit(f"{step} at n={n} failed:\n{r.stderr[-3000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1]); print(json.dumps(row), flush=True)
        return row
    rows = [launch(s, n) for s in a.steps for n in a.sizes]
    rows += [launch("recall", n) for n in (a.recall_at if a.recall_at is not None else [max(a.sizes)])]
    if a.embed_images: rows.append(launch("embed", a.embed_images))
    if a.append and Path(a.json).exists():   # merge into an earlier run's rows (same step and n: replaced)
        new = {(r["step"], r.get("n")) for r in rows}
        rows = [r for r in json.loads(Path(a.json).read_text())["rows"] if (r["step"], r.get("n")) not in new] + rows
    # growth exponents between consecutive sizes: time ~ n^a
    print(f"\n{'step':10s} {'n':>9s} {'index':>6s} {'wall s':>8s} {'CPU s':>8s} {'peak rise MB':>13s} {'exponent (CPU)':>15s}")
    for s in dict.fromkeys(r["step"] for r in rows if r["step"] not in ("recall", "embed")):
        rs = sorted((r for r in rows if r["step"] == s), key=lambda r: r["n"])
        for i, r in enumerate(rs):
            if i:
                r["exponent"] = round(math.log(max(r["cpu_s"], 1e-3) / max(rs[i - 1]["cpu_s"], 1e-3)) / math.log(r["n"] / rs[i - 1]["n"]), 2)
            print(f"{s:10s} {r['n']:9d} {str(r.get('index', '-')):>6s} {r['seconds']:8.2f} {r['cpu_s']:8.2f} {r['peak_rise_mb']:13.1f} "
                  f"{str(r.get('exponent', '')):>15s}")
    for r in rows:
        if r["step"] in ("recall", "embed"): print(json.dumps(r))
    settings = {"dim": a.dim, "threads": 1, "vectors": "random unit Gaussian", "machine": "shared 2-core CPU box",
                "date": time.strftime("%Y-%m-%d")}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print("wrote", a.json)


if __name__ == "__main__":
    main()
