"""Distillation into the CPU-sized ConvNeXt of chapter 28, next to a ViT student, from ONE teacher forward per step.

One `MultiDistillTrainer` run trains two students from a tiny_v2 teacher run: the ViT student of `distill_tiny`
(embed 64) and chapter 28's CPU ConvNeXt (dims 48-96-192-384, depths 1-1-3-1, pseudo patch size 16, so that its
map sits on the teacher's ViT/16 grid and one teacher forward serves both). The CPU seconds of each student's steps
and of the shared teacher forward are measured. The distilled students and the teacher are then evaluated like
`benchmarks/convnext_vs_vit.py` evaluates its models (k-NN k=20 on Imagenette val at 64 px, CamVid linear
segmentation and the NYU linear depth probe at 192x256, CPU time per image of `forward_features`); the same ConvNeXt
trained from scratch for the same number of steps (210, 213 CPU-s) is read from `data/runs/convnext_vs_vit.json`.

    PYTHONPATH=. .venv/bin/python benchmarks/distill_convnext.py --teacher runs/tiny_v2 --steps 210 \
        --out runs/distill_convnext --json data/runs/distill_convnext.json
"""
import argparse, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from convnext_vs_vit import CPU_CONVNEXT, cpu_seconds_per_image  # noqa: E402

from dino_from_scratch.checkpoint import latest_good_checkpoint  # noqa: E402
from dino_from_scratch.config import DistillConfig, override, recipe_from_dict  # noqa: E402
from dino_from_scratch.convnext import ConvNeXt  # noqa: E402
from dino_from_scratch.dense import depth_eval, seg_eval  # noqa: E402
from dino_from_scratch.distill import MultiDistillTrainer, load_student  # noqa: E402
from dino_from_scratch.eval import knn_eval, load_backbone, random_backbone  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="a tiny_v2 run directory (backbone and heads)")
    ap.add_argument("--steps", type=int, default=210)
    ap.add_argument("--out", default="runs/distill_convnext")
    ap.add_argument("--json", default=None)
    ap.add_argument("--scratch-json", default="data/runs/convnext_vs_vit.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _, _, meta = latest_good_checkpoint(Path(args.teacher), verbose=False)
    t_recipe = recipe_from_dict(meta["recipe"])
    recipe = override(t_recipe, ["name=distill_convnext", "model.embed_dim=64", "data.num_workers=0",
                                 f"run.ckpt_every={args.steps}", "run.log_every=10"])
    dcfg = DistillConfig(enabled=True, teacher=str(args.teacher), students=[{"name": "vit"}, {"name": "cnx"}])
    res = {"teacher": f"{args.teacher} (tiny_v2, step {meta['step']})", "steps": args.steps, "threads": 1,
           "convnext": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(CPU_CONVNEXT).items()}}
    out = Path(args.out)
    mt = MultiDistillTrainer(recipe, out=out, distill=dcfg, backbones={"cnx": CPU_CONVNEXT}, verbose=False)
    cpu = {"teacher_forward": 0.0, "vit": 0.0, "cnx": 0.0}
    t0 = mt.trainers[0]
    inner_tf = t0.teacher_features
    def timed_tf(*a, **kw):
        c = time.process_time(); r = inner_tf(*a, **kw); cpu["teacher_forward"] += time.process_time() - c; return r
    t0.teacher_features = timed_tf
    for tr in mt.trainers:
        def timed(crops, tr=tr, inner=tr.train_step):
            c = time.process_time(); r = inner(crops); cpu[tr.name] += time.process_time() - c; return r
        tr.train_step = timed
    w0 = time.perf_counter()
    mt.fit(max_steps=args.steps, progress=False)
    res["train"] = {"wall_s": round(time.perf_counter() - w0, 1), "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
                    "final_loss": {tr.name: tr.history[-1]["loss"] for tr in mt.trainers}}
    print(f"[train] {res['train']}", flush=True)
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))

    vit, _ = load_student(out / "vit")
    cnx, _ = load_student(out / "cnx")
    teacher, _ = load_backbone(args.teacher)
    torch.manual_seed(0)
    models = {"convnext_distilled": cnx, "vit_student_distilled": vit, "teacher": teacher,
              "vit_student_random": random_backbone(recipe, 0)}
    res["params"] = {k: sum(q.numel() for q in m.parameters()) for k, m in models.items()}
    for name, size, batch in (("64px", (64, 64), 64), ("192x256", (192, 256), 8)):
        s = cpu_seconds_per_image({"vit_student": vit, "convnext": cnx, "teacher": teacher}, size, batch)
        res[f"img_per_cpu_s_{name}"] = {k: round(1 / v, 1) for k, v in s.items()}
        print(f"[speed] {name}: {res[f'img_per_cpu_s_{name}']}", flush=True)
    res["evals"] = {}
    for k, m in models.items():
        c0 = time.process_time()
        e = {"knn": knn_eval(m, recipe, progress=False)["top1"], "camvid_miou": seg_eval(m, size=(192, 256))["miou"]}
        d = depth_eval(m, size=(192, 256))
        e |= {"depth_rmse": d["rmse"], "depth_abs_rel": d["abs_rel"], "depth_delta1": d["delta1"], "cpu_s": round(time.process_time() - c0, 1)}
        res["evals"][k] = e
        print(f"[eval] {k}: " + json.dumps({a: round(b, 4) for a, b in e.items()}), flush=True)
        if args.json: Path(args.json).write_text(json.dumps(res, indent=1))
    sj = Path(args.scratch_json)
    if sj.exists():
        s = json.loads(sj.read_text())
        res["from_scratch"] = {"source": str(sj), "steps": s["steps"], "train_cpu_s": s["train"]["cpu_s"],
                               "convnext_scratch": s["evals"][f"convnext_step{s['steps']}"], "convnext_random": s["evals"]["convnext_random"]}
    print(json.dumps(res))
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
