"""Distilled vs from-scratch student on the same CPU budget: k-NN on Imagenette (chapter 25).

Both arms train the SAME small student (tiny_v2 with `--student` overrides, default embed 64) at the same time,
each in its own process with one intra-op thread and the same wall-clock limit (the machine is shared: running them
side by side gives both the same conditions). Arm `distill`: the frozen tiny_v2 teacher (`--teacher`, a trained run
directory) makes the DINO/iBOT targets, the student is unmasked, KoLeo on; arm `scratch`: ordinary tiny_v2
self-distillation (EMA teacher of the same small size). Then `dino-eval knn` style k-NN (k=20, T=0.07) of each EMA.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill.py --minutes 15                  # runs/distill/bench
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill.py --student depth=2 --out runs/distill/bench_depth2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill.py --seed 1 --out runs/distill/bench_seed1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill.py --seed 2 --epochs 4 --out runs/distill/bench_seed2_e4
    .venv/bin/python benchmarks/distill.py --arm distill --minutes 1 --out /tmp/x   # one arm only (what the above launches)

Writes `<out>/result.json` (steps, img/s, k-NN top-1 of both arms and of the teacher) and `<out>/curves.png`.
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEACHER = REPO / "benchmarks/out/v1_vs_v2/tiny_v2"     # tiny_v2, 20 CPU minutes, k-NN 38.2 %


def recipe_for(student, epochs, data, seed=0):
    from dino_from_scratch.config import get_recipe, override
    sets = [f"model.{s}" for s in student] + [f"optim.epochs={epochs}", "run.eval_at_end=false", "run.log_every=20",
                                               "run.ckpt_every=200", f"run.seed={seed}"]
    if data: sets.append(f"data.path={json.dumps(data)}")
    return override(get_recipe("tiny_v2"), sets)


def run_arm(args):
    "Train one arm in this process (called by the launcher below)."
    import torch
    torch.set_num_threads(1)
    from dino_from_scratch.config import override
    from dino_from_scratch.cli import make_trainer
    r = recipe_for(args.student, args.epochs, args.data, args.seed)
    if args.arm == "distill":   # the same recipe with its distill section on: make_trainer picks the DistillTrainer
        r = override(r, ["distill.enabled=true", f"distill.teacher={json.dumps(str(args.teacher))}"])
    out = Path(args.out)
    tr = make_trainer(r, out=out)
    t0 = time.perf_counter()
    tr.fit(max_minutes=args.minutes, progress=False)
    dt = time.perf_counter() - t0
    (out / "train.json").write_text(json.dumps({"arm": args.arm, "steps": tr.step, "train_seconds": round(dt, 1),
        "epochs": round(tr.step / tr.batches.per_epoch, 2), "img_per_s": round(tr.step * r.data.batch_size / dt, 1)}))


def knn(run, data):
    from dino_from_scratch.eval import knn_eval, load_backbone
    model, recipe = load_backbone(run)
    return round(knn_eval(model, recipe, data, progress=False)["top1"], 2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15)
    p.add_argument("--epochs", type=float, default=3, help="schedule length of both arms (the time limit may stop them first)")
    p.add_argument("--student", nargs="*", default=["embed_dim=64"], help="ViT overrides of tiny_v2 for the student")
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    p.add_argument("--seed", type=int, default=0, help="run.seed of both arms (initialisation, data order, augmentations)")
    p.add_argument("--data", default=os.environ.get("DINO_DATA", str(REPO.parent / "shared/data/imagenette2-128")))
    p.add_argument("--out", default=str(REPO / "runs/distill/bench"))
    p.add_argument("--arm", choices=["distill", "scratch"], default=None, help="train only this arm (internal)")
    args = p.parse_args()
    if args.arm:
        return run_arm(args)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    procs = {}
    for arm in ("distill", "scratch"):   # side by side: the same machine load for both
        cmd = [sys.executable, __file__, "--arm", arm, "--out", str(out / arm), "--minutes", str(args.minutes),
               "--epochs", str(args.epochs), "--seed", str(args.seed), "--teacher", args.teacher, "--data", args.data, "--student", *args.student]
        procs[arm] = subprocess.Popen(cmd, env=env, stdout=open(out / f"{arm}.log", "w"), stderr=subprocess.STDOUT)
    for arm, pr in procs.items():
        if pr.wait(): sys.exit(f"arm {arm} failed, see {out / (arm + '.log')}")
    res = {"minutes": args.minutes, "epochs": args.epochs, "seed": args.seed, "student": args.student, "teacher": args.teacher}
    for arm in ("distill", "scratch"):
        res[arm] = json.loads((out / arm / "train.json").read_text()) | {"knn_top1": knn(out / arm, args.data)}
    res["teacher_knn_top1"] = knn(args.teacher, args.data)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    try:
        import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        for arm in ("distill", "scratch"):
            m = [json.loads(l) for l in (out / arm / "metrics.jsonl").read_text().splitlines()]
            ax[0].plot([x["step"] for x in m], [x["loss"] for x in m], label=arm)
            ax[1].bar(arm, res[arm]["knn_top1"])
        ax[0].set(xlabel="step", ylabel="loss", title="training loss"); ax[0].legend()
        ax[1].axhline(res["teacher_knn_top1"], color="k", ls="--", label="teacher"); ax[1].legend()
        ax[1].set(ylabel="k-NN top-1 (%)", title=f"same student, {args.minutes:g} CPU min")
        fig.tight_layout(); fig.savefig(out / "curves.png", dpi=100)
    except Exception as e:
        print("figure skipped:", e)


if __name__ == "__main__":
    main()
