"""Distilled CPU ConvNeXt vs the same ConvNeXt from scratch vs the distilled ViT student: same teacher, same CPU time.

Three arms, each trained in its own process for the same budget of CPU seconds (`time.process_time` of that process:
one thread, data loading in the process (num_workers=0), and for the two distilled arms the frozen teacher's forward):

* `cnx_distilled`: chapter 28's CPU ConvNeXt (ConvNeXt-T's design at half its widths, depths 1-1-3-1, 2.61 M
  parameters, pseudo patch size 16 so that its tokens sit on the teacher's ViT/16 grid) distilled from the teacher
  run (`DistillTrainer(backbone=...)`: DINO + iBOT + KoLeo, student unmasked, DINOv3's scheme);
* `cnx_scratch`: the same ConvNeXt trained from scratch with the teacher's own recipe (chapter 12's DINOv2 trainer);
* `vit_distilled`: `distill_tiny`'s ViT student (the teacher's recipe at embed 64) distilled from the same teacher.

Every arm uses the teacher run's recipe (data, crops, heads, losses, seed) with a schedule as long as the steps its budget
affords: a pilot of 6 steps gives the CPU seconds per step, `optim.epoch_length` = steps / `optim.epochs`, so warm-up and
cosine decay end where training ends; training also stops when the budget is spent. Each arm's EMA backbone is then
evaluated: k-NN (k=20, Imagenette val at 64 px), CamVid linear segmentation mIoU and the NYU linear depth probe at
192x256. A last process evaluates the teacher and the ViT student's random init and times inference (images per
CPU-second of `forward_features`, one thread, models interleaved round by round). The ConvNeXt's random-init numbers
are read from `data/runs/convnext_vs_vit.json` (same model, same evaluation).

    DINO_DATA=/work/shared/data/imagenette2-128 DINO_CAMVID=/work/shared/data/camvid DINO_DEPTH=/work/shared/data/depth-mini \
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/distill_convnext.py --teacher /work/main/runs/tiny --budget 180 \
        --out /tmp/distill_convnext --json data/runs/distill_convnext.json
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from convnext_vs_vit import CPU_CONVNEXT, ConvNeXtV2Trainer, cpu_seconds_per_image, load_convnext_run, median_cpu_per_step  # noqa: E402

from dino_from_scratch.checkpoint import latest_good_checkpoint  # noqa: E402
from dino_from_scratch.config import DistillConfig, override, recipe_from_dict  # noqa: E402
from dino_from_scratch.data import resolve_data  # noqa: E402
from dino_from_scratch.dense import depth_eval, seg_eval  # noqa: E402
from dino_from_scratch.distill import DistillTrainer, load_student  # noqa: E402
from dino_from_scratch.eval import knn_eval, load_backbone, random_backbone  # noqa: E402

ARMS = ("cnx_distilled", "cnx_scratch", "vit_distilled")


def base_recipe(teacher: str):
    "The teacher run's recipe, one process, evaluated at 64 px (the k-NN protocol of chapter 28's table)."
    _, _, meta = latest_good_checkpoint(Path(teacher), verbose=False)
    return override(recipe_from_dict(meta["recipe"]), ["data.num_workers=0", "data.eval_size=64", "run.log_every=5"]), meta


def arm_recipe(arm: str, teacher: str):
    r, _ = base_recipe(teacher)
    r = override(r, [f"name={arm}"] + (["model.embed_dim=64"] if arm == "vit_distilled" else []))
    return r


def make_trainer(arm: str, recipe, out, dataset, teacher: str):
    if arm == "cnx_scratch": return ConvNeXtV2Trainer(recipe, out, dataset=dataset, verbose=False)
    cfg = DistillConfig(enabled=True, teacher=str(teacher))
    return DistillTrainer(recipe, out, dataset=dataset, verbose=False, distill=cfg,
                          backbone=CPU_CONVNEXT if arm == "cnx_distilled" else None)


def pilot(arm, recipe, dataset, teacher, n: int = 6) -> float:
    "CPU seconds per train step (median of steps 2..n), data loading and the teacher's forward included."
    with tempfile.TemporaryDirectory() as d:
        return median_cpu_per_step(make_trainer(arm, recipe, d, dataset, teacher), n)


def evaluate(m, recipe) -> dict:
    c0 = time.process_time()
    e = {"knn": knn_eval(m, recipe, progress=False)["top1"], "camvid_miou": seg_eval(m, size=(192, 256))["miou"]}
    d = depth_eval(m, size=(192, 256))
    return e | {"depth_rmse": d["rmse"], "depth_abs_rel": d["abs_rel"], "depth_delta1": d["delta1"],
                "eval_cpu_s": round(time.process_time() - c0, 1)}


def run_arm(arm: str, teacher: str, budget: float, out: Path) -> dict:
    torch.set_num_threads(1)
    recipe = arm_recipe(arm, teacher)
    ds, _ = resolve_data(None, "train", verbose=False)
    s = pilot(arm, recipe, ds, teacher)
    steps = max(1, int(budget / s))
    ep = max(1, round(steps / recipe.optim.epochs))
    recipe = override(recipe, [f"optim.epoch_length={ep}", f"run.ckpt_every={10 ** 6}"])
    print(f"[{arm}] pilot {s:.3f} CPU-s/step: schedule {recipe.optim.epochs:g} epochs x {ep} steps", flush=True)
    tr = make_trainer(arm, recipe, out / arm, ds, teacher)
    c0, w0 = time.process_time(), time.perf_counter()
    tr.should_stop = lambda deadline: time.process_time() - c0 > budget or tr.stop_signal is not None
    tr.fit(progress=False)
    train = {"pilot_cpu_s_per_step": round(s, 3), "schedule_steps": len(tr.sched), "steps": tr.step,
             "cpu_s": round(time.process_time() - c0, 1), "wall_s": round(time.perf_counter() - w0, 1),
             "final_loss": tr.history[-1]["loss"], "params": sum(p.numel() for p in tr.student.backbone.parameters())}
    print(f"[{arm}] trained: {train}", flush=True)
    m = load_convnext_run(out / arm, CPU_CONVNEXT)[0] if arm == "cnx_scratch" else load_student(out / arm)[0]
    res = {"train": train, "eval": evaluate(m, recipe)}
    print(f"[{arm}] eval: {res['eval']}", flush=True)
    return res


def run_baselines(teacher: str, out: Path) -> dict:
    "The teacher and the ViT student's random init, evaluated; inference speed of the trained models, interleaved."
    torch.set_num_threads(1)
    recipe = arm_recipe("vit_distilled", teacher)
    t, _ = load_backbone(teacher)
    torch.manual_seed(0)
    res = {"eval": {"teacher": evaluate(t, recipe), "vit_student_random": evaluate(random_backbone(recipe, 0), recipe)}}
    models = {"cnx_distilled": load_student(out / "cnx_distilled")[0], "cnx_scratch": load_convnext_run(out / "cnx_scratch", CPU_CONVNEXT)[0],
              "vit_distilled": load_student(out / "vit_distilled")[0], "teacher": t}
    res["params"] = {k: sum(q.numel() for q in m.parameters()) for k, m in models.items()}
    for name, size, batch in (("64px", (64, 64), 64), ("192x256", (192, 256), 8)):
        s = cpu_seconds_per_image(models, size, batch)
        res[f"img_per_cpu_s_{name}"] = {k: round(1 / v, 1) for k, v in s.items()}
        print(f"[speed] {name}: {res[f'img_per_cpu_s_{name}']}", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="our run directory (backbone and heads), e.g. the `tiny` flagship run")
    ap.add_argument("--budget", type=float, default=180.0, help="CPU seconds of training per arm")
    ap.add_argument("--out", default="runs/distill_convnext")
    ap.add_argument("--json", default="data/runs/distill_convnext.json")
    ap.add_argument("--scratch-json", default="data/runs/convnext_vs_vit.json")
    ap.add_argument("--arm", default=None, help="internal: run one arm (or 'baselines') in this process")
    ap.add_argument("--arms", default=",".join(ARMS) + ",baselines")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.arm:   # a child process: one arm, its result as JSON in out/<arm>.json
        out.mkdir(parents=True, exist_ok=True)
        r = run_baselines(args.teacher, out) if args.arm == "baselines" else run_arm(args.arm, args.teacher, args.budget, out)
        (out / f"{args.arm}.json").write_text(json.dumps(r, indent=1))
        return
    jp = Path(args.json)
    res = json.loads(jp.read_text()) if jp.exists() else {}
    _, meta = base_recipe(args.teacher)
    res |= {"command": " ".join(["python"] + sys.argv), "teacher": f"{args.teacher} (recipe {meta['recipe']['name']}, step {meta['step']})",
            "budget_cpu_s": args.budget, "threads": 1, "date": time.strftime("%Y-%m-%d"),
            "convnext": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(CPU_CONVNEXT).items()}}
    for arm in args.arms.split(","):   # one after the other, each in a fresh process (its own CPU clock)
        subprocess.run([sys.executable, __file__, "--teacher", args.teacher, "--budget", str(args.budget), "--out", str(out),
                        "--arm", arm], check=True, env=os.environ)
        res[arm] = json.loads((out / f"{arm}.json").read_text())
        jp.write_text(json.dumps(res, indent=1))
    sj = Path(args.scratch_json)
    if sj.exists():
        s = json.loads(sj.read_text())
        res["convnext_random"] = {"source": str(sj), "eval": s["evals"]["convnext_random"]}
    jp.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
