"""The Gram-anchoring experiment in miniature (issue 4, chapter 22).

Evaluates every checkpoint of one or more run directories: k-NN top-1 on Imagenette (global quality), CamVid val
mIoU of a linear probe on frozen patch tokens (dense quality), and the mean cosine between each patch token and the
CLS token on CamVid val images (a patch-locality measure: it rises when patch features lose their local content
and drift towards the global one). Results are appended to a JSON-lines file and re-used (nothing is evaluated
twice), so the script can run while the training runs are still writing checkpoints.

    python benchmarks/gram_experiment.py eval runs/gramexp/nogram runs/gramexp/gram --out data/runs/gram_experiment.jsonl
    python benchmarks/gram_experiment.py plot data/runs/gram_experiment.jsonl --png data/runs/gram_experiment.png
"""
import argparse, json, os, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

from dino_from_scratch.eval import load_backbone, knn_eval
from dino_from_scratch.dense import seg_eval, load_seg_folder, prepare_images, default_seg_size
from dino_from_scratch.checkpoint import list_checkpoints


@torch.no_grad()
def patch_cls_cosine(model, images: torch.Tensor, size, batch_size: int = 16) -> float:
    "Mean over images and patches of cos(patch token, CLS token) after the final norm."
    vals = []
    for i in range(0, len(images), batch_size):
        out = model.forward_features(prepare_images(images[i:i + batch_size], size))
        vals.append(F.cosine_similarity(out["patches"], out["cls"][:, None], dim=-1).mean(1))
    return torch.cat(vals).mean().item()


def evaluate(ckpt: Path, camvid_val, seg_epochs: int) -> dict:
    model, recipe = load_backbone(ckpt)
    t0 = time.perf_counter()
    knn = knn_eval(model, recipe, progress=False)
    seg = seg_eval(model, epochs=seg_epochs)
    size = default_seg_size(model.patch_size)
    return {"knn_top1": knn["top1"], "camvid_miou": seg["miou"], "patch_cls_cos": patch_cls_cosine(model, camvid_val.images, size),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval"); e.add_argument("runs", nargs="+"); e.add_argument("--out", required=True)
    e.add_argument("--every", type=int, default=1, help="evaluate checkpoints whose step is a multiple of this"); e.add_argument("--seg-epochs", type=int, default=30)
    e.add_argument("--watch", action="store_true", help="keep polling for new checkpoints until the runs have a DONE file")
    q = sub.add_parser("plot"); q.add_argument("results"); q.add_argument("--png", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.cmd == "plot": return plot(a.results, a.png)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    camvid_val = load_seg_folder(None, "val")
    while True:
        done = {(r["run"], r["step"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
        todo = []
        for run in a.runs:
            cks = sorted(list_checkpoints(run))
            todo += [(Path(run), c) for c in cks if int(c.stem.split("_")[1]) % a.every == 0]
        todo = [(r, c) for r, c in todo if (r.name, int(c.stem.split("_")[1])) not in done]
        for run, c in todo:
            res = {"run": run.name, "step": int(c.stem.split("_")[1]), **evaluate(c, camvid_val, a.seg_epochs)}
            print(json.dumps(res), flush=True)
            with open(out, "a") as f: f.write(json.dumps(res) + "\n")
        if not a.watch or all((Path(r) / "DONE").exists() for r in a.runs) and not todo: break
        if not todo: time.sleep(30)


def plot(results, png):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in Path(results).read_text().splitlines() if l]
    fig, axs = plt.subplots(1, 3, figsize=(12, 3.2))
    for run in sorted({r["run"] for r in rows}):
        rr = sorted((r for r in rows if r["run"] == run), key=lambda r: r["step"])
        for ax, k in zip(axs, ("knn_top1", "camvid_miou", "patch_cls_cos")):
            ax.plot([r["step"] for r in rr], [r[k] for r in rr], "o-", ms=3, label=run)
    for ax, t in zip(axs, ("k-NN top-1 (Imagenette, %)", "CamVid linear mIoU", "mean cos(patch, CLS)")):
        ax.set_title(t); ax.set_xlabel("step"); ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
