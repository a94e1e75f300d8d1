"""tiny_v1 vs tiny_v2 on the same CPU time budget: k-NN on Imagenette and a linear CamVid probe, trained vs random init.

The measurement the DINOv2 chapters ask for. Each recipe trains for at most `--minutes` on `imagenette2-128/train`
(or an existing run is reused with `--v1-run` / `--v2-run`), then for each of {tiny_v1, tiny_v2} x {trained, random
init}: weighted k-NN top-1 (k=20, T=0.07) on `imagenette2-128/val` and the mIoU of a linear probe on frozen patch
features on CamVid val (`dense.seg_eval`). Optionally (`--highres-minutes`), a short high-resolution phase of tiny_v2
(crops x`--highres-scale`, position embedding interpolated, started from the trained weights with `run.init_from`)
is run and evaluated at both resolutions. Not part of CI (about 2 x minutes + 5).

    .venv/bin/python benchmarks/v1_vs_v2.py --minutes 20 --highres-minutes 3
    .venv/bin/python benchmarks/v1_vs_v2.py --v1-run benchmarks/out/tiny_v1 --minutes 20   # reuse a tiny_v1 run

Writes `<out>/result.json` and `<out>/curves.png` (loss and teacher entropy of both runs) and prints a table.
"""
import argparse, json, os, time
from pathlib import Path

import torch

from dino_from_scratch.config import get_recipe, override
from dino_from_scratch.cli import make_trainer
from dino_from_scratch.eval import knn_eval, load_backbone, random_backbone
from dino_from_scratch.dense import seg_eval


def train_run(recipe_name, data, minutes, out, extra=()):
    recipe = override(get_recipe(recipe_name), list(extra) + [f"data.path={json.dumps(data)}", "run.eval_at_end=false"])
    if out.exists():
        import shutil; shutil.rmtree(out)
    tr = make_trainer(recipe, out=out)
    t0 = time.perf_counter()
    tr.fit(max_minutes=minutes)
    dt = time.perf_counter() - t0
    return {"train_seconds": round(dt, 1), "steps": tr.step, "epochs": round(tr.step / tr.batches.per_epoch, 2),
            "img_per_s": round(tr.step * recipe.data.batch_size / dt, 1)}


def evaluate(model, recipe, data, camvid, eval_size=None):
    if eval_size: recipe = override(recipe, [f"data.eval_size={eval_size}"])
    knn = knn_eval(model, recipe, data, progress=False)
    seg = seg_eval(model, camvid)
    return {"knn_top1": round(knn["top1"], 2), "camvid_miou": round(100 * seg["miou"], 2), "eval_size": knn["eval_size"]}


def last_metrics(run):
    rows = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines() if l]
    return rows, rows[-1]


def plot(runs: dict, path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.2))
    for name, run in runs.items():
        rows, _ = last_metrics(run)
        ep = [r["epoch"] for r in rows]
        axs[0].plot(ep, [r["loss"] for r in rows], label=f"{name} total")
        if "dino_loss" in rows[0]: axs[0].plot(ep, [r["dino_loss"] for r in rows], "--", label=f"{name} DINO term")
        if "ibot_loss" in rows[0]: axs[0].plot(ep, [r["ibot_loss"] for r in rows], ":", label=f"{name} iBOT term")
        axs[1].plot(ep, [r["teacher_entropy"] for r in rows], label=name)
        axs[2].plot(ep, [r["teacher_batch_entropy"] for r in rows], label=name)
    for a, t in zip(axs, ["loss", "teacher per-sample entropy (nats)", "entropy of the batch-mean teacher (nats)"]):
        a.set_title(t, fontsize=9); a.set_xlabel("epoch"); a.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("DINO_DATA", "../shared/data/imagenette2-128"))
    p.add_argument("--camvid", default=os.environ.get("DINO_CAMVID", "../shared/data/camvid"))
    p.add_argument("--minutes", type=float, default=20.0, help="training budget per recipe")
    p.add_argument("--v1-run", default=None, help="reuse this tiny_v1 run directory instead of training")
    p.add_argument("--v2-run", default=None, help="reuse this tiny_v2 run directory instead of training")
    p.add_argument("--v2-set", nargs="*", default=[], metavar="FIELD=VALUE", help="overrides for tiny_v2 (ablations)")
    p.add_argument("--highres-minutes", type=float, default=0.0, help="length of tiny_v2's high-resolution phase (0: skip)")
    p.add_argument("--highres-scale", type=int, default=2, help="crop and evaluation size multiplier of that phase")
    p.add_argument("--highres-epochs", type=float, default=0.35, help="schedule length of that phase (epochs)")
    p.add_argument("--out", default="benchmarks/out/v1_vs_v2")
    a = p.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    res = {"minutes": a.minutes, "v2_overrides": a.v2_set, "torch": torch.__version__, "threads": torch.get_num_threads()}
    runs = {}
    for name, reuse, extra in (("tiny_v1", a.v1_run, []), ("tiny_v2", a.v2_run, a.v2_set)):
        run = Path(reuse) if reuse else out / name
        res[name] = {"run": str(run)}
        if not reuse: res[name] |= train_run(name, a.data, a.minutes, run, extra)
        runs[name] = run
        model, recipe = load_backbone(run)
        _, last = last_metrics(run)
        res[name] |= {"final_loss": round(last["loss"], 4), "final_teacher_entropy": round(last["teacher_entropy"], 3),
                      "final_teacher_batch_entropy": round(last["teacher_batch_entropy"], 3),
                      "trained": evaluate(model, recipe, a.data, a.camvid),
                      "random_init": evaluate(random_backbone(recipe), recipe, a.data, a.camvid)}
        print(json.dumps({name: res[name]}), flush=True)
    if a.highres_minutes:
        s = a.highres_scale
        _, r2 = load_backbone(runs["tiny_v2"])
        c = r2.data.crops
        extra = a.v2_set + [f"data.crops.global_size={c.global_size * s}", f"data.crops.local_size={c.local_size * s}",
                            f"model.img_size={r2.model.img_size * s}", f"run.init_from={runs['tiny_v2']}",
                            # a short phase that continues a finished run: a tenth of the peak lr, a slow teacher
                            f"optim.lr={r2.optim.lr / 10}", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
                            "optim.momentum_teacher=0.995", f"optim.epochs={a.highres_epochs}"]
        hr = out / "tiny_v2_highres"
        info = train_run("tiny_v2", a.data, a.highres_minutes, hr, extra)
        model, recipe = load_backbone(hr)
        base, _ = load_backbone(runs["tiny_v2"])
        res["tiny_v2_highres"] = info | {
            "eval_at_train_size": evaluate(model, recipe, a.data, a.camvid, r2.data.eval_size),
            "eval_at_high_size": evaluate(model, recipe, a.data, a.camvid, r2.data.eval_size * s),
            "before_phase_at_high_size": evaluate(base, r2, a.data, a.camvid, r2.data.eval_size * s)}
        print(json.dumps({"tiny_v2_highres": res["tiny_v2_highres"]}), flush=True)
    plot(runs, out / "curves.png")
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(f"\n{'':10s} {'kNN trained':>12s} {'kNN random':>11s} {'mIoU trained':>13s} {'mIoU random':>12s}")
    for name in ("tiny_v1", "tiny_v2"):
        t, r = res[name]["trained"], res[name]["random_init"]
        print(f"{name:10s} {t['knn_top1']:12.2f} {r['knn_top1']:11.2f} {t['camvid_miou']:13.2f} {r['camvid_miou']:12.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
