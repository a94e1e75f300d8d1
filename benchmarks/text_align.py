"""dino.txt at CPU scale (chapter 27): trained vs random-init frozen backbone, with and without the patch half.

Four arms, each `text.tiny_align_config()` (batch 128, 240 steps, 128 px, one intra-op thread) on captions-mini train:
{trained tiny_v2, the same architecture at random init (seed 0)} x {CLS + mean patch (dino.txt), CLS only (LiT)}.
Each is evaluated on captions-mini val retrieval (R@1/5/10 both ways), Imagenette val zero-shot top-1 (prompt
ensembling), CamVid val open-vocabulary mIoU and pointing game (at 96x128 and 192x256; CamVid val and train). Also measured in the same run: training
images/s with cached frozen tokens against running the frozen backbone in every step (the reason for the cache),
and the mIoU of constant predictions (the floor).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_align.py                     # runs/text_align, ~20 CPU minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_align.py --arms trained:cls_patch --steps 20 --out /tmp/ta  # smoke

Writes `<out>/result.json` and, with `--save`, data/runs/text_align_result.json (what the chapter plots). Each arm's run
directory `<out>/<arm>` holds metrics.jsonl and checkpoints; an arm that already finished is resumed (no retraining).
"""
import argparse, json, os, sys, time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def find_backbone() -> Path:
    for c in (os.environ.get("DINO_ALIGN_BACKBONE"), REPO / "runs/tiny_v2", REPO.parent / "shared_runs/tiny_v2"):
        if c and Path(c).is_dir() and list(Path(c).glob("checkpoints/step_*.safetensors")): return Path(c)
    sys.exit("no trained tiny_v2 run found: train one (dino-train --recipe tiny_v2) or set DINO_ALIGN_BACKBONE")


def cache_speed(trainer, steps: int = 4) -> dict:
    "Images/s of train steps over cached tokens vs the same steps also running the frozen backbone on decoded images."
    from dino_from_scratch.text import load_square, normalize_images
    bb, data = trainer.model.visual_model.backbone, trainer._data
    n = trainer.cfg.batch_size
    def step_with_backbone():
        idx = torch.randint(len(data.sources), (n,))
        x = normalize_images(torch.stack([load_square(data.sources[i], trainer.cfg.image_size) for i in idx]))
        with torch.no_grad(): trainer.model.visual_model.backbone_tokens(x)
    t = {"cached": 0.0, "backbone": 0.0}
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt = {k: v for k, v in trainer.opt.optimizer.state_dict().items()}
    s0 = trainer.step
    for _ in range(steps):                                   # interleaved: both see the same background load
        t0 = time.process_time(); trainer.train_step(); t["cached"] += time.process_time() - t0
        t0 = time.process_time(); step_with_backbone(); trainer.train_step(); t["backbone"] += time.process_time() - t0
    trainer.model.load_state_dict(state); trainer.opt.optimizer.load_state_dict(opt); trainer.step = s0
    return {"img_per_cpu_s_cached": steps * n / t["cached"], "img_per_cpu_s_backbone_each_step": steps * n / t["backbone"],
            "speedup": t["backbone"] / t["cached"], "batch": n, "steps": steps}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default=None)
    p.add_argument("--out", default=str(REPO / "runs/text_align"))
    p.add_argument("--cache", default=str(REPO / "runs/text_cache"))
    p.add_argument("--arms", default="trained:cls_patch,random:cls_patch,trained:cls,random:cls")
    p.add_argument("--steps", type=int, default=None, help="override the steps of tiny_align_config (smoke runs)")
    p.add_argument("--save", action="store_true", help="also write data/runs/text_align_result.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    from dino_from_scratch.eval import load_backbone, random_backbone
    from dino_from_scratch.text import AlignTrainer, evaluate_aligned, load_captions, tiny_align_config
    from dino_from_scratch.dense import load_seg_folder, miou
    src = Path(args.backbone) if args.backbone else find_backbone()
    trained, recipe = load_backbone(src)
    backbones = {"trained": (trained, str(src)), "random": (random_backbone(recipe, seed=0), f"random init of {src} (seed 0)")}
    data = load_captions(None, "train")
    out, res = Path(args.out), {"backbone": str(src), "arms": {}}
    res["config"] = tiny_align_config(**({"steps": args.steps} if args.steps else {})).__dict__
    for arm in args.arms.split(","):
        which, variant = arm.split(":")
        cfg = tiny_align_config(use_patches=variant == "cls_patch", **({"steps": args.steps} if args.steps else {}))
        bb, source = backbones[which]
        tr = AlignTrainer(cfg, bb, data, out / f"{which}_{variant}", resume=True, cache_dir=args.cache, backbone_source=source,
                          progress=False)
        tr._data = data
        t0 = time.time()
        tr.fit(progress=False)
        print(f"[{arm}] {tr.step} steps, {tr.train_seconds:.0f} s wall, {tr.cpu_seconds:.0f} s CPU "
              f"({time.time() - t0:.0f} s this call)", flush=True)
        hist = [json.loads(l) for l in (out / f"{which}_{variant}" / "metrics.jsonl").read_text().splitlines()]
        r = {"steps": tr.step, "train_seconds": tr.train_seconds, "cpu_seconds": tr.cpu_seconds,
             "img_per_s": tr.step * cfg.batch_size / max(tr.train_seconds, 1e-9),
             "img_per_cpu_s": tr.step * cfg.batch_size / max(tr.cpu_seconds, 1e-9), "final_loss": hist[-1]["loss"],
             "final_temperature": hist[-1]["temperature"], "loss_curve": [(m["step"], round(m["loss"], 4)) for m in hist]}
        for size in ((96, 128), (192, 256)):
            e = evaluate_aligned(tr.model, tr.tokenizer, seg_size=size, cache_dir=args.cache)
            r.setdefault("retrieval", e.get("retrieval")); r.setdefault("zero_shot", e.get("zero_shot"))
            r[f"segmentation_{size[0]}x{size[1]}"] = e.get("segmentation")
            r[f"camvid_train_{size[0]}x{size[1]}"] = e.get("segmentation_camvid_train")
        if arm == "trained:cls_patch": res["cache_speed"] = cache_speed(tr)
        res["arms"][arm] = r
        rr, z, s = r["retrieval"], r["zero_shot"], r["segmentation_96x128"]
        print(f"[{arm}] i2t R@1/5/10 {rr['i2t_r1']:.1f}/{rr['i2t_r5']:.1f}/{rr['i2t_r10']:.1f}  t2i {rr['t2i_r1']:.1f}/"
              f"{rr['t2i_r5']:.1f}/{rr['t2i_r10']:.1f}  zero-shot {z['top1']:.1f} (1 template {z['top1_one_template']:.1f})  "
              f"mIoU 96x128 {s['miou']:.2f}, 192x256 {r['segmentation_192x256']['miou']:.2f}  pointing val {s['pointing']['mean']:.1f} "
              f"train {r['camvid_train_96x128']['pointing']['mean']:.1f}", flush=True)
        (out / "result.json").write_text(json.dumps(res, indent=1))
    seg = load_seg_folder(None, "val")
    res["segmentation_constant"] = {c: miou(torch.full_like(seg.masks, k), seg.masks)["miou"] * 100
                                    for c, k in (("sky", 0), ("building", 1), ("road", 3))}
    (out / "result.json").write_text(json.dumps(res, indent=1))
    if args.save: (REPO / "data/runs/text_align_result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "arms"}, indent=1))


if __name__ == "__main__":
    main()
