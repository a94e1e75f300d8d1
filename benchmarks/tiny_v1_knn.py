"""tiny_v1 on a CPU budget: train for at most N minutes, then k-NN of the trained teacher vs. random init.

The acceptance measurement of the DINOv1 chapters: `tiny_v1`, trained for at most 20 minutes on a 2-core CPU on
`imagenette2-128/train`, must reach a weighted k-NN top-1 (k=20, T=0.07) on `imagenette2-128/val` at least
10 points above the same architecture at random initialisation. Not part of CI (it takes ~25 minutes).

    .venv/bin/python benchmarks/tiny_v1_knn.py --minutes 20 --data ../shared/data/imagenette2-128
    .venv/bin/python benchmarks/tiny_v1_knn.py --set optim.momentum_teacher=0.996   # an ablation

It prints the training time, images/s, both k-NN numbers and their difference as a table and as one JSON line, and
writes `<out>/curves.png` (loss and teacher entropies) next to the run's metrics.jsonl.
"""
import argparse, json, os, time
from pathlib import Path

import torch

from dino_from_scratch.config import get_recipe, override
from dino_from_scratch.cli import make_trainer
from dino_from_scratch.eval import knn_eval, load_backbone, random_backbone


def plot_curves(metrics_path: Path, out_png: Path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l]
    step = [r["step"] for r in rows]
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.2))
    axs[0].plot(step, [r["loss"] for r in rows]); axs[0].set_title("DINO loss"); axs[0].set_xlabel("step")
    axs[1].plot(step, [r["teacher_entropy"] for r in rows], label="per-sample entropy")
    axs[1].plot(step, [r["teacher_batch_entropy"] for r in rows], label="entropy of the batch mean")
    axs[1].set_title("teacher entropy (nats)"); axs[1].set_xlabel("step"); axs[1].legend()
    fig.tight_layout(); fig.savefig(out_png, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny_v1")
    p.add_argument("--data", default=os.environ.get("DINO_DATA", "../shared/data/imagenette2-128"))
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget for training")
    p.add_argument("--out", default="benchmarks/out/tiny_v1")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    p.add_argument("--skip-train", action="store_true", help="only evaluate an existing run in --out")
    a = p.parse_args()
    recipe = override(get_recipe(a.recipe), a.set + [f"data.path={json.dumps(a.data)}", "run.eval_at_end=false"])
    out = Path(a.out)
    t_train = None
    if not a.skip_train:
        if out.exists():
            import shutil; shutil.rmtree(out)
        tr = make_trainer(recipe, out=out)
        t0 = time.perf_counter()
        hist = tr.fit(max_minutes=a.minutes)
        t_train = time.perf_counter() - t0
        n_images = tr.step * recipe.data.batch_size
    model, recipe = load_backbone(out)
    knn = knn_eval(model, recipe, a.data, progress=False)
    knn0 = knn_eval(random_backbone(recipe), recipe, a.data, progress=False)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    plot_curves(out / "metrics.jsonl", out / "curves.png")
    res = {"recipe": recipe.name, "overrides": a.set, "steps": rows[-1]["step"], "epochs": round(rows[-1]["epoch"], 2),
           "train_seconds": round(t_train, 1) if t_train else None,
           "img_per_s": round(n_images / t_train, 1) if t_train else None,
           "knn_top1": round(knn["top1"], 2), "knn_top1_random_init": round(knn0["top1"], 2),
           "gain_points": round(knn["top1"] - knn0["top1"], 2),
           "final_loss": round(rows[-1]["loss"], 4), "final_teacher_entropy": round(rows[-1]["teacher_entropy"], 3),
           "final_teacher_batch_entropy": round(rows[-1]["teacher_batch_entropy"], 3),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"\n{'recipe':28s} {res['recipe']} {' '.join(a.set)}")
    for k in ("steps", "epochs", "train_seconds", "img_per_s", "knn_top1", "knn_top1_random_init", "gain_points",
              "final_loss", "final_teacher_entropy", "final_teacher_batch_entropy"):
        print(f"{k:28s} {res[k]}")
    print(json.dumps(res))
    (out / "result.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
